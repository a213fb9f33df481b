"""Rollouts as the driver sees them: generation submitted ahead of the learner within a staleness bound, and
crashed engines restarted, re-synced and asked again. (The weights reach the engines through `actors.sync`, the
weight path's one owner; generation is always submitted behind the newest weights.)

Generation for step j is submitted while the learner works on step j - k (k = async.max_staleness), so it
runs on weights at most k versions old; every sample carries the version that produced it. Engines execute
calls in order, so a weight push queued behind in-flight generation lands after it, and generation submitted after a
push started lands behind its weights. With k = 0 this is the strict on-policy loop: generate, train, sync.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from actors.launcher import Actors
from actors.messages import Completion, Sample
from actors.rollout import submit_sharded

from ..config import Config
from ..data import Example
from ..errors import EngineFailed

RESTART_TIMEOUT_S = 600


def sample_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-request sampling seeds: a function of (seed, step, index), so a resumed or retried step samples
    exactly what it would have."""
    return [((seed * 1_000_003 + step) * 65_537 + i) % (2**31 - 1) for i in range(n)]


@dataclass
class _Pending:
    prompts: list[Example]
    seeds: list[int]
    shards: list = field(default_factory=list)  # [(engine index, prompt indices, ObjectRef)]


class Rollouts:
    def __init__(self, actors: Actors, cfg: Config, batch_for_step: Callable[[int], list[Example]], total_steps: int):
        self.actors, self.cfg, self.batch_for_step, self.total_steps = actors, cfg, batch_for_step, total_steps
        self.pending: dict[int, _Pending] = {}
        self.restarts = 0

    # ---- engines ---------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Colocated placement: engines release the GPU while the learner trains (a no-op on CPU)."""
        if self.actors.colocated:
            ray.get([e.sleep.remote() for e in self.actors.engines])

    def wake(self) -> None:
        if self.actors.colocated:
            ray.get([e.wake_up.remote() for e in self.actors.engines])

    @contextmanager
    def student_weights(self, version: int):
        """Eval and the forgetting monitor score the student. Engines that sample as the frozen teacher (dft) hold
        the initial weights: they get the student's for the duration and the initial ones back after."""
        sync = self.actors.sync
        if self.cfg.engines_follow_student:
            sync.deliver()
            yield
            return
        self.wake()
        sync.push(version)
        try:
            yield
        finally:
            sync.restore_base()

    def wait_weights(self) -> dict:
        """The stats of the weight push in flight ({} if none); engines that died under it are awaited and
        re-synced."""
        try:
            return self.actors.sync.wait()
        except RayActorError:
            self.actors.sync.abandon()
            for i in range(len(self.actors.engines)):
                self._await_engine(i)
            return self.actors.sync.resync(list(range(len(self.actors.engines))))

    def _await_engine(self, i: int) -> None:
        engine, deadline = self.actors.engines[i], time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(engine.__ray_ready__.remote(), timeout=30)
                return
            except ActorDiedError as e:
                raise EngineFailed(f"rollout engine {i} died and cannot be restarted "
                                   f"(ray.engine_max_restarts={self.cfg.ray.engine_max_restarts}): {e}") from None
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise EngineFailed(f"rollout engine {i} did not come back within {RESTART_TIMEOUT_S}s") from None
                time.sleep(1)

    def _recover(self, i: int) -> None:
        """A crashed engine restarts from the base weights: bring it to the current version before reuse."""
        self.restarts += 1
        self._await_engine(i)
        if self.actors.sync.version:  # a restarted engine holds the initial weights: version 0
            self.actors.sync.resync([i])

    # ---- generation ----------------------------------------------------------------------------------------
    def _sampling(self) -> dict:
        r = self.cfg.rollout
        return dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)

    def _prompt(self, ex: Example) -> list[int]:
        return ex.teacher_ids if self.cfg.rollout.context == "teacher" else ex.student_ids

    def _submit(self, step: int) -> None:
        self.actors.sync.deliver()  # behind the newest weights
        n = self.cfg.rollout.samples_per_prompt
        prompts = [ex for ex in self.batch_for_step(step) for _ in range(n)]
        job = _Pending(prompts, sample_seeds(self.cfg.train.seed, step, len(prompts)))
        job.shards = submit_sharded(self.actors.engines, [self._prompt(ex) for ex in prompts], job.seeds,
                                    **self._sampling())
        self.pending[step] = job

    def _collect(self, job: _Pending) -> list[Completion]:
        out: list[Completion] = [None] * len(job.prompts)  # type: ignore[list-item]
        for i, idx, ref in job.shards:
            while True:
                try:
                    results = ray.get(ref)
                    break
                except RayActorError:  # the engine crashed mid-generation: restart, re-sync, same seeds again
                    self._recover(i)
                    engine = self.actors.engines[i]
                    ref = engine.generate.remote([self._prompt(job.prompts[j]) for j in idx],
                                                 seeds=[job.seeds[j] for j in idx], **self._sampling())
            for j, r in zip(idx, results):
                out[j] = r
        return out

    def prefetch(self, step: int) -> None:
        """Submit generation for the max_staleness steps after `step` (async mode), to run while the learner works
        on `step`."""
        for j in range(step + 1, min(step + self.cfg.async_.max_staleness, self.total_steps - 1) + 1):
            if j not in self.pending:
                self._submit(j)

    def take(self, step: int) -> tuple[list[Sample], dict]:
        """Learner samples for `step` (generated now unless `prefetch` submitted them earlier), plus rollout stats."""
        if step not in self.pending:
            self._submit(step)
        job = self.pending.pop(step)
        outs = self._collect(job)
        samples = [Sample(ex.student_ids, o.token_ids, ex.teacher_ids, o.logprobs, o.weight_version)
                   for ex, o in zip(job.prompts, outs)]
        tokens = sum(len(o.token_ids) for o in outs)
        busy = {i: outs[idx[0]].gen_seconds for i, idx, _ in job.shards}  # engine-side seconds per engine
        # versions behind the learner; 0 when the engines sample as the frozen teacher by design (dft)
        staleness = [step - o.weight_version if self.cfg.engines_follow_student else 0 for o in outs]
        return samples, {
            "tokens": tokens, "tokens_per_s": tokens / max(max(busy.values()), 1e-9),
            "mean_length": tokens / len(outs),
            "truncated_frac": sum(o.finish_reason == "length" for o in outs) / len(outs),
            "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
            "busy_s": sum(busy.values()), "engine_restarts": self.restarts,
        }
