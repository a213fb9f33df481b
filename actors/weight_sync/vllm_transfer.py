"""GPU weight sync (learner rank 0 -> vLLM rollout engines) on vLLM's own RL weight-transfer API.

Backends (vLLM ``vllm.distributed.weight_transfer``):

* ``nccl`` (disaggregated): learner rank 0 is NCCL rank 0 and broadcasts the full HF-named
  state dict; engine ``i``'s workers are ranks ``1 + i*workers_per_engine + w``. The trainer
  side is vLLM's ``NCCLTrainerWeightTransferEngine`` driven with a no-op control-plane client,
  because here the Ray driver, not the trainer, calls the engines.
* ``ipc`` (colocated): CUDA IPC handles of the learner's own tensors (zero copy); the engine
  worker opens them and ``load_weights`` copies. Handles are keyed by the learner GPU's UUID,
  so only engines whose worker sits on that same GPU can open them.

Engine construction (the rollout actor, before ``LLM(...)``)::

    llm = LLM(..., **engine_kwargs(backend))   # weight_transfer_config={"backend": backend}

``engine_kwargs`` also sets ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` in ``os.environ`` for
``ipc``: IPC handles must be pickled to reach the EngineCore worker, and vLLM reads (then
caches) that flag when the engine starts, so it has to be set before ``LLM(...)``.

Call order (the driver; ``L`` = learner rank 0 holding a ``TrainerSender``, ``E_i`` = engines)::

    once:   infos = [L.init_info(i) for i in range(n_engines)]
            ray.get([L.connect(), *(E_i.engine_init(infos[i]) for i)])   # concurrent: NCCL rendezvous
    sync:   info = ray.get(L.update_info(named_tensors))                 # stage + metadata, nothing sent
            ray.get([L.broadcast(), *(E_i.engine_receive(info) for i)])  # concurrent: one NCCL collective
            ray.get(L.release())                                         # after every engine returned
    end:    L.close(); E_i.engine_shutdown()

The same driver code serves ``ipc``: ``connect``/``broadcast`` are no-ops there and
``update_info`` already carries the handles; ``release`` must still wait for every engine,
since the handles point at the learner's memory. Every sync must send the *whole* model:
vLLM's layerwise reload rebuilds each layer from what it receives. Engines must be awake
(``wake_up()`` if slept) and idle (no ``generate`` in flight) during ``engine_receive``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BACKENDS = ("nccl", "ipc")
NamedTensors = Iterable[tuple[str, "torch.Tensor"]]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"GPU weight sync backend must be one of {BACKENDS}, got {backend!r}")


def engine_kwargs(backend: str) -> dict[str, Any]:
    """``LLM(...)`` kwargs enabling the worker-side engine (``Worker.load_model`` creates it from
    ``weight_transfer_config``). For ``ipc`` also sets the env flag the worker needs to unpickle
    IPC handles; it must run in the rollout process before ``LLM(...)`` (see module docstring)."""
    _check_backend(backend)
    if backend == "ipc":
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return {"weight_transfer_config": {"backend": backend}}


def engine_init(llm: Any, backend: str, init_info: dict) -> None:
    """Run the worker-side handshake; for ``nccl`` it blocks until ``TrainerSender.connect``."""
    _check_backend(backend)
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))


def engine_receive(llm: Any, backend: str, update_info: dict) -> None:
    """Load one full update, then drop the prefix cache: its KV was computed by the old weights.
    For ``nccl`` this blocks inside the broadcast, so it must overlap ``TrainerSender.broadcast``."""
    _check_backend(backend)
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    llm.start_weight_update()  # layerwise-reload setup; a failed update clears it in the worker
    llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
    llm.finish_weight_update()  # processes layers and copies into the live (CUDA-graph) storage
    if not llm.reset_prefix_cache():
        raise RuntimeError("reset_prefix_cache failed: requests were running during a weight sync")


def engine_shutdown(llm: Any) -> None:
    """Release the trainer connection (NCCL communicator) without stopping inference."""
    llm.shutdown_weight_transfer_engine()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).split(".")[-1]  # the worker resolves it with getattr(torch, name)


@functools.cache
def _staged_source_cls() -> type:
    """A vLLM ``WeightSource`` over an already materialized list (built lazily: imports vLLM)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class _Staged(WeightSource):
        def __init__(self) -> None:
            self.pairs: list[tuple[str, torch.Tensor]] = []

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

        def __iter__(self):
            return iter(self.pairs)

    return _Staged


class _NoopClient:
    """``VLLMWeightSyncClient`` that does nothing: the Ray driver calls the engines instead."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...
    def start_weight_update(self) -> None: ...
    def update_weights(self, update_info: Any) -> None: ...
    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


class TrainerSender:
    """Trainer end of the sync, living in learner rank 0 (the only rank holding the full model).

    ``world_size_of_engines`` is the total number of vLLM worker processes across all engines
    (engines x TP x PP); ``workers_per_engine`` (TP x PP, default 1) sets each engine's rank
    offset. ``packed`` (nccl) batches tensors into ``packed_buffer_size_bytes`` buffers
    (x2 on both sides, vLLM's default 1 GiB each); the worker learns these at ``engine_init``.
    """

    def __init__(self, backend: str, world_size_of_engines: int, master_address: str,
                 master_port: int, *, workers_per_engine: int = 1, packed: bool = True,
                 packed_buffer_size_bytes: int | None = None) -> None:
        _check_backend(backend)
        if world_size_of_engines < 1 or world_size_of_engines % workers_per_engine:
            raise ValueError(
                f"{world_size_of_engines=} must be a positive multiple of {workers_per_engine=}")
        self.backend, self.master_address, self.master_port = backend, master_address, master_port
        self.world_size = 1 + world_size_of_engines  # NCCL group: trainer rank 0 + every worker
        self.num_engines = world_size_of_engines // workers_per_engine
        self.workers_per_engine = workers_per_engine
        self.packed = packed
        self.packed_buffer_size_bytes = packed_buffer_size_bytes
        self._engine: Any = None  # vLLM NCCLTrainerWeightTransferEngine once connected
        self._staged: list[tuple[str, torch.Tensor]] = []  # kept alive until release()

    def _trainer_init_info(self) -> Any:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        size = self.packed_buffer_size_bytes
        extra = {} if size is None else {"packed_buffer_size_bytes": size}
        return NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                   world_size=self.world_size, packed=self.packed, rank=0, **extra)

    def init_info(self, engine_index: int) -> dict:
        """What engine ``engine_index`` passes to ``engine_init``; wire params mirror the trainer's."""
        if not 0 <= engine_index < self.num_engines:
            raise ValueError(f"engine_index {engine_index} outside [0, {self.num_engines})")
        if self.backend == "ipc":
            return {"packed": False}  # one handle per tensor, no shared staging buffer to reuse
        from vllm.distributed.weight_transfer.nccl_common import (
            NCCLWeightTransferInitInfo, worker_init_payload)

        t = self._trainer_init_info()
        # Separate LLM instances all report data_parallel_index 0, so the offset alone keeps
        # their workers' NCCL ranks distinct.
        return worker_init_payload(NCCLWeightTransferInitInfo(
            master_address=t.master_address, master_port=t.master_port,
            rank_offset=1 + engine_index * self.workers_per_engine, world_size=t.world_size,
            packed=t.packed, packed_buffer_size_bytes=t.packed_buffer_size_bytes,
            packed_num_buffers=t.packed_num_buffers))

    def connect(self) -> None:
        """nccl: host the TCPStore on ``master_address:master_port`` as rank 0 and build the
        communicator on the current CUDA device; blocks until every engine is in ``engine_init``."""
        if self.backend == "nccl" and self._engine is None:
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            self._engine = WeightTransferTrainerFactory.trainer_init(
                self._trainer_init_info(), client=_NoopClient(), source=_staged_source_cls()())

    def update_info(self, named_tensors: NamedTensors) -> dict:
        """Stage the tensors (references only) and return the payload for ``engine_receive``."""
        staged = [(n, t.detach()) for n, t in named_tensors]
        if not staged or any(not t.is_cuda for _, t in staged):
            raise ValueError("GPU weight sync needs a non-empty list of CUDA tensors")
        self._staged = staged
        info: dict[str, Any] = {"names": [n for n, _ in staged],
                                "dtype_names": [_dtype_name(t) for _, t in staged],
                                "shapes": [list(t.shape) for _, t in staged]}
        if self.backend == "ipc":
            info["ipc_handles_pickled"] = self._ipc_handles()
        return info

    def _ipc_handles(self) -> str:
        """Per-tensor CUDA IPC handles, pickled+base64 so vLLM's msgpack RPC carries a plain str
        (the worker's ``IPCWeightTransferUpdateInfo`` decodes them)."""
        import base64
        import pickle

        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        # Same as vLLM's own IPC trainer: one contiguous tensor per handle. A copy (only for
        # non-contiguous views) replaces the staged entry so it stays alive until release().
        self._staged = [(n, t if t.is_contiguous() else t.contiguous()) for n, t in self._staged]
        uuid = str(torch.cuda.get_device_properties(self._staged[0][1].device).uuid)
        handles = [{uuid: reduce_tensor(t)[1]} for _, t in self._staged]
        torch.cuda.synchronize()  # the consumer must see finished writes
        return base64.b64encode(pickle.dumps(handles)).decode("ascii")

    def broadcast(self, named_tensors: NamedTensors | None = None) -> None:
        """nccl: broadcast the staged tensors (or these, which must match ``update_info``),
        concurrently with every ``engine_receive``; returns once sent. ipc: no-op."""
        if self.backend == "ipc":
            return  # the handles already went out with update_info; keep what they point at
        if named_tensors is not None:
            self._staged = [(n, t.detach()) for n, t in named_tensors]
        if self._engine is None:
            raise RuntimeError("connect() must complete before broadcast()")
        self._engine.source.pairs = self._staged
        try:  # vLLM checks each tensor against the metadata it announced
            self._engine.send_weights()
        finally:
            self._engine.source.pairs = []
            self._staged = []

    def send(self, named_tensors: NamedTensors) -> dict:
        """Contract alias of ``update_info``: nothing moves until ``broadcast``/``engine_receive``."""
        return self.update_info(named_tensors)

    def release(self) -> None:
        """Drop staged tensors once every engine has returned; ipc: let CUDA free shared blocks."""
        self._staged = []
        if self.backend == "ipc":
            import torch

            torch.cuda.ipc_collect()

    def close(self) -> None:
        """Destroy the NCCL communicator (engines call ``engine_shutdown`` on their side)."""
        self.release()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
