"""Where weights cross from the learner to the rollout engines, once per step.

* `object_store` (CPU, and any placement): learner rank 0 puts its full HF-named state dict into Ray's
  shared-memory object store once; every engine reads it from there into vLLM's `reload_weights`.
* `nccl` / `ipc` (GPU): vLLM's own weight-transfer API, see `weight_sync_gpu.py` (not exercised on CI).
"""

from __future__ import annotations

import time

import ray


def resolve_backend(name: str, on_gpu: bool, placement: str = "disaggregated") -> str:
    if name != "auto":
        return name
    if not on_gpu:
        return "object_store"
    return "ipc" if placement == "colocated" else "nccl"


class ObjectStoreSync:
    """Full state dict through Ray's object store; costs one copy per engine, works everywhere."""

    def __init__(self, learners: list, engines: list, dtype: str | None = None, gather_all: bool = False):
        self.learners, self.engines, self.dtype, self.gather_all = learners, engines, dtype, gather_all

    def push(self, version: int, engines: list | None = None) -> dict:
        t0 = time.perf_counter()
        # Rank 0's dict stays in the object store and engines read it there; under ZeRO-3 every rank joins the gather.
        exporting = self.learners if self.gather_all else self.learners[:1]
        refs = [lr.export_weights.remote(self.dtype) for lr in exporting]
        stats = ray.get([e.load_weights.remote(refs[0], version) for e in (engines or self.engines)])
        ray.get(refs[1:])
        return {"seconds": time.perf_counter() - t0, "bytes": stats[0]["bytes"],
                "engine_load_s": max(s["seconds"] for s in stats)}


class GpuSync:
    """vLLM weight-transfer engines (NCCL broadcast or CUDA IPC); sender and receivers run concurrently."""

    def __init__(self, backend: str, learners: list, engines: list):
        self.backend, self.learner, self.engines = backend, learners[0], engines
        infos = ray.get(self.learner.gpu_sync_setup.remote(backend, len(engines)))
        ray.get([self.learner.gpu_sync_connect.remote()]
                + [e.gpu_sync_init.remote(backend, info) for e, info in zip(engines, infos)])

    def push(self, version: int, engines: list | None = None) -> dict:
        if engines is not None and engines != self.engines:
            raise NotImplementedError("re-syncing a restarted engine over NCCL needs a new group; not supported yet")
        t0 = time.perf_counter()
        update_info, nbytes = ray.get(self.learner.gpu_sync_update_info.remote())
        ray.get([self.learner.gpu_sync_send.remote()]
                + [e.gpu_sync_receive.remote(self.backend, update_info, version) for e in self.engines])
        ray.get(self.learner.gpu_sync_release.remote())  # IPC handles point at learner memory until every engine is done
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}


def make_sync(backend: str, learners: list, engines: list, dtype: str | None = None, gather_all: bool = False):
    if backend == "object_store":
        return ObjectStoreSync(learners, engines, dtype, gather_all)
    return GpuSync(backend, learners, engines)
