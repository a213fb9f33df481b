"""Metrics out: `OUTPUT/metrics.jsonl` (one object per step) and wandb (offline without an API key)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import OutputError, OutputLost


def _flatten(record: dict) -> dict:
    """{"loss": .., "timing_s": {"rollout": ..}} -> {"train/loss": .., "timing_s/rollout": ..} for wandb."""
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
        elif k != "step" and v is not None:  # None: a skipped step's non-finite value
            flat[f"train/{k}"] = v
    return flat


def _records(path: Path) -> list[tuple[str, int]]:
    """(line, step) of each record of metrics.jsonl; a last line cut short by a kill is dropped with one line saying
    so, a bad line elsewhere is an error naming it."""
    lines = [l for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append((line, int(json.loads(line)["step"])))
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                print(f"sdft: {path}: dropped its last line, cut short when the previous run was stopped "
                      f"({line[:60]!r}...)", file=sys.stderr)
                break
            raise OutputError(f"{path}:{i + 1}: not a metrics record ({line[:60]!r}); the file was changed by hand: "
                              "restore it or start over with --overwrite") from None
    return records


class MetricsLogger:
    def __init__(self, cfg, output_dir: Path, resume_step: int | None = None, wandb_id: str | None = None):
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop records a crashed run wrote after its last checkpoint: they will be produced again.
            keep = [line for line, step in _records(self.path) if step <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            os.replace(tmp, self.path)
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
        """One line per record, in one write() of the whole line: a kill leaves the file with whole lines, or at
        worst one torn last line, which a resume drops (`_records`)."""
        record = {"step": step, **record}
        try:
            with self.path.open("ab", buffering=0) as f:
                f.write((json.dumps(record) + "\n").encode())
        except OSError as e:
            raise OutputLost(f"cannot write {self.path} ({e.strerror}): the output folder was removed or made "
                             "unwritable during the run; the run stops. Restore the folder and continue with "
                             "`sdft train ... --resume` from its last checkpoint, or start over elsewhere") from None
        if self.run is not None:
            self.run.log(_flatten(record), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
