"""Triton kernels for per-token forward KL / reverse KL / generalized JSD over the full vocab.

One program per row (token), streaming over vocab blocks of ``BLOCK_V`` with an online
log-sum-exp for student and teacher (a = z_s / tau, b = z_t / tau, float32 accumulation):

forward kernel (per row; writes the value and stats = (m_s, log d_s, m_t, log d_t, aux), where
m = max, d = sum e^{x - m}; log p = (x - m) - log d, exact near the max even for huge offsets):
  * forward_kl: ONE pass.  Besides both online LSEs it keeps
    W = sum_v e^{b - m_t} ((b - m_t) - (a - m_s)), shifted/rescaled whenever a running max grows;
    KL = W / d_t - log d_t + log d_s.
  * reverse_kl / jsd: pass 1 = the two LSEs, pass 2 = the value; aux = KL(pS||pT) resp.
    KL(pS||M) + log(1-beta) (needed by the gradient, see _jsd_dprime).

backward kernel (per row, ONE pass, reads both logits once, writes dL/dz_s once, already
multiplied by grad_output[row]; rows with grad_output == 0 get exact zeros):
  * forward_kl : (pS - pT) / tau
  * reverse_kl : pS (log pS - log pT - KL) / tau
  * jsd        : (1 - beta) pS (log pS - log M - KL(pS||M)) / tau,  M = (1-beta) pS + beta pT
                 (evaluated as (1 - beta) pS (D' - sum pS D') / tau, D' = log pS - log M + log(1-beta))
    (dJSD/dpS_j = (1-beta)(log pS_j - log M_j); chained through the softmax Jacobian).

Nothing of size [N, V] is kept between forward and backward except the two input logits
themselves (the student's are kept by autograd anyway); the backward recomputes
probabilities from the stored per-row LSEs.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import canonical

MODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
MAX_BLOCK_V = 4096
MIN_BLOCK_V = 16


@triton.jit
def _online_lse_update(m, d, x):
    """Online log-sum-exp step: returns new max, new sum, the rescale factor and e^{x - m_new}."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    alive = m_new > float("-inf")
    scale = tl.where(alive, tl.exp(m - m_new), 0.0)
    e = tl.where(x > float("-inf"), tl.exp(x - m_new), 0.0)
    d_new = d * scale + tl.sum(e, axis=0)
    return m_new, d_new, scale, e


@triton.jit
def _log1p(x):
    """Accurate log(1 + x) for x >= 0 (Goldberg's trick; tl has no log1p)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _log_mix(ls, lt, log_1mbeta, log_beta):
    """log M = logaddexp(ls + log(1-beta), lt + log(beta)); -inf where both are -inf."""
    u = ls + log_1mbeta
    v = lt + log_beta
    mx = tl.maximum(u, v)
    mn = tl.minimum(u, v)
    return tl.where(mx > float("-inf"), mx + _log1p(tl.exp(mn - mx)), float("-inf"))


@triton.jit
def _jsd_dprime(ls, lt, log_1mbeta, log_beta):
    """D' = log pS - log M + log(1 - beta), computed without the constant: with
    d = (ls + log(1-beta)) - (lt + log(beta)),  D' = min(d, 0) - log1p(exp(-|d|)).
    The JSD gradient (1-beta) pS (D - KL(pS||M)) equals (1-beta) pS (D' - sum pS D'); removing the
    constant -log(1-beta) analytically avoids a catastrophic cancellation when D is ~constant."""
    d = (ls + log_1mbeta) - (lt + log_beta)
    return tl.minimum(d, 0.0) - _log1p(tl.exp(-tl.abs(d)))


@triton.jit
def _row_start(S, T, stride_s, stride_t, BLOCK_V: tl.constexpr):
    """This program's row (int64, so row * stride cannot overflow), the student and teacher row
    pointers, and the offsets within one vocab block."""
    row = tl.program_id(0).to(tl.int64)
    return row, S + row * stride_s, T + row * stride_t, tl.arange(0, BLOCK_V)


@triton.jit
def _load_block(s_ptr, t_ptr, idx, V, inv_tau):
    """One vocab block of both rows at temperature tau, in fp32; -inf beyond V (zero probability)."""
    mask = idx < V
    a = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
    b = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
    return a, b, idx, mask


@triton.jit
def _load_log_probs(s_ptr, t_ptr, idx, V, inv_tau, m_s, logd_s, m_t, logd_t):
    """log pS, log pT of one vocab block from the row's final LSE stats (m = max, log d = log sum);
    -inf beyond V."""
    a, b, idx, mask = _load_block(s_ptr, t_ptr, idx, V, inv_tau)
    return (a - m_s) - logd_s, (b - m_t) - logd_t, idx, mask


@triton.jit
def _divergence_fwd_kernel(
    S, T, stride_s, stride_t,
    LOSS, STATS,
    V, inv_tau, beta, log_beta, log_1mbeta,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, s_ptr, t_ptr, offs = _row_start(S, T, stride_s, stride_t, BLOCK_V)

    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    w = 0.0
    # pass 1: both online LSEs.  forward KL also accumulates, in the same pass,
    #   W = sum_v e^{b - m_t} * ((b - m_t) - (a - m_s))      (coordinates relative to the running maxes,
    # so large common offsets cancel exactly); when the maxes grow, W is shifted and rescaled.
    for start in range(0, V, BLOCK_V):
        a, b, idx, mask = _load_block(s_ptr, t_ptr, start + offs, V, inv_tau)
        m_s_old = m_s
        m_t_old = m_t
        d_t_old = d_t
        m_s, d_s, _sc_s, _e_s = _online_lse_update(m_s, d_s, a)
        m_t, d_t, sc_t, e_t = _online_lse_update(m_t, d_t, b)
        if MODE == 0:
            shift = tl.where(m_s == m_s_old, 0.0, m_s - m_s_old) - tl.where(m_t == m_t_old, 0.0, m_t - m_t_old)
            w = tl.where(d_t_old > 0.0, sc_t * (w + d_t_old * shift), 0.0)
            a_sh = tl.where(a > float("-inf"), a - m_s, float("-inf"))
            w += tl.sum(tl.where(e_t > 0.0, e_t * ((b - m_t) - a_sh), 0.0), axis=0)
    logd_s = tl.log(d_s)
    logd_t = tl.log(d_t)

    if MODE == 0:
        loss = w / d_t - logd_t + logd_s
        aux = loss
    else:
        acc = 0.0
        ks = 0.0
        for start in range(0, V, BLOCK_V):
            ls, lt, idx, mask = _load_log_probs(s_ptr, t_ptr, start + offs, V, inv_tau, m_s, logd_s, m_t, logd_t)
            ps = tl.exp(ls)
            if MODE == 1:
                acc += tl.sum(tl.where(ps > 0.0, ps * (ls - lt), 0.0), axis=0)
            else:
                pt = tl.exp(lt)
                lm = _log_mix(ls, lt, log_1mbeta, log_beta)
                ts = tl.where(ps > 0.0, ps * (ls - lm), 0.0)
                tt = tl.where(pt > 0.0, pt * (lt - lm), 0.0)
                acc += tl.sum(beta * tt + (1.0 - beta) * ts, axis=0)
                dp = _jsd_dprime(ls, lt, log_1mbeta, log_beta)
                ks += tl.sum(tl.where(ps > 0.0, ps * dp, 0.0), axis=0)
        loss = acc
        if MODE == 1:
            aux = acc
        else:
            aux = ks

    tl.store(LOSS + row, loss)
    st = STATS + row * 5
    tl.store(st + 0, m_s)
    tl.store(st + 1, logd_s)
    tl.store(st + 2, m_t)
    tl.store(st + 3, logd_t)
    tl.store(st + 4, aux)


@triton.jit
def _divergence_bwd_kernel(
    S, T, G, stride_s, stride_t, stride_g,
    GO, STATS,
    V, inv_tau, beta, log_beta, log_1mbeta,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, s_ptr, t_ptr, offs = _row_start(S, T, stride_s, stride_t, BLOCK_V)
    g_ptr = G + row * stride_g

    go = tl.load(GO + row).to(tl.float32)
    st = STATS + row * 5
    m_s = tl.load(st + 0)
    logd_s = tl.load(st + 1)
    m_t = tl.load(st + 2)
    logd_t = tl.load(st + 3)
    aux = tl.load(st + 4)
    scale = go * inv_tau
    for start in range(0, V, BLOCK_V):
        ls, lt, idx, mask = _load_log_probs(s_ptr, t_ptr, start + offs, V, inv_tau, m_s, logd_s, m_t, logd_t)
        ps = tl.exp(ls)
        if MODE == 0:
            g = ps - tl.exp(lt)
        elif MODE == 1:
            g = tl.where(ps > 0.0, ps * (ls - lt - aux), 0.0)
        else:
            dp = _jsd_dprime(ls, lt, log_1mbeta, log_beta)
            g = (1.0 - beta) * tl.where(ps > 0.0, ps * (dp - aux), 0.0)
        g = tl.where(go == 0.0, 0.0, g * scale)
        tl.store(g_ptr + idx, g.to(G.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launch helpers (also used per chunk by the fused-linear path)
# ----------------------------------------------------------------------------------------------


def _block_v(V, block_v=None):
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 1)))
    return max(MIN_BLOCK_V, int(block_v))


def _num_warps(block_v):
    return 8 if block_v >= 2048 else 4


def _check_device(x):
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on non-CUDA tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (or use backend='torch')"
        )


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _scalars(mode, beta, temperature):
    beta = float(beta)
    if mode == 2 and not (0.0 < beta < 1.0):
        raise ValueError("internal: jsd kernel needs 0 < beta < 1 (reference.canonical maps the end points)")
    log_beta = math.log(beta) if beta > 0 else 0.0
    log_1mbeta = math.log1p(-beta) if beta < 1 else 0.0
    return 1.0 / float(temperature), beta, log_beta, log_1mbeta


def divergence_forward(zs, zt, mode, beta, temperature, block_v=None):
    """Launch the forward kernel.  zs, zt: [N, V] with unit last stride.  Returns
    (values [N] float32, stats [N, 5] float32 = (max_s, log sum_s, max_t, log sum_t, aux))."""
    _check_device(zs)
    N, V = zs.shape
    loss = torch.empty(N, dtype=torch.float32, device=zs.device)
    stats = torch.empty((N, 5), dtype=torch.float32, device=zs.device)
    if N == 0:
        return loss, stats
    inv_tau, beta, log_beta, log_1mbeta = _scalars(mode, beta, temperature)
    bv = _block_v(V, block_v)
    _divergence_fwd_kernel[(N,)](
        zs, zt, zs.stride(0), zt.stride(0), loss, stats,
        V, inv_tau, beta, log_beta, log_1mbeta, MODE=mode, BLOCK_V=bv, num_warps=_num_warps(bv),
    )
    return loss, stats


def divergence_backward(zs, zt, stats, grad_output, mode, beta, temperature,
                        out_dtype=None, block_v=None):
    """Launch the backward kernel: returns grad_output[:, None] * d value / d zs, [N, V]."""
    _check_device(zs)
    N, V = zs.shape
    grad = torch.empty((N, V), dtype=out_dtype or zs.dtype, device=zs.device)
    if N == 0 or V == 0:
        return grad
    inv_tau, beta, log_beta, log_1mbeta = _scalars(mode, beta, temperature)
    bv = _block_v(V, block_v)
    go = grad_output.to(torch.float32).contiguous()
    _divergence_bwd_kernel[(N,)](
        zs, zt, grad, zs.stride(0), zt.stride(0), grad.stride(0), go, stats,
        V, inv_tau, beta, log_beta, log_1mbeta, MODE=mode, BLOCK_V=bv, num_warps=_num_warps(bv),
    )
    return grad


class TritonTokenDivergence(torch.autograd.Function):
    """values[N] = divergence(student_logits, teacher_logits); grad only for the student."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, mode, beta, temperature, block_v):
        zs = _rowmajor(student_logits)
        zt = _rowmajor(teacher_logits.detach())
        loss, stats = divergence_forward(zs, zt, mode, beta, temperature, block_v)
        ctx.save_for_backward(zs, zt, stats)
        ctx.cfg = (mode, beta, temperature, block_v, student_logits.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        zs, zt, stats = ctx.saved_tensors
        mode, beta, temperature, block_v, dtype = ctx.cfg
        grad = None
        if ctx.needs_input_grad[0]:
            grad = divergence_backward(zs, zt, stats, grad_output, mode, beta,
                                       temperature, out_dtype=dtype, block_v=block_v)
        return grad, None, None, None, None, None


def triton_token_divergence(student_logits, teacher_logits, divergence="forward_kl", beta=0.5,
                            temperature=1.0, block_v=None):
    """[N, V] x [N, V] -> [N] float32 (no argument validation; use kernels.token_divergence)."""
    beta = float(beta)
    divergence = canonical(divergence, beta)
    return TritonTokenDivergence.apply(student_logits, teacher_logits, MODES[divergence], beta,
                                       float(temperature), block_v)
