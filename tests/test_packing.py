"""train.packing: the learner's forwards put a micro-batch's sequences in one row (position ids restarting per
sequence) instead of padding them. The same logits, hidden states, losses and gradients as padded forwards, to fp32
tolerance: in-process on the tiny model, then on the learner actor under ZeRO 0/2/3, the three loss backends, LoRA,
and in a whole run with two learner ranks."""

from pathlib import Path

import pytest
import torch

from actors.forward import attention_kwargs, completion_hidden, completion_logits, token_counts, token_kl_sum
from samples import learner_metrics, two_rank_steps

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(3, 380, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
    completions = [torch.randint(3, 380, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    return contexts, completions


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def test_packed_forwards_equal_padded_ones_and_their_gradients(model):
    contexts, completions = _batch()
    for fn in (completion_logits, completion_hidden):
        padded, packed = [fn(model, contexts, completions, 0, packed=p) for p in (False, True)]
        assert packed.shape == padded.shape == (sum(map(len, completions)), padded.shape[1])
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)

    weights = torch.randn(sum(map(len, completions)), model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for packed in (False, True):
        model.zero_grad()
        (completion_logits(model, contexts, completions, 0, packed=packed).log_softmax(-1) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, want in grads[0].items():  # fp32 sums of a different order: to 1e-5 of the gradient's scale
        torch.testing.assert_close(grads[1][name], want, atol=1e-5 * want.abs().max().item(), rtol=0, msg=name)


def test_token_counts_and_kl_to_base(model):
    contexts, completions = _batch()
    lengths = [len(c) + len(y) - 1 for c, y in zip(contexts, completions)]
    assert token_counts(contexts, completions, packed=True) == (sum(lengths), sum(lengths))
    assert token_counts(contexts, completions, packed=False) == (sum(lengths), len(lengths) * max(lengths))
    base = lambda x, y: completion_logits(model, x, y, 0) * 1.5  # noqa: E731 — any other distribution
    seqs = list(zip(contexts, completions))
    padded = token_kl_sum(model, base, seqs, 0, chunk=2)
    packed = token_kl_sum(model, base, seqs, 0, chunk=2, packed=True)
    assert packed[1] == padded[1] and packed[0] == pytest.approx(padded[0], rel=1e-5)


def test_flash_attention_only_for_packed_forwards_on_a_gpu_with_flash_attn(monkeypatch):
    import importlib.util

    assert attention_kwargs(packed=True, on_gpu=False) == {} and attention_kwargs(packed=False, on_gpu=True) == {}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else find_spec(name))
    assert attention_kwargs(packed=True, on_gpu=True) == {"attn_implementation": "flash_attention_2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else find_spec(name))
    assert attention_kwargs(packed=True, on_gpu=True) == {}


# ---- the learner actor -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["train.zero_stage=0"], ["train.zero_stage=2"], ["train.zero_stage=3"],
    ["loss.backend=triton"], ["loss.backend=fused_linear", "loss.chunk_size=7"],
    ["model.lora.r=8"], ["train.mode=sft"],
], ids=["zero0", "zero2", "zero3", "triton", "fused_linear", "lora", "sft"])
def test_learner_packed_equals_padded(ray_session, tiny_model, overrides):
    padded = learner_metrics(ray_session, tiny_model, SMOKE, *overrides)
    packed = learner_metrics(ray_session, tiny_model, SMOKE, *overrides, "train.packing=true")
    for a, b in zip(padded, packed):
        for key in ("loss", "kl", "grad_norm", "is_weight_mean", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert a["pad_fraction"] > 0 and b["pad_fraction"] == 0.0  # learner_samples have mixed lengths
    assert padded[1]["loss"] != padded[0]["loss"]  # the first step moved the weights


@pytest.mark.slow
def test_two_learner_ranks_packed_equal_padded(ray_session, tmp_path):
    common = [SMOKE, "train.batch_size=4", "train.zero_stage=2"]
    padded, packed = two_rank_steps(tmp_path / "padded", *common), two_rank_steps(tmp_path / "packed", *common,
                                                                                   "train.packing=true")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-4)
    assert [r["grad_norm"] for r in packed] == pytest.approx([r["grad_norm"] for r in padded], rel=1e-4)
    assert all(r["pad_fraction"] == 0.0 for r in packed) and all(r["pad_fraction"] > 0 for r in padded)
