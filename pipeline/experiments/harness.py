"""The prior-capability suite (eval.lm_eval, `sdft eval --lm-eval`): lm-evaluation-harness tasks scored on the student
through the run's own vLLM engines.

The harness asks a model for three things: the log-likelihood of a continuation (multiple choice: HellaSwag, MMLU,
TruthfulQA, Winogrande), greedy generation until a stop string (HumanEval, IFEval) and rolling log-likelihood
(perplexity). `EngineLM` answers them with the engines that already hold the student's current weights (a prefill with
prompt log-probs, or generation with stop strings), so the suite runs mid-training without a checkpoint on disk or
a GPU of its own. Tokenization follows the harness's HF backend (no special tokens added, BOS/EOS as the context of
an empty one), so the numbers are the harness's: `tests/test_lm_eval.py` compares them with its HF backend.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lm_eval.api.model import TemplateLM

from ..errors import EvalError
from ..models import first_line, hub_offline

# eval.lm_eval.tasks: paper — the SDFT paper's prior-capability suite (Table 5) with the authors' metric keys
PAPER_METRICS = {"hellaswag": "acc_norm", "mmlu": "acc", "truthfulqa_mc1": "acc", "winogrande": "acc",
                 "humaneval": "pass@1", "ifeval": "inst_level_loose_acc"}
PRESETS = {"paper": PAPER_METRICS}
CHUNK = 256  # log-likelihood requests per engine call: spread over every engine, no call holds one for long


@dataclass
class Suite:
    """The resolved task list: harness names, the headline metric of each (None: the task's first) and the harness's
    task index (the include path first)."""

    tasks: list[str]
    metrics: dict[str, str | None]
    manager: object


def parse_tasks(items: list[str]) -> dict[str, str | None]:
    """TASK[:METRIC] entries and preset names -> {task: headline metric or None}, in order."""
    out: dict[str, str | None] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if part in PRESETS:
                out.update(PRESETS[part])
            elif part:
                task, _, metric = part.partition(":")
                out[task] = metric or PAPER_METRICS.get(task)
    return out


def prepare_suite(lm_cfg) -> Suite | None:
    """Resolve and load every task once, before training starts: a misspelt task, a dataset the Hub cannot give
    (offline) or code execution that was not allowed stops the run here, not after its last step."""
    if not lm_cfg.tasks:
        return None
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    metrics = parse_tasks(lm_cfg.tasks)
    include = lm_cfg.include_path
    if include is not None and not Path(include).is_dir():
        raise EvalError(f"eval.lm_eval.include_path={include}: not a folder; give the folder of your task YAMLs")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in metrics):  # the harness's own tasks too
        manager = TaskManager(include_path=include)
    for task in metrics:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=1)
            raise EvalError(f"eval.lm_eval.tasks: {task!r} is not an lm-evaluation-harness task"
                            + (f" (did you mean {close[0]}?)" if close else "")
                            + "; give harness task names, the preset 'paper', or your own tasks with "
                              "eval.lm_eval.include_path")
        try:
            loaded = manager.load([task])["tasks"]
        except Exception as e:  # the dataset: offline and not cached, no network, a bad local file
            fix = ("HF_HUB_OFFLINE is set and it is not in the local datasets cache: run it once with network access, "
                   "or use a local task (eval.lm_eval.include_path)" if hub_offline() else
                   "check the network and the task's dataset_path, or use a local task (eval.lm_eval.include_path)")
            raise EvalError(f"eval.lm_eval: task {task!r} cannot load its dataset ({type(e).__name__}: "
                            f"{first_line(e)}); {fix}") from None
        unsafe = [name for name, t in loaded.items() if getattr(t, "UNSAFE_CODE", False)
                  or getattr(getattr(t, "config", None), "unsafe_code", False)]
        if unsafe and not lm_cfg.allow_code_execution:
            raise EvalError(f"eval.lm_eval: task {task!r} runs the model's code ({', '.join(unsafe[:3])}); set "
                            "eval.lm_eval.allow_code_execution=true where that is safe, or leave the task out")
    return Suite(list(metrics), metrics, manager)


def run_suite(engines: list, tokenizer, suite: Suite, cfg, quiet: bool = False) -> dict:
    """The harness over every task of the suite on the engines' weights. Returns the headline number per task, their
    average (`lm_eval/<task>`, `lm_eval/average`) and the harness's full results (`full`, for the JSON file).
    `quiet`: without the harness's progress bars and task warnings (a training run's console has its own bar)."""
    import contextlib
    import io

    import lm_eval

    lm_cfg = cfg.eval.lm_eval
    if lm_cfg.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF evaluate's code_eval asks for it
    model = EngineLM(engines, tokenizer, cfg.model.max_model_len, cfg.data.chat_template_kwargs,
                     stall_timeout_s=cfg.ray.stall_timeout_s)
    limit = None if lm_cfg.limit is None else (int(lm_cfg.limit) if lm_cfg.limit >= 1 else lm_cfg.limit)
    seed = cfg.train.seed
    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.WARNING)
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        out = lm_eval.simple_evaluate(
            model=model, tasks=suite.tasks, task_manager=suite.manager, num_fewshot=lm_cfg.num_fewshot, limit=limit,
            apply_chat_template=lm_cfg.apply_chat_template, confirm_run_unsafe_code=lm_cfg.allow_code_execution,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    scores, keys = {}, {}
    for task in suite.tasks:
        keys[task], scores[task] = headline(out["results"], task, suite.metrics[task])
    # the average is over scores where higher is better (accuracies), as the paper's; a perplexity stays out of it
    better = [t for t in suite.tasks if out["higher_is_better"].get(t, {}).get(keys[t].split(",")[0], True)]
    if better:
        scores["average"] = sum(scores[t] for t in better) / len(better)
    full = {k: out.get(k) for k in ("results", "groups", "versions", "n-shot", "n-samples", "higher_is_better")}
    return {**scores, "full": {**full, "metric_keys": keys, "limit": limit, "lm_eval_version": lm_eval.__version__}}


def headline(results: dict, task: str, metric: str | None) -> tuple[str, float]:
    """(the harness's metric key, e.g. "acc,none", its value) of one task's results."""
    entry = results.get(task)
    if entry is None:
        raise EvalError(f"eval.lm_eval: the harness returned no results for {task!r} (it has {sorted(results)})")
    keys = [k for k in entry if "," in k and "_stderr" not in k and isinstance(entry[k], (int, float))]
    pick = [k for k in keys if k.split(",")[0] == metric] if metric else keys[:1]
    if not pick:
        raise EvalError(f"eval.lm_eval: task {task!r} has no metric {metric!r}; it reports "
                        f"{sorted({k.split(',')[0] for k in keys})}: write {task}:<metric> in eval.lm_eval.tasks")
    return pick[0], float(entry[pick[0]])


def write_results(result: dict, path: Path, extra: dict) -> Path:
    """The suite's full results as JSON, written to a temp file and renamed (never half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**extra, **{k: v for k, v in result.items() if k != "full"}, **result["full"]},
                              indent=1, default=str))
    tmp.replace(path)
    return path


class EngineLM(TemplateLM):
    """An lm-evaluation-harness model backed by the run's vLLM engines (Ray handles of `RolloutEngine`)."""

    def __init__(self, engines: list, tokenizer, max_model_len: int, template_kwargs: dict | None = None,
                 stall_timeout_s: float = 0):
        super().__init__()
        self.engines, self.tokenizer, self.template_kwargs = engines, tokenizer, template_kwargs or {}
        self.stall_timeout_s = stall_timeout_s  # ray.stall_timeout_s (actors/watchdog.py)
        self.max_length = max_model_len - 1  # the engine's one throw-away output token needs a slot

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # the context of an empty context, as the harness's HF backend
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.template_kwargs)

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate to the engine's length, as the HF backend does; the context keeps at least one token."""
        cont = cont[-(self.max_length - 1):]
        return ctx[-(self.max_length - len(cont)):], cont

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from actors import watchdog

        pairs = [self._fit(c, x) for c, x in pairs]
        chunks = [pairs[i:i + CHUNK] for i in range(0, len(pairs), CHUNK)]
        owners = [watchdog.Owner(f"rollout engine {i % len(self.engines)}", self.engines[i % len(self.engines)])
                  for i in range(len(chunks))]
        refs = [o.actor.loglikelihood.remote(c) for o, c in zip(owners, chunks)]
        return [r for part in watchdog.wait(refs, owners, self.stall_timeout_s, "lm-eval") for r in part]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) generation on the engines, cut at the task's stop strings; requests
        with the same generation settings go in one sharded call."""
        from actors.rollout import generate_sharded

        groups: dict[tuple, list[int]] = {}
        eos = self.tokenizer.decode([self.eot_token_id])
        for i, (_, gen) in enumerate(req.args for req in requests):
            gen = dict(gen or {})
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = until + [eos] if eos not in until else until
            temperature = float(gen.get("temperature", 0.0)) if gen.get("do_sample", False) else 0.0
            groups.setdefault((tuple(until), int(gen.get("max_gen_toks", 256)), temperature), []).append(i)
        out = [""] * len(requests)
        for (until, max_new, temperature), idx in groups.items():
            budget = max(self.max_length - max_new, 1)
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in idx]
            done = generate_sharded(self.engines, prompts, max_new_tokens=min(max_new, self.max_length),
                                    temperature=temperature, stop=[s for s in until if s],
                                    stall_timeout_s=self.stall_timeout_s)
            for i, c in zip(idx, done):
                text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                for stop in filter(None, until):
                    text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
