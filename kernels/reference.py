"""Plain-torch reference definitions of the per-token divergences.

This is the source of truth the Triton / fused-linear paths are tested against,
and it is the ``backend="torch"`` path of :func:`kernels.token_divergence`.

Conventions (all functions):
  * ``student_logits``, ``teacher_logits``: ``[N, V]`` (any float dtype).  Both are
    divided by ``temperature`` before the softmax.
  * the teacher is under stop-gradient (``.detach()``); gradients flow to the
    student logits only and come back in the student logits' dtype.
  * accumulation is float32; the result is a ``[N]`` float32 tensor.
  * ``-inf`` logits are allowed; ``0 * log 0`` is treated as 0, so a token with
    zero probability under the distribution that weights a term contributes 0.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "canonical",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "topk_forward_kl",
    "sparse_topk_forward_kl",
    "sampled_kl",
    "reference_divergence",
]


def canonical(divergence, beta):
    """The divergence that is computed for ``(divergence, beta)``: jsd at ``beta == 0`` is exactly
    :func:`forward_kl` and at ``beta == 1`` exactly :func:`reverse_kl`; every backend maps the end
    points here (its jsd kernels only handle 0 < beta < 1).  Other names pass through unchanged."""
    if divergence == "jsd":
        return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd")
    return divergence


def _log_probs(student_logits, teacher_logits, temperature):
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return ls, lt


def _kl_terms(lp, lq):
    """Per-element p * (log p - log q) with 0 * anything = 0 (NaN-free gradients)."""
    p = lp.exp()
    live = p > 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(live, p * (torch.where(live, lp, zero) - torch.where(live, lq, zero)), zero)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_teacher || p_student) = sum_v pT (log pT - log pS), per token."""
    ls, lt = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_terms(lt, ls).sum(-1)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_student || p_teacher) = sum_v pS (log pS - log pT), per token."""
    ls, lt = _log_probs(student_logits, teacher_logits, temperature)
    return _kl_terms(ls, lt).sum(-1)


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """Generalized JSD as in TRL's GKD ``generalized_jsd_loss``.

    ``beta == 0`` -> exactly :func:`forward_kl`; ``beta == 1`` -> exactly :func:`reverse_kl`;
    otherwise with M = (1-beta) pS + beta pT:  beta * KL(pT||M) + (1-beta) * KL(pS||M).
    Note (inherited from TRL): the value is discontinuous at the end points -- as beta -> 0 or 1
    the interior formula goes to 0, not to the KLs.
    """
    beta = float(beta)
    end_point = canonical("jsd", beta)
    if end_point != "jsd":
        return reference_divergence(student_logits, teacher_logits, end_point, temperature=temperature)
    ls, lt = _log_probs(student_logits, teacher_logits, temperature)
    ps, pt = ls.exp(), lt.exp()
    live = (ps > 0) | (pt > 0)
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    # log M = logsumexp(log pS + log(1-beta), log pT + log beta); entries where both are 0 are
    # replaced by a finite dummy (their terms are masked) so the backward stays NaN-free.
    lm = torch.logaddexp(
        torch.where(live, ls, zero) + math.log1p(-beta), torch.where(live, lt, zero) + math.log(beta)
    )
    return beta * _kl_terms(lt, lm).sum(-1) + (1.0 - beta) * _kl_terms(ls, lm).sum(-1)


def topk_forward_kl(student_logits, teacher_logits, k=64, temperature=1.0):
    """Forward KL over the teacher's top-k tokens plus one tail bucket.

    Buckets: the teacher's k most likely tokens, and one "tail" bucket with the remaining
    mass (teacher: 1 - sum of its top-k probs, student: 1 - sum of the student's probs on the
    same indices; both computed as a log-sum-exp over the complement, so no cancellation).
    KL(pT || pS) over these k+1 buckets.  For ``k >= V`` this is exactly :func:`forward_kl`.
    """
    V = student_logits.shape[-1]
    k = int(k)
    if k < 1:
        raise ValueError(f"topk needs k >= 1, got {k}")
    if k >= V:
        return forward_kl(student_logits, teacher_logits, temperature)
    ls, lt = _log_probs(student_logits, teacher_logits, temperature)
    idx = lt.topk(k, dim=-1).indices
    ls_k, lt_k = ls.gather(-1, idx), lt.gather(-1, idx)
    in_top = torch.zeros_like(ls, dtype=torch.bool).scatter_(-1, idx, True)
    neg_inf = torch.full((), float("-inf"), dtype=ls.dtype, device=ls.device)
    ls_tail = torch.where(in_top, neg_inf, ls).logsumexp(-1, keepdim=True)
    lt_tail = torch.where(in_top, neg_inf, lt).logsumexp(-1, keepdim=True)
    return _kl_terms(torch.cat([lt_k, lt_tail], -1), torch.cat([ls_k, ls_tail], -1)).sum(-1)


def sparse_topk_forward_kl(student_logits, teacher_ids, teacher_logprobs, tail=True):
    """Forward KL against a *sparse* teacher: its top-k ids and their log-probs (vLLM's prompt_logprobs).

    ``student_logits`` [N, V]; ``teacher_ids`` [N, K] distinct ids in [0, V); ``teacher_logprobs`` [N, K] (from
    the teacher's full-vocabulary softmax; ``-inf`` allowed).  P_i = exp(teacher_logprobs_i), Q = softmax(student).

    * ``tail=True`` (K+1 buckets, as TRL's ``distillation_add_tail``): P_tail = max(0, 1 - sum_i P_i) and
      Q_tail = the student's mass outside the ids, a log-sum-exp over the complement (``1 - sum_i Q_i`` would
      cancel catastrophically when the ids hold ~all the mass).  Value: sum_i P_i (log P_i - log Q_i) +
      P_tail (log P_tail - log Q_tail).  For K == V the tail bucket does not exist (no term): this is then
      :func:`forward_kl` of the teacher distribution the log-probs describe.
    * ``tail=False``: the truncated sum sum_i P_i (log P_i - log Q_i) (no tail, no renormalisation).

    0 * log 0 = 0 throughout.  The gradient (autograd) is, with S = sum_i P_i and q = softmax(z):
    (S + P_tail) q_v - P_v on the ids and (S + P_tail) q_v - P_tail q_v / Q_tail elsewhere (tail=True;
    S + P_tail == 1 unless the log-probs sum above 1 by rounding), resp. S q_v - P_v [v in ids] (tail=False).
    The teacher is data (detached).  Builds [N, V] tensors (it is the reference).
    """
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    ids = teacher_ids.long()
    lp = teacher_logprobs.detach().float()
    out = _kl_terms(lp, ls.gather(-1, ids)).sum(-1)
    if tail and ids.shape[-1] < ls.shape[-1]:
        in_top = torch.zeros_like(ls, dtype=torch.bool).scatter_(-1, ids, True)
        rest = ls.masked_fill(in_top, float("-inf"))
        # a complement the student gives no mass at all: log Q_tail = -inf, but logsumexp's backward would be
        # NaN there (exp(-inf - -inf)); take the LSE of a dummy row and select -inf (zero gradient) instead.
        empty = (rest == float("-inf")).all(-1, keepdim=True)
        ls_tail = torch.where(empty, float("-inf"), rest.masked_fill(empty, 0.0).logsumexp(-1, keepdim=True))
        p_tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        out = out + _kl_terms(p_tail.log(), ls_tail).squeeze(-1)
    broken = _broken_rows(student_logits) | _broken_rows(teacher_logprobs)
    return torch.where(broken, torch.full_like(out, float("nan")), out)


def sampled_kl(student_logits, teacher_logits, sampled_ids, temperature=1.0):
    """Single-sample reverse-KL estimator on the tokens actually sampled from the student.

    Value (what the forward returns): ``log pS(y) - log pT(y)`` per token -- an unbiased
    estimate of KL(pS || pT) because ``y ~ pS``.

    Gradient: NOT the gradient of that value (whose expectation is 0 under y ~ pS), but the
    policy-gradient (REINFORCE) form  ``stopgrad(log pS(y) - log pT(y)) * grad log pS(y)``,
    whose expectation over y ~ pS is the gradient of KL(pS || pT).  Implemented as
    ``r + (r * log pS(y) - stopgrad(r * log pS(y)))`` with ``r = stopgrad(log ratio)``.
    """
    ls, lt = _log_probs(student_logits, teacher_logits, temperature)
    y = sampled_ids.to(device=ls.device, dtype=torch.long).reshape(-1, 1)
    if y.shape[0] != ls.shape[0]:
        raise ValueError(f"sampled_ids has {y.shape[0]} entries but there are {ls.shape[0]} tokens")
    ls_y, lt_y = ls.gather(-1, y).squeeze(-1), lt.gather(-1, y).squeeze(-1)
    ratio = (ls_y - lt_y).detach()
    surrogate = ratio * ls_y
    return ratio + (surrogate - surrogate.detach())


def reference_divergence(student_logits, teacher_logits, divergence="forward_kl", beta=0.5,
                         temperature=1.0, sampled_ids=None, topk=64):
    """Dispatch by name over the definitions above (shapes already validated, [N, V]). A row with a NaN or +inf
    logit gets a NaN divergence (the definitions treat zero probabilities as 0, which would hide a diverged model
    as "KL 0"); -inf logits are ordinary zero-probability entries."""
    if divergence == "forward_kl":
        out = forward_kl(student_logits, teacher_logits, temperature)
    elif divergence == "reverse_kl":
        out = reverse_kl(student_logits, teacher_logits, temperature)
    elif divergence == "jsd":
        out = jsd(student_logits, teacher_logits, beta, temperature)
    elif divergence == "topk":
        out = topk_forward_kl(student_logits, teacher_logits, topk, temperature)
    elif divergence == "sampled":
        if sampled_ids is None:
            raise ValueError("divergence='sampled' needs sampled_ids (one token id per row)")
        out = sampled_kl(student_logits, teacher_logits, sampled_ids, temperature)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    broken = _broken_rows(student_logits) | _broken_rows(teacher_logits)
    return torch.where(broken, torch.full_like(out, float("nan")), out)


def _broken_rows(logits):
    return (torch.isnan(logits) | (logits == float("inf"))).any(-1)
