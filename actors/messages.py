"""What crosses Ray between the driver, the rollout engines and the learner ranks: typed, on both sides.

* `Completion`: one sampled completion, engine → driver.
* `Sample`: one training sequence, driver → learner (student context, teacher context, completion, the
  engine's per-token sampling log-probs and the weight version that produced them).
* `StepMetrics`: one learner rank's step, learner → driver; `StepMetrics.merge` combines ranks by the rule
  each field declares.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token (empty for greedy eval calls)
    finish_reason: str | None
    weight_version: int  # optimizer steps behind the weights that sampled it
    gen_seconds: float  # the engine call's duration (shared by every completion of that call)


@dataclass
class Sample:
    student_ids: list[int]  # the prompt x, as the student sees it
    completion_ids: list[int]  # y: the student's sample (SDFT) or the demonstration (SFT)
    teacher_ids: list[int] | None = None  # teacher_ctx(x, c); None for SFT
    logprobs: list[float] | None = None  # rollout log-probs of y for the IS weight; None for SFT
    weight_version: int = 0


def _merge(rule: str):
    return field(metadata={"merge": rule})


@dataclass
class StepMetrics:
    """One optimizer step on one rank. Ranks hold equal numbers of sequences, so means average; grad_norm and
    lr are global already (DeepSpeed all-reduces the gradients)."""

    loss: float = _merge("mean")
    kl: float = _merge("mean")
    tokens: int = _merge("sum")
    is_weight_mean: float = _merge("mean")
    is_weight_min: float = _merge("min")
    is_weight_max: float = _merge("max")
    grad_norm: float = _merge("first")
    lr: float = _merge("first")
    skipped: int = _merge("max")  # 1: the update was not applied (train.on_nonfinite=skip); ranks agree
    pad_fraction: float = _merge("mean")  # padding tokens / computed tokens of the learner's forwards

    @classmethod
    def merge(cls, ranks: list[StepMetrics]) -> StepMetrics:
        rules = {"mean": lambda v: sum(v) / len(v), "sum": sum, "min": min, "max": max, "first": lambda v: v[0]}
        return cls(**{f.name: rules[f.metadata["merge"]]([getattr(r, f.name) for r in ranks]) for f in fields(cls)})

    def as_dict(self) -> dict:
        return asdict(self)

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in asdict(self).values())

    def describe_nonfinite(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if not math.isfinite(v))
