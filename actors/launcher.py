"""Creates the Ray actors of a run: the learner and the rollout engines, and the weight sync between them."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray

from .learner import Learner
from .rollout import RolloutEngine, engine_env
from .weight_sync import make_sync, resolve_backend

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR", "SDFT_CACHE", "HF_HOME",
              "TRITON_INTERPRET", "WANDB_MODE", "HF_HUB_OFFLINE")


def _passthrough_env() -> dict[str, str]:
    """Cache locations and switches the driver was given travel to every actor."""
    return {k: os.environ[k] for k in CACHE_VARS if k in os.environ}


def init_ray(address: str | None, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a private local instance, loopback only
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Actors:
    learner: ray.actor.ActorHandle
    engines: list
    sync: object  # ObjectStoreSync | GpuSync

    def shutdown(self) -> None:
        for a in [self.learner, *self.engines]:
            ray.kill(a)


def launch(cfg, model_path: str, total_steps: int, with_engines: bool = True) -> Actors:
    """Start learner + engines (GPU when the cluster has them) and wire the weight sync."""
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = 1 if on_gpu else 0
    env = _passthrough_env()
    # TRITON_INTERPRET must be set before triton is imported; only the CPU learner needs it.
    learner_env = {**env, **({} if on_gpu else {"TRITON_INTERPRET": "1"}), "OMP_NUM_THREADS": "1"}
    cfg_dict = cfg.model_dump()
    learner = ray.remote(Learner).options(
        num_cpus=cfg.ray.learner_cpus, num_gpus=gpus, runtime_env={"env_vars": learner_env},
    ).remote(cfg_dict, model_path, total_steps, master_port=_free_port())
    engines = []
    if with_engines:
        engine_vars = {**env, **engine_env(cfg.rollout.cpu_kv_cache_gib)}
        engines = [
            ray.remote(RolloutEngine).options(
                num_cpus=cfg.ray.rollout_cpus, num_gpus=gpus,
                runtime_env={"env_vars": engine_vars},
            ).remote(model_path, cfg_dict, i)
            for i in range(cfg.rollout.num_engines)
        ]
    backend = resolve_backend(cfg.sync.backend, on_gpu)
    dtype = None if not on_gpu else ("bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype)
    ray.get([learner.__ray_ready__.remote(), *[e.__ray_ready__.remote() for e in engines]])
    return Actors(learner, engines, make_sync(backend, learner, engines, dtype) if engines else None)
