"""Per-token teacher/student divergences for self-distillation fine-tuning.

Public API: :func:`token_divergence` (logits level), :func:`fused_linear_token_divergence`
(fused with the lm_head, chunked over tokens) and :func:`sparse_topk_divergence` (against a sparse
teacher: its top-k ids and log-probs, e.g. vLLM's prompt_logprobs).  Definitions: :mod:`kernels.reference`.

Triton is imported lazily (only on the ``backend="triton"`` path, or by the fused-linear path on
CUDA tensors), so ``import kernels`` is cheap and callers can still set ``TRITON_INTERPRET=1``
before the first Triton use.
"""

from __future__ import annotations

import torch

from . import reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "topk", "sampled")
BACKENDS = ("torch", "triton")
_EXACT = ("forward_kl", "reverse_kl", "jsd")

__all__ = ["token_divergence", "fused_linear_token_divergence", "sparse_topk_divergence", "DIVERGENCES", "BACKENDS",
           "reference"]


def _check_common(divergence, beta, temperature):
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    beta = float(beta)
    if divergence == "jsd" and not (0.0 <= beta <= 1.0):
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return beta, temperature


def _check_vocab(v_student, v_teacher):
    if v_student != v_teacher:
        raise ValueError(
            f"student and teacher vocab sizes differ: student V={v_student}, teacher V={v_teacher} "
            "(pad/slice the lm_head outputs to a common vocabulary first)"
        )


def token_divergence(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                     backend="torch", sampled_ids=None, topk=64) -> torch.Tensor:
    """Per-token divergence between student and teacher next-token distributions.

    student_logits, teacher_logits: [N, V] (rows = completion tokens already gathered; leading
    dims [..., V] are also accepted and flattened; the result then has shape [...]).
    Returns the per-token divergence, float32, differentiable w.r.t. ``student_logits`` only
    (teacher is stop-gradient); any per-token grad_output is honoured (the caller multiplies by
    masks / IS weights / 1/len and sums).  Gradient comes back in the student logits' dtype.

    divergence: "forward_kl" KL(pT||pS) (default) | "reverse_kl" KL(pS||pT) | "jsd" (TRL GKD
    generalized JSD; beta=0 -> forward_kl, beta=1 -> reverse_kl) | "topk" (teacher top-``topk``
    + tail bucket, forward KL; torch only) | "sampled" (log pS(y) - log pT(y) on ``sampled_ids``
    with the policy-gradient backward, see :func:`kernels.reference.sampled_kl`; torch only).
    Both logits are divided by ``temperature`` before the softmax.
    backend: "torch" (reference, autograd) or "triton" (streaming kernels; CUDA, or CPU under
    TRITON_INTERPRET=1).
    """
    beta, temperature = _check_common(divergence, beta, temperature)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError("logits must have a trailing vocab dimension")
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    zs = student_logits.reshape(-1, V)
    zt = teacher_logits.reshape(-1, V)
    if divergence == "sampled":
        if sampled_ids is None:
            raise ValueError("divergence='sampled' needs sampled_ids (one token id per row)")
        sampled_ids = sampled_ids.reshape(-1)
    if backend == "triton":
        if divergence not in _EXACT:
            raise ValueError(f"divergence={divergence!r} is only implemented for backend='torch'")
        from .divergence_triton import triton_token_divergence

        out = triton_token_divergence(zs, zt, divergence, beta, temperature)
    else:
        out = reference.reference_divergence(zs, zt, divergence, beta, temperature, sampled_ids, topk)
    return out.reshape(lead)


def fused_linear_token_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                                  divergence="forward_kl", beta=0.5, temperature=1.0, chunk_size=1024,
                                  token_weights=None, backend="auto") -> torch.Tensor:
    """Per-token divergence of ``hidden @ weight.T`` logits without materialising [N, V].

    student_hidden [N, H], student_weight [V, H] (lm_head), teacher_hidden [N, H'],
    teacher_weight [V, H'].  Tokens are processed in chunks of ``chunk_size``; peak extra memory
    O(chunk_size * V).  Returns [N] float32; gradients for ``student_hidden`` and
    ``student_weight`` (teacher is stop-gradient) are exact for any per-token grad_output.

    token_weights: optional [N] hint = the grad_output the caller will use (e.g. the mask * IS
    weight / len it multiplies the values by before summing).  With it, the gradients are
    computed inside the forward (no recomputation in backward when grad_output equals it, or a
    scalar multiple of it); otherwise the backward recomputes the chunk logits.
    divergence in {"forward_kl", "reverse_kl", "jsd"}.  backend: "auto" (Triton per chunk on
    CUDA, torch otherwise) | "torch" | "triton".
    """
    beta, temperature = _check_common(divergence, beta, temperature)
    if divergence not in _EXACT:
        raise ValueError(f"fused_linear_token_divergence supports {_EXACT}, got {divergence!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_weight.dim() != 2 \
            or teacher_weight.dim() != 2:
        raise ValueError("fused_linear_token_divergence expects hidden [N, H] and weight [V, H]")
    _check_vocab(student_weight.shape[0], teacher_weight.shape[0])
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student/teacher token counts differ: {student_hidden.shape[0]} vs "
                         f"{teacher_hidden.shape[0]}")
    if student_hidden.shape[1] != student_weight.shape[1] or teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError("hidden size does not match the lm_head weight's second dimension")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if token_weights is not None and token_weights.numel() != student_hidden.shape[0]:
        raise ValueError(f"token_weights has {token_weights.numel()} entries for {student_hidden.shape[0]} tokens")
    from .fused_linear import fused_linear_token_divergence_impl

    return fused_linear_token_divergence_impl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                              divergence, beta, temperature, chunk_size, token_weights, backend)


def _check_sparse(student_logits, teacher_ids, teacher_logprobs, backend):
    """Validate sparse_topk_divergence's arguments; returns the flattened [N, V], [N, K], [N, K] tensors and
    the ids sorted along each row (the Triton path reuses them)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for name, x in (("student_logits", student_logits), ("teacher_logprobs", teacher_logprobs)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if teacher_ids.is_floating_point() or teacher_ids.is_complex() or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor (int64 or int32 token ids), got {teacher_ids.dtype}")
    if student_logits.dim() < 1 or teacher_ids.dim() < 1:
        raise ValueError("student_logits [N, V] and teacher_ids [N, K] need a trailing vocab / top-k dimension")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape [N, K]")
    if student_logits.shape[:-1] != teacher_ids.shape[:-1]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} [N, V] and teacher_ids "
                         f"{tuple(teacher_ids.shape)} [N, K] have different token counts N")
    V, K = student_logits.shape[-1], teacher_ids.shape[-1]
    if K < 1:
        raise ValueError(f"teacher_ids needs K >= 1 ids per row, got K={K}")
    if K > V:
        raise ValueError(f"teacher_ids has K={K} ids per row, more than the student's vocabulary V={V}")
    if teacher_ids.device != student_logits.device or teacher_logprobs.device != student_logits.device:
        raise ValueError(f"student_logits ({student_logits.device}), teacher_ids ({teacher_ids.device}) and "
                         f"teacher_logprobs ({teacher_logprobs.device}) must be on the same device")
    zs = student_logits.reshape(-1, V)
    ids = teacher_ids.reshape(-1, K)
    lp = teacher_logprobs.reshape(-1, K)
    sorted_ids = ids.sort(dim=-1).values
    if ids.shape[0]:
        # one host sync: an out-of-range id would read out of bounds in the kernel (or scatter wrongly), a repeat
        # would count a token twice
        out_of_range = (sorted_ids[:, 0] < 0) | (sorted_ids[:, -1] >= V)
        repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(-1)
        flags = torch.stack([out_of_range.any(), repeated.any()]).tolist()
        if flags[0]:
            raise ValueError(f"teacher_ids must lie in [0, V={V}); got ids in "
                             f"[{int(sorted_ids[:, 0].min())}, {int(sorted_ids[:, -1].max())}]")
        if flags[1]:
            raise ValueError("teacher_ids must be distinct within each row (a repeated id would be counted twice)")
    return zs, ids, lp, sorted_ids


def sparse_topk_divergence(student_logits, teacher_ids, teacher_logprobs, *, tail=True,
                           backend="torch") -> torch.Tensor:
    """Per-token forward KL against a sparse teacher: its top-k token ids and their log-probs.

    student_logits [N, V] (any float dtype; differentiable), teacher_ids [N, K] integer ids (distinct within
    a row, 0 <= id < V; K == V = the full vocabulary), teacher_logprobs [N, K] the teacher's log-probs of those
    ids from its full-vocabulary softmax (``-inf`` allowed).  Leading dims [..., V] / [..., K] are flattened
    (the result then has shape [...]).  Returns [N] float32; gradient flows to ``student_logits`` only (the
    teacher is data), in its dtype; any per-token grad_output is honoured.

    tail=True: K + 1 buckets, the ids plus a tail (teacher: max(0, 1 - sum of its probs), student: its mass
    outside the ids, as a log-sum-exp over the complement); for K == V there is no tail and this is
    :func:`kernels.reference.forward_kl`.  tail=False: the truncated sum over the ids only.  Definition:
    :func:`kernels.reference.sparse_topk_forward_kl`.  A row with a NaN / +inf student logit (or teacher
    log-prob) gets a NaN value.
    backend: "torch" (reference, autograd; builds [N, V] temporaries) or "triton" (streaming kernels that never
    materialise the student's log-softmax; CUDA, or CPU under TRITON_INTERPRET=1).
    The id checks (range, distinct) cost one host sync.
    """
    zs, ids, lp, sorted_ids = _check_sparse(student_logits, teacher_ids, teacher_logprobs, backend)
    lead = student_logits.shape[:-1]
    if backend == "triton":
        from .sparse_triton import triton_sparse_topk_divergence

        out = triton_sparse_topk_divergence(zs, ids, lp, tail=bool(tail), sorted_ids=sorted_ids)
    else:
        out = reference.sparse_topk_forward_kl(zs, ids, lp, tail=bool(tail))
    return out.reshape(lead)
