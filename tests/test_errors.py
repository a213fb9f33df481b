"""Every user-facing error lives in pipeline/errors.py with its `sdft` exit code, and the CLI maps it from there."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import errors
from pipeline.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent

USER = ["ConfigError", "DataError", "EvalError", "ModelNotFound", "OutputError", "CheckpointError"]
RUN = ["LearnerFailed", "LearnerStalled", "EngineFailed", "PlacementError", "SyncMismatch", "TrainingDiverged",
       "ForgettingLimit", "TeacherGateFailed", "CheckpointWriteFailed", "OutputLost"]


@pytest.mark.parametrize("name", USER)
def test_user_errors_exit_2(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.SdftError) and issubclass(cls, ValueError)  # `except ValueError` still catches
    assert cls.exit_code == 2 and cls.prefix == "sdft: error"


@pytest.mark.parametrize("name", RUN)
def test_run_failures_exit_1(name):
    cls = getattr(errors, name)
    assert issubclass(cls, errors.SdftError) and issubclass(cls, RuntimeError)
    assert cls.exit_code == 1 and cls.prefix == "sdft: run failed"


def test_every_error_class_is_listed():
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.SdftError)}
    assert defined - {"SdftError", "UserError", "RunFailed"} == set(USER) | set(RUN)
    assert [c.__name__ for c in errors.USER_ERRORS] == USER and [c.__name__ for c in errors.RUN_FAILURES] == RUN


def test_modules_reexport_the_same_classes():
    """`from pipeline.run.checkpoint import CheckpointError` and the like keep working, and name the one class."""
    from actors import launcher
    from pipeline import config, data, models
    from pipeline.experiments import evaluation, gate
    from pipeline.run import checkpoint

    for module, names in ((config, ["ConfigError"]), (data, ["DataError"]), (evaluation, ["EvalError"]),
                          (models, ["ModelNotFound"]), (checkpoint, ["OutputError", "CheckpointError",
                                                                     "CheckpointWriteFailed"]),
                          (gate, ["TeacherGateFailed"]), (launcher, ["PlacementError"])):
        for name in names:
            assert getattr(module, name) is getattr(errors, name), f"{module.__name__}.{name}"


def test_cli_maps_errors_by_class(monkeypatch, capsys):
    import pipeline.cli as cli

    def fail(args):
        raise errors.ForgettingLimit("forgetting limit: after step 1")

    monkeypatch.setattr(cli, "_config", fail)
    assert cli_main(["config"]) == 1
    assert capsys.readouterr().err == "sdft: run failed: forgetting limit: after step 1\n"


def test_cli_missing_config_exits_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(missing)], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith(f"sdft: error: config file {missing} does not exist") and "Traceback" not in r.stderr
