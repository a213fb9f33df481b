"""Seconds per weight push, learner → rollout engine, on this machine: the real actors (`launch`), the configured
backend, the model of a config (default: SmolLM2-135M-Instruct, 651 MB in float32), a few pushes after a warm-up.

    python benchmarks/weight_sync.py                               # this checkout
    python benchmarks/weight_sync.py --against /path/to/other/tree  # two checkouts, interleaved, with the ratio

Each run is a fresh process (its own private Ray); with --against the two trees alternate `--reps` times, and the
table gives the median over runs of each run's median push, with the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("seconds", "transport_s", "load_s")


def _worker(args) -> None:
    sys.path.insert(0, os.getcwd())
    from actors.launcher import init_ray, launch, stop_private_ray
    from pipeline.config import load_config
    from pipeline.models import resolve_model

    cfg = load_config(args.config, ["ray.learner_ranks=1", "rollout.num_engines=1", *args.overrides])
    model_path = resolve_model(cfg.model.path, cfg.train.seed)
    init_ray(None, cfg.ray.num_cpus)
    actors = launch(cfg, model_path, 10)
    try:
        actors.sync.push(version=1)  # warm-up: first-call costs of Ray and vLLM
        pushes = [actors.sync.push(version=v) for v in range(2, 2 + args.pushes)]
    finally:
        actors.shutdown()
        stop_private_ray()
    Path(args.result).write_text(json.dumps(pushes))


def _run(tree: Path, args) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--result", result, "--config", args.config,
           "--pushes", str(args.pushes), *args.overrides]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(result).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2-knowledge.yaml", help="relative to each tree")
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--against", help="another checkout of sdft, measured in turn with this one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    trees = {"this": ROOT, **({"against": Path(args.against).resolve()} if args.against else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for rep in range(args.reps):
        for name, tree in trees.items():
            pushes = _run(tree, args)
            runs[name].append({k: statistics.median(x[k] for x in pushes) for k in KEYS} | {"bytes": pushes[0]["bytes"]})
            print(f"rep {rep + 1} {name:7}: " + ", ".join(f"{k} {runs[name][-1][k]:.3f}" for k in KEYS), flush=True)
    print(f"\n{'tree':8} {'MB':>7} " + " ".join(f"{k + ' (median, range)':>26}" for k in KEYS))
    med = {}
    for name, rs in runs.items():
        med[name] = {k: statistics.median(r[k] for r in rs) for k in KEYS}
        cells = " ".join(f"{med[name][k]:>8.3f} ({min(r[k] for r in rs):.3f}-{max(r[k] for r in rs):.3f})".rjust(26)
                         for k in KEYS)
        print(f"{name:8} {rs[0]['bytes'] / 1e6:7.1f} {cells}")
    if args.against:
        print(f"\nthis / against, seconds per push: {med['this']['seconds'] / med['against']['seconds']:.2f}")


if __name__ == "__main__":
    main()
