"""CPU (and any placement) backend: the full HF-named state dict through Ray's shared-memory object store.

Learner rank 0 returns its weights from a Ray call, which puts them into the object store once (the one copy);
every engine reads them from there into vLLM's `reload_weights` — on CPU the worker prepacks linear weights, so
`model.load_weights` alone would leave them stale. Under ZeRO-3 every rank joins the bucketed gather.
"""

from __future__ import annotations

import time

import ray

from .gather import state_dict_copy

BUCKET_BYTES = 256 << 20  # ZeRO-3: how much is gathered at a time


class Sender:
    """Learner side (one per rank)."""

    def __init__(self, learner, dtype: str | None = None):
        import torch

        self.learner = learner
        self.dtype = getattr(torch, dtype) if dtype else None

    def export(self) -> dict | None:
        """The full state dict on CPU on rank 0 (None elsewhere); no copy when it is already there."""
        lr = self.learner
        return state_dict_copy(lr.engine.module, zero3=lr.cfg.train.zero_stage == 3, bucket_bytes=BUCKET_BYTES,
                               dtype=self.dtype, device="cpu")


class Receiver:
    """Engine side."""

    def __init__(self, engine):
        self.engine = engine

    def load(self, state_dict: dict, version: int) -> dict:
        """Load a full state dict and drop cached prefixes: their KV came from the old weights."""
        t0 = time.perf_counter()
        llm = self.engine.llm
        llm.collective_rpc("reload_weights",
                           kwargs={"weights_iterator": list(state_dict.items()), "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        self.engine.weight_version = version
        nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}


class Transport:
    """Driver side."""

    def __init__(self, learners: list, engines: list, *, backend: str = "object_store", zero3: bool):
        self.learners, self.zero3 = learners, zero3

    def push(self, version: int, engines: list) -> dict:
        t0 = time.perf_counter()
        # Rank 0's dict stays in the object store and engines read it there; under ZeRO-3 every rank gathers.
        refs = [lr.sync.remote("export") for lr in (self.learners if self.zero3 else self.learners[:1])]
        stats = ray.get([e.sync.remote("load", refs[0], version) for e in engines])
        ray.get(refs[1:])
        return {"seconds": time.perf_counter() - t0, "bytes": stats[0]["bytes"],
                "engine_load_s": max(s["seconds"] for s in stats)}

    def resync(self, engines: list, version: int) -> dict:
        """A restarted engine holds the base weights: send it the current ones."""
        return self.push(version, engines)
