"""The weight path from the learner to the rollout engines, once per step: the one owner of it.

Each backend is one module holding its three sides together — `Sender` (lives in every learner rank),
`Receiver` (lives in every rollout engine) and `Transport` (the driver's side, which calls the other two):

* `object_store` (CPU, any placement): the state dict through Ray's shared-memory object store
  (`object_store.py`);
* `nccl` / `ipc` (GPU): vLLM's own weight-transfer API, NCCL broadcast for disaggregated engines, CUDA IPC for
  colocated ones (`vllm_transfer.py`; not exercised without a GPU);
* `lora` (any device; chosen whenever `model.lora` is on): only the student's LoRA adapter, through the object
  store, loaded by each engine as a new vLLM LoRA adapter (`lora.py`).

Learner and engine actors only host their side (`open_sync`, then `sync(op, ...)` calls); the scheduler only
calls `WeightSync.push(version)` (or `submit`/`collect` to overlap it with the learner's next step) and
`WeightSync.resync(indices)`. `gather.py` reads the learner's full
weights bucket by bucket, under ZeRO-3 too.
"""

from __future__ import annotations

import time

BACKENDS = ("object_store", "nccl", "ipc", "lora")


def resolve_backend(name: str, on_gpu: bool, placement: str = "disaggregated", lora: bool = False) -> str:
    if lora:  # the base never changes: only the adapter is sent (the config rejects nccl / ipc with LoRA)
        return "lora"
    if name != "auto":
        return name
    if not on_gpu:
        return "object_store"
    return "ipc" if placement == "colocated" else "nccl"


def _module(backend: str):
    if backend == "object_store":
        from . import object_store

        return object_store
    if backend == "lora":
        from . import lora

        return lora
    from . import vllm_transfer

    return vllm_transfer


def make_sender(backend: str, learner, **options):
    """The learner-side endpoint (called inside the learner actor)."""
    return _module(backend).Sender(learner, **options)


def make_receiver(backend: str, engine):
    """The engine-side endpoint (called inside the rollout actor)."""
    return _module(backend).Receiver(engine)


class WeightSync:
    """Driver side: opens every endpoint, then pushes each new weight version to the engines."""

    def __init__(self, backend: str, learners: list, engines: list, *, dtype: str | None, zero3: bool):
        import ray

        if backend not in BACKENDS:
            raise ValueError(f"sync.backend={backend!r}: expected one of {BACKENDS}")
        self.backend, self.engines, self.version = backend, engines, 0
        options = {"dtype": dtype} if backend in ("object_store", "lora") else {"backend": backend}
        ray.get([lr.open_sync.remote(backend, **options) for lr in learners]
                + [e.open_sync.remote(backend) for e in engines])
        self.transport = _module(backend).Transport(learners, engines, backend=backend, zero3=zero3)
        # the export may run next to the learner's next step: full weights through the object store (a ZeRO-3 export
        # is a collective of every rank, which a step running at the same time would interleave with its own)
        self.overlaps = backend == "object_store" and not zero3

    def push(self, version: int) -> dict:
        """Send the learner's weights as `version` to every engine and wait; returns seconds, bytes and the
        backend's split (e.g. transport_s, load_s)."""
        return self.collect(self.submit(version))

    def submit(self, version: int):
        """Start a push without waiting. Where the push `overlaps`, only the learner's export has started (next to
        whatever the learner runs; a step that must not change the weights meanwhile gets hold=version) and the
        weights reach the engines at `forward` or `collect`. Otherwise the learner's next call runs once the weights
        are taken from it, and each engine's next call once it has loaded them (Ray runs one caller's calls to an
        actor in order)."""
        self.version = version
        return time.perf_counter(), self.transport.submit(version, self.engines)

    def forward(self, pending) -> None:
        """Hand a started push's weights to the engines: calls made to them afterwards land behind the new weights."""
        self.transport.forward(pending[1])

    def collect(self, pending) -> dict:
        t0, handle = pending
        stats = self.transport.collect(handle)
        return {"seconds": time.perf_counter() - t0, **stats}

    def resync(self, indices: list[int]) -> dict:
        """Bring restarted engines (fresh from the base weights) to the current version."""
        import ray

        t0 = time.perf_counter()
        engines = [self.engines[i] for i in indices]
        ray.get([e.open_sync.remote(self.backend) for e in engines])
        stats = self.transport.resync(engines, self.version)
        return {"seconds": time.perf_counter() - t0, **stats}
