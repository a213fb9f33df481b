"""Shared fixtures: one loopback Ray instance per session, caches shared across runs, tiny local models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SDFT_TEST_CACHE", ROOT / ".cache"))
# Compiled sampler kernels, DeepSpeed ops and tiny models survive between test sessions.
for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("VLLM_CACHE_ROOT", "vllm"),
                 ("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("SDFT_CACHE", "sdft"), ("WANDB_DIR", "wandb")):
    os.environ.setdefault(var, str(CACHE / sub))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from pipeline.models import resolve_model

    return resolve_model("tiny:llama")


@pytest.fixture(scope="session")
def ray_session():
    """A private Ray instance as `sdft train` starts one (every server on 127.0.0.1, a temp dir of its own); shut
    down (its processes stopped, its temp dir deleted) at the end."""
    import ray

    from actors.launcher import start_private_ray, stop_private_ray

    start_private_ray(num_cpus=2, log_to_driver=False)
    yield ray
    stop_private_ray()
