"""Rollouts as the driver sees them: generation submitted ahead of the learner within a staleness bound, and
crashed engines restarted, re-synced and asked again. (The weights reach the engines through `actors.sync`, the
weight path's one owner; generation is always submitted behind the newest weights.)

Generation for step j is submitted while the learner works on step j - k (k = async.max_staleness), so it
runs on weights at most k versions old; every sample carries the version that produced it. Engines execute
calls in order, so a weight push queued behind in-flight generation lands after it, and generation submitted after a
push started lands behind its weights. With k = 0 this is the strict on-policy loop: generate, train, sync.

With the teacher on the engines (teacher.placement=engines) every completion is scored under the teacher as soon as
it exists: by the rollout engine that sampled it, in the same call (live teacher; LoRA frozen / ema: the base / the EMA
adapter on the same engines), or by an engine of the teacher pool, called with the generation's result (a Ray
ObjectRef: it starts when generation ends, without the driver). In async mode scoring thus overlaps the learner's
previous step, on the teacher weights the pool holds then (ema: up to k pushes of phi behind).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from actors import watchdog
from actors.launcher import Actors
from actors.messages import Completion, Sample
from actors.rollout import submit_sharded

from ..config import Config
from ..data import Example
from ..errors import EngineFailed

RESTART_TIMEOUT_S = 600
T = TypeVar("T")


def sample_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-request sampling seeds: a function of (seed, step, index), so a resumed or retried step samples
    exactly what it would have."""
    return [((seed * 1_000_003 + step) * 65_537 + i) % (2**31 - 1) for i in range(n)]


@dataclass
class _Pending:
    prompts: list[Example]
    seeds: list[int]
    shards: list = field(default_factory=list)  # [(engine index, prompt indices, ObjectRef)]
    scores: list = field(default_factory=list)  # teacher pool: [(teacher engine index, ObjectRef)], one per shard


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
        the initial weights: they get the student's for the duration and the initial ones back after. SFT pushes
        nothing after its steps: the student's weights go out here, when an eval or the monitor needs them."""
        sync = self.actors.sync
        if self.cfg.engines_follow_student:
            if sync.version != version:  # sft: no push since the last eval (nothing samples in between)
                self.wake()
                sync.start(version)
                self.wait_weights()
            sync.deliver()
            yield
            return
        self.wake()
        sync.start(version)
        self.wait_weights()
        try:
            yield
        finally:
            sync.restore_base()

    def again_after_crash(self, measure: Callable[[], T]) -> T:
        """Eval, the lm-eval suite, the monitor, the greedy check: a measurement whose engine crashed, or stalled and
        was killed (ray.stall_timeout_s), is taken again once every engine is back at the current weights. A second
        failure stops the run."""
        try:
            return measure()
        except RayActorError as e:
            logging.getLogger(__name__).warning("an engine failed during a measurement (%s): restarting it", e)
        self.restarts += 1
        self.actors.sync.abandon()
        for i in range(len(self.actors.engines)):
            self._await_engine(i)
        if self.actors.sync.version:
            self.actors.sync.resync(list(range(len(self.actors.engines))))
        try:
            return measure()
        except RayActorError as e:
            raise EngineFailed(f"a measurement failed again after its engines were restarted: {e}") from None

    def wait_weights(self) -> dict:
        """The stats of the weight push in flight ({} if none); engines that died under it are awaited and
        re-synced."""
        try:
            return self.actors.sync.wait()
        except RayActorError:
            self.restarts += 1
            self.actors.sync.abandon()
            for i in range(len(self.actors.engines)):
                self._await_engine(i)
            return self.actors.sync.resync(list(range(len(self.actors.engines))))

    def _await_engine(self, i: int, pool: str = "rollout") -> None:
        engines = self.actors.teachers if pool == "teacher" else self.actors.engines
        engine, deadline = engines[i], time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(engine.__ray_ready__.remote(), timeout=30)
                return
            except ActorDiedError as e:
                raise EngineFailed(f"{pool} engine {i} died and cannot be restarted "
                                   f"(ray.engine_max_restarts={self.cfg.ray.engine_max_restarts}): {e}") from None
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise EngineFailed(f"{pool} engine {i} did not come back within {RESTART_TIMEOUT_S}s") from None
                time.sleep(1)

    def _wait(self, ref, label: str, engine, what: str):
        """One engine call's result; a stall kills the engine (actors/watchdog.py): the call raises RayActorError."""
        return watchdog.wait([ref], [watchdog.Owner(label, engine)], self.cfg.ray.stall_timeout_s, what)[0]

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

    def _scored_here(self) -> bool:
        """The rollout engines score the teacher themselves, right after sampling (teacher.placement=engines)."""
        return self.cfg.teacher_on_engines and not self.cfg.teacher_pool

    def _submit(self, step: int) -> None:
        self.actors.sync.deliver()  # behind the newest weights
        n = self.cfg.rollout.samples_per_prompt
        prompts = [ex for ex in self.batch_for_step(step) for _ in range(n)]
        job = _Pending(prompts, sample_seeds(self.cfg.train.seed, step, len(prompts)))
        contexts = [ex.teacher_ids for ex in prompts] if self._scored_here() else None
        job.shards = submit_sharded(self.actors.engines, [self._prompt(ex) for ex in prompts], job.seeds,
                                    teacher_contexts=contexts, **self._sampling())
        pool = self.actors.teachers
        for k, (_, idx, ref) in enumerate(job.shards):  # the pool scores each shard once it is generated
            if pool:
                job.scores.append((k % len(pool), pool[k % len(pool)].score.remote(
                    [prompts[j].teacher_ids for j in idx], ref)))
        self.pending[step] = job

    def _collect(self, job: _Pending) -> list[Completion]:
        out: list[Completion] = [None] * len(job.prompts)  # type: ignore[list-item]
        for k, (i, idx, ref) in enumerate(job.shards):
            while True:
                try:
                    results = self._wait(ref, f"rollout engine {i}", self.actors.engines[i], "generation")
                    break
                except RayActorError:  # crashed, or stalled and killed: restart, re-sync, same seeds again
                    self._recover(i)
                    engine = self.actors.engines[i]
                    contexts = [job.prompts[j].teacher_ids for j in idx] if self._scored_here() else None
                    ref = engine.generate.remote([self._prompt(job.prompts[j]) for j in idx],
                                                 seeds=[job.seeds[j] for j in idx], teacher_contexts=contexts,
                                                 **self._sampling())
            if job.scores:
                for r, scores in zip(results, self._pool_scores(job, k, idx, results)):
                    r.teacher = scores
            for j, r in zip(idx, results):
                out[j] = r
        return out

    def _pool_scores(self, job: _Pending, k: int, idx: list[int], results: list[Completion]) -> list:
        """The teacher pool's scores of shard k; a teacher engine that crashed is awaited, brought to the current phi
        and asked again."""
        t, ref = job.scores[k]
        while True:
            try:
                return self._wait(ref, f"teacher engine {t}", self.actors.teachers[t], "teacher scoring")
            except RayActorError:
                self._recover_teachers([t])
                ref = self.actors.teachers[t].score.remote([job.prompts[j].teacher_ids for j in idx], results)

    def push_teacher(self, version: int) -> None:
        """phi as `version` to the teacher pool (teacher.kind=ema), once the previous push has landed; pool engines
        that died under it are awaited and re-synced first."""
        sync = self.actors.teacher_sync
        try:
            sync.wait()
        except RayActorError:
            self._recover_teachers(list(range(len(self.actors.teachers))))
        sync.start(version)

    def _recover_teachers(self, indices: list[int]) -> None:
        """Pool engines restart from model.path: bring them to the current phi (frozen: nothing to bring)."""
        self.restarts += 1
        sync = self.actors.teacher_sync
        if sync is not None:
            sync.abandon()
        for t in indices:
            self._await_engine(t, pool="teacher")
        if sync is not None and sync.version:
            sync.resync(indices)

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
        samples = [Sample(ex.student_ids, o.token_ids, ex.teacher_ids, o.logprobs, o.weight_version, o.teacher)
                   for ex, o in zip(job.prompts, outs)]
        tokens = sum(len(o.token_ids) for o in outs)
        # engine-side seconds per engine (scoring included where the rollout engines score the teacher)
        busy = {i: outs[idx[0]].gen_seconds + (outs[idx[0]].teacher.seconds if self._scored_here() else 0.0)
                for i, idx, _ in job.shards}
        # versions behind the learner; 0 when the engines sample as the frozen teacher by design (dft)
        staleness = [step - o.weight_version if self.cfg.engines_follow_student else 0 for o in outs]
        return samples, {
            "tokens": tokens, "tokens_per_s": tokens / max(max(busy.values()), 1e-9),
            "mean_length": tokens / len(outs),
            "truncated_frac": sum(o.finish_reason == "length" for o in outs) / len(outs),
            "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
            "busy_s": sum(busy.values()), "engine_restarts": self.restarts,
            **({"teacher_s": max(outs[idx[0]].teacher.seconds for _, idx, _ in job.shards)}
               if self.cfg.teacher_on_engines else {}),
        }
