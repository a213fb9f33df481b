"""What crosses Ray between the driver, the rollout engines and the learner ranks: typed, on both sides.

* `Completion`: one sampled completion, engine → driver.
* `TeacherTopK`: the teacher's distribution at each token of one completion, as an engine scored it (teacher.placement
  = engines), engine → driver → learner.
* `Sample`: one training sequence, driver → learner (student context, teacher context, completion, the
  engine's per-token sampling log-probs and the weight version that produced them; with the teacher on the engines,
  its top-k).
* `StepMetrics`: one learner rank's step, learner → driver; `StepMetrics.merge` combines ranks by the rule
  each field declares.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np


@dataclass
class TeacherTopK:
    """The teacher's top-k at every completion position t (the distribution of token t given teacher context ⊕ y_<t),
    from a vLLM prefill with prompt log-probs. Arrays travel through Ray without pickling element by element."""

    ids: np.ndarray  # [T, k] int64 token ids, by descending log-prob
    logprobs: np.ndarray  # [T, k] float32 their log-probs (full-vocabulary softmax at temperature 1)
    sampled: np.ndarray  # [T] float32 the teacher's log-prob of the sampled token y_t (teacher/logprob_gap)
    version: int  # the teacher weights' version: the student's (live), 0 (frozen) or phi's push (ema)
    seconds: float  # the scoring call's duration (shared by every completion of that call)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token (empty for greedy eval calls)
    finish_reason: str | None
    weight_version: int  # optimizer steps behind the weights that sampled it
    gen_seconds: float  # the engine call's duration (shared by every completion of that call)
    teacher: TeacherTopK | None = None  # scored right after sampling, on the same engine (teacher.placement=engines)


@dataclass
class Sample:
    student_ids: list[int]  # the prompt x, as the student sees it
    completion_ids: list[int]  # y: the student's sample (SDFT) or the demonstration (SFT)
    teacher_ids: list[int] | None = None  # teacher_ctx(x, c); None for SFT
    logprobs: list[float] | None = None  # rollout log-probs of y for the IS weight; None for SFT
    weight_version: int = 0
    teacher_topk: TeacherTopK | None = None  # teacher.placement=engines: the teacher's scores of y


def _merge(rule: str):
    return field(metadata={"merge": rule})


@dataclass
class StepMetrics:
    """One optimizer step on one rank. Ranks hold equal numbers of sequences, so means average; grad_norm and
    lr are global already (DeepSpeed all-reduces the gradients; param_norm is all-reduced)."""

    loss: float = _merge("mean")
    kl: float = _merge("mean")
    tokens: int = _merge("sum")
    is_weight_mean: float = _merge("mean")
    is_weight_min: float = _merge("min")
    is_weight_max: float = _merge("max")
    grad_norm: float = _merge("first")
    param_norm: float = _merge("first")  # of every parameter after the update, all-reduced across ZeRO-3 shards
    lr: float = _merge("first")
    skipped: int = _merge("max")  # 1: the update was not applied (train.on_nonfinite=skip); ranks agree
    pad_fraction: float = _merge("mean")  # padding tokens / computed tokens of the learner's forwards
    # teacher.placement=engines (None otherwise): the teacher's mean mass on its top-k, and on the steps of
    # teacher.check_every the mean |engine - learner| teacher log-prob of the sampled tokens (rank 0's samples)
    topk_mass: float | None = field(default=None, metadata={"merge": "mean"})
    logprob_gap: float | None = field(default=None, metadata={"merge": "first"})

    @classmethod
    def merge(cls, ranks: list[StepMetrics]) -> StepMetrics:
        rules = {"mean": lambda v: sum(v) / len(v), "sum": sum, "min": min, "max": max, "first": lambda v: v[0]}
        merged = {}
        for f in fields(cls):
            values = [v for v in (getattr(r, f.name) for r in ranks) if v is not None]
            merged[f.name] = rules[f.metadata["merge"]](values) if values else None
        return cls(**merged)

    def as_dict(self) -> dict:
        return asdict(self)

    def _measured(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self._measured().values())

    def describe_nonfinite(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._measured().items() if not math.isfinite(v))
