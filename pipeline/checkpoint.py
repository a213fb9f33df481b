"""Checkpoints: `OUTPUT/step_NNNNNN/` holds the student as an HF folder (`model/`), the EMA teacher, the
DeepSpeed state (optimizer, scheduler, RNG) and `trainer_state.json` (with `model.lora`, also `adapter/` and
`teacher_adapter/`, and `model/` is base + adapter merged: actors/learner.py `save`). Written to a hidden temp
folder and renamed, so a folder named step_* is always complete."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

PREFIX = "step_"
RUN_FILES = ("metrics.jsonl", "logs", "wandb")  # what a run writes besides its checkpoints


class OutputError(ValueError):
    """The output folder cannot be used as asked; the message says what to do."""


def prepare_output(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output folder before anything starts and return the checkpoint to resume from (or None).

    A folder that holds a previous run is never written into by accident: continue it with `resume`, or
    delete that run's files with `overwrite`; anything else in the folder is left alone."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} is a file, not a folder: choose another --output")
    previous = sorted(p.name for p in output_dir.glob("*") if p.name in RUN_FILES or p.name.startswith(PREFIX)) \
        if output_dir.exists() else []
    if overwrite:
        for name in previous:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for tmp in output_dir.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        previous = []
    ckpt = latest(output_dir) if resume else None
    if previous and ckpt is None:
        hint = ("it has no complete checkpoint to resume from" if resume
                else "continue it with --resume")
        raise OutputError(f"output {output_dir} holds a previous run ({', '.join(previous[:4])}): {hint}, or start "
                          "over with --overwrite (deletes that run), or choose another --output")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".sdft-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output {output_dir} is not writable ({e.strerror}): choose another --output") from None
    return ckpt


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
    import ray

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
