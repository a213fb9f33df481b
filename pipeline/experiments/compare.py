"""`sdft compare CONFIG`: base, SFT and SDFT from the same base model, the paper-style table, results.json and
a plot of new-skill accuracy against prior-skill retention over training.

Each method is an ordinary `sdft train` run (same config, same data, same eval; only `train.mode` differs) in
OUTPUT/<method>/. The base row is the step-0 eval (identical for every method); the teacher row is the
base model *with* the demonstration in context on the held-out new-skill prompts (eval.teacher). With eval.lm_eval a
second table has the paper's layout (Table 5): per method the new-task score, every prior benchmark of the harness
suite and their average; the base row comes from the first method's step-0 suite run.

Sequential mode (`--sequential name=TRAIN,EVAL ...`): the stages train one after another, each starting from
the previous stage's final weights; after each stage every stage's held-out set and the prior skills are
evaluated, giving the forgetting table.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, load_config


def _row(ev: dict, cfg: Config | None = None) -> dict:
    """Headline numbers of one eval record; prior_acc per eval.prior_metric, prior_content = eval.metric."""
    exact = cfg is not None and cfg.eval.prior_metric == "exact_match"
    out = {"new_acc": ev.get("accuracy"), "new_exact": ev.get("exact_match"),
           "prior_acc": ev.get("prior_exact") if exact else ev.get("prior_accuracy"),
           "prior_content": ev.get("prior_accuracy")}
    if "teacher_accuracy" in ev:
        out["teacher_acc"] = ev["teacher_accuracy"]
    sets = {k.removesuffix(".accuracy"): v for k, v in ev.items() if k.endswith(".accuracy")}
    if sets:
        out["sets"] = sets  # every named eval set (eval.sets), e.g. paraphrased questions or each prior skill
    return {k: v for k, v in out.items() if v is not None}


def read_history(run_dir: Path, cfg: Config | None = None) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("eval"):
            rows.append({"step": rec["step"], **_row(rec["eval"], cfg)})
    return rows


def read_monitor(run_dir: Path) -> list[dict]:
    """The forgetting monitor's records (monitor:): step, kl_to_base, general_accuracy."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("monitor"):
            rows.append({"step": rec["step"], **{k: rec["monitor"][k] for k in ("kl_to_base", "general_accuracy")}})
    return rows


def _method_cfg(config: str | None, overrides: list[str], out: Path, method: str) -> Config:
    return load_config(config, [*overrides, f"output_dir={out / method}", f"train.mode={method}"])


def run_compare(config: str | None, overrides: list[str], output: Path, methods: list[str],
                overwrite: bool = False) -> dict:
    from ..run.driver import train

    output.mkdir(parents=True, exist_ok=True)
    results: dict = {"methods": methods, "history": {}}
    for i, method in enumerate(methods):
        # the prior suite on the base weights is the same for every method: run it once, with the first
        cfg = _method_cfg(config, [*overrides, *([] if i == 0 else ["eval.lm_eval.before=false"])], output, method)
        summary = train(cfg, overwrite=overwrite)
        before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
        if "base" not in results:
            results["base"] = {**_row(before, cfg), **_suite(summary.get("lm_eval_before"))}
            results["teacher"] = {"new_acc": before.get("teacher_accuracy"),
                                  "new_exact": before.get("teacher_exact_match")}
            results["config"] = cfg.model_dump()
        results[method] = {**_row(after, cfg), "steps": summary["steps"],
                           "teacher_after": after.get("teacher_accuracy"), **_suite(summary.get("lm_eval_after"))}
        results["history"][method] = read_history(Path(cfg.output_dir), cfg)
        results.setdefault("monitor", {})[method] = read_monitor(Path(cfg.output_dir))
        if summary.get("checkpoint"):
            results[method]["kl_to_base"] = checkpoint_kl_to_base(cfg, Path(summary["checkpoint"]) / "model")
        results["base"].pop("teacher_acc", None)
    results["prior_skills"] = list(results["config"]["eval"]["prior"])
    (output / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, output / "compare.png")
    print_table(results, str(output))
    if results["base"].get("prior_suite") is not None:
        print_paper_table(results)
    return results


def _suite(scores: dict | None) -> dict:
    """The prior-capability suite (eval.lm_eval) of one row: each benchmark's headline and their average."""
    if not scores:
        return {}
    return {"prior_suite": {k: v for k, v in scores.items() if k != "average"}, "prior_average": scores.get("average")}


def _fmt(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def print_table(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"base vs {' vs '.join(m.upper() for m in results['methods'])} — {title}")
    ev = results.get("config", {}).get("eval", {})
    extra = [n for n in ev.get("sets", {}) if n not in ev.get("prior", [])]  # e.g. paraphrased questions
    for col in ("method", "new skill", "new, exact", *extra, "prior skills", "prior (eval.metric)",
                "teacher+demo", "KL to base"):
        t.add_column(col, justify="right" if col != "method" else "left", no_wrap=True)
    teacher, base = results["teacher"], results["base"]

    def sets(r):
        return [_fmt(r.get("sets", {}).get(n)) for n in extra]

    t.add_row("teacher (base + demo)", _fmt(teacher["new_acc"]), _fmt(teacher.get("new_exact")),
              *["–"] * len(extra), "–", "–", "–", "–")
    t.add_row("base", _fmt(base.get("new_acc")), _fmt(base.get("new_exact")), *sets(base),
              _fmt(base.get("prior_acc")), _fmt(base.get("prior_content")), _fmt(teacher["new_acc"]), "0")
    for m in results["methods"]:
        r = results[m]
        t.add_row(f"{m.upper()} ({r['steps']} steps)", _fmt(r.get("new_acc")), _fmt(r.get("new_exact")),
                  *sets(r), _fmt(r.get("prior_acc")), _fmt(r.get("prior_content")), _fmt(r.get("teacher_after")),
                  "–" if r.get("kl_to_base") is None else f"{r['kl_to_base']:.3f}")
    Console(width=max(Console().width, 130)).print(t)
    print("Accuracy in % (greedy, held-out prompts, no demonstration). new skill: content right in any form "
          "(eval.metric);\nnew, exact: the exact reference string; other named sets (eval.sets outside eval.prior, "
          "e.g. paraphrased\nquestions): eval.metric; prior skills: eval.prior_metric; teacher+demo: the model *with* "
          "the demonstration\nin context; KL to base: mean per-token KL(base || model) on prior-skill prompts, nats.")


def print_paper_table(results: dict) -> None:
    """The paper's Table 5 layout: per method the new-task score, each prior benchmark and their average (%)."""
    from rich.console import Console
    from rich.table import Table

    rows = [("base", results["base"])] + [(m.upper(), results[m]) for m in results["methods"]]
    tasks = list(results["base"].get("prior_suite") or {})
    t = Table(title="new task and prior capabilities (lm-evaluation-harness), %")
    for col in ("method", "new task", *tasks, "prior avg"):
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name, r in rows:
        suite = r.get("prior_suite") or {}
        t.add_row(name, _fmt(r.get("new_acc")), *[_fmt(suite.get(k)) for k in tasks], _fmt(r.get("prior_average")))
    Console(width=max(Console().width, 130)).print(t)
    print("new task: eval.metric on the held-out prompts, greedy, no demonstration; prior benchmarks: each task's "
          "headline metric (eval.lm_eval.tasks); prior avg: their mean over the metrics where higher is better.")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor = {m: rows for m, rows in results.get("monitor", {}).items() if rows}
    suite = results["base"].get("prior_average") is not None
    panels = 2 + bool(monitor) + suite
    fig, (a, b, *c) = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    colors = {"sdft": "tab:blue", "sft": "tab:red", "dft": "tab:green"}
    for m in results["methods"]:
        h = results["history"][m]
        xs = [r.get("new_acc", 0) for r in h]
        ys = [r.get("prior_acc", 0) for r in h]
        a.plot(xs, ys, "o-", color=colors.get(m), label=m.upper(), ms=4)
        steps = [r["step"] for r in h]
        b.plot(steps, xs, "o-", color=colors.get(m), label=f"{m.upper()} new skill", ms=3)
        b.plot(steps, ys, "s--", color=colors.get(m), label=f"{m.upper()} prior skills", ms=3)
    a.plot([results["base"].get("new_acc", 0)], [results["base"].get("prior_acc", 0)], "k*", ms=12, label="base")
    a.set_xlabel("new-skill accuracy (held out, no demonstration)")
    a.set_ylabel("prior-skill accuracy (mean)")
    a.set_xlim(-0.03, 1.03)
    a.set_ylim(-0.03, 1.03)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    a.set_title("learning vs retention over training")
    b.set_xlabel("step")
    b.set_ylabel("accuracy")
    b.set_ylim(-0.03, 1.03)
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    b.set_title("accuracy over training")
    if monitor:  # the live forgetting monitor: KL(base || student) on the general prompts
        for m, rows in monitor.items():
            c[0].plot([r["step"] for r in rows], [r["kl_to_base"] for r in rows], "o-", color=colors.get(m),
                      label=m.upper(), ms=3)
        c[0].set_xlabel("step")
        c[0].set_ylabel("KL(base || model) per token, nats")
        c[0].grid(alpha=0.3)
        c[0].legend(fontsize=8)
        c[0].set_title("KL to base on general prompts (monitor)")
    if suite:  # the paper's trade-off: new-task score against the prior-capability average
        d = c[-1]
        d.plot([results["base"].get("new_acc") or 0], [results["base"]["prior_average"]], "k*", ms=12, label="base")
        for m in results["methods"]:
            d.plot([results[m].get("new_acc") or 0], [results[m].get("prior_average") or 0], "o", ms=9,
                   color=colors.get(m), label=m.upper())
        d.set_xlabel("new task (eval.metric)")
        d.set_ylabel("prior benchmarks, average (lm_eval)")
        d.grid(alpha=0.3)
        d.legend(fontsize=8)
        d.set_title("new task vs prior capabilities")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_kl_to_base(cfg: Config, model_dir: Path, max_prompts: int = 300) -> float | None:
    """Mean per-token KL(base || trained) of a saved checkpoint's model on the prior-skill prompts (eval.prior
    sets), over the base model's own greedy answers — how far training moved the model where it was already
    competent (the paper's "KL to base"). In-process Hugging Face forwards; meant for small models. The KL is the
    forgetting monitor's (`actors.forward.token_kl_sum`); the live one, on the learner, is `Learner.kl_to_base`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.forward import completion_logits

    from .evaluation import load_eval_sets
    from ..models import resolve_model
    from actors.forward import token_kl_sum

    if not cfg.eval.prior:
        return None
    base_dir = resolve_model(cfg.model.path, cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sets = load_eval_sets(cfg, tok)
    prompts = [ex.student_ids for n in cfg.eval.prior for ex in sets[n]][:max_prompts]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    answers = []
    with torch.no_grad():
        for p in prompts:
            seq = base.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=pad)
            answers.append(seq[0, len(p):].tolist())
    packed = cfg.train.packing
    total, count = token_kl_sum(model, lambda x, y: completion_logits(base, x, y, pad, packed),
                                list(zip(prompts, answers)), pad, chunk=16, packed=packed)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------- sequential
def parse_stages(items: list[str]) -> list[tuple[str, str, str]]:
    stages = []
    for it in items:
        name, _, rest = it.partition("=")
        train_file, _, eval_file = rest.partition(",")
        if not (name and train_file and eval_file):
            raise ValueError(f"--sequential stage {it!r}: expected NAME=TRAIN.jsonl,EVAL.jsonl")
        stages.append((name, train_file, eval_file))
    return stages


def run_sequential(config: str | None, overrides: list[str], output: Path, methods: list[str],
                   stages: list[tuple[str, str, str]], overwrite: bool = False) -> dict:
    """Stages in a row; after each, accuracy on every stage's held-out set and the prior skills."""
    from ..run.checkpoint import latest
    from ..run.driver import train

    output.mkdir(parents=True, exist_ok=True)
    stage_sets = [f"eval.sets.{n}={e}" for n, _, e in stages]
    results: dict = {"methods": methods, "stages": [s[0] for s in stages], "table": {}}
    for method in methods:
        model_override: list[str] = []
        rows = []
        for i, (name, train_file, eval_file) in enumerate(stages):
            cfg = load_config(config, [*overrides, *stage_sets, *model_override,
                                       f"output_dir={output / method / name}", f"train.mode={method}",
                                       f"data.train={train_file}", f"data.eval={eval_file}"])
            summary = train(cfg, overwrite=overwrite)
            if i == 0:
                results.setdefault("base", _stage_row(summary["eval_before"], stages, cfg))
            rows.append({"after": name, **_stage_row(summary["eval_after"], stages, cfg)})
            model_override = [f"model.path={latest(Path(cfg.output_dir)) / 'model'}"]
        results["table"][method] = rows
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print_sequential(results)
    return results


def _stage_row(ev: dict, stages, cfg) -> dict:
    row = {n: ev.get(f"{n}.accuracy") for n, _, _ in stages}
    row["prior_acc"] = _row(ev, cfg)["prior_acc"]
    return row


def print_sequential(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sequential learning: accuracy after each stage (%)")
    t.add_column("method / after")
    for n in results["stages"]:
        t.add_column(n, justify="right")
    t.add_column("prior skills", justify="right")
    t.add_row("base", *[_fmt(results["base"][n]) for n in results["stages"]], _fmt(results["base"]["prior_acc"]))
    for m, rows in results["table"].items():
        for r in rows:
            t.add_row(f"{m.upper()} after {r['after']}", *[_fmt(r[n]) for n in results["stages"]],
                      _fmt(r["prior_acc"]))
    Console().print(t)
