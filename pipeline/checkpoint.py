"""Checkpoints: `OUTPUT/step_NNNNNN/` holds the student as an HF folder (`model/`), the EMA teacher, the
DeepSpeed state (optimizer, scheduler, RNG) and `trainer_state.json`. Written to a hidden temp folder and
renamed, so a folder named step_* is always complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray
import yaml

PREFIX = "step_"


def save(learners: list, output_dir: Path, step: int, cfg, extra: dict) -> Path:
    """Every learner rank writes its DeepSpeed shard; rank 0 also the HF model and the teacher."""
    final = output_dir / f"{PREFIX}{step:06d}"
    tmp = output_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get([lr.save.remote(str(tmp)) for lr in learners])
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old)
    return final


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
