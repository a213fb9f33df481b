"""CPU (and any placement) backend: the full HF-named weights through Ray's shared-memory object store, streamed.

One copy on the way, and loading overlaps it: learner rank 0 yields its live parameters (no clone) bucket by
bucket from a streaming Ray call, each bucket as numpy arrays that Ray writes out of band straight into shared
memory; as each bucket's ref appears the driver hands it to every engine, which maps it without a copy and feeds it
to vLLM's layerwise reload (`initialize_layerwise_reload` → `model.load_weights` per bucket →
`finalize_layerwise_reload`; on CPU the worker prepacks linear weights, so a plain `load_weights` would leave them
stale). So the engines load bucket k while the learner puts bucket k + 1. Under ZeRO-3 every rank joins each
bucket's gather and rank 0 puts it while it is gathered.

The object store holds a pushed version until every engine has loaded it, so the learner may start its next step
as soon as its export returns (async mode: a second buffer).
"""

from __future__ import annotations

import time
import warnings

import ray
import torch

from .gather import iter_buckets

BUCKET_BYTES = 64 << 20  # gathered (ZeRO-3), put and loaded at a time: small enough to pipeline, large per call
_AS_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # dtypes numpy lacks travel as raw bits


def _to_numpy(t: torch.Tensor):
    t = t.detach().contiguous()
    return (t.view(_AS_INT[t.dtype]) if t.dtype in _AS_INT else t).numpy()


def _from_numpy(dtype: str, array) -> torch.Tensor:
    with warnings.catch_warnings():  # shared memory is read-only; vLLM only reads it while loading
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    want = getattr(torch, dtype)
    return t if t.dtype == want else t.view(want)


def bucket_arrays(bucket: list) -> list:
    """[(name, dtype name, ndarray)]; tied names in one bucket share one array, which Ray stores once."""
    arrays: dict = {}
    out = []
    for name, t in bucket:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in arrays:
            arrays[key] = _to_numpy(t)
        out.append((name, str(t.dtype).removeprefix("torch."), arrays[key]))
    return out


def bucket_tensors(bucket: list) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of one exported bucket's shared memory (read-only)."""
    return [(name, _from_numpy(dtype, array)) for name, dtype, array in bucket]


class Sender:
    """Learner side (one per rank)."""

    def __init__(self, learner, dtype: str | None = None):
        self.learner = learner
        self.dtype = getattr(torch, dtype) if dtype else None

    def _buckets(self):
        lr = self.learner
        return iter_buckets(lr.engine.module, zero3=lr.cfg.train.zero_stage == 3, bucket_bytes=BUCKET_BYTES,
                            dtype=self.dtype, device="cpu")

    def export(self):
        """Rank 0, as a streaming call: each bucket, put into the object store as it is yielded."""
        for bucket in self._buckets():
            yield bucket_arrays(bucket)

    def drain(self) -> None:
        """Ranks > 0 under ZeRO-3: join every bucket's gather."""
        for _ in self._buckets():
            pass


# vLLM's layerwise reload, run on the engine's worker (collective_rpc passes the worker first).
def _begin(worker) -> None:
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(worker.model_runner.get_model())


def _feed(worker, weights: list) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(weights)


def _finish(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)


class Receiver:
    """Engine side: begin, one feed per bucket as it arrives, finish."""

    def __init__(self, engine):
        self.engine, self.busy, self.bytes = engine, 0.0, 0

    def begin(self) -> None:
        t0 = time.perf_counter()
        self.engine.llm.collective_rpc(_begin)
        self.busy, self.bytes = time.perf_counter() - t0, 0

    def feed(self, bucket: list) -> None:
        t0 = time.perf_counter()
        weights = bucket_tensors(bucket)
        self.engine.llm.collective_rpc(_feed, args=(weights,))
        self.bytes += sum(t.numel() * t.element_size() for _, t in weights)
        self.busy += time.perf_counter() - t0

    def finish(self, version: int) -> dict:
        """Process what the layers received and drop cached prefixes: their KV came from the old weights."""
        t0 = time.perf_counter()
        self.engine.llm.collective_rpc(_finish)
        self.engine.llm.reset_prefix_cache()
        self.engine.weight_version = version
        return {"load_s": self.busy + time.perf_counter() - t0, "bytes": self.bytes}


class Transport:
    """Driver side."""

    def __init__(self, learners: list, engines: list, *, backend: str = "object_store", zero3: bool):
        self.learners, self.zero3 = learners, zero3

    def submit(self, version: int, engines: list) -> tuple:
        """Stream the export to the engines; returns once the learner has put every bucket (its weights are then
        free to change), with the engines still loading."""
        t0 = time.perf_counter()
        drains = [lr.sync.remote("drain") for lr in self.learners[1:]] if self.zero3 else []
        stream = self.learners[0].sync_stream.options(num_returns="streaming").remote("export")
        calls = [e.sync.remote("begin") for e in engines]
        for ref in stream:
            calls += [e.sync.remote("feed", ref) for e in engines]
        transport_s = time.perf_counter() - t0
        return transport_s, drains, calls, [e.sync.remote("finish", version) for e in engines]

    def collect(self, handle: tuple) -> dict:
        transport_s, drains, calls, finishes = handle
        ray.get(drains + calls)
        stats = ray.get(finishes)
        return {"bytes": stats[0]["bytes"], "transport_s": transport_s, "load_s": max(s["load_s"] for s in stats)}

    def resync(self, engines: list, version: int) -> dict:
        """A restarted engine holds the base weights: send it the current ones."""
        return self.collect(self.submit(version, engines))
