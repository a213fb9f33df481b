"""CPU (and any placement) backend: the full HF-named weights through Ray's shared-memory object store, streamed.

One copy on the way, and loading overlaps it: learner rank 0 yields its live parameters (no clone) bucket by
bucket from a streaming Ray call, each bucket as numpy arrays that Ray writes out of band straight into shared
memory; as each bucket's ref appears the driver hands it to every engine, which maps it without a copy and feeds it
to vLLM's layerwise reload (`initialize_layerwise_reload` → `model.load_weights` per bucket →
`finalize_layerwise_reload`; on CPU the worker prepacks linear weights, so a plain `load_weights` would leave them
stale). So the engines load bucket k while the learner puts bucket k + 1. Under ZeRO-3 every rank joins each
bucket's gather and rank 0 puts it while it is gathered.

The object store holds a pushed version until every engine has loaded it, so the learner may update its weights as soon
as its export returns. In async mode the export also runs next to the learner's next step: rank 0 puts the buckets
from its `sync` concurrency group while the step's forward and backward run, and the step's update waits for the
export (`Learner.step(hold=version)`); the engines receive the buckets at `forward`, before their next generation.
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
    """Driver side. `submit` starts the export, `forward` hands its buckets to the engines as they come, `collect`
    waits for the engines to load them. The export runs in the learner's `sync` concurrency group: between `submit`
    and `forward` the driver may start the learner's next step (hold=version), whose update waits for the export."""

    def __init__(self, learners: list, engines: list, *, backend: str = "object_store", zero3: bool):
        self.learners, self.zero3 = learners, zero3

    def submit(self, version: int, engines: list) -> dict:
        drains = [lr.sync.remote("drain") for lr in self.learners[1:]] if self.zero3 else []
        stream = self.learners[0].sync_stream.options(num_returns="streaming", concurrency_group="sync").remote(
            "export", version=version)
        return {"version": version, "engines": engines, "drains": drains, "stream": stream, "calls": None}

    def forward(self, push: dict) -> None:
        """Stream the export to the engines (once); returns when the learner has put every bucket, with the engines
        still loading. Calls made to the engines after this land behind the new weights."""
        if push["calls"] is not None:
            return
        t0, engines = time.perf_counter(), push["engines"]
        calls = [e.sync.remote("begin") for e in engines]
        for ref in push["stream"]:
            calls += [e.sync.remote("feed", ref) for e in engines]
        push["transport_s"] = time.perf_counter() - t0
        push["calls"], push["finishes"] = calls, [e.sync.remote("finish", push["version"]) for e in engines]

    def collect(self, push: dict) -> dict:
        self.forward(push)
        ray.get(push["drains"] + push["calls"])
        stats = ray.get(push["finishes"])
        return {"bytes": stats[0]["bytes"], "transport_s": push["transport_s"],
                "load_s": max(s["load_s"] for s in stats)}

    def resync(self, engines: list, version: int) -> dict:
        """A restarted engine holds the base weights: send it the current ones."""
        return self.collect(self.submit(version, engines))
