"""CPU (and any placement) backend: the full HF-named weights through Ray's shared-memory object store, streamed.

One copy on the way, and loading overlaps it: learner rank 0 yields its live parameters (no clone) bucket by
bucket from a streaming Ray call, each bucket as numpy arrays that Ray writes out of band straight into shared
memory; as each bucket's ref appears the driver hands it to every engine, which maps it without a copy and passes it
to vLLM's weight-transfer API (`update_weights`, between `start_weight_update` and `finish_weight_update`), received
by the worker-side engine below, registered with vLLM's factory at engine start: vLLM's layerwise reload, as its NCCL
engine runs it. So the engines load bucket k while the learner puts bucket k + 1. Under ZeRO-3 every rank joins each
bucket's gather and rank 0 puts it while it is gathered.

The object store holds a pushed version until every engine has loaded it, so the learner may update its weights as soon
as its export returns. In async mode the export also runs next to the learner's next step: rank 0 puts the buckets
from its `sync` concurrency group while the step's forward and backward run, and the step's update waits for the
export (`Learner.step(hold=version)`); the engines receive the buckets at `WeightSync.deliver`, before their next generation.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

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


def bucket_tensors(payload: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of one exported bucket's shared memory (read-only)."""
    return [(name, _from_numpy(dtype, array))
            for name, dtype, array in zip(payload["names"], payload["dtype_names"], payload["arrays"])]


class ObjectStoreSender:
    """Learner side. Rank 0 streams the buckets from its export; under ZeRO-3 the other ranks join each gather."""

    def __init__(self, learner, dtype: str | None = None, source: str = "student"):
        self.rank = learner.rank
        self.module, self.zero3 = learner.weight_source(source)
        self.dtype = getattr(torch, dtype) if dtype else None

    def _buckets(self):
        return iter_buckets(self.module, zero3=self.zero3, bucket_bytes=BUCKET_BYTES, dtype=self.dtype, device="cpu")

    def init_info(self, num_engines: int) -> list[dict]:
        return [{}] * num_engines

    def connect(self) -> None:
        """Nothing to join: the object store is there already."""

    def updates(self):
        """Each bucket as it is gathered, put into the object store as it is yielded (a streaming call)."""
        for bucket in self._buckets():
            yield bucket_payload(bucket)

    def send(self) -> None:
        """Ranks > 0 under ZeRO-3: join every bucket's gather (rank 0 gathers in `updates`)."""
        if self.rank > 0:
            for _ in self._buckets():
                pass

    def release(self) -> None:
        """The object store frees a version once every engine has loaded it."""

    def close(self) -> None:
        """Nothing to leave."""


def bucket_payload(bucket: list) -> dict:
    """One `update_weights` payload: vLLM's metadata fields plus the arrays, which Ray writes out of band into shared
    memory (tied names in one bucket share one array, stored once)."""
    named = bucket_arrays(bucket)
    return {"names": [n for n, _, _ in named], "dtype_names": [d for _, d, _ in named],
            "shapes": [list(a.shape) for _, _, a in named], "arrays": [a for _, _, a in named]}


@functools.cache
def _engine_cls() -> type:
    """The worker-side engine: vLLM's `WeightTransferEngine` whose payloads carry the weights themselves (built
    lazily: subclassing imports vLLM, which a learner rank never needs)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, \
        WeightTransferUpdateInfo
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    @dataclass
    class InitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class UpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]
        arrays: list

    class ObjectStoreWeightTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
        """Layerwise reload like vLLM's NCCL engine, fed from the mapped buckets: on CPU the worker prepacks linear
        weights, so a plain `load_weights` would leave them stale."""

        init_info_cls, update_info_cls = InitInfo, UpdateInfo

        def init_transfer_engine(self, init_info: InitInfo) -> None:
            pass

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:
            # the base class also synchronizes an accelerator, which a CPU worker has not got
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: UpdateInfo) -> None:
            self.model.load_weights([(name, _from_numpy(dtype, array)) for name, dtype, array in
                                     zip(update_info.names, update_info.dtype_names, update_info.arrays)])

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            pass

    return ObjectStoreWeightTransferEngine


def register_engine(name: str) -> None:
    """Make `name` a weight-transfer backend of vLLM's worker in this process (once)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(name, _engine_cls())
