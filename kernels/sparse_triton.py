"""Triton kernels for the forward KL against a sparse teacher (its top-k ids and log-probs) plus a tail bucket.

Definition and gradient: :func:`kernels.reference.sparse_topk_forward_kl`.  One program per row (token), float32
accumulation, student logits z (P_i = exp(teacher log-prob i), S = sum_i P_i, q = softmax(z)).

The tail needs log Q_tail = LSE of z over the complement of the ids.  Computing it as LSE(all) "minus" LSE(ids)
(log(1 - e^{lse_ids - lse})) cancels catastrophically when the ids hold ~all the student's mass (1 - (1 - 1e-9)
is 0 in fp32), and a per-block membership test costs K compares per vocab entry.  Instead the row's ids are
sorted on the host ([N, K], cheap) and the kernel streams over the K + 1 *gaps* between consecutive sorted ids:
the complement is summed directly (exact however small), no membership test is needed, and
LSE(all) = logaddexp(LSE(ids), LSE(complement)) is an addition (no cancellation).  Extra cost: at most K + 1
partially masked vocab blocks per row.

forward kernel (per row): (1) over the K ids (chunks of BLOCK_K): online LSE of z_ids, S, broken-row flag;
(2) over the gaps (blocks of BLOCK_V): online LSE of the complement; (3) over the ids again: the terms
P_i (log P_i - (z_i - lse)).  Writes the value and stats = (lse, lse_complement, lse_ids, S).

backward kernel (per row, writes dL/dz once, already multiplied by grad_output[row]; rows with grad_output == 0
get exact zeros).  With c = S + P_tail = max(S, 1) (tail) or S (no tail):
  * over the gaps (the complement): tail: q_v (c - P_tail / Q_tail), evaluated for S < 1 as
    r_v (S - Q_ids) with r_v = q_v / Q_tail = e^{z_v - lse_complement} and Q_ids = e^{lse_ids - lse}
    (the identity uses P_tail = 1 - S, Q_tail = 1 - Q_ids): the direct form q_v - (1 - S) r_v cancels
    when Q_tail ~ P_tail (1 - S rounds in fp32, an O(1e-5) relative gradient error for K = 1), this one is
    accurate to fp32 relative to max(S, Q_ids) and stays finite when Q_tail underflows.  S >= 1 (P_tail = 0)
    and no tail: c q_v.
  * over the ids: c q_i - P_i (disjoint addresses from the gaps, so the two stores never race).

Nothing of size [N, V] is kept between forward and backward except the student logits themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .divergence_triton import _check_device, _log1p, _online_lse_update, _rowmajor

MAX_BLOCK_V = 2048
MAX_BLOCK_K = 1024
MIN_BLOCK = 16


@triton.jit
def _load_ids(i_ptr, lp_ptr, s_ptr, k0, K, offs_k):
    """One chunk of the row's K ids: their positions, the student logits there (fp32) and the teacher's log-probs
    (-inf beyond K, i.e. zero probability)."""
    kk = k0 + offs_k
    km = kk < K
    ids = tl.load(i_ptr + kk, mask=km, other=0)
    a = tl.load(s_ptr + ids, mask=km, other=float("-inf")).to(tl.float32)
    lp = tl.load(lp_ptr + kk, mask=km, other=float("-inf")).to(tl.float32)
    return ids, a, lp, km


@triton.jit
def _gap_end(si_ptr, j, K, V):
    """End (exclusive) of gap j: the j-th sorted id, or V for the last gap (int32 so the loop-carried start keeps
    one type whatever the ids' dtype)."""
    return tl.load(si_ptr + j, mask=j < K, other=V).to(tl.int32)


@triton.jit
def _broken(x):
    """1 where x is NaN or +inf."""
    return ((x != x) | (x == float("inf"))).to(tl.int32)


@triton.jit
def _sparse_fwd_kernel(
    S, IDS, SIDS, LP, stride_s, stride_i, stride_si, stride_lp,
    LOSS, STATS, V, K,
    TAIL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    i_ptr = IDS + row * stride_i
    si_ptr = SIDS + row * stride_si
    lp_ptr = LP + row * stride_lp
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)

    # (1) the ids: LSE of the student's logits there, the teacher's mass S, broken-row flag (NaN / +inf in
    # either side's numbers makes the value NaN, so a diverged model cannot read as "KL 0")
    m_k = float("-inf")
    d_k = 0.0
    p_sum = 0.0
    bad = 0
    for k0 in range(0, K, BLOCK_K):
        ids, a, lp, km = _load_ids(i_ptr, lp_ptr, s_ptr, k0, K, offs_k)
        m_k, d_k, _sc, _e = _online_lse_update(m_k, d_k, a)
        p_sum += tl.sum(tl.exp(lp), axis=0)
        bad = tl.maximum(bad, tl.max(_broken(a) | _broken(lp), axis=0))

    # (2) the complement, summed directly gap by gap (exact even when it holds ~1e-9 of the mass)
    m_c = float("-inf")
    d_c = 0.0
    lo = 0
    for j in range(0, K + 1):
        hi = _gap_end(si_ptr, j, K, V)
        for start in range(lo, hi, BLOCK_V):
            idx = start + offs_v
            a = tl.load(s_ptr + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
            m_c, d_c, _sc, _e = _online_lse_update(m_c, d_c, a)
            bad = tl.maximum(bad, tl.max(_broken(a), axis=0))
        lo = hi + 1
    lse_k = m_k + tl.log(d_k)
    lse_c = m_c + tl.log(d_c)  # -inf for an empty complement (K == V) or one the student gives no mass
    mx = tl.maximum(lse_k, lse_c)
    mn = tl.minimum(lse_k, lse_c)
    lse = mx + _log1p(tl.exp(mn - mx))

    # (3) the id terms P_i (log P_i - log Q_i), 0 where P_i == 0
    acc = 0.0
    for k0 in range(0, K, BLOCK_K):
        ids, a, lp, km = _load_ids(i_ptr, lp_ptr, s_ptr, k0, K, offs_k)
        p = tl.exp(lp)
        live = p > 0.0
        acc += tl.sum(tl.where(live, p * (tl.where(live, lp, 0.0) - (a - lse)), 0.0), axis=0)

    if TAIL:  # (only launched with TAIL when K < V: for K == V the tail bucket does not exist)
        p_tail = tl.maximum(1.0 - p_sum, 0.0)
        live_t = p_tail > 0.0
        # log Q_tail = lse_c - lse = log sigmoid(lse_c - lse_ids): from the difference, so it keeps full relative
        # precision when the tail holds ~all the mass (lse_c - lse would lose ulp(lse) to rounding)
        dct = lse_c - lse_k
        lq_tail = tl.minimum(dct, 0.0) - _log1p(tl.exp(-tl.abs(dct)))
        acc += tl.where(live_t, p_tail * (tl.log(tl.where(live_t, p_tail, 1.0)) - lq_tail), 0.0)

    tl.store(LOSS + row, tl.where(bad > 0, float("nan"), acc))
    st = STATS + row * 4
    tl.store(st + 0, lse)
    tl.store(st + 1, lse_c)
    tl.store(st + 2, lse_k)
    tl.store(st + 3, p_sum)


@triton.jit
def _sparse_bwd_kernel(
    S, IDS, SIDS, LP, stride_s, stride_i, stride_si, stride_lp,
    G, stride_g, GO, STATS, V, K,
    TAIL: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    i_ptr = IDS + row * stride_i
    si_ptr = SIDS + row * stride_si
    lp_ptr = LP + row * stride_lp
    g_ptr = G + row * stride_g
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)

    go = tl.load(GO + row).to(tl.float32)
    st = STATS + row * 4
    lse = tl.load(st + 0)
    lse_c = tl.load(st + 1)
    lse_k = tl.load(st + 2)
    p_sum = tl.load(st + 3)
    if TAIL:
        coef = tl.maximum(p_sum, 1.0)  # S + P_tail
        q_ids = tl.exp(lse_k - lse)
    else:
        coef = p_sum

    # complement (see the module docstring); a -inf logit has zero probability and zero gradient (this also
    # guards exp(-inf - -inf) when the complement has no mass)
    lo = 0
    for j in range(0, K + 1):
        hi = _gap_end(si_ptr, j, K, V)
        for start in range(lo, hi, BLOCK_V):
            idx = start + offs_v
            mask = idx < hi
            a = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
            if TAIL:
                g = tl.where(p_sum < 1.0, tl.exp(a - lse_c) * (p_sum - q_ids), p_sum * tl.exp(a - lse))
            else:
                g = p_sum * tl.exp(a - lse)
            g = tl.where(a > float("-inf"), g, 0.0)
            g = tl.where(go == 0.0, 0.0, g * go)
            tl.store(g_ptr + idx, g.to(G.dtype.element_ty), mask=mask)
        lo = hi + 1

    # ids: c q_i - P_i
    for k0 in range(0, K, BLOCK_K):
        ids, a, lp, km = _load_ids(i_ptr, lp_ptr, s_ptr, k0, K, offs_k)
        g = coef * tl.exp(a - lse) - tl.exp(lp)
        g = tl.where(go == 0.0, 0.0, g * go)
        tl.store(g_ptr + ids, g.to(G.dtype.element_ty), mask=km)


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------


def _blocks(V, K, block_v=None, block_k=None):
    bv = block_v if block_v is not None else min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))
    bk = block_k if block_k is not None else min(MAX_BLOCK_K, triton.next_power_of_2(max(K, 1)))
    return max(MIN_BLOCK, int(bv)), max(MIN_BLOCK, int(bk))


def _num_warps(block_v, block_k):
    return 8 if max(block_v, block_k) >= 2048 else 4


def _launch_args(zs, ids, sorted_ids, lp):
    return (zs, ids, sorted_ids, lp, zs.stride(0), ids.stride(0), sorted_ids.stride(0), lp.stride(0))


def sparse_forward(zs, ids, sorted_ids, lp, tail, block_v=None, block_k=None):
    """Launch the forward kernel.  zs [N, V] (unit last stride), ids / sorted_ids [N, K] integer, lp [N, K]
    float32.  Returns (values [N] float32, stats [N, 4] float32 = (lse, lse_complement, lse_ids, S))."""
    _check_device(zs)
    N, V = zs.shape
    K = ids.shape[1]
    loss = torch.empty(N, dtype=torch.float32, device=zs.device)
    stats = torch.empty((N, 4), dtype=torch.float32, device=zs.device)
    if N == 0:
        return loss, stats
    bv, bk = _blocks(V, K, block_v, block_k)
    _sparse_fwd_kernel[(N,)](
        *_launch_args(zs, ids, sorted_ids, lp), loss, stats, V, K,
        TAIL=bool(tail and K < V), BLOCK_V=bv, BLOCK_K=bk, num_warps=_num_warps(bv, bk),
    )
    return loss, stats


def sparse_backward(zs, ids, sorted_ids, lp, stats, grad_output, tail, out_dtype=None, block_v=None,
                    block_k=None):
    """Launch the backward kernel: returns grad_output[:, None] * d value / d zs, [N, V]."""
    _check_device(zs)
    N, V = zs.shape
    K = ids.shape[1]
    grad = torch.empty((N, V), dtype=out_dtype or zs.dtype, device=zs.device)
    if N == 0:
        return grad
    bv, bk = _blocks(V, K, block_v, block_k)
    go = grad_output.to(torch.float32).contiguous()
    _sparse_bwd_kernel[(N,)](
        *_launch_args(zs, ids, sorted_ids, lp), grad, grad.stride(0), go, stats, V, K,
        TAIL=bool(tail and K < V), BLOCK_V=bv, BLOCK_K=bk, num_warps=_num_warps(bv, bk),
    )
    return grad


class TritonSparseTopK(torch.autograd.Function):
    """values[N] = sparse_topk_forward_kl(student_logits, ids, logprobs); grad only for the student."""

    @staticmethod
    def forward(ctx, student_logits, ids, sorted_ids, lp, tail, block_v, block_k):
        zs = _rowmajor(student_logits)
        loss, stats = sparse_forward(zs, ids, sorted_ids, lp, tail, block_v, block_k)
        ctx.save_for_backward(zs, ids, sorted_ids, lp, stats)
        ctx.cfg = (tail, block_v, block_k, student_logits.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        zs, ids, sorted_ids, lp, stats = ctx.saved_tensors
        tail, block_v, block_k, dtype = ctx.cfg
        grad = None
        if ctx.needs_input_grad[0]:
            grad = sparse_backward(zs, ids, sorted_ids, lp, stats, grad_output, tail, out_dtype=dtype,
                                   block_v=block_v, block_k=block_k)
        return grad, None, None, None, None, None, None


def _int_ids(x):
    return (x if x.dtype in (torch.int32, torch.int64) else x.long()).contiguous()


def triton_sparse_topk_divergence(student_logits, teacher_ids, teacher_logprobs, tail=True, sorted_ids=None,
                                  block_v=None, block_k=None):
    """[N, V] x [N, K] ids x [N, K] log-probs -> [N] float32 (no argument validation; use
    kernels.sparse_topk_divergence).  ``sorted_ids``: ``teacher_ids`` sorted along the row, if already at hand."""
    ids = _int_ids(teacher_ids)
    sorted_ids = _int_ids(ids.sort(dim=-1).values if sorted_ids is None else sorted_ids)
    lp = teacher_logprobs.detach().to(torch.float32).contiguous()
    return TritonSparseTopK.apply(student_logits, ids, sorted_ids, lp, bool(tail), block_v, block_k)
