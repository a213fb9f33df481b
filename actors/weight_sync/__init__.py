"""The weight path from the learner to the rollout engines: one protocol, one owner.

Every backend is a `Sender` (in each learner rank) and speaks to the engines through one engine-side `Receiver`:

* `object_store` (CPU default): full HF-named weights bucket by bucket through Ray's shared-memory object store,
  received by a vLLM weight-transfer engine registered at run time (`object_store.py`);
* `nccl` / `ipc` (GPU): vLLM's own NCCL broadcast and CUDA-IPC engines (`vllm_transfer.py`);
* `lora` (whenever `model.lora` is on): only the student adapter, loaded as a new vLLM LoRA adapter (`lora.py`).

The three full-weight backends share the engine side: vLLM's weight-transfer API (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`), so the CPU tests drive the call sequence a GPU
run makes and only the communicator differs. `WeightSync` (the driver's side) owns the weight versions, the
overlap with the learner's next step and the re-sync of restarted engines; `gather.py` reads the learner's full
weights bucket by bucket, under ZeRO-3 too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import ray

from pipeline.errors import LearnerStalled

from .. import watchdog

BACKENDS = ("object_store", "nccl", "ipc", "lora")
# The learner exports in a concurrency group of its own, so that in async mode the export of version v runs next to
# the step that follows it (that step's update waits for it: `Learner.step(hold=v)`).
SYNC_GROUP = "sync"
LEARNER_CONCURRENCY = {SYNC_GROUP: 1}


class Sender(Protocol):
    """Learner side, one per rank. Rank 0 talks to the engines; under ZeRO-3 the other ranks join its gathers."""

    def init_info(self, num_engines: int) -> list[dict]:
        """Rank 0: each engine's payload for `Receiver.init` (a rendezvous address and rank for nccl)."""

    def connect(self) -> None:
        """Rank 0: join the group the engines join in `Receiver.init` (nccl), concurrently with them."""

    def updates(self) -> Iterator[dict]:
        """Rank 0: the payloads every engine loads in order, one `Receiver.update` each (the weights themselves, or
        only their metadata where `send` carries them)."""

    def send(self) -> None:
        """Every rank, concurrently with the engines' updates: the bytes that go outside the payloads (the nccl
        broadcast), and on ranks > 0 under ZeRO-3 their part of each bucket's gather."""

    def release(self) -> None:
        """Rank 0, once every engine has loaded the version: free what was staged for it (ipc handles)."""

    def close(self) -> None:
        """Rank 0: leave the group (before a new one forms around a restarted engine)."""


class Receiver(Protocol):
    """Engine side: a handshake once, then begin → update per payload → finish for every version."""

    def init(self, init_info: dict) -> None: ...
    def begin(self) -> None: ...
    def update(self, payload: dict) -> None: ...
    def finish(self, version: int) -> dict:
        """Make the version live (drop prefixes cached under the old weights); returns load_s and bytes."""
    def close(self) -> None: ...


def resolve_backend(name: str, on_gpu: bool, placement: str = "disaggregated", lora: bool = False,
                    zero3_ranks: bool = False) -> str:
    """`sync.backend: auto` → object_store on CPU; on GPU ipc when colocated (unless ZeRO-3 spreads the model over
    several ranks: ipc shares rank 0's whole model), else nccl. LoRA always sends only the adapter."""
    if lora:
        return "lora"
    if name != "auto":
        return name
    if not on_gpu:
        return "object_store"
    return "ipc" if placement == "colocated" and not zero3_ranks else "nccl"


def make_sender(backend: str, learner, dtype: str | None, source: str = "student") -> Sender:
    """`source`: the weights sent, `student` or `teacher` (phi, to a teacher engine pool; `Learner.weight_source`)."""
    if backend == "object_store":
        from .object_store import ObjectStoreSender

        return ObjectStoreSender(learner, dtype, source)
    if backend == "lora":
        from .lora import LoRASender

        return LoRASender(learner, dtype)
    from .vllm_transfer import VLLMSender

    return VLLMSender(learner, backend, source)


def make_receiver(backend: str, engine) -> Receiver:
    if backend == "lora":
        from .lora import LoRAReceiver

        return LoRAReceiver(engine)
    from .receiver import TransferReceiver

    return TransferReceiver(engine)


class WeightSync:
    """Driver side: pushes each new weight version from the learner ranks to the engines.

    `push(v)` sends and waits. `start(v)` only starts: where the sync `overlaps`, the learner's export runs next to
    its next step (which must get `hold=self.hold`) and the engines get the weights at `deliver` or `wait`;
    elsewhere the engines get them at once and the learner's next call runs once they are taken from it (Ray runs
    one caller's calls to an actor in order). Calls made to an engine after `deliver` land behind the new weights."""

    def __init__(self, backend: str, learners: list, engines: list, *, dtype: str | None, zero3: bool,
                 source: str = "student", stall_timeout_s: float = 0):
        """`source`: what the engines get, the student (rollout engines) or the teacher phi (a teacher engine pool,
        from its full copy on each rank: no ZeRO-3 gather, and no overlap with the step, which updates phi last).
        A push that makes no progress for `stall_timeout_s` kills the engines it waits for (actors/watchdog.py)."""
        if backend not in BACKENDS:
            raise ValueError(f"sync.backend={backend!r}: expected one of {BACKENDS}")
        self.backend, self.learners, self.engines, self.source = backend, learners, engines, source
        self.stall_timeout_s = stall_timeout_s
        self.zero3 = zero3 and source == "student"
        # the export may run next to the learner's next step: full weights through the object store (a ZeRO-3 export
        # is a collective of every rank, which a step running at the same time would interleave with its own)
        self.overlaps = backend == "object_store" and not self.zero3 and source == "student"
        self.version = 0  # the version the engines hold, or are being sent
        self._pending: dict | None = None  # a push started and not yet waited for
        ray.get([lr.open_weight_sync.remote(backend, dtype, source) for lr in learners])
        self._connect(engines)

    def _connect(self, engines: list) -> None:
        ray.get([e.open_weight_sync.remote(self.backend) for e in engines])
        infos = ray.get(self.learners[0].weight_init_info.remote(len(engines), self.source))
        ray.get([self.learners[0].connect_weight_sync.remote(self.source)]
                + [e.init_weight_transfer.remote(info) for e, info in zip(engines, infos)])

    # ---- one version --------------------------------------------------------------------------------------------
    def push(self, version: int) -> dict:
        """Send the learner's weights as `version` to every engine and wait; returns seconds, bytes and the backend's
        split (transport_s: until the learner has handed every payload over; load_s: the slowest engine's load)."""
        self.start(version)
        return self.wait()

    def start(self, version: int) -> None:
        self.wait()
        self.version = version
        self._pending = self._begin(version, self.engines)
        if not self.overlaps:
            self.deliver()

    @property
    def hold(self) -> int | None:
        """The version the learner may still be exporting next to its next step (that step's `hold`), else None."""
        return self.version if self._pending is not None and self._pending["updates"] is None else None

    def deliver(self) -> None:
        """Hand the push in flight to the engines, payload by payload as the learner puts them; returns once the
        learner has handed every one over, with the engines still loading."""
        if self._pending is not None:
            self._deliver(self._pending)

    def wait(self) -> dict:
        """The stats of the push in flight ({} if none)."""
        push, self._pending = self._pending, None
        return {} if push is None else self._collect(push)

    def abandon(self) -> None:
        """Forget the push in flight (an engine died under it); `resync` sends the version again."""
        self._pending = None

    def _begin(self, version: int, engines: list) -> dict:
        senders = self.learners if self.zero3 else self.learners[:1]
        stream = self.learners[0].export_weights.options(num_returns="streaming", concurrency_group=SYNC_GROUP
                                                         ).remote(version, self.source)
        return {"t0": time.perf_counter(), "version": version, "engines": engines, "stream": stream,
                "sends": [lr.send_weights.remote(self.source) for lr in senders], "updates": None}

    def _deliver(self, push: dict) -> None:
        if push["updates"] is not None:
            return
        t0, engines = time.perf_counter(), push["engines"]
        push["updates"] = [e.start_weight_update.remote() for e in engines]
        for ref in self._payloads(push):
            push["updates"] += [e.update_weights.remote(ref) for e in engines]
        push["transport_s"] = time.perf_counter() - t0
        push["finishes"] = [e.finish_weight_update.remote(push["version"]) for e in engines]

    def _owners(self, engines: list) -> list[watchdog.Owner]:
        pool = "teacher" if self.source == "teacher" else "rollout"
        return [watchdog.Owner(f"{pool} engine {self.engines.index(e)}", e) for e in engines]

    def _wait(self, refs: list, owners: list[watchdog.Owner]) -> list:
        return watchdog.wait(refs, owners, self.stall_timeout_s, "the weight push")

    def _payloads(self, push: dict) -> Iterator:
        """The learner's export as it streams. One that yields nothing for stall_timeout_s: the engines it may be
        waiting on (nccl) are checked first (stalled ones are killed: RayActorError), else learner rank 0 stalled."""
        stream = push["stream"]
        while True:
            if self.stall_timeout_s and not ray.wait([stream], timeout=self.stall_timeout_s)[0]:
                self._wait(push["updates"], self._update_owners(push))
                raise LearnerStalled(f"learner rank 0 made no progress for {self.stall_timeout_s:.0f}s "
                                     "(ray.stall_timeout_s) in the weight push: the run stops.")
            try:
                yield next(stream)
            except StopIteration:
                return

    def _update_owners(self, push: dict) -> list[watchdog.Owner]:
        """push["updates"]: every engine's start, then every engine's share of each payload."""
        return self._owners(push["engines"]) * (len(push["updates"]) // len(push["engines"]))

    def _collect(self, push: dict) -> dict:
        self._deliver(push)
        learners = [watchdog.Owner(f"learner rank {r}", lr, restarts=False) for r, lr in enumerate(self.learners)]
        self._wait(push["sends"] + push["updates"], learners[:len(push["sends"])] + self._update_owners(push))
        stats = self._wait(push["finishes"], self._owners(push["engines"]))
        self._wait([self.learners[0].release_weights.remote(self.source)], learners[:1])
        return {"seconds": time.perf_counter() - push["t0"], "transport_s": push["transport_s"],
                "bytes": stats[0]["bytes"] if stats else 0, "load_s": max((s["load_s"] for s in stats), default=0.0)}

    # ---- engines that lost their weights ----------------------------------------------------------------------
    def resync(self, indices: list[int]) -> dict:
        """Bring restarted engines (fresh from the base weights) to the current version. An nccl group's membership
        is fixed at its rendezvous: the group is closed and formed anew around every engine."""
        restarted = [self.engines[i] for i in indices]
        if self.backend == "nccl":
            alive = [e for e in self.engines if e not in restarted]
            ray.get([self.learners[0].close_weight_sync.remote(self.source)] + [e.close_weight_sync.remote() for e in alive])
            restarted = self.engines
        self._connect(restarted)
        return self._collect(self._begin(self.version, restarted))

    def restore_base(self) -> None:
        """Engines back to the initial weights, version 0 (dft: they sample as the frozen teacher)."""
        self.wait()
        ray.get([e.restore_base.remote() for e in self.engines])
        self.version = 0
