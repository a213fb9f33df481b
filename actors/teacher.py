"""The teacher: the model conditioned on the demonstration, with its own weights φ (`teacher.kind`).

* `ema` (default): a float32 copy of the student, φ ← α·θ + (1−α)·φ after every optimizer step (a bf16 copy
  would round most α = 0.01 updates away);
* `frozen`: a copy of the initial student in the run's dtype, never updated;
* `live`: the student's current weights, no copy.

It scores a micro-batch without gradients: logits for the logits-level kernels, or final hidden states plus its
lm_head weight for the fused-linear kernels. Only `ema` has state of its own to save.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from .forward import completion_hidden, completion_logits

STATE_FILE = "teacher.safetensors"


class Teacher:
    def __init__(self, kind: str, student: torch.nn.Module, *, ema_alpha: float, dtype: torch.dtype, device):
        """`student` is the HF model before DeepSpeed wraps it (ZeRO-3 partitions it in place afterwards, so the
        copy must be taken first); it stays the live teacher's weights and the EMA's source."""
        self.kind, self.alpha, self.student = kind, ema_alpha, student
        self.copy: torch.nn.Module | None = None
        if kind in ("ema", "frozen"):
            self.copy = copy.deepcopy(student).requires_grad_(False).eval()
            self.copy.to(device, dtype=torch.float32 if kind == "ema" else dtype)

    @property
    def model(self) -> torch.nn.Module:
        return self.copy if self.copy is not None else self.student

    @torch.no_grad()
    def logits(self, contexts: list[list[int]], completions: list[list[int]], pad_id: int) -> torch.Tensor:
        """[N, V] teacher logits at the rows that predict each completion token."""
        return completion_logits(self.model, contexts, completions, pad_id)

    @torch.no_grad()
    def hidden(self, contexts, completions, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, H] final hidden states at the same rows, [V, H] lm_head weight) for the fused-linear kernels."""
        return (completion_hidden(self.model, contexts, completions, pad_id),
                self.model.get_output_embeddings().weight)

    def update(self, full_params: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """After an optimizer step. `full_params()` makes the student's full parameters readable (ZeRO-3)."""
        if self.kind == "ema":
            with full_params():
                ema_update(self.copy, self.student, self.alpha)

    def save(self, folder: Path) -> None:
        if self.kind == "ema":
            from safetensors.torch import save_file

            save_file(_untie(self.copy.state_dict()), str(folder / STATE_FILE))

    def load(self, folder: Path) -> None:
        if self.kind == "ema":
            from safetensors.torch import load_file

            self.copy.load_state_dict(load_file(str(folder / STATE_FILE)), strict=False)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """φ ← α·θ + (1−α)·φ, parameter by parameter."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.lerp_(p_s.detach().to(p_t.dtype), alpha)


def _untie(sd: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): keep one contiguous copy of each tensor."""
    seen, out = set(), {}
    for k, v in sd.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out[k] = v.contiguous()
    return out
