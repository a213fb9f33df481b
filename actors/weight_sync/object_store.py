"""CPU (and any placement) backend: the full HF-named weights through Ray's shared-memory object store.

One copy on the way: learner rank 0 puts each bucket of its live parameters (no clone) into the object store as
numpy arrays, which Ray writes out of band straight into shared memory; every engine maps them from there
without a copy and hands them to vLLM's `reload_weights` — on CPU the worker prepacks linear weights, so
`model.load_weights` alone would leave them stale — which is the engine's own copy. Under ZeRO-3 every rank
joins the bucketed gather and rank 0 puts each bucket while it is gathered.

The export returns the buckets' object refs (not the weights), so the learner's next step may start as soon as
it returns: the object store holds the exported version (a second buffer) while engines load it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import ray
import torch

from .gather import iter_buckets

BUCKET_BYTES = 256 << 20  # how much is gathered (ZeRO-3) and put at a time
_AS_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # dtypes numpy lacks travel as raw bits


@dataclass
class Exported:
    """One weight version in the object store: the buckets' refs (nested, so Ray does not resolve them)."""

    buckets: list  # [ObjectRef of [(name, dtype name, ndarray)]]
    bytes: int
    seconds: float  # the learner's side: gather + the copy into shared memory

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views of the shared memory, in export order (read-only: vLLM only reads them)."""
        return [(name, _from_numpy(dtype, array)) for ref in self.buckets for name, dtype, array in ray.get(ref)]


def _to_numpy(t: torch.Tensor):
    t = t.detach().contiguous()
    return (t.view(_AS_INT[t.dtype]) if t.dtype in _AS_INT else t).numpy()


def _from_numpy(dtype: str, array) -> torch.Tensor:
    with warnings.catch_warnings():  # shared memory is read-only; vLLM only reads it while loading
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype)) if t.dtype != getattr(torch, dtype) else t


class Sender:
    """Learner side (one per rank)."""

    def __init__(self, learner, dtype: str | None = None):
        self.learner = learner
        self.dtype = getattr(torch, dtype) if dtype else None

    def export(self) -> Exported | None:
        """Rank 0: put the weights into the object store, bucket by bucket; other ranks only join ZeRO-3's
        gathers and return None."""
        t0, lr = time.perf_counter(), self.learner
        buckets, nbytes = [], 0
        for bucket in iter_buckets(lr.engine.module, zero3=lr.cfg.train.zero_stage == 3, bucket_bytes=BUCKET_BYTES,
                                   dtype=self.dtype, device="cpu"):
            if lr.rank == 0:
                arrays = _dedup_numpy(bucket)
                buckets.append(ray.put(arrays))
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        return Exported(buckets, nbytes, time.perf_counter() - t0) if lr.rank == 0 else None


def _dedup_numpy(bucket: list) -> list:
    """[(name, dtype name, ndarray)]; tied names share one array object, which Ray's pickling stores once."""
    seen: dict = {}
    out = []
    for name, t in bucket:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen[key] = _to_numpy(t)
        out.append((name, str(t.dtype).removeprefix("torch."), seen[key]))
    return out


class Receiver:
    """Engine side."""

    def __init__(self, engine):
        self.engine = engine

    def load(self, exported: Exported, version: int) -> dict:
        """Load a version from the object store and drop cached prefixes: their KV came from the old weights."""
        t0 = time.perf_counter()
        weights = exported.tensors()
        llm = self.engine.llm
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        self.engine.weight_version = version
        return {"load_s": time.perf_counter() - t0}


class Transport:
    """Driver side."""

    def __init__(self, learners: list, engines: list, *, backend: str = "object_store", zero3: bool):
        self.learners, self.zero3 = learners, zero3

    def submit(self, version: int, engines: list) -> tuple:
        """Start: under ZeRO-3 every rank gathers; rank 0's export (refs only) goes to the engines."""
        exports = [lr.sync.remote("export") for lr in (self.learners if self.zero3 else self.learners[:1])]
        return exports, [e.sync.remote("load", exports[0], version) for e in engines]

    def collect(self, handle: tuple) -> dict:
        exports, loads = handle
        stats = ray.get(loads)
        exported = ray.get(exports)[0]
        return {"bytes": exported.bytes, "transport_s": exported.seconds, "load_s": max(s["load_s"] for s in stats)}

    def resync(self, engines: list, version: int) -> dict:
        """A restarted engine holds the base weights: send it the current ones."""
        return self.collect(self.submit(version, engines))
