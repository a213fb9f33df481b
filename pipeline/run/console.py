"""What a run prints: a short header, the progress bar (in the driver loop), a summary table. Everything else —
the driver's library logging and each actor's output — goes to OUTPUT/logs/."""

from __future__ import annotations

import logging
from pathlib import Path


current_log: Path | None = None  # driver.log of the run in progress in this process (where the CLI puts tracebacks)


def log_to_file(log_dir: Path) -> logging.Handler:
    """Send the driver's Python logging (Ray, wandb, transformers, ...) at INFO to log_dir/driver.log; the
    console keeps what each library itself shows at WARNING and above. Returns the handler to remove later."""
    global current_log
    log_dir.mkdir(parents=True, exist_ok=True)
    current_log = log_dir / "driver.log"
    handler = logging.FileHandler(current_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def forget_log(handler: logging.Handler) -> None:
    """Undo `log_to_file`: the handler closed and removed, no current log (its folder is about to go)."""
    global current_log
    logging.getLogger().removeHandler(handler)
    handler.close()
    current_log = None


def print_header(cfg, model_path: str, n_train: int, n_eval: int, steps: int, start_step: int,
                 log_dir: Path) -> None:
    from rich.console import Console

    r = cfg.ray
    engines = f" × {cfg.rollout.num_engines} vLLM" if cfg.train.distills else ""
    timing = (f"async, staleness ≤ {cfg.async_.max_staleness}" if cfg.async_.max_staleness
              else "strict on-policy") if cfg.train.distills else "no rollouts"
    if cfg.train.distills and cfg.rollout.context == "teacher":
        timing = (timing + ", on the teacher context") if cfg.engines_follow_student else \
            "the frozen teacher samples on its context"
    rows = [
        ("model", cfg.model.path + ("" if cfg.model.path == model_path else f"  ({model_path})")),
        ("data", f"{cfg.data.train}: {n_train} train, {n_eval} eval"),
        ("layout", f"{r.learner_ranks} learner{engines}, {r.placement}, sync {cfg.sync.backend}, {timing}"),
        ("steps", f"{start_step} → {steps}" if start_step else str(steps)),
        ("output", f"{cfg.output_dir}  (logs: {log_dir})"),
    ]
    console = Console(highlight=False)
    console.print(f"[bold]sdft train[/bold] — {cfg.train.mode.upper()}")
    for name, value in rows:
        console.print(f"  {name:<7} {value}")


def print_summary(summary: dict, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    last = summary.get("last", {})
    table = Table(title=f"sdft run — {output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{summary['start_step']} → {summary['steps']}"),
        ("eval accuracy before", summary.get("eval_before", {}).get("accuracy")),
        ("eval accuracy after", summary.get("eval_after", {}).get("accuracy")),
        ("last loss", last.get("loss")), ("last kl", last.get("kl")),
        ("IS weight mean", last.get("is_weight_mean")),
        *[(f"step time: {k} (s)", v) for k, v in last.get("timing_s", {}).items()],
        ("checkpoint", summary.get("checkpoint")),
    ]
    for name, value in rows:
        if value is not None:
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
