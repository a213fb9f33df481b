"""Checkpoints: `OUTPUT/step_NNNNNN/` holds the student as an HF folder (`model/`), the EMA teacher, the
DeepSpeed state (optimizer, scheduler, RNG) and `trainer_state.json`. Written to a hidden temp folder and
renamed, so a folder named step_* is always complete."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

PREFIX = "step_"


@dataclass
class Pending:
    """A checkpoint being written: the learners save in the background while the run goes on."""

    folder: Path  # the hidden temp folder
    final: Path
    saves: list  # ObjectRefs of the learners' save calls
    meta: dict  # config.yaml and trainer_state.json contents


def start(learners: list, output_dir: Path, step: int, cfg, extra: dict) -> Pending:
    """Every learner rank writes its DeepSpeed shard; rank 0 also the HF model and the teacher. Returns at once:
    a learner runs its calls in order, so its next step waits for its save, but the engines and the driver go on
    (strict mode generates the next rollouts meanwhile)."""
    final = output_dir / f"{PREFIX}{step:06d}"
    tmp = output_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"config.yaml": yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False),
            "trainer_state.json": json.dumps({"step": step, **extra}, indent=1)}
    return Pending(tmp, final, [lr.save.remote(str(tmp)) for lr in learners], meta)


def finish(pending: Pending, keep_last: int) -> Path:
    """Wait for the learners, then publish the folder under its step_* name (a rename: all or nothing) and keep
    the newest `keep_last`."""
    ray.get(pending.saves)
    for name, text in pending.meta.items():
        (pending.folder / name).write_text(text)
    if pending.final.exists():
        shutil.rmtree(pending.final)
    os.replace(pending.folder, pending.final)
    for old in list_checkpoints(pending.final.parent)[:-keep_last]:
        shutil.rmtree(old)
    return pending.final


def list_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.exists():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())
