"""The engine side of every full-weight backend: vLLM's own weight-transfer API on the engine's `LLM`.

The worker-side transfer engine is chosen at engine start (`engine_kwargs`): vLLM's NCCL or CUDA-IPC engine on GPU,
the object-store engine of `object_store.py` (registered with vLLM's factory in this process) elsewhere. Each
version is `start_weight_update` (layerwise reload begins) → `update_weights` per payload → `finish_weight_update`
(layers processed and, on GPU, copied into the live storage), the sequence OpenRLHF's and verl's engines run.
"""

from __future__ import annotations

import math
import os
import time

import torch

OBJECT_STORE_ENGINE = "sdft_object_store"  # the name our worker-side engine is registered under


def engine_kwargs(backend: str) -> dict:
    """`LLM(...)` kwargs that create the worker-side transfer engine of a full-weight `backend`. Call it before
    `LLM(...)`: the object-store engine is registered here, and for ipc the flag the worker needs to unpickle CUDA IPC
    handles is set here (vLLM reads it once at engine start)."""
    if backend == "object_store":
        from .object_store import register_engine

        register_engine(OBJECT_STORE_ENGINE)
        return {"weight_transfer_config": {"backend": OBJECT_STORE_ENGINE}}
    if backend == "ipc":
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return {"weight_transfer_config": {"backend": backend}}


def payload_bytes(payload: dict) -> int:
    return sum(math.prod(shape) * getattr(torch, dtype).itemsize
               for dtype, shape in zip(payload["dtype_names"], payload["shapes"]))


class TransferReceiver:
    def __init__(self, engine):
        self.engine, self.busy, self.bytes = engine, 0.0, 0

    def _timed(self, call, *args):
        t0 = time.perf_counter()
        call(*args)
        self.busy += time.perf_counter() - t0

    def init(self, init_info: dict) -> None:
        """For nccl this blocks until the learner's `Sender.connect`."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.engine.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def begin(self) -> None:
        self.busy, self.bytes = 0.0, 0
        self._timed(self.engine.llm.start_weight_update)

    def update(self, payload: dict) -> None:
        """One payload (for nccl, inside the broadcast). The engine is idle: the driver only syncs between calls."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._timed(self.engine.llm.update_weights, WeightTransferUpdateRequest(update_info=payload))
        self.bytes += payload_bytes(payload)

    def finish(self, version: int) -> dict:
        self._timed(self.engine.llm.finish_weight_update)
        if not self.engine.llm.reset_prefix_cache():  # cached prefixes hold KV of the old weights
            raise RuntimeError("reset_prefix_cache failed: requests were running during a weight sync")
        self.engine.weight_version = version
        return {"load_s": self.busy, "bytes": self.bytes}

    def close(self) -> None:
        self.engine.llm.shutdown_weight_transfer_engine()
