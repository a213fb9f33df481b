"""The driver's waits on actor calls, bounded by ray.stall_timeout_s, so that a hung or stopped actor is a message and
not a silent hang. An engine whose call makes no progress for that long is killed: Ray restarts it, and the call
raises RayActorError, which the caller's crash path handles (restart, re-sync, ask again). A learner rank cannot be
restarted: its stall stops the run (LearnerStalled). A bound of 0 waits forever."""

from __future__ import annotations

import logging
import sys
from typing import NamedTuple

import ray
from ray.exceptions import GetTimeoutError

from pipeline.errors import LearnerStalled


class Owner(NamedTuple):
    """The actor a call runs on: how messages name it, and whether Ray restarts it (engines) or not (learners)."""

    label: str
    actor: object
    restarts: bool = True


def wait(refs: list, owners: list[Owner], timeout_s: float, what: str) -> list:
    """ray.get(refs), owners[i] running refs[i], for at most timeout_s without every result; `what` names the work in
    the message (generation, the weight push, eval)."""
    try:
        return ray.get(refs, timeout=timeout_s or None)
    except GetTimeoutError:
        pass
    _, late = ray.wait(refs, num_returns=len(refs), timeout=0)
    stalled = list({o.label: o for ref, o in zip(refs, owners) if ref in late}.values())
    engines = [o for o in stalled if o.restarts]  # first: a learner may be waiting on them (an nccl send)
    if not engines:
        raise LearnerStalled(f"{stalled[0].label} made no progress for {timeout_s:.0f}s (ray.stall_timeout_s) in "
                             f"{what}: the run stops.")
    for o in engines:
        message = (f"{o.label} made no progress for {timeout_s:.0f}s (ray.stall_timeout_s) in {what}: killing it; it "
                   "restarts and is re-synced")
        logging.getLogger(__name__).warning(message)
        print(f"sdft: {message}", file=sys.stderr)
        ray.kill(o.actor, no_restart=False)
    return wait(refs, owners, timeout_s, what)  # the killed engines' calls raise RayActorError now
