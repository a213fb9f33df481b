"""The learner on a GPU, as a GPU user runs it: bf16 under DeepSpeed (ZeRO 0 and 2), full and LoRA, compiled Triton
kernels, NCCL as the process group. Skipped where torch sees no CUDA device (the CPU suite covers the same code in
fp32 with the Triton interpreter).

The learner is built in this process (no Ray, no vLLM), so the file needs only torch, triton, transformers, peft,
deepspeed and pydantic: `pytest tests/test_cuda.py` on any CUDA machine. The kernel tests run on the GPU with
`SDFT_TEST_DEVICE=cuda pytest tests/test_kernels.py`."""

from pathlib import Path

import pytest
import torch
from samples import learner_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def _learner(model, *overrides):
    from actors.learner import Learner
    from actors.net import free_port
    from pipeline.config import load_config

    cfg = load_config(SMOKE, ["train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-2",
                              "train.warmup_steps=0", "loss.skip_first_tokens=1", "model.dtype=auto", *overrides])
    return Learner(cfg, model, 10, master_port=free_port())


def _trainable(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in learner.engine.module.named_parameters() if p.requires_grad}


def _teacher(learner) -> dict[str, torch.Tensor]:
    t = learner.teacher
    if t.lora:
        return {n: v.clone() for n, v in t.masters.items()}
    return {n: p.detach().clone() for n, p in t.copy.named_parameters()}


def _moved(before, after) -> float:
    return max((after[n].float() - before[n].float()).abs().max().item() for n in before)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_learner_trains_student_and_ema_teacher(tiny_model, stage, lora):
    learner = _learner(tiny_model, f"train.zero_stage={stage}", "loss.backend=triton",
                       *(["model.lora.r=8"] if lora else []))
    assert learner.engine.device.type == "cuda" and learner.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in learner.engine.module.parameters())
    teacher0, student0 = _teacher(learner), _trainable(learner)
    # the EMA is kept in float32 (see teacher.py), next to the student
    assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in teacher0.values())
    metrics = [learner.step(learner_samples()) for _ in range(3)]
    for m in metrics:
        assert all(torch.isfinite(torch.tensor(v)) for v in (m.loss, m.kl, m.grad_norm, m.is_weight_mean)), m
        assert m.skipped == 0 and m.grad_norm > 0
    assert metrics[2].loss != metrics[0].loss
    student_move, teacher_move = _moved(student0, _trainable(learner)), _moved(teacher0, _teacher(learner))
    # φ ← 0.99 φ + 0.01 θ after each step: the teacher follows the student, by about a hundredth of its move
    assert student_move > 0 and 0 < teacher_move < 0.1 * student_move, (student_move, teacher_move)
    completions = learner.greedy([[5, 6, 7, 8]], 4)
    assert len(completions) == 1 and 1 <= len(completions[0]) <= 4


def test_bf16_loss_backends_agree(tiny_model):
    """torch, compiled Triton and the fused-linear kernel give the same first-step loss in bf16."""
    losses = {b: _learner(tiny_model, f"loss.backend={b}", "loss.chunk_size=7").step(learner_samples()).loss
              for b in ("torch", "triton", "fused_linear")}
    assert losses["triton"] == pytest.approx(losses["torch"], rel=2e-2), losses
    assert losses["fused_linear"] == pytest.approx(losses["torch"], rel=2e-2), losses


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_nonfinite_step_is_skipped(tiny_model, stage):
    """train.on_nonfinite=skip in bf16: ZeRO-0 drops the step itself, ZeRO-2 through DeepSpeed's
    check_grad_overflow. The weights stay bit-identical, and the next good step trains."""
    learner = _learner(tiny_model, f"train.zero_stage={stage}", "train.on_nonfinite=skip")
    before = _trainable(learner)
    bad = learner.step(learner_samples(logprob=float("nan")))
    assert bad.skipped == 1
    assert all(torch.equal(before[n], v) for n, v in _trainable(learner).items())
    good = learner.step(learner_samples())
    assert good.skipped == 0 and _moved(before, _trainable(learner)) > 0
