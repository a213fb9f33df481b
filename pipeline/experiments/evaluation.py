"""Eval hook: generate on eval prompts without demonstrations (greedy), score against the reference."""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Callable

from actors.rollout import generate_sharded

from ..data import Example
from ..errors import EvalError
from ..models import first_line
from .task_metrics import TASK_METRICS


BUILTIN_METRICS = ("exact_match", "contains", "regex", *TASK_METRICS)


def make_scorer(metric: str, pattern: str | None = None) -> Callable[[str, Example], float]:
    """exact_match | contains | regex | tooluse | science | "package.module:function" (called as fn(completion,
    example) -> float). tooluse and science are the official SDFT eval scripts' rules (task_metrics.py)."""
    if metric in TASK_METRICS:
        return TASK_METRICS[metric]
    if metric == "exact_match":
        return lambda text, ex: float(text.strip() == ex.answer.strip())
    if metric == "contains":
        return lambda text, ex: float(ex.answer.strip() in text)
    if metric == "regex":
        if not pattern:
            raise EvalError("eval.metric=regex needs eval.regex (a pattern; group 1 is compared to the answer)")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise EvalError(f"eval.regex={pattern!r} is not a valid regular expression ({e})") from None

        def score(text, ex):
            m = rx.search(text)
            return float(m is not None and (m.group(1) if rx.groups else m.group(0)).strip() == ex.answer.strip())

        return score
    if ":" in metric:
        mod, _, name = metric.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except Exception as e:  # not importable, no such name, or the module fails while importing
            raise EvalError(f"eval.metric={metric!r}: cannot import {name} from {mod} ({type(e).__name__}: "
                            f"{first_line(e)}); give an importable 'package.module:function'") from None
        if not callable(fn):
            raise EvalError(f"eval.metric={metric!r}: {mod}.{name} is not a function")
        _check_signature(fn, metric)
        return fn
    close = difflib.get_close_matches(metric, BUILTIN_METRICS, n=1)
    raise EvalError(f"eval.metric={metric!r} is not a metric" + (f" (did you mean {close[0]}?)" if close else "")
                    + f"; use {', '.join(BUILTIN_METRICS)} or 'package.module:function'")


def _check_signature(fn, metric: str) -> None:
    """A metric is called as fn(completion, example): a callable that cannot take that (e.g. os:system) is refused
    now, not when the first eval calls it."""
    import inspect

    try:
        inspect.signature(fn).bind("completion", None)
    except TypeError:
        raise EvalError(f"eval.metric={metric!r} cannot be called as fn(completion, example) -> float; give a "
                        "function of that form") from None
    except ValueError:  # a builtin without a signature: not a metric of ours
        raise EvalError(f"eval.metric={metric!r} is not a Python function taking (completion, example)") from None


def check_metric(cfg) -> None:
    """eval.metric (and eval.regex) resolve to a scorer: a typo stops the run before Ray starts, not at the first eval."""
    make_scorer(cfg.eval.metric, cfg.eval.regex)


def score_groups(engines, groups: dict[str, tuple[list[list[int]], list[Example]]], tokenizer, cfg) -> dict[str, dict]:
    """One batched greedy generation over every group of (prompt ids, examples); per group the accuracy
    (eval.metric), exact match, count and mean completion length."""
    scorer = make_scorer(cfg.eval.metric, cfg.eval.regex)
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    prompts = [p for ids, _ in groups.values() for p in ids]
    outs = generate_sharded(engines, prompts, max_new_tokens=max_new, temperature=0.0,
                           stall_timeout_s=cfg.ray.stall_timeout_s)
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    res, i = {}, 0
    for name, (ids, exs) in groups.items():
        t, o = texts[i : i + len(ids)], outs[i : i + len(ids)]
        i += len(ids)
        res[name] = {
            "accuracy": sum(float(scorer(x, ex)) for x, ex in zip(t, exs)) / len(exs),
            "exact_match": sum(float(x.strip() == ex.answer.strip()) for x, ex in zip(t, exs)) / len(exs),
            "num_examples": len(exs), "mean_completion_tokens": sum(len(r.token_ids) for r in o) / len(o),
        }
    return res


def evaluate(engines: list, examples: list[Example], tokenizer, cfg) -> dict:
    if not examples:
        return {}
    return score_groups(engines, {"eval": ([ex.student_ids for ex in examples], examples)}, tokenizer, cfg)["eval"]


def load_eval_sets(cfg, tokenizer) -> dict[str, list[Example]]:
    """The named extra eval sets of `eval.sets` (e.g. prior skills), tokenized like the train data."""
    from ..data import load_examples, tokenize_examples

    out = {}
    for name, source in cfg.eval.sets.items():
        exs = load_examples(source, cfg.data)
        if cfg.eval.size:
            exs = exs[: cfg.eval.size]
        tokenize_examples(exs, tokenizer, cfg)
        out[name] = exs
    return out


def evaluate_all(engines: list, examples: list[Example], sets: dict[str, list[Example]], tokenizer, cfg) -> dict:
    """`evaluate` on the eval set, plus (flat keys, so they log as eval/<key>): `teacher_accuracy` (the eval
    set with its demonstration in context, current weights) when eval.teacher, `<name>.accuracy` /
    `<name>.exact_match` for every named set, and `prior_accuracy` / `prior_exact` over eval.prior."""
    groups = {f"set:{name}": ([ex.student_ids for ex in exs], exs) for name, exs in sets.items() if exs}
    if examples:
        groups["eval"] = ([ex.student_ids for ex in examples], examples)
        if cfg.eval.teacher:
            groups["teacher"] = ([ex.teacher_ids for ex in examples], examples)
    if not groups:
        return {}
    scored = score_groups(engines, groups, tokenizer, cfg)
    res = scored.pop("eval", {})
    if "teacher" in scored:
        teacher = scored.pop("teacher")
        res["teacher_accuracy"], res["teacher_exact_match"] = teacher["accuracy"], teacher["exact_match"]
    for key, r in scored.items():
        name = key.removeprefix("set:")
        res[f"{name}.accuracy"], res[f"{name}.exact_match"] = r["accuracy"], r["exact_match"]
    prior = [scored[f"set:{n}"] for n in cfg.eval.prior if f"set:{n}" in scored]
    if prior:
        res["prior_accuracy"] = sum(r["accuracy"] for r in prior) / len(prior)
        res["prior_exact"] = sum(r["exact_match"] for r in prior) / len(prior)
    return res
