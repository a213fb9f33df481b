"""The SDFT loss against a straightforward float64 implementation written with explicit loops."""

import math

import pytest
import torch

import kernels
from actors.forward import completion_hidden
from actors.teacher import ema_update
from actors.loss import TokenLayout, sdft_loss, sft_loss, token_logprobs

EOS = 1


def _divergence64(zs, zt, kind, beta, tau):
    ls, lt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    fwd = (pt * (lt - ls)).sum()
    rev = (ps * (ls - lt)).sum()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return fwd
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return rev
    m = (1 - beta) * ps + beta * pt
    return beta * (pt * (lt - m.log())).sum() + (1 - beta) * (ps * (ls - m.log())).sum()


def reference_loss(s_logits, t_logits, completions, rollout_lp, kind, beta, tau, skip, cap):
    """Loops over sequences and tokens; every quantity in float64."""
    seq_losses = []
    for zs_seq, zt_seq, y, lp_roll in zip(s_logits, t_logits, completions, rollout_lp):
        divs, ratios, seen_eos = [], [], False
        for t, tok in enumerate(y):
            if seen_eos:
                break  # positions after EOS are masked
            seen_eos = tok == EOS
            if t >= skip:  # the IS ratio is averaged over the loss mask, as the official code does
                lp_train = torch.log_softmax(zs_seq[t], -1)[tok]
                ratios.append(min(math.exp(lp_train.item() - lp_roll[t]), cap))
                divs.append(_divergence64(zs_seq[t], zt_seq[t], kind, beta, tau))
        w = sum(ratios) / len(ratios) if ratios else 0.0
        seq_losses.append(w * (torch.stack(divs).mean() if divs else zs_seq.sum() * 0))
    return torch.stack(seq_losses).mean()


def _batch(lengths, vocab, eos_at=None):
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
    for seq, pos in (eos_at or {}).items():
        completions[seq][pos] = EOS
    s = [torch.randn(n, vocab, dtype=torch.float64) * 3 for n in lengths]
    t = [torch.randn(n, vocab, dtype=torch.float64) * 3 for n in lengths]
    # rollout logprobs near the trainer's, some far enough to hit the cap
    roll = [(torch.log_softmax(z, -1)[torch.arange(len(y)), torch.tensor(y)]
             + torch.randn(len(y), generator=g, dtype=torch.float64) * 0.8).tolist()
            for z, y in zip(s, completions)]
    return s, t, completions, roll


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3),
                                       ("jsd", 1.0)])
@pytest.mark.parametrize("tau,skip", [(1.0, 0), (0.7, 2)])
def test_sdft_loss_matches_float64_reference(kind, beta, tau, skip):
    lengths, vocab = [5, 1, 7, 4], 11
    s, t, y, roll = _batch(lengths, vocab, eos_at={2: 3})  # sequence 2 has tokens after its EOS
    s_flat = torch.cat(s).float().requires_grad_()
    t_flat = torch.cat(t).float()
    ids = torch.tensor([tok for seq in y for tok in seq])
    layout = TokenLayout.from_lengths(lengths)
    per_token = kernels.token_divergence(s_flat, t_flat, divergence=kind, beta=beta, temperature=tau)
    out = sdft_loss(per_token, token_logprobs(s_flat.detach(), ids), ids,
                    torch.tensor([v for r in roll for v in r]), layout, eos_id=EOS, skip_first_tokens=skip, is_cap=2.0)
    out.loss.backward()

    s64 = [z.clone().requires_grad_() for z in s]
    want = reference_loss(s64, t, y, roll, kind, beta, tau, skip, cap=2.0)
    want.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    # float32 kernels vs float64: log-probs of logits up to ~±15/tau carry ~1e-7 absolute error into the gradient
    assert torch.allclose(s_flat.grad.double(), torch.cat([z.grad for z in s64]), rtol=1e-4, atol=1e-6)
    assert (out.is_weights <= 2.0).all() and (out.is_weights >= 0).all()


def test_is_weight_is_capped_and_detached():
    layout = TokenLayout.from_lengths([2, 2])
    lp_train = torch.tensor([0.0, 0.0, -1.0, -1.0], requires_grad=True)
    lp_roll = torch.tensor([-5.0, -5.0, -1.0, -1.0])  # sequence 0: ratio e^5 -> capped at 2
    per_token = torch.ones(4, requires_grad=True)
    out = sdft_loss(per_token, lp_train, torch.tensor([5, 6, 7, 8]), lp_roll, layout, eos_id=EOS, is_cap=2.0)
    assert out.is_weights.tolist() == pytest.approx([2.0, 1.0])
    assert out.loss.item() == pytest.approx(1.5)
    out.loss.backward()
    assert lp_train.grad is None  # the weight carries no gradient


def test_fully_masked_sequence_contributes_zero():
    layout = TokenLayout.from_lengths([2, 3])
    per_token = torch.tensor([4.0, 4.0, 1.0, 2.0, 3.0])
    out = sdft_loss(per_token, torch.zeros(5), torch.tensor([5, 6, 5, 6, 7]), None, layout, eos_id=EOS,
                    skip_first_tokens=2, is_cap=None)
    # sequence 0 has only 2 tokens, both skipped; sequence 1 keeps its third token (3.0)
    assert out.loss.item() == pytest.approx((0.0 + 3.0) / 2)
    assert out.num_tokens == 1


def test_sft_loss_is_token_mean_then_batch_mean():
    logits = torch.randn(5, 9, dtype=torch.float64)
    ids = torch.tensor([3, EOS, 2, 4, 8])
    out = sft_loss(logits, ids, TokenLayout.from_lengths([2, 3]), eos_id=EOS)
    nll = -torch.log_softmax(logits, -1)[torch.arange(5), ids]
    assert out.loss.item() == pytest.approx(((nll[0] + nll[1]) / 2 + nll[2:].mean()).item() / 2)


def test_ema_update_math():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.01)
    for b, p_t, p_s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(p_t, 0.01 * p_s + 0.99 * b, atol=1e-7)


def test_completion_rows_align_with_unpadded_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    contexts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    completions = [[20, 21], [22, 23, 24, 25], [26]]
    with torch.no_grad():
        rows = model.get_output_embeddings()(completion_hidden(model, contexts, completions, pad_id=0))
        want = []
        for c, y in zip(contexts, completions):
            logits = model(torch.tensor([c + y])).logits[0]
            want.append(logits[len(c) - 1 : len(c) - 1 + len(y)])  # the positions that predict y
    assert torch.allclose(rows, torch.cat(want), atol=1e-4)


def test_token_clip_caps_each_token_and_stops_its_gradient():
    layout = TokenLayout.from_lengths([2, 2])
    per_token = torch.tensor([0.5, 3.0, 1.0, 9.0], requires_grad=True)
    out = sdft_loss(per_token, torch.zeros(4), torch.tensor([5, 6, 7, 8]), None, layout, eos_id=EOS, is_cap=None,
                    token_clip=2.0)
    assert out.loss.item() == pytest.approx(((0.5 + 2.0) / 2 + (1.0 + 2.0) / 2) / 2)
    assert out.divergence.item() == pytest.approx((0.5 + 2.0 + 1.0 + 2.0) / 4)
    out.loss.backward()
    assert per_token.grad.tolist() == pytest.approx([0.25, 0.0, 0.25, 0.0])  # clipped tokens give no gradient
