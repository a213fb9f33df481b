"""Nothing lost: a previous run is never written over by accident, bad numbers stop before anything starts, and a
diverged run stops with one message instead of saving NaN weights."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.run.checkpoint import OutputError, prepare_output
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.yaml")


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
    import pipeline.run.driver

    def launch(*args, **kwargs):
        raise AssertionError("actors were launched")

    monkeypatch.setattr(pipeline.run.driver, "launch", launch)  # the refusal must come before any actor starts
    _previous_run(tmp_path)
    assert cli_main(["train", SMOKE, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert cli_main(["train", SMOKE, "--output", str(tmp_path), "--resume", "--overwrite"]) == 2


@pytest.mark.slow
def test_divergence_stops_without_saving_nan_weights(tmp_path, ray_session):
    from pipeline.run.driver import TrainingDiverged, train

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


# One line per fault, found before Ray starts where it can be: `sdft: error: ...` (exit 2), `sdft: stopped ...`
# (exit 130), `sdft: unexpected error: ...` (exit 1).

def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def no_actors(monkeypatch):
    """`launch` refuses to start actors; like the real one, it first waits for the step count (the data load),
    whose errors so come first."""
    import pipeline.run.driver

    def launch(cfg, model_path, total_steps, **kwargs):
        if callable(total_steps):
            total_steps()
        raise AssertionError("actors were launched")

    monkeypatch.setattr(pipeline.run.driver, "launch", launch)


@pytest.mark.parametrize("content, expect", [
    (None, "is a folder"), ("", "does not exist"), ("train: [unclosed\n", r":2:1: not valid YAML \(expected ',' or '\]'"),
    ("- a list\n", "must be a mapping"), (b"train:\n  lr: \xff\n", "not a text file"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, expect):
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content:
        path.write_text(content)
    assert cli_main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    line = _one_line(capsys)
    assert line.startswith("sdft: error: ") and str(path) in line
    assert re.search(expect, line), line


def test_data_errors_name_the_file_and_line(tmp_path, capsys, no_actors):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "demonstration": "b"}\n\n{"prompt": "caf\xe9", "demonstration": "d"}\n')
    assert cli_main(["train", SMOKE, "--output", str(tmp_path / "r1"), f"data.train={bad}"]) == 2
    assert f"{bad}:3: not UTF-8 text (byte 0xe9 at column 16)" in _one_line(capsys)
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    assert cli_main(["train", SMOKE, "--output", str(tmp_path / "r2"), f"data.train={folder}"]) == 2
    line = _one_line(capsys)
    assert f"data folder {folder} is not a dataset" in line and "JSONL" in line


@pytest.mark.parametrize("drop, missing", [
    (["model.safetensors"], "weights"), (["config.json"], "config.json"),
    (["tokenizer.json", "tokenizer_config.json"], "tokenizer"),
])
def test_incomplete_model_folder_is_one_line(tmp_path, capsys, tiny_model, no_actors, drop, missing):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name in drop:
        (folder / name).unlink()
    assert cli_main(["train", SMOKE, "--output", str(tmp_path / "run"), f"model.path={folder}"]) == 2
    line = _one_line(capsys)
    assert f"{folder} has no {missing}" in line and line.count(" has no ") == 1, line


def test_bad_data_found_while_the_engines_start_leaves_nothing_behind(tmp_path):
    """Ray and the engines start while the data load: a data error then stops them and the private instance this
    train() started (a fresh process, where none runs yet), so a caller in the same process finds Ray as it was,
    and removes the log folder it created, so the corrected command runs as it is."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a",\n')  # not valid JSON
    engine_log = tmp_path / "run" / "logs" / "engine-0.log"
    code = textwrap.dedent(f"""
        import os, time, ray
        import pipeline.run.driver
        from pipeline.config import load_config
        from pipeline.data import DataError

        load = pipeline.run.driver._load_inputs

        def load_once_an_engine_started(cfg, model_path):  # the data load waits for the first engine's log
            deadline = time.time() + 120
            while not os.path.exists({str(engine_log)!r}) and time.time() < deadline:
                time.sleep(0.1)
            print("engine started while the data loaded:", time.time() < deadline)
            return load(cfg, model_path)

        pipeline.run.driver._load_inputs = load_once_an_engine_started
        cfg = load_config({SMOKE!r}, ["output_dir={tmp_path / 'run'}", "data.train={bad}"])
        try:
            pipeline.run.driver.train(cfg)
        except DataError as e:
            print("error:", e)
        print("ray running:", ray.is_initialized())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "engine started while the data loaded: True" in r.stdout, r.stdout
    assert f"error: {bad}:1:" in r.stdout and "ray running: False" in r.stdout, r.stdout
    assert not (tmp_path / "run" / "logs").exists()  # the engine's log went with the folder it started in


@pytest.mark.parametrize("override", ["model.path=sdft-test/no-such-model", "data.train=hf:sdft-test/no-such-data"])
def test_hub_source_while_offline_is_one_line(tmp_path, override):
    """A fresh process: the hub clients read HF_HUB_OFFLINE when imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", SMOKE, "--output", str(tmp_path / "run"),
                        override], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "sdft-test/no-such-" in err[0] and "HF_HUB_OFFLINE is set" in err[0] and "Hugging Face Hub" in err[0]
    assert not (tmp_path / "run" / "logs").exists()  # stopped before the run's logs (and Ray) start


@pytest.mark.parametrize("metric, expect", [
    ("exact_mach", r"eval.metric='exact_mach' is not a metric \(did you mean exact_match\?\)"),
    ("no_such_pkg.scores:f1", r"cannot import f1 from no_such_pkg.scores \(ModuleNotFoundError"),
])
def test_eval_metric_typo_is_found_before_ray(tmp_path, capsys, no_actors, metric, expect):
    assert cli_main(["train", SMOKE, "--output", str(tmp_path / "run"), f"eval.metric={metric}"]) == 2
    assert re.search(expect, _one_line(capsys))


def test_unexpected_error_is_one_line_with_the_traceback_in_driver_log(tmp_path, capsys, monkeypatch):
    import pipeline.run.driver

    def launch(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(pipeline.run.driver, "launch", launch)
    assert cli_main(["train", SMOKE, "--output", str(tmp_path / "run")]) == 1
    log = tmp_path / "run" / "logs" / "driver.log"
    assert _one_line(capsys) == f"sdft: unexpected error: RuntimeError: boom; full traceback in {log.resolve()}"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text and "in launch" in text


# more steps than run before the signal (the tiny model trains at ~10 steps/s): the stop lands mid-run
RUN_ARGS = ["train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=4",
            "data.eval_size=2", "ray.num_cpus=2", "checkpoint.every=1", "logging.wandb=false"]


def _run_in_background(tmp_path: Path, tmp: Path, args: list[str]) -> subprocess.Popen:
    """`sdft train ...` as its own process (and process group, with the Ray instance it starts), TMPDIR `tmp`;
    returns once it has published a checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TMPDIR": str(tmp)}
    err_file, out = tmp_path / "stderr.txt", Path(args[args.index("--output") + 1])
    with err_file.open("w") as err, (tmp_path / "stdout.txt").open("w") as stdout:
        # a terminal's Ctrl-C, also when these tests run in a background job (which starts with SIGINT ignored,
        # and a Python that starts so never raises KeyboardInterrupt)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, stdout=stdout,
                                stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not list(out.glob("step_*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # a published checkpoint: step 1 is logged to metrics.jsonl and saved
    assert proc.poll() is None, err_file.read_text()[-3000:]
    return proc


def _stop_group(proc: subprocess.Popen) -> None:
    """The run's process and everything it started (its private Ray instance), by process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_ctrl_c_stops_with_one_line_and_a_resume_command(tmp_path, capsys, signum):
    """Ctrl-C, and SIGTERM (a scheduler's stop) the same way; while the run is alive its folder is locked: a second
    run into it, even with --resume, is refused in one line."""
    tmp = Path(tempfile.mkdtemp(prefix="sdft-t-", dir="/tmp"))  # the run's TMPDIR (short, for Ray's sockets)
    out = tmp_path / "run"
    args = ["train", SMOKE, "--output", str(out), "--steps", "400", *RUN_ARGS]
    proc = _run_in_background(tmp_path, tmp, args)
    try:
        assert cli_main(["train", SMOKE, "--output", str(out), "--resume"]) == 2
        assert "is in use by a run that is still alive (pid" in _one_line(capsys)
        os.kill(proc.pid, signum)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        left = list(tmp.glob("sdft-ray-*"))
        shutil.rmtree(tmp, ignore_errors=True)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"sdft: stopped at step (\d+); continue with `sdft (.*) --resume` \(from (step_\d+)\)", last)
    assert m, last
    assert int(m[1]) >= 1 and m[2] == shlex.join(args) and (out / m[3] / "trainer_state.json").exists()
    assert int(m[3].removeprefix("step_")) <= int(m[1])
    assert left == []  # the private instance's temp dir is gone after an interrupt too


@pytest.mark.slow
def test_a_killed_driver_loses_nothing(tmp_path, capsys):
    """SIGKILL of the driver (and its Ray instance) mid-run, while it writes metrics.jsonl and checkpoints every step:
    --resume takes the dead run's lock over, continues from the newest published checkpoint, and metrics.jsonl holds
    each step once, every line whole."""
    tmp = Path(tempfile.mkdtemp(prefix="sdft-t-", dir="/tmp"))
    out = tmp_path / "run"
    proc = _run_in_background(tmp_path, tmp, ["train", SMOKE, "--output", str(out), "--steps", "400", *RUN_ARGS])
    try:
        time.sleep(1.0)  # a few steps more: the kill lands anywhere in a step, a write or a checkpoint
        _stop_group(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    resumed_from = max(int(p.name.removeprefix("step_")) for p in out.glob("step_*"))
    steps = resumed_from + 2
    assert cli_main(["train", SMOKE, "--output", str(out), "--resume", "--steps", str(steps), *RUN_ARGS]) == 0
    err = capsys.readouterr().err
    assert f"taking over {out}: its previous run (pid {proc.pid} on" in err, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
