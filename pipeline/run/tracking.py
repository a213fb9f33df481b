"""Metrics out: `OUTPUT/metrics.jsonl` (one object per step) and wandb (offline without an API key)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _flatten(record: dict) -> dict:
    """{"loss": .., "timing_s": {"rollout": ..}} -> {"train/loss": .., "timing_s/rollout": ..} for wandb."""
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
        elif k != "step" and v is not None:  # None: a skipped step's non-finite value
            flat[f"train/{k}"] = v
    return flat


class MetricsLogger:
    def __init__(self, cfg, output_dir: Path, resume_step: int | None = None, wandb_id: str | None = None):
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop records a crashed run wrote after its last checkpoint: they will be produced again.
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif self.path.exists():
            self.path.unlink()
        self.run = None
        if cfg.logging.wandb:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run = wandb.init(
                project=cfg.logging.project, name=cfg.logging.run_name, config=cfg.model_dump(), mode=mode,
                dir=str(output_dir), id=wandb_id, resume="allow" if wandb_id else None,
                settings=wandb.Settings(silent=True),  # no banner or run summary on the console; the run is in dir
            )

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, step: int, record: dict) -> None:
        record = {"step": step, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(_flatten(record), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
