"""Where an actor's output goes: its own file under OUTPUT/logs/, so the driver's console shows only the run.

vLLM, DeepSpeed, gloo and Triton write to the process's stdout/stderr from Python and from native code alike,
so the redirect is at the file-descriptor level, before any of them is imported. Warnings that every run
triggers by design are dropped at their logger; everything else stays in the file.
"""

from __future__ import annotations

import logging
import os
import sys


def redirect_output(log_dir: str | None, name: str) -> None:
    """Send this process's stdout and stderr to `log_dir/name.log` (appended: a restarted actor keeps its
    predecessor's lines); a no-op without a log folder."""
    if not log_dir:
        return
    os.makedirs(log_dir, exist_ok=True)
    fd = os.open(os.path.join(log_dir, f"{name}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _RotaryReload(logging.Filter):
    """vLLM's layerwise reload warns "<layer>: Failed to load weights" for a layer that the checkpoint has no
    tensor for. A rotary embedding's cos/sin cache is computed, never stored, so on every weight sync that warning
    is expected for it — and only for it; a real layer that fails to load still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and str(record.args[0]).endswith("RotaryEmbedding"))


def drop_expected_vllm_warnings() -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReload())
