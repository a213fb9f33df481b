"""Verified checkpoints: a manifest of every file's size and sha256 (a damaged checkpoint is refused, or skipped with
--resume=auto), loads that cannot run code, and a resume that compares the new config with the checkpoint's."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.run import checkpoint
from pipeline.run.checkpoint import CheckpointError, check_config, config_changes, resume_point, verify, write_manifest
from pipeline.cli import main as cli_main
from pipeline.config import load_config

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
# A short, quick run: constant lr, so a resume reproduces the losses whatever train.steps says.
RUN = ["logging.progress=false", "logging.wandb=false", "train.batch_size=4", "train.micro_batch_size=2",
       "rollout.max_new_tokens=8", "eval.max_new_tokens=4", "data.eval_size=2", "train.lr_schedule=constant",
       "train.warmup_steps=0", "train.lr=1e-3"]


def _fake_checkpoint(out: Path, step: int, cfg=None) -> Path:
    """A published checkpoint as `checkpoint.finish` leaves it, with random bytes for the weights."""
    folder = out / f"step_{step:06d}"
    (folder / "model").mkdir(parents=True)
    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(os.urandom(5000))
    (folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    cfg = cfg or load_config(SMOKE, [f"output_dir={out}"])
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))
    write_manifest(folder)
    return folder


def _flip_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(capsys) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("sdft: ")]
    assert len(err) == 1, err
    return err[0]


# ---- manifest ------------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    folder = _fake_checkpoint(tmp_path, 1)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.yaml", "deepspeed/state/mp_rank_00_model_states.pt", "model/model.safetensors",
                             "trainer_state.json"]
    weights = (folder / "model" / "model.safetensors").read_bytes()
    assert files["model/model.safetensors"] == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert not list(folder.glob(".*"))  # the manifest's temp file is gone
    verify(folder)


@pytest.mark.parametrize("damage, reason", [
    (lambda f: _flip_byte(f / "model" / "model.safetensors"), "model/model.safetensors: sha256 differs"),
    (lambda f: os.truncate(f / "model" / "model.safetensors", 4000), "model/model.safetensors: size differs"),
    (lambda f: (f / "deepspeed" / "state" / "mp_rank_00_model_states.pt").unlink(),
     "deepspeed/state/mp_rank_00_model_states.pt: missing"),
    (lambda f: (f / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x"),
     "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt: not in the manifest"),
    (lambda f: (f / "manifest.json").write_text('{"files": '), "manifest.json unreadable"),
    (lambda f: (f / "manifest.json").write_text('{"files": {"../x": {"size": 1, "sha256": ""}}}'),
     "manifest.json unreadable"),
])
def test_damage_is_named_in_one_line(tmp_path, damage, reason):
    folder = _fake_checkpoint(tmp_path, 4)
    size = (folder / "model" / "model.safetensors").stat().st_size
    damage(folder)
    with pytest.raises(CheckpointError) as e:
        verify(folder)
    assert str(e.value).startswith(f"{folder} is corrupt (") and reason in str(e.value)
    assert "\n" not in str(e.value)
    if "sha256" in reason:
        assert (folder / "model" / "model.safetensors").stat().st_size == size  # same size: only the hash tells


def test_checkpoint_without_manifest_is_refused_until_vouched_for(tmp_path, capsys):
    folder = _fake_checkpoint(tmp_path, 2)
    (folder / "manifest.json").unlink()  # as an older sdft wrote it
    with pytest.raises(CheckpointError, match=r"has no manifest.json .*python -m pipeline.run.checkpoint"):
        verify(folder)
    assert checkpoint._main([str(folder)]) == 0
    verify(folder)
    _flip_byte(folder / "model" / "model.safetensors")
    assert checkpoint._main([str(folder)]) == 2  # an existing manifest is never rewritten: that would hide damage
    assert "already has" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify(folder)


# ---- which checkpoint --resume takes ---------------------------------------------------------------------------------
def test_resume_refuses_a_damaged_newest_and_offers_the_previous_intact(tmp_path, capsys):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    assert resume_point(tmp_path) == tmp_path / "step_000004"
    _flip_byte(tmp_path / "step_000004" / "model" / "model.safetensors")
    (tmp_path / "step_000003" / "trainer_state.json").write_text('{"step": 3}  ')  # one byte longer
    with pytest.raises(CheckpointError) as e:
        resume_point(tmp_path)
    assert str(e.value) == ("step_000004 is corrupt (model/model.safetensors: sha256 differs); the previous intact "
                            "checkpoint is step_000002: resume from it with --resume=auto")
    assert resume_point(tmp_path, "auto") == tmp_path / "step_000002"
    note = capsys.readouterr().err
    assert "step_000004 is corrupt" in note and "step_000003 is corrupt (trainer_state.json: size differs)" in note
    assert "resuming from step_000002" in note


def test_resume_with_no_intact_checkpoint_left(tmp_path):
    folder = _fake_checkpoint(tmp_path, 1)
    (folder / "model" / "model.safetensors").unlink()
    for mode in ("latest", "auto"):
        with pytest.raises(CheckpointError, match=r"step_000001 is corrupt .*missing.*no intact checkpoint.*overwrite"):
            resume_point(tmp_path, mode)


# ---- config on resume ----------------------------------------------------------------------------------------------
def test_config_changes_are_sorted_into_safe_and_not():
    old = load_config(SMOKE, []).model_dump(by_alias=True)
    new = load_config(SMOKE, ["output_dir=elsewhere", "train.steps=20", "eval.every=2", "checkpoint.keep_last=5",
                              "ray.learner_threads=2", "logging.wandb=false", "train.lr=1e-3",
                              "rollout.temperature=0.7", "ray.learner_ranks=2", "train.batch_size=8"]
                      ).model_dump(by_alias=True)
    safe, unsafe = config_changes(old, new)
    assert sorted(safe) == ["checkpoint.keep_last", "eval.every", "logging.wandb", "output_dir", "ray.learner_threads",
                            "train.steps"]
    assert sorted(unsafe) == ["ray.learner_ranks", "rollout.temperature", "train.lr"]  # batch_size 8: unchanged
    assert unsafe["train.lr"] == (1e-4, 1e-3)
    assert config_changes(old, old) == ({}, {})
    del old["train"]["seed"]  # a key an older version did not write counts as changed
    assert "train.seed" in config_changes(old, new)[1]


def test_resume_checks_the_config(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path, 2, load_config(SMOKE, [f"output_dir={tmp_path}", "train.lr=1e-4"]))
    capsys.readouterr()
    safe = load_config(SMOKE, [f"output_dir={tmp_path}", "train.lr=1e-4", "train.steps=12"])
    assert check_config(ckpt, safe) == {"train.steps": (8, 12)}
    assert "config changed since step_000002: train.steps 8 → 12" in capsys.readouterr().err
    changed = load_config(SMOKE, [f"output_dir={tmp_path}", "train.lr=3e-4", "loss.divergence=jsd"])
    with pytest.raises(CheckpointError) as e:
        check_config(ckpt, changed)
    assert str(e.value) == ('step_000002 was written with another config: loss.divergence "forward_kl" → "jsd", '
                            "train.lr 0.0001 → 0.0003; resuming would mix two runs: restore those values, or pass "
                            "--allow-config-change to continue anyway")
    assert set(check_config(ckpt, changed, allow_change=True)) == {"loss.divergence", "train.lr"}
    assert "(--allow-config-change)" in capsys.readouterr().err


def test_cli_refuses_before_anything_starts(tmp_path, capsys, monkeypatch):
    import pipeline.run.driver

    def launch(*args, **kwargs):
        raise AssertionError("actors were launched")

    monkeypatch.setattr(pipeline.run.driver, "launch", launch)  # every refusal must come before any actor starts
    out = tmp_path / "run"
    _fake_checkpoint(out, 1, load_config(SMOKE, [f"output_dir={out}"]))
    _fake_checkpoint(out, 2, load_config(SMOKE, [f"output_dir={out}"]))
    assert cli_main(["train", SMOKE, "--output", str(out), "--resume", "train.lr=1e-3"]) == 2
    assert "train.lr 0.0001 → 0.001" in _one_line_error(capsys)
    _flip_byte(out / "step_000002" / "model" / "model.safetensors")
    assert cli_main(["train", "--output", str(out), "--resume", SMOKE]) == 2  # --resume CONFIG still parses
    assert "step_000002 is corrupt" in _one_line_error(capsys)
    assert cli_main(["eval", str(out / "step_000002")]) == 2
    assert "sha256 differs" in _one_line_error(capsys)
    assert cli_main(["train", SMOKE, "--output", str(out), "--resume=newest"]) == 2
    assert "choose latest" in _one_line_error(capsys)


def test_eval_takes_no_code_from_the_checkpoints_config(tmp_path, capsys):
    from pipeline.cli import _eval_config

    ckpt = _fake_checkpoint(tmp_path, 1, load_config(SMOKE, ["model.trust_remote_code=true", "eval.metric=os:getcwd"]))
    with pytest.raises(CheckpointError, match=r"eval.metric=os:getcwd, a Python callable.*pass eval.metric=os:getcwd"):
        _eval_config(ckpt, None, [])
    assert cli_main(["eval", str(ckpt)]) == 2  # before any engine starts
    assert "a Python callable" in _one_line_error(capsys)
    cfg, _ = _eval_config(ckpt, None, ["eval.metric=os:getcwd"])
    assert cfg.model.trust_remote_code is False and cfg.eval.metric == "os:getcwd"
    cfg, _ = _eval_config(ckpt, None, ["eval.metric=os:getcwd", "model.trust_remote_code=true"])
    assert cfg.model.trust_remote_code is True  # asked for on the command line
    cfg, _ = _eval_config(ckpt, str(ckpt / "config.yaml"), [])  # a config given by the user is taken as it is
    assert cfg.model.trust_remote_code is True


def test_weights_only_load_refuses_a_pickled_call(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from actors.learner import _WeightsOnlyLoads

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "loss_scaler": LossScaler(1.0)}, good)  # what ZeRO writes: allowed
    assert torch.equal(_WeightsOnlyLoads(None).load(str(good))["w"], torch.ones(2))
    bad, marker = tmp_path / "bad.pt", tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"bad.pt holds objects a checkpoint may not \(exec\).*nothing in it ran"):
        _WeightsOnlyLoads(None).load(str(bad))
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, tiny_model):
    """One 3-step run with a checkpoint after every step (step_000001..3); tests work on copies of it."""
    from pipeline.run.driver import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_config(SMOKE, [f"output_dir={out}", *RUN, "train.steps=3", "checkpoint.every=1",
                              "checkpoint.keep_last=3"]))
    return out


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_and_auto_resumes_from_the_last_intact(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001", "step_000002", "step_000003"]
    for step in (1, 2, 3):
        verify(out / f"step_{step:06d}")
    size = (out / "step_000003" / "model" / "model.safetensors").stat().st_size
    _flip_byte(out / "step_000003" / "model" / "model.safetensors", at=size // 2)
    os.truncate(out / "step_000002" / "teacher.safetensors", 100)
    capsys.readouterr()

    args = ["train", SMOKE, "--output", str(out), *RUN]
    assert cli_main([*args, "--resume"]) == 2
    assert _one_line_error(capsys) == (
        "sdft: error: step_000003 is corrupt (model/model.safetensors: sha256 differs); the previous intact "
        "checkpoint is step_000001: resume from it with --resume=auto")
    assert cli_main(["eval", str(out / "step_000003")]) == 2
    assert _one_line_error(capsys).endswith("step_000003 is corrupt (model/model.safetensors: sha256 differs)")

    # keep_last=1 and 2 steps: step_000003 (damaged, from before the resume) must not count towards keep_last,
    # else publishing step_000002 would delete step_000002 itself.
    assert cli_main([*args, "--resume=auto", "--steps", "2", "checkpoint.every=1", "checkpoint.keep_last=1"]) == 0
    err = capsys.readouterr().err
    assert ("--resume=auto: step_000003 is corrupt (model/model.safetensors: sha256 differs); step_000002 is corrupt "
            "(teacher.safetensors: size differs); resuming from step_000001") in err
    changed = next(l for l in err.splitlines() if l.startswith("config changed since step_000001: "))
    assert "checkpoint.keep_last 3 → 1" in changed and "train.steps 3 → 2" in changed and "train.lr" not in changed
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000003"]
    verify(out / "step_000002")  # written again by the resumed run
    with pytest.raises(CheckpointError):
        verify(out / "step_000003")  # left as it was
    assert sorted(_losses(out)) == [1, 2]
    assert _losses(out)[2] == pytest.approx(_losses(trained)[2], rel=1e-6, abs=1e-9)  # resumed exactly


@pytest.mark.slow
def test_a_planted_pickle_in_the_deepspeed_state_does_not_run(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt, marker = out / "step_000003", tmp_path / "ran"
    state = ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    sd = torch.load(state, weights_only=False)  # our own file
    sd["torch_rng"] = _Payload(marker)
    torch.save(sd, state)
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)  # the manifest vouches for the file: only the load itself can stop the payload
    verify(ckpt)
    capsys.readouterr()
    assert cli_main(["train", SMOKE, "--output", str(out), *RUN, "--resume"]) == 2
    err = _one_line_error(capsys)
    assert err == (f"sdft: error: {state} holds objects a checkpoint may not (exec): refused to load it, nothing in "
                   "it ran")
    assert not marker.exists()


@pytest.mark.slow
def test_a_failed_checkpoint_write_leaves_nothing_behind(tmp_path, ray_session):
    """A learner's save that fails (here: ENOSPC raised in a real Ray task, as a full disk does) is one message;
    the temp folder is removed and the previous checkpoint stays published and intact."""
    import errno

    previous = _fake_checkpoint(tmp_path, 2)

    @ray_session.remote
    def save(folder):
        (Path(folder) / "partial.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    tmp = tmp_path / ".step_000004.tmp"
    tmp.mkdir()
    pending = checkpoint.Pending(tmp, tmp_path / "step_000004", [save.remote(str(tmp))], {"trainer_state.json": "{}"},
                                 learners=[None])  # a task, not a learner: no stall bound here
    with pytest.raises(checkpoint.CheckpointWriteFailed) as e:
        checkpoint.finish(pending, keep_last=2)
    msg = str(e.value)
    assert "step_000004" in msg and "No space left on device" in msg and "--resume" in msg and "\n" not in msg
    assert not tmp.exists() and not (tmp_path / "step_000004").exists()
    verify(previous)
    assert checkpoint.list_checkpoints(tmp_path) == [previous]
