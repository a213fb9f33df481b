"""Creates the Ray actors of a run — M learner ranks and N rollout engines placed through Ray placement
groups — and the weight sync between them.

* `disaggregated`: learner ranks and engines get bundles of their own (separate GPUs, possibly nodes);
  each role's bundles are packed together.
* `colocated`: bundle i holds learner rank i and engine i on one GPU (half a GPU each as far as Ray is
  concerned); on GPU the engines sleep while the learner trains.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import Config
from pipeline.errors import PlacementError

from .net import LOOPBACK, free_port, loopback_store
from .rollout import RolloutEngine, engine_env
from .weight_sync import LEARNER_CONCURRENCY, WeightSync, resolve_backend

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR", "SDFT_CACHE", "HF_HOME",
              "TRITON_INTERPRET", "WANDB_MODE", "HF_HUB_OFFLINE")


def _passthrough_env() -> dict[str, str]:
    """Cache locations and switches the driver was given travel to every actor."""
    return {k: os.environ[k] for k in CACHE_VARS if k in os.environ}


_private_temp: str | None = None  # temp dir of the private Ray instance this process started, while it runs


def _loopback_interface() -> str:
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.address == LOOPBACK for a in addrs)), "lo")


def private_env() -> dict[str, str]:
    """Environment of every process of a private instance (Ray's processes pass it on to the actors):
    * RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray swaps a loopback `_node_ip_address` for the host's address unless
      clusters are off; with them off GCS, raylet, workers, agents and metrics endpoints all bind 127.0.0.1.
    * GLOO_SOCKET_IFNAME: gloo groups (the CPU learner's, vLLM's on CPU) listen on loopback, not wherever the
      host name resolves to; NCCL_SOCKET_IFNAME the same for NCCL's bootstrap on GPU (one machine: its data goes
      over NVLink/PCIe, not sockets)."""
    lo = _loopback_interface()
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}


@contextmanager
def _environ(updates: dict[str, str]):
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_private_ray(num_cpus: int | None = None, **options) -> None:
    """Start a Ray instance for this process alone: every server on 127.0.0.1, no dashboard, a temp dir of its
    own that `stop_private_ray` (also run at exit) deletes. `options` go to ray.init.

    No idle workers are prestarted for the driver: every actor of a run gets a process of its own (its runtime
    env differs), so they would only take CPU from the start of the actors that matter."""
    global _private_temp
    from ray._private import ray_constants

    # short: Ray's unix sockets live under it and their paths are limited to 107 bytes
    root = tempfile.gettempdir() if len(tempfile.gettempdir()) <= 32 else "/tmp"
    temp = tempfile.mkdtemp(prefix="sdft-ray-", dir=root)
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # what the env var says, for this already-imported Ray
    try:
        with _environ(private_env()):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                     _temp_dir=temp, _system_config={"prestart_worker_first_driver": False}, **options)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters
    _private_temp = temp
    atexit.unregister(stop_private_ray)
    atexit.register(stop_private_ray)  # after Ray's own hook, so it runs first


def stop_private_ray() -> None:
    """Shut down the private instance this process started (its processes stopped) and delete its temp dir."""
    global _private_temp
    if _private_temp is None:
        return
    ray.shutdown(wait_for_processes=True)
    shutil.rmtree(_private_temp, ignore_errors=True)
    _private_temp = None


def is_private() -> bool:
    """Whether Ray runs as the private instance this process started (everything on this machine)."""
    return _private_temp is not None and ray.is_initialized()


def init_ray(address: str | None, num_cpus: int | None) -> None:
    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)  # the CLI's (SIGTERM takes Ctrl-C's path); Ray's native one replaces it
    _init_ray(address, num_cpus)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
    else:  # a private local instance on loopback ("local": never join another cluster found on this machine)
        # Ray warns on every start that it chose token auth by default; for a private instance that is expected.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda r: not r.getMessage().startswith("Token authentication is enabled"))
        start_private_ray(num_cpus, logging_level=logging.WARNING)


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Address and a free port on the node of learner rank 0 (runs in rank 0's bundle)."""
    return ray.util.get_node_ip_address(), free_port()


@dataclass
class Actors:
    learners: list
    engines: list
    sync: WeightSync | None = None
    teachers: list = field(default_factory=list)  # the teacher engine pool (cfg.teacher_pool)
    teacher_sync: WeightSync | None = None  # phi to the pool (teacher.kind=ema)
    placement_groups: list = field(default_factory=list)
    colocated: bool = False
    store: object = None  # the learners' rendezvous store when this process serves it (a private instance)

    @property
    def learner(self):
        """Rank 0: the one that exports weights and writes the HF checkpoint."""
        return self.learners[0]

    def shutdown(self, wait: bool = False) -> None:
        """Kill every actor and free the placement groups; with `wait`, return once Ray reports the actors dead."""
        killed = [*self.learners, *self.engines, *self.teachers]
        for a in killed:
            ray.kill(a, no_restart=True)
        if wait:
            for a in killed:
                try:
                    ray.get(a.__ray_ready__.remote(), timeout=60)
                except Exception:  # noqa: BLE001 — dead is the point
                    pass
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.store = None  # stops its server


def _bundle(cpus: float, gpus: float, extra: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **extra}


def _check_fits(bundles: list[dict]) -> None:
    """A bundle larger than every node of the cluster can never be placed: say so at once, not after the wait (unless
    ray.autoscaling: a node that holds it may still be started)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for b in bundles:
        if nodes and not any(all(node.get(k, 0) >= v for k, v in b.items() if v) for node in nodes):
            raise PlacementError(
                f"no node of the Ray cluster can ever host bundle {b}: its nodes have "
                f"{[{k: v for k, v in n.items() if k in b} for n in nodes]}. Lower ray.learner_cpus / ray.rollout_cpus "
                "or the per-role resources, or add a larger node (on a cluster that starts nodes on demand: "
                "ray.autoscaling=true).")


def _reserve(bundles: list[dict], strategy: str, r) -> ray.util.placement_group.PlacementGroup:
    """`r`: the config's ray section (autoscaling, placement_timeout_s)."""
    if not r.autoscaling:
        _check_fits(bundles)
    pg = placement_group(bundles, strategy=strategy)
    if not pg.wait(r.placement_timeout_s):
        remove_placement_group(pg)
        raise PlacementError(
            f"the Ray cluster cannot host bundles {bundles} (strategy {strategy}) within {r.placement_timeout_s:g}s "
            f"(ray.placement_timeout_s); available: {ray.available_resources()}. Lower ray.learner_ranks / "
            "rollout.num_engines or the per-role cpus/resources, or add nodes."
        )
    return pg


def _placements(cfg, gpu: bool) -> tuple[list, list, list]:
    """(learner strategies, engine strategies, placement groups) per the configured layout."""
    r, m, n = cfg.ray, cfg.ray.learner_ranks, cfg.rollout.num_engines
    at = PlacementGroupSchedulingStrategy
    if r.placement == "colocated":
        shared = _bundle(r.learner_cpus + r.rollout_cpus, 1 if gpu else 0,
                         {k: r.learner_resources.get(k, 0) + r.rollout_resources.get(k, 0)
                          for k in {*r.learner_resources, *r.rollout_resources}})
        pg = _reserve([shared] * max(m, n), "PACK", r)
        return ([at(pg, i) for i in range(m)], [at(pg, i) for i in range(n)], [pg])
    learn_pg = _reserve([_bundle(r.learner_cpus, 1 if gpu else 0, r.learner_resources)] * m, "PACK", r)
    roll_pg = _reserve([_bundle(r.rollout_cpus, 1 if gpu else 0, r.rollout_resources)] * n, "PACK", r)
    return [at(learn_pg, i) for i in range(m)], [at(roll_pg, i) for i in range(n)], [learn_pg, roll_pg]


def _teacher_placements(cfg, gpu: bool) -> tuple[list, list]:
    """The teacher engine pool's bundles: like the rollout engines', a group of their own."""
    r, n = cfg.ray, cfg.teacher.engines
    pg = _reserve([_bundle(r.rollout_cpus, 1 if gpu else 0, r.rollout_resources)] * n, "PACK", r)
    return [PlacementGroupSchedulingStrategy(pg, i) for i in range(n)], [pg]


def thread_counts(cfg, gpu: bool, nodes: int) -> tuple[int, int, bool]:
    """(threads of each learner rank, threads of each engine, whether the learners' OpenMP threads wait passively).

    The role's own CPUs, except in strict mode (`async.max_staleness=0`) on a single CPU-only node: there the
    learner ranks and the engines take turns, so each phase gets every core reserved for the run, split among that
    role's processes. `ray.learner_threads` / `ray.rollout_threads` override the counts; where learner and engines
    then run at the same time on more threads than the run has cores (async, one node), the learners' threads wait
    passively (OMP_WAIT_POLICY=PASSIVE: a thread that reaches a barrier early sleeps instead of spinning on a core
    the engine or its sibling needs). benchmarks/README.md has the layouts measured on 2 cores."""
    r = cfg.ray
    m, n = r.learner_ranks, cfg.rollout.num_engines
    learner, engine = max(1, int(r.learner_cpus)), max(1, int(r.rollout_cpus))
    shared = not gpu and nodes == 1 and n > 0
    pool = m * r.learner_cpus + n * r.rollout_cpus
    if shared and cfg.async_.max_staleness == 0:
        learner, engine = max(1, int(pool // m)), max(1, int(pool // n))
    learner, engine = r.learner_threads or learner, r.rollout_threads or engine
    overlapping = shared and cfg.async_.max_staleness > 0 and m * learner + n * engine > pool
    return learner, engine, overlapping


def _thread_env(n: int, passive: bool = False) -> dict[str, str]:
    """Set before the process imports torch or vLLM, for both pools: OpenMP's (torch's own kernels, vLLM's CPU
    kernels) and MKL's (torch's CPU matrix products), which would otherwise keep an MKL_NUM_THREADS=1 inherited
    from the driver's environment and run every GEMM on one thread."""
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), **({"OMP_WAIT_POLICY": "PASSIVE"} if passive else {})}


def launch(cfg: Config, model_path: str, total_steps: int | Callable[[], int], with_engines: bool = True,
           log_dir: str | None = None) -> Actors:
    """Start engines + learner ranks (on GPUs when the cluster has them) and wire the weight sync. Actors write
    their output to `log_dir` (one file each) when given. The engines go first: their vLLM start is the longest.
    `total_steps` may be a callable that blocks until the step count is known (the driver's data load, which then
    runs while the engines start); the learners, whose LR schedule needs it, start after it returns. Whatever it
    raises stops the engines and propagates. Every actor gets `cfg` itself (Ray pickles the typed Config), whose
    cross-field rules were checked when it was built (pipeline/config.py `_compatible`), before Ray started."""
    if cfg.model.lora.enabled:  # a target module the model lacks: one clear error before any actor starts
        from .adapters import check_targets_at

        check_targets_at(model_path, cfg.model.lora.target_modules, cfg.model.trust_remote_code)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    colocated = cfg.ray.placement == "colocated"
    gpu_share = (0.5 if colocated else 1) if gpu else 0
    learner_at, engine_at, pgs = _placements(cfg, gpu)
    learner_threads, engine_threads, passive = thread_counts(cfg, gpu, len([x for x in ray.nodes() if x["Alive"]]))
    env = _passthrough_env()
    backend = resolve_backend(cfg.sync.backend, gpu, cfg.ray.placement, lora=cfg.model.lora.enabled,
                              zero3_ranks=cfg.train.zero_stage == 3 and cfg.ray.learner_ranks > 1)

    # TRITON_INTERPRET must be set before triton is imported; only a CPU learner needs it.
    learner_env = {**env, **({} if gpu else {"TRITON_INTERPRET": "1"}),
                   **_thread_env(learner_threads, passive)}
    store = None
    if is_private():  # torch's own store server would listen on every interface: serve it here, on loopback
        store, port = loopback_store()
        addr = LOOPBACK
        learner_env["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # every rank, rank 0 too, is a client of that store
    else:
        addr, port = ray.get(_rendezvous.options(scheduling_strategy=learner_at[0]).remote())
    actors = Actors([], [], placement_groups=pgs, colocated=colocated, store=store)
    try:
        if with_engines:
            engine_vars = {**env, **engine_env(cfg.rollout), **_thread_env(engine_threads)}
            actors.engines = [
                ray.remote(RolloutEngine).options(
                    num_cpus=cfg.ray.rollout_cpus, num_gpus=gpu_share, scheduling_strategy=engine_at[i],
                    runtime_env={"env_vars": engine_vars}, max_restarts=cfg.ray.engine_max_restarts,
                    max_task_retries=0,
                ).remote(model_path, cfg, i, sleep_mode=gpu and colocated, log_dir=log_dir, sync_backend=backend)
                for i in range(cfg.rollout.num_engines)
            ]
        if with_engines and cfg.teacher_pool:  # never synced (frozen) or phi through a WeightSync of its own (ema)
            teacher_at, teacher_pgs = _teacher_placements(cfg, gpu)
            actors.placement_groups += teacher_pgs
            actors.teachers = [
                ray.remote(RolloutEngine).options(
                    num_cpus=cfg.ray.rollout_cpus, num_gpus=1 if gpu else 0, scheduling_strategy=teacher_at[i],
                    runtime_env={"env_vars": engine_vars}, max_restarts=cfg.ray.engine_max_restarts,
                    max_task_retries=0,
                ).remote(model_path, cfg, i, log_dir=log_dir, role="teacher",
                          sync_backend=backend if cfg.teacher.kind == "ema" else None)
                for i in range(cfg.teacher.engines)
            ]
        steps = total_steps() if callable(total_steps) else total_steps
        from .learner import Learner  # torch: not needed by the driver before this (Ray and the engines start first)

        m = cfg.ray.learner_ranks
        actors.learners = [
            ray.remote(concurrency_groups=LEARNER_CONCURRENCY)(Learner).options(
                num_cpus=cfg.ray.learner_cpus, num_gpus=gpu_share, scheduling_strategy=learner_at[rank],
                runtime_env={"env_vars": learner_env},
            ).remote(cfg, model_path, steps, rank=rank, world_size=m, master_addr=addr, master_port=port,
                      log_dir=log_dir)
            for rank in range(m)
        ]
        learners, engines = actors.learners, actors.engines
        ray.get([a.__ray_ready__.remote() for a in [*learners, *engines, *actors.teachers]])
        dtype = cfg.model.resolved_dtype(gpu) if gpu else None
        if engines:
            actors.sync = WeightSync(backend, learners, engines, dtype=dtype, zero3=cfg.train.zero_stage == 3,
                                     stall_timeout_s=cfg.ray.stall_timeout_s)
        if actors.teachers and cfg.teacher.kind == "ema":
            actors.teacher_sync = WeightSync(backend, learners, actors.teachers, dtype=dtype, zero3=False,
                                             source="teacher", stall_timeout_s=cfg.ray.stall_timeout_s)
    except BaseException:
        actors.shutdown(wait=True)  # so that no actor writes to the output folder once the caller sees the error
        raise
    return actors
