"""GPU backends on vLLM's own RL weight-transfer API (`vllm.distributed.weight_transfer`).

* `nccl` (disaggregated): learner rank 0 is rank 0 of an NCCL group whose other ranks are the engines' workers
  (engine i = rank 1 + i), and broadcasts the full HF-named weights. Under ZeRO-3 every learner rank gathers
  the parameters bucket by bucket in lockstep (the gather is a collective) and rank 0 sends each bucket while it
  is gathered, so the extra memory is one bucket, not the model — as OpenRLHF and verl do. The trainer side is
  vLLM's `NCCLTrainerWeightTransferEngine` with a no-op control-plane client: the Ray driver calls the engines.
* `ipc` (colocated): CUDA IPC handles of the learner's own tensors (zero copy); each engine worker opens them
  and copies. Handles are keyed by the learner GPU's UUID, so only an engine on that GPU can open them.

Per version (`WeightSync`): `updates` yields one payload (names, dtypes, shapes; ipc: also the handles) that every
engine passes to vLLM's `update_weights`, while `send` on the learner ranks broadcasts (nccl); `release` once every
engine is done (IPC handles point at learner memory). The engine side is `receiver.TransferReceiver`, shared with
the object-store backend. Every sync sends the whole model: vLLM's layerwise reload rebuilds each layer from what it
receives. A restarted engine cannot join an existing NCCL group: the group is closed and formed anew.
"""

from __future__ import annotations

import base64
import functools
import pickle
from typing import Any

import ray
import torch

from ..net import free_port
from .gather import full_shapes, iter_buckets, state_dict_copy

BUCKET_BYTES = 1 << 30  # ZeRO-3: parameters gathered at a time


@functools.cache
def _lazy_source_cls() -> type:
    """A vLLM `WeightSource` that gathers while it is iterated (built lazily: imports vLLM)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class _Source(WeightSource):
        def __init__(self, module, zero3: bool):
            self.module, self.zero3 = module, zero3

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, dtype, tuple(shape)) for n, dtype, shape in full_shapes(self.module)]

        def __iter__(self):
            for bucket in iter_buckets(self.module, zero3=self.zero3, bucket_bytes=BUCKET_BYTES):
                yield from bucket
                # vLLM copies into its packed buffers on side streams: finish before the bucket is released.
                torch.cuda.synchronize()

    return _Source


class _NoopClient:
    """vLLM's control-plane client, unused: the Ray driver calls the engines itself."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...
    def start_weight_update(self) -> None: ...
    def update_weights(self, update_info: Any) -> None: ...
    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


class VLLMSender:
    """Learner side. Rank 0 holds the NCCL endpoint; under ZeRO-3 the other ranks only join the gathers."""

    def __init__(self, learner, backend: str, source: str = "student"):
        self.backend, self.rank = backend, learner.rank
        self.module, self.zero3 = learner.weight_source(source)
        self._engine: Any = None  # vLLM's NCCL trainer engine once connected
        self._staged: dict | None = None  # ipc: the tensors the handles point at, kept until release()

    def init_info(self, num_engines: int) -> list[dict]:
        """Rank 0: the init payload of each engine (`nccl`: the rendezvous address and the engine's rank)."""
        if self.backend == "ipc":
            return [{"packed": False}] * num_engines  # one handle per tensor, no staging buffer
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        self._init = NCCLTrainerInitInfo(master_address=ray.util.get_node_ip_address(), master_port=free_port(),
                                         world_size=1 + num_engines, rank=0)
        # Separate LLM instances all report data-parallel index 0: the offset alone keeps their ranks distinct.
        return [worker_init_payload(NCCLWeightTransferInitInfo(
            master_address=self._init.master_address, master_port=self._init.master_port, rank_offset=1 + i,
            world_size=self._init.world_size, packed=self._init.packed,
            packed_buffer_size_bytes=self._init.packed_buffer_size_bytes,
            packed_num_buffers=self._init.packed_num_buffers)) for i in range(num_engines)]

    def connect(self) -> None:
        """nccl: host the rendezvous as rank 0; blocks until every engine is inside `Receiver.init`."""
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            self._engine = WeightTransferTrainerFactory.trainer_init(
                self._init, client=_NoopClient(), source=_lazy_source_cls()(self.module, self.zero3))

    def updates(self):
        """Rank 0: what the engines are about to receive (names, dtypes, shapes; ipc: also the handles)."""
        meta = full_shapes(self.module)
        info: dict[str, Any] = {"names": [n for n, _, _ in meta],
                                "dtype_names": [str(d).split(".")[-1] for _, d, _ in meta],
                                "shapes": [list(s) for _, _, s in meta]}
        if self.backend == "ipc":
            info["ipc_handles_pickled"] = self._ipc_handles()
        yield info

    def _ipc_handles(self) -> str:
        """Per-tensor CUDA IPC handles, pickled and base64-encoded so vLLM's msgpack RPC carries a plain str."""
        from torch.multiprocessing.reductions import reduce_tensor

        device = next(self.module.parameters()).device
        self._staged = state_dict_copy(self.module, zero3=self.zero3, bucket_bytes=BUCKET_BYTES, device=device)
        self._staged = {n: t.contiguous() for n, t in self._staged.items()}  # one handle per contiguous tensor
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handles = [{uuid: reduce_tensor(t)[1]} for t in self._staged.values()]
        torch.cuda.synchronize()  # the engines must see finished writes
        return base64.b64encode(pickle.dumps(handles)).decode("ascii")

    def send(self) -> None:
        """nccl: rank 0 broadcasts while gathering; under ZeRO-3 the other ranks join each gather. ipc: no-op,
        the handles went out with `updates`."""
        if self.backend == "ipc":
            return
        if self.rank == 0:
            self._engine.send_weights()
        else:
            for _ in iter_buckets(self.module, zero3=self.zero3, bucket_bytes=BUCKET_BYTES):
                pass

    def release(self) -> None:
        """Once every engine returned: ipc lets CUDA free what the handles shared."""
        self._staged = None
        if self.backend == "ipc":
            torch.cuda.ipc_collect()

    def close(self) -> None:
        """Destroy the NCCL group (before forming a new one that includes a restarted engine)."""
        self.release()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
