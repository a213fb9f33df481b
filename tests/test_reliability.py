"""Nothing lost: a previous run is never written over by accident, bad numbers stop before anything starts, and a
diverged run stops with one message instead of saving NaN weights."""

import json
from pathlib import Path

import pytest

from pipeline.checkpoint import OutputError, prepare_output
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")


def _previous_run(folder: Path, complete: bool = True) -> None:
    (folder / "step_000002").mkdir(parents=True)
    if complete:
        (folder / "step_000002" / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (folder / "notes.txt").write_text("mine")


def test_previous_run_is_refused_without_resume_or_overwrite(tmp_path):
    _previous_run(tmp_path)
    with pytest.raises(OutputError, match=r"previous run .*--resume.*--overwrite"):
        prepare_output(tmp_path, resume=False, overwrite=False)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "step_000002").exists()  # untouched
    assert prepare_output(tmp_path, resume=True, overwrite=False) == tmp_path / "step_000002"


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    _previous_run(tmp_path)
    (tmp_path / ".step_000003.tmp").mkdir()
    assert prepare_output(tmp_path, resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path):
    _previous_run(tmp_path, complete=False)
    with pytest.raises(OutputError, match="no complete checkpoint"):
        prepare_output(tmp_path, resume=True, overwrite=False)
    assert prepare_output(tmp_path / "fresh", resume=True, overwrite=False) is None  # nothing to resume: a new run


def test_output_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output(tmp_path / "file", resume=False, overwrite=False)
    with pytest.raises(OutputError, match="not writable"):
        prepare_output(tmp_path / "file" / "run", resume=False, overwrite=False)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_config_rejects_non_finite_numbers(value):
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(SMOKE, [f"train.lr={value}"])


def test_cli_refuses_a_previous_run_in_one_line_before_ray(tmp_path, capsys, monkeypatch):
    import pipeline.driver

    def launch(*args, **kwargs):
        raise AssertionError("actors were launched")

    monkeypatch.setattr(pipeline.driver, "launch", launch)  # the refusal must come before any actor starts
    _previous_run(tmp_path)
    assert cli_main(["train", SMOKE, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert cli_main(["train", SMOKE, "--output", str(tmp_path), "--resume", "--overwrite"]) == 2


@pytest.mark.slow
def test_divergence_stops_without_saving_nan_weights(tmp_path, ray_session):
    from pipeline.driver import TrainingDiverged, train

    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "logging.progress=false", "train.batch_size=4",
                              "train.micro_batch_size=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=4",
                              "data.eval_size=2", "train.steps=4", "checkpoint.every=1", "train.lr=1e30",
                              "train.warmup_steps=0", "train.lr_schedule=constant"])
    with pytest.raises(TrainingDiverged, match=r"step (\d) produced non-finite values .*Last good checkpoint") as e:
        train(cfg)
    bad_step = int(e.value.args[0].split()[1])
    steps = sorted(int(p.name.removeprefix("step_")) for p in tmp_path.glob("step_*"))
    assert all(s < bad_step for s in steps)  # nothing saved from the diverged step on
    if steps:
        assert f"step_{steps[-1]:06d}" in str(e.value)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < bad_step for r in records)  # the NaN step is not logged as a normal step
