"""The teacher: the model conditioned on the demonstration, with its own weights φ (`teacher.kind`).

* `ema` (default): a float32 copy of the student, φ ← α·θ + (1−α)·φ after every optimizer step (a bf16 copy
  would round most α = 0.01 updates away);
* `frozen`: a copy of the initial student in the run's dtype, never updated;
* `live`: the student's current weights, no copy.

Under LoRA (`model.lora`; the student is a peft model) there is no second copy of the base weights:

* `ema`: a second adapter, `teacher`, on the same base, φ ← α·θ + (1−α)·φ applied to the adapter's A and B
  (float32 masters kept here), scored by switching the active adapter;
* `frozen`: the base itself, the student adapter disabled while scoring;
* `live`: the student adapter.

It scores a micro-batch without gradients: logits for the logits-level kernels, or final hidden states plus its
lm_head weight for the fused-linear kernels. Only `ema` has state of its own to save.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from . import adapters
from .forward import completion_hidden, completion_logits

STATE_FILE = "teacher.safetensors"
ADAPTER_DIR = "teacher_adapter"  # LoRA ema: φ as a peft adapter folder (PeftModel.from_pretrained loads it)


class Teacher:
    def __init__(self, kind: str, student: torch.nn.Module, *, ema_alpha: float, dtype: torch.dtype, device):
        """`student` is the HF model before DeepSpeed wraps it (ZeRO-3 partitions it in place afterwards, so the
        copy must be taken first); it stays the live teacher's weights and the EMA's source."""
        self.kind, self.alpha, self.student = kind, ema_alpha, student
        self.copy: torch.nn.Module | None = None
        self.lora = adapters.is_peft(student)
        self.masters: dict[str, torch.Tensor] = {}  # LoRA ema: peft name -> float32 φ
        if self.lora:
            if kind == "ema":
                self._add_ema_adapter(device)
        elif kind in ("ema", "frozen"):
            self.copy = copy.deepcopy(student).requires_grad_(False).eval()
            self.copy.to(device, dtype=torch.float32 if kind == "ema" else dtype)

    @property
    def model(self) -> torch.nn.Module:
        return self.copy if self.copy is not None else self.student

    # ---- LoRA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _add_ema_adapter(self, device) -> None:
        """φ starts as the student adapter (θ₀: the same A, B = 0), so the teacher starts as the base, like the
        student. The masters stay float32 whatever dtype DeepSpeed gives the module (a bf16 φ would round most
        α = 0.01 updates away) and on the learner's device, where DeepSpeed puts the model; the adapter in the model
        is a copy of them, refreshed after each update."""
        m = self.student
        m.add_adapter(adapters.TEACHER, m.peft_config[adapters.STUDENT])
        self._student_params = adapters.adapter_params(m, adapters.STUDENT)
        self._teacher_params = adapters.adapter_params(m, adapters.TEACHER)
        for name, p in self._teacher_params.items():
            p.copy_(self._student_params[name])
            self.masters[name] = self._student_params[name].detach().to(device, torch.float32, copy=True)
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        """Only the student adapter trains. `set_adapter` marks the adapter it activates trainable and the others
        frozen, so the flags are put back explicitly after every switch."""
        for p in self._student_params.values():
            p.requires_grad_(True)
        for p in self._teacher_params.values():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def _scoring(self):
        """The model with the teacher's weights active: itself (no LoRA), the `teacher` adapter (ema), the base
        with the adapter disabled (frozen) or the student adapter (live). Under LoRA the shared model scores in
        eval mode (no adapter dropout) and gets its mode and active adapter back afterwards."""
        if not self.lora:
            yield self.model
            return
        m = self.student
        training = m.training
        m.eval()
        try:
            if self.kind == "frozen":
                with m.disable_adapter():
                    yield m
            elif self.kind == "ema":
                m.set_adapter(adapters.TEACHER)
                try:
                    yield m
                finally:
                    m.set_adapter(adapters.STUDENT)
                    self._restore_trainable()
            else:
                yield m
        finally:
            m.train(training)

    # ---- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, contexts: list[list[int]], completions: list[list[int]], pad_id: int,
               packed: bool = False) -> torch.Tensor:
        """[N, V] teacher logits at the rows that predict each completion token."""
        with self._scoring() as model:
            return completion_logits(model, contexts, completions, pad_id, packed)

    @torch.no_grad()
    def hidden(self, contexts, completions, pad_id: int, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, H] final hidden states at the same rows, [V, H] lm_head weight) for the fused-linear kernels."""
        with self._scoring() as model:
            return (completion_hidden(model, contexts, completions, pad_id, packed),
                    model.get_output_embeddings().weight)

    def update(self, full_params: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """After an optimizer step. `full_params()` makes the student's full parameters readable (ZeRO-3)."""
        if self.kind != "ema":
            return
        if self.lora:
            self._lora_ema_update()
            return
        with full_params():
            ema_update(self.copy, self.student, self.alpha)

    @torch.no_grad()
    def _lora_ema_update(self) -> None:
        # This is the EMA of the factors A and B, each on its own, not of the product B·A (the EMA of products is
        # not a product of EMAs, and B·A of the result is not the EMA of the student's updates). It is what TRL's
        # EMA callback for peft adapters (PEFTAdapterEMACallback) does: EMA over the adapter's state-dict entries.
        for name, master in self.masters.items():
            master.lerp_(self._student_params[name].detach().to(master.dtype), self.alpha)
            self._teacher_params[name].copy_(master)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        if self.kind != "ema":
            return
        if self.lora:
            adapters.write_adapter(Path(folder) / ADAPTER_DIR, adapters.adapter_config(self.student, adapters.TEACHER),
                                   {k: v.cpu() for k, v in self.masters.items()})
            return
        from safetensors.torch import save_file

        save_file(_untie(self.copy.state_dict()), str(folder / STATE_FILE))

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        if self.kind != "ema":
            return
        if self.lora:
            saved = adapters.read_adapter(Path(folder) / ADAPTER_DIR)
            if saved.keys() != self.masters.keys():
                raise ValueError(f"{Path(folder) / ADAPTER_DIR}: the EMA adapter's tensors do not match this model's "
                                 "LoRA layers (a different model.lora config?)")
            for name, t in saved.items():
                self.masters[name].copy_(t)
                self._teacher_params[name].copy_(self.masters[name])
            return
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
