"""What a run prints: a header, the progress bar and a summary on the console; library output in OUTPUT/logs/."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actors.logs import drop_expected_vllm_warnings

ROOT = Path(__file__).resolve().parent.parent


def _layerwise_warning(layer: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, "layerwise.py",
                             266, "%s: Failed to load weights", (layer,), None)


def test_only_the_rotary_reload_warning_is_dropped():
    drop_expected_vllm_warnings()
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    assert not log.filter(_layerwise_warning("RotaryEmbedding"))
    assert not log.filter(_layerwise_warning("Llama3RotaryEmbedding"))
    assert log.filter(_layerwise_warning("QKVParallelLinear"))  # a real layer that fails to load still warns


@pytest.mark.slow
def test_train_console_is_quiet_and_logs_go_to_files(tmp_path):
    """A private Ray instance of its own (as a user gets it), so actor output would stream to this console."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", str(ROOT / "configs" / "smoke.yaml"), "--output", str(out),
         "--steps", "2", "train.batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=8",
         "eval.max_new_tokens=4", "data.eval_size=2", "ray.num_cpus=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "sdft train — SDFT" in console and "layout" in console and "sdft run —" in console
    noise = [line for line in console.splitlines()
             if re.search(r"WARNING|Warning|wandb:|Failed to load|Started a local Ray|pid=\d+", line)]
    assert noise == []
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert {"driver.log", "learner-0.log", "engine-0.log"} <= set(logs)
    assert "vllm" in logs["engine-0.log"].lower()  # the engine's own output is kept, in its file
    assert "Failed to load weights" not in logs["engine-0.log"]  # expected on every sync: dropped at the source
