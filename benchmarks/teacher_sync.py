"""How far `teacher.sync_every` can go before the loss moves: the EMA teacher of full fine-tuning scored on a teacher
engine pool that gets phi every k steps, against the learner's own teacher (`teacher.placement=learner`), same seed.

    python benchmarks/teacher_sync.py [--config configs/smoke.yaml] [--steps 12] [--every 1,2,4,8] [key=value ...]

Prints, per k, the mean and largest relative difference of the per-step loss from the learner-scored run, the mean
teacher/logprob_gap (checked every step) and the mean s/step, and the machine it ran on. The full vocabulary is
scored (teacher.topk=-1), so k = 1 differs only by float rounding.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(config: str, steps: int, overrides: list[str]) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.run.driver import train

    out = Path(tempfile.mkdtemp(prefix="teacher-sync-"))
    cfg = load_config(config, [f"output_dir={out}", f"train.steps={steps}", "logging.progress=false",
                               "logging.wandb=false", "checkpoint.final=false", "eval.every=0", "monitor.enabled=false",
                               "gate.enabled=false", "teacher.kind=ema", *overrides])
    train(cfg)
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", default="1,2,4,8")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    ref = _run(args.config, args.steps, args.overrides)
    rows = []
    for k in map(int, args.every.split(",")):
        got = _run(args.config, args.steps, [*args.overrides, "teacher.placement=engines", "teacher.topk=-1",
                                             f"teacher.sync_every={k}", "teacher.check_every=1", "ray.num_cpus=3"])
        rel = [abs(g["loss"] - r["loss"]) / abs(r["loss"]) for g, r in zip(got, ref)]
        gap = [g["teacher"]["logprob_gap"] for g in got]
        rows.append((k, sum(rel) / len(rel), max(rel), sum(gap) / len(gap),
                     sum(g["timing_s"]["step"] for g in got[1:]) / (len(got) - 1)))
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; {args.config}, "
          f"{args.steps} steps, {' '.join(args.overrides)}")
    print(f"learner-scored: {sum(r['timing_s']['step'] for r in ref[1:]) / (len(ref) - 1):.3f} s/step")
    print("| teacher.sync_every | loss vs learner-scored: mean rel. diff | max rel. diff | mean teacher/logprob_gap | s/step |")
    print("|---:|---:|---:|---:|---:|")
    for k, mean, worst, gap, step in rows:
        print(f"| {k} | {mean:.2e} | {worst:.2e} | {gap:.2e} | {step:.3f} |")


if __name__ == "__main__":
    main()
