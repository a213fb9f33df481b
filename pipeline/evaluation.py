"""Eval hook: generate on eval prompts without demonstrations (greedy), score against the reference."""

from __future__ import annotations

import importlib
import re
from typing import Callable

from actors.rollout import generate_sharded

from .data import Example


class EvalError(ValueError):
    pass


def make_scorer(metric: str, pattern: str | None = None) -> Callable[[str, Example], float]:
    """exact_match | contains | regex | "package.module:function" (called as fn(completion, example) -> float)."""
    if metric == "exact_match":
        return lambda text, ex: float(text.strip() == ex.answer.strip())
    if metric == "contains":
        return lambda text, ex: float(ex.answer.strip() in text)
    if metric == "regex":
        if not pattern:
            raise EvalError("eval.metric=regex needs eval.regex (a pattern; group 1 is compared to the answer)")
        rx = re.compile(pattern)

        def score(text, ex):
            m = rx.search(text)
            return float(m is not None and (m.group(1) if rx.groups else m.group(0)).strip() == ex.answer.strip())

        return score
    if ":" in metric:
        mod, _, name = metric.partition(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"eval.metric={metric!r}: cannot import {name} from {mod} ({e})") from None
    raise EvalError(f"eval.metric={metric!r}: use exact_match, contains, regex or 'package.module:function'")


def evaluate(engines: list, examples: list[Example], tokenizer, cfg) -> dict:
    if not examples:
        return {}
    scorer = make_scorer(cfg.eval.metric, cfg.eval.regex)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    outs = generate_sharded(engines, [ex.student_ids for ex in examples], max_new_tokens=max_new, temperature=0.0)
    completions = [o["token_ids"] for o in outs]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    scores = [float(scorer(t, ex)) for t, ex in zip(texts, examples)]
    return {"accuracy": sum(scores) / len(scores), "num_examples": len(scores),
            "mean_completion_tokens": sum(map(len, completions)) / len(completions)}
