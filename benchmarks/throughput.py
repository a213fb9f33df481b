"""Throughput of a small SDFT job on this machine: strict vs async rollouts, 1 vs 2 rollout engines, and the
same rollouts through Hugging Face `generate` as the baseline for the vLLM engine; or (`--lora`) full fine-tuning
against a LoRA adapter of rank 16 (step split, bytes and seconds per sync, peak memory of learner and engine); or
(`--packing`) the learner's padded forwards against packed ones (`train.packing`), on demonstrations of mixed length
(1 to 8 sentences) and completions sampled at temperature 1 up to --max-new-tokens, runs interleaved --reps times;
or (`--teacher`) the teacher scored on the learner against on vLLM engines (`teacher.placement`), ema and live, strict
and async, next to SFT's step.

    python benchmarks/throughput.py [--steps 12] [--batch 8] [--max-new-tokens 32] [--model tiny:llama] [--lora]
    python benchmarks/throughput.py --packing --model package:smollm2 --max-new-tokens 128 --steps 6 --reps 2
    python benchmarks/throughput.py --teacher --model package:smollm2 --batch 4 --steps 8

Prints one table, every row as a ratio to the first (strict, 1 engine), and the machine it ran on.
Steady state: the first step (compilation, caches) is left out of the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run by path, sys.path[0] is benchmarks/: import this checkout's `pipeline`
SMOKE = ROOT / "configs" / "smoke.yaml"


def _run(name: str, args, *overrides) -> dict:
    from pipeline.config import load_config
    from pipeline.run.driver import train

    out = Path(tempfile.mkdtemp(prefix="bench-"))
    cfg = load_config(SMOKE, [
        f"output_dir={out}", f"model.path={args.model}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", f"rollout.max_new_tokens={args.max_new_tokens}", "data.eval_size=1",
        "eval.max_new_tokens=1", "logging.progress=false", "logging.wandb=false", "checkpoint.every=0",
        "checkpoint.final=false", *overrides,
    ])
    peak: dict = {}
    t0 = time.perf_counter()
    train(cfg, on_step=lambda step, actors: _peak_rss(actors, peak))
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r][1:]  # steady state
    seconds = sum(r["timing_s"]["step"] for r in steps)
    tokens = sum(r.get("rollout", {}).get("tokens", r["tokens"]) for r in steps)  # sft: the demonstrations
    return {
        "name": name, "steps_per_s": len(steps) / seconds, "tokens_per_s": tokens / seconds,
        "rollout_s": sum(r["timing_s"]["rollout"] for r in steps) / len(steps),
        "learner_s": sum(r["timing_s"]["learner"] for r in steps) / len(steps),
        "sync_s": sum(r["timing_s"]["sync"] for r in steps) / len(steps),
        "rollout_idle": sum(r["idle"]["rollout"] for r in steps) / len(steps),
        "learner_idle": sum(r["idle"]["learner"] for r in steps) / len(steps),
        "engine_tokens_per_s": sum(r.get("rollout", {}).get("tokens_per_s", 0.0) for r in steps) / len(steps),
        "wall_s": wall,
        "sync_mb": sum(r["sync"].get("bytes", 0) for r in steps) / len(steps) / 2**20,
        "pad_fraction": sum(r["pad_fraction"] for r in steps) / len(steps),
        "learner_tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["timing_s"]["learner"] for r in steps),
        "peak_gib": {role: kib / 2**20 for role, kib in peak.items()},
    }


def _peak_rss(actors, peak: dict) -> None:
    """Peak resident memory (VmHWM) so far of learner rank 0 and engine 0, in KiB, into `peak`."""
    import ray

    for role, actor in (("learner", actors.learner), ("engine", actors.engines[0])):
        pid = ray.get(actor.node.remote())["pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        peak[role] = max(peak.get(role, 0), kib)


def _hf_generate(args) -> dict:
    """The same prompts, sampled with HF generate (batched, left-padded) in one process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.data import load_splits
    from pipeline.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    train_set, _ = load_splits(load_config(SMOKE, [f"model.path={args.model}", "data.eval_size=1"]), tok)
    prompts = [ex.student_ids for ex in train_set[: args.batch]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        rates.append(int((new != tok.pad_token_id).sum()) / (time.perf_counter() - t0))
    return {"name": "HF generate (rollouts only, 1 thread)", "engine_tokens_per_s": sorted(rates)[1]}


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--model", default="tiny:llama")
    p.add_argument("--lora", action="store_true", help="full fine-tuning vs model.lora.r=16 instead of the layouts")
    p.add_argument("--packing", action="store_true", help="padded vs packed learner forwards instead of the layouts")
    p.add_argument("--reps", type=int, default=2, help="--packing: interleaved runs of each")
    p.add_argument("--budget", type=int, help="--packing: also packed forwards with train.micro_batch_tokens=BUDGET")
    p.add_argument("--teacher", action="store_true", help="teacher.placement learner vs engines, and SFT, instead")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.packing:
        return _packing(args)
    if args.lora:
        return _print_lora(args, [_run("full fine-tuning", args), _run("LoRA r=16", args, "model.lora.r=16")])
    if args.teacher:
        return _teacher(args)

    rows = [
        _run("strict, 1 engine", args),
        # thread layouts (learner/engine): the default in strict mode on CPU gives each role both cores in turn
        _run("strict, threads 1/1", args, "ray.learner_threads=1", "ray.rollout_threads=1"),
        _run("strict, threads 2/1", args, "ray.learner_threads=2", "ray.rollout_threads=1"),
        _run("strict, threads 1/2", args, "ray.learner_threads=1", "ray.rollout_threads=2"),
        _run("async (staleness 1), 1 engine", args, "async.max_staleness=1"),
        _run("strict, 2 engines", args, "rollout.num_engines=2", "ray.rollout_cpus=0.5", "ray.learner_cpus=1"),
        _hf_generate(args),
    ]
    base = rows[0]
    print(f"\nSDFT pipeline throughput — {_machine()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts, {args.max_new_tokens} new tokens, "
          "steady state (first step excluded)\n")
    head = f"{'variant':38} {'steps/s':>8} {'ratio':>6} {'tok/s':>8} {'ratio':>6} {'engine tok/s':>12} {'ratio':>6}" \
           f" {'rollout s':>9} {'learner s':>9} {'sync s':>7} {'idle R/L':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def cell(key, fmt):
            return (f"{r[key]:{fmt}}", f"{r[key] / base[key]:6.2f}") if key in r else ("-", "-")

        sps, sps_r = cell("steps_per_s", "8.2f")
        tps, tps_r = cell("tokens_per_s", "8.0f")
        eng, eng_r = cell("engine_tokens_per_s", "12.0f")
        timing = (f"{r['rollout_s']:9.3f} {r['learner_s']:9.3f} {r['sync_s']:7.3f} "
                  f"{r['rollout_idle']:.2f}/{r['learner_idle']:.2f}") if "rollout_s" in r else ""
        print(f"{r['name']:38} {sps:>8} {sps_r:>6} {tps:>8} {tps_r:>6} {eng:>12} {eng_r:>6} {timing}")


def _teacher(args) -> None:
    """teacher.placement=learner against engines (the live teacher on the rollout engine, and the EMA teacher on a pool
    engine of its own: ray.num_cpus=3 for its bundle), strict and async, and SFT's step on the same batches."""
    pool = ["teacher.placement=engines", "teacher.kind=ema", "ray.num_cpus=3"]
    layouts = [("strict", []), ("async", ["async.max_staleness=1"])]
    rows = []
    for mode, extra in layouts:
        rows += [_run(f"{mode}, ema teacher on the learner", args, "teacher.kind=ema", *extra),
                 _run(f"{mode}, ema teacher on a pool engine", args, *pool, *extra),
                 _run(f"{mode}, ema teacher on a pool engine, phi every 4 steps", args, *pool,
                      "teacher.sync_every=4", *extra),
                 _run(f"{mode}, live teacher on the learner", args, "teacher.kind=live", *extra),
                 _run(f"{mode}, live teacher on the rollout engine", args, "teacher.kind=live",
                      "teacher.placement=engines", *extra)]
    rows.append(_run("sft", args, "train.mode=sft"))
    sft = rows[-1]["steps_per_s"]
    print(f"\nteacher.placement — {_machine()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts, {args.max_new_tokens} new tokens, "
          "steady state (first step excluded); teacher.topk=20 on the engines\n")
    print("| run | s/step | SDFT / SFT s/step | rollout s | learner s | sync s | engine idle | learner idle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {1 / r['steps_per_s']:.3f} | {sft / r['steps_per_s']:.2f}× | {r['rollout_s']:.3f} | "
              f"{r['learner_s']:.3f} | {r['sync_s']:.3f} | {r['rollout_idle']:.2f} | {r['learner_idle']:.2f} |")


def _print_lora(args, rows: list[dict]) -> None:
    base = rows[0]
    print(f"\nFull fine-tuning vs LoRA — {_machine()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts, {args.max_new_tokens} new tokens, "
          "steady state (first step excluded); peak RSS of learner rank 0 and engine 0\n")
    head = (f"{'variant':18} {'steps/s':>8} {'ratio':>6} {'rollout s':>9} {'learner s':>9} {'sync s':>7} "
            f"{'sync MB':>9} {'learner GiB':>11} {'engine GiB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:18} {r['steps_per_s']:8.3f} {r['steps_per_s'] / base['steps_per_s']:6.2f} "
              f"{r['rollout_s']:9.3f} {r['learner_s']:9.3f} {r['sync_s']:7.3f} {r['sync_mb']:9.2f} "
              f"{r['peak_gib'].get('learner', 0):11.2f} {r['peak_gib'].get('engine', 0):10.2f}")


def _mixed_demonstrations(n: int = 64) -> Path:
    """Rows whose demonstrations hold 1 to 8 sentences: the fact asked about, then other facts of the set."""
    import random

    facts = [json.loads(line) for line in (ROOT / "configs/data/smollm2/facts_train.jsonl").read_text().splitlines()]
    rng, rows = random.Random(0), []
    for i in range(n):
        row = facts[i % len(facts)]
        extra = rng.sample([f["demonstration"] for f in facts if f is not row], rng.randint(0, 7))
        rows.append({**row, "demonstration": " ".join([row["demonstration"], *extra])})
    path = Path(tempfile.mkdtemp(prefix="bench-data-")) / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _packing(args) -> None:
    data = _mixed_demonstrations()
    common = [f"data.train={data}", "data.eval_size=1", "model.max_model_len=512", "rollout.temperature=1.0"]
    variants = {"padded": ["train.packing=false"], "packed": ["train.packing=true"]}
    if args.budget:
        variants[f"packed, {args.budget}-token micro-batches"] = ["train.packing=true",
                                                                  f"train.micro_batch_tokens={args.budget}"]
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, overrides in variants.items():
            runs[name].append(_run(name, args, *common, *overrides))
    keys = ("learner_s", "learner_tokens_per_s", "pad_fraction", "steps_per_s")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"\nLearner forwards padded vs packed — {_machine()}")
    print(f"model {args.model}, {args.steps} steps x {args.batch} prompts (one micro-batch), up to "
          f"{args.max_new_tokens} new tokens at temperature 1, demonstrations of 1-8 sentences; {args.reps} interleaved "
          "runs each, medians, steady state (first step excluded)\n")
    head = f"{'forwards':36} {'learner s/step':>14} {'range':>15} {'learner tok/s':>13} {'pad_fraction':>12} {'steps/s':>8}"
    print(head)
    print("-" * len(head))
    for name, rs in runs.items():
        m = med[name]
        span = f"{min(r['learner_s'] for r in rs):.3f}-{max(r['learner_s'] for r in rs):.3f}"
        print(f"{name:36} {m['learner_s']:14.3f} {span:>15} {m['learner_tokens_per_s']:13.1f} "
              f"{m['pad_fraction']:12.3f} {m['steps_per_s']:8.3f}")
    for name in list(runs)[1:]:
        print(f"\npadded / {name} learner time: {med['padded']['learner_s'] / med[name]['learner_s']:.2f} "
              f"(1 / (1 - pad_fraction) = {1 / (1 - med['padded']['pad_fraction']):.2f})")


if __name__ == "__main__":
    main()
