"""Checkpoints: `OUTPUT/step_NNNNNN/` holds the student as an HF folder (`model/`), the EMA teacher, the
DeepSpeed state (optimizer, scheduler, RNG) and `trainer_state.json` (with `model.lora`, also `adapter/` and
`teacher_adapter/`, and `model/` is base + adapter merged: actors/learner.py `save`). Written to a hidden temp
folder and renamed, so a folder named step_* is always complete; `manifest.json`, written last, holds every file's
size and sha256, so a checkpoint damaged afterwards (a bad disk, a partial copy) is refused instead of loaded.

`python -m pipeline.run.checkpoint FOLDER` writes the manifest of a checkpoint saved before manifests existed, for
someone who trusts it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import CheckpointError, CheckpointWriteFailed, OutputError

PREFIX = "step_"
RUN_FILES = ("metrics.jsonl", "logs", "wandb", "lm_eval")  # what a run writes besides its checkpoints
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
# Config keys a resumed run may change (a key, or a section and everything under it): how long it runs, what it
# measures, logs and saves, where and with how many CPUs/threads. Everything else (model, data, sampling, teacher,
# loss, optimizer, learner ranks, engines) decides what a step computes, so a change there mixes two runs.
RESUME_SAFE_KEYS = (
    "output_dir", "train.steps", "train.epochs", "eval", "logging", "checkpoint", "monitor", "gate",
    "sync.check_greedy", "ray.address", "ray.num_cpus", "ray.placement", "ray.learner_cpus", "ray.rollout_cpus",
    "ray.learner_threads", "ray.rollout_threads", "ray.learner_resources", "ray.rollout_resources",
    "ray.engine_max_restarts", "ray.stall_timeout_s", "ray.autoscaling", "ray.placement_timeout_s",
    "teacher.check_every", "train.on_collapse", "train.max_param_growth",
)


def prepare_output(output_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """Check the output folder before anything starts and return its newest checkpoint when resuming (or None);
    `resume_point` then verifies it.

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
    learners: list  # who makes the saves, one per ref


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
    return Pending(tmp, final, [lr.save.remote(str(tmp)) for lr in learners], meta, learners)


def finish(pending: Pending, keep_last: int, stall_timeout_s: float = 0) -> Path:
    """Wait for the learners (a rank that makes no progress for `stall_timeout_s`: LearnerStalled), then publish the
    folder under its step_* name (a rename: all or nothing) and keep the newest `keep_last`."""
    import ray

    from actors import watchdog

    try:
        watchdog.wait(pending.saves, [watchdog.Owner(f"learner rank {r}", lr, restarts=False)
                                      for r, lr in enumerate(pending.learners)], stall_timeout_s, "a checkpoint save")
        for name, text in pending.meta.items():
            (pending.folder / name).write_text(text)
        write_manifest(pending.folder)  # last: it vouches for everything above
    except (OSError, ray.exceptions.RayTaskError) as e:  # e.g. a full disk, in a learner or here
        shutil.rmtree(pending.folder, ignore_errors=True)
        cause = getattr(e, "cause", None) or e
        reason = (str(cause).strip().splitlines() or [""])[-1]
        raise CheckpointWriteFailed(
            f"writing checkpoint {pending.final.name} failed ({type(cause).__name__}: {reason}); its partial folder "
            f"is removed and the earlier checkpoints in {pending.final.parent} are intact: free space (or fix the "
            "folder) and continue with `sdft train ... --resume`") from None
    if pending.final.exists():
        shutil.rmtree(pending.final)
    os.replace(pending.folder, pending.final)
    # Checkpoints newer than this one are left from before a resume (possibly the corrupt ones it skipped): they
    # are replaced when this run reaches their step, and never count towards keep_last.
    ours = [p for p in list_checkpoints(pending.final.parent) if _step(p) <= _step(pending.final)]
    for old in ours[:-keep_last]:
        shutil.rmtree(old)
    return pending.final


class Checkpoints:
    """A run's checkpoints: written in the background while training goes on (one at a time) and published by a
    thread of the driver as soon as the learners' writes complete, so a run that stops later (Ctrl-C, SIGTERM, a dead
    rank) leaves it published; `last` is the newest published one."""

    def __init__(self, learners: list, output_dir: Path, cfg, last: Path | None = None):
        self.learners, self.output_dir, self.cfg = learners, output_dir, cfg
        self.last = str(last) if last else None
        self._saving: Pending | None = None
        self._publisher: threading.Thread | None = None
        self._error: BaseException | None = None

    def due(self, step: int, total: int) -> bool:
        c = self.cfg.checkpoint
        return bool(c.every and step % c.every == 0) or (step == total and c.final)

    def save(self, step: int, extra: dict) -> None:
        """Start writing `step` (after the previous one is published)."""
        self.finish()
        self._saving = start(self.learners, self.output_dir, step, self.cfg, extra)
        self._publisher = threading.Thread(target=self._publish, args=(self._saving,), daemon=True,
                                           name=f"sdft-publish-{step}")
        self._publisher.start()

    def _publish(self, pending: Pending) -> None:
        try:
            self.last = str(finish(pending, self.cfg.checkpoint.keep_last, self.cfg.ray.stall_timeout_s))
        except BaseException as e:  # raised to the run by `finish`
            self._error = e

    def finish(self) -> str | None:
        """Wait until the checkpoint being written is published, if any (its error, if writing it failed); returns
        the newest published one."""
        if self._publisher is not None:
            self._publisher.join()
            self._publisher = self._saving = None
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        return self.last

    def settle(self) -> str | None:
        """`finish` for a run that stops on an error: a checkpoint whose rank died while saving stays unpublished
        (its temp folder is incomplete). Returns the newest published one."""
        import ray

        try:
            return self.finish()
        except ray.exceptions.RayActorError:
            return self.last

    def save_now(self, step: int, extra: dict) -> str:
        """Publish a checkpoint of `step` before the run stops (the one being written, if it is that step's)."""
        if self._saving is None or self._saving.final.name != f"{PREFIX}{step:06d}":
            self.save(step, extra)
        return self.finish()


def list_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.exists():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=_step)


def _step(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def latest(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


# ---- verification ------------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its relative posix path, except the manifest itself."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel not in (MANIFEST, f".{MANIFEST}.tmp"):
                out[rel] = path
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks: checkpoints can be many GB


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = {rel: {"size": path.stat().st_size, "sha256": _sha256(path)}
             for rel, path in sorted(_files(folder).items())}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _read_manifest(folder: Path) -> dict[str, dict]:
    files = json.loads((folder / MANIFEST).read_text())["files"]
    for rel, entry in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"path {rel!r} leaves the folder")
        if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
            raise ValueError(f"bad entry for {rel!r}")
    return files


def problem(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` ("is corrupt (FILE: sha256 differs)", ...), or None when every file
    matches its manifest. Sizes are checked first, so a truncated file is found without hashing everything."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return (f"has no {MANIFEST} (written before checkpoints were verified), so it cannot be checked: if you "
                f"trust it, add one with `python -m pipeline.run.checkpoint {folder}`")
    try:
        files = _read_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"is corrupt ({MANIFEST} unreadable: {e})"
    present = _files(folder)
    for rel, want in sorted(files.items()):
        if rel not in present:
            return f"is corrupt ({rel}: missing)"
        if present[rel].stat().st_size != want["size"]:
            return f"is corrupt ({rel}: size differs)"
    extra = sorted(present.keys() - files.keys())
    if extra:
        return f"is corrupt ({extra[0]}: not in the manifest)"
    for rel, want in sorted(files.items()):
        if _sha256(present[rel]) != want["sha256"]:
            return f"is corrupt ({rel}: sha256 differs)"
    return None


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the folder and its first bad file unless it matches its manifest."""
    reason = problem(folder)
    if reason is not None:
        raise CheckpointError(f"{folder} {reason}")


def resume_point(output_dir: Path, mode: str = "latest") -> Path:
    """The checkpoint `--resume` continues from: the newest one, verified. With mode "auto" a damaged newest one
    is skipped (with a printed line saying so) for the newest intact one; otherwise the error offers it."""
    found = list_checkpoints(output_dir)
    skipped = []
    for ckpt in reversed(found):
        reason = problem(ckpt)
        if reason is None:
            break
        skipped.append(f"{ckpt.name} {reason}")
    else:
        ckpt = None
    if not skipped:
        return ckpt
    if mode == "auto" and ckpt is not None:
        note = f"--resume=auto: {'; '.join(skipped)}; resuming from {ckpt.name}"
        log.info(note)
        print(note, file=sys.stderr)
        return ckpt
    if ckpt is not None:
        hint = f"the previous intact checkpoint is {ckpt.name}: resume from it with --resume=auto"
    else:
        hint = (f"no intact checkpoint is left in {output_dir}: start over with --overwrite (deletes that run) or "
                "choose another --output")
    raise CheckpointError(f"{skipped[0]}; {hint}")


# ---- the config a checkpoint was written with ----------------------------------------------------------------------
def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> tuple[dict, dict]:
    """The keys whose values differ between two dumped configs, as {key: (old, new)}, split into those
    RESUME_SAFE_KEYS allows and the rest. A key one side lacks (another sdft version) counts as changed."""
    a, b = _flat(old), _flat(new)
    changed = {k: (a.get(k, "(unset)"), b.get(k, "(unset)")) for k in sorted(a.keys() | b.keys())
               if a.get(k, "(unset)") != b.get(k, "(unset)")}
    safe = lambda k: any(k == s or k.startswith(f"{s}.") for s in RESUME_SAFE_KEYS)  # noqa: E731
    return ({k: v for k, v in changed.items() if safe(k)}, {k: v for k, v in changed.items() if not safe(k)})


def _describe(changes: dict, limit: int = 8) -> str:
    shown = [f"{k} {json.dumps(a, default=str)} → {json.dumps(b, default=str)}" for k, (a, b) in changes.items()]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def check_config(ckpt: Path, cfg, allow_change: bool = False) -> dict:
    """Compare the config `ckpt` was written with to the resumed run's. Changes of RESUME_SAFE_KEYS are logged
    and printed; any other change stops the run unless `allow_change`. Returns all changes."""
    old = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    safe, unsafe = config_changes(old, cfg.model_dump(by_alias=True))
    if unsafe and not allow_change:
        raise CheckpointError(f"{ckpt.name} was written with another config: {_describe(unsafe)}; resuming would mix "
                              "two runs: restore those values, or pass --allow-config-change to continue anyway")
    changes = {**safe, **unsafe}
    if changes:
        note = f"config changed since {ckpt.name}" + (" (--allow-config-change)" if unsafe else "") + \
            f": {_describe(changes)}"
        log.info(note)
        print(note, file=sys.stderr)
    return changes


def check_data(ckpt: Path, prints: dict, allow_change: bool = False) -> None:
    """The data sources' fingerprints stored in `ckpt` against the resumed run's: rows that changed under a run
    would silently continue it on other data. A checkpoint from before fingerprints were stored is not checked."""
    stored = trainer_state(ckpt).get("data") or {}
    changed = [key for key, value in prints.items() if key in stored and stored[key] != value]
    if not changed:
        return
    what = ", ".join(changed)
    if not allow_change:
        raise CheckpointError(f"{ckpt.name} was trained on other data: the contents of {what} changed since; "
                              "resuming would continue on other rows: restore the data, or pass --allow-config-change "
                              "to continue anyway")
    note = f"data changed since {ckpt.name} (--allow-config-change): {what}"
    log.info(note)
    print(note, file=sys.stderr)


def _main(argv: list[str]) -> int:
    """`python -m pipeline.run.checkpoint FOLDER`: vouch for a checkpoint written before manifests existed."""
    if len(argv) != 1:
        print("usage: python -m pipeline.run.checkpoint STEP_FOLDER  (writes its manifest.json)", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    if not (folder / "trainer_state.json").exists():
        print(f"error: {folder} is not a checkpoint (no trainer_state.json)", file=sys.stderr)
        return 2
    if (folder / MANIFEST).exists():  # rewriting it would make a damaged checkpoint look intact
        print(f"error: {folder} already has a {MANIFEST}", file=sys.stderr)
        return 2
    write_manifest(folder)
    print(f"wrote {folder / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
