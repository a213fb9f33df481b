"""Chunked fused lm_head + per-token divergence, so the [N, V] logits never exist at once.

Per chunk of ``chunk_size`` tokens: student/teacher logits = hidden @ weight.T (input dtype),
divergence value and d value / d student-logits (torch closed form, or the Triton kernels
on CUDA), then the logits chunk is dropped.  Peak extra memory is O(chunk_size * V) plus the
gradient outputs themselves ([N, H] and [V, H]).

Two gradient strategies, both exact for an arbitrary per-token ``grad_output``:

* ``token_weights is None`` (default): the forward only computes values; the backward
  recomputes each chunk's logits (two GEMMs) and accumulates
  ``grad_hidden = (go * G) @ W`` and ``grad_weight += (go * G).T @ h``.
* ``token_weights`` given (a [N] tensor, normally the very weights the caller multiplies the
  values by before summing): the forward already computes the per-token (unscaled)
  ``grad_hidden`` stash [N, H] (fp32) and ``grad_weight = sum_t w_t G_t^T h_t``.  In the
  backward ``grad_hidden = go[:, None] * stash`` (exact for any go); ``grad_weight`` is the stash
  if ``go == token_weights`` (or ``c * stash`` if ``go`` is a scalar multiple ``c *
  token_weights`` to within 1e-6 relative), otherwise it falls back to recomputing the chunks.
"""

from __future__ import annotations

import math

import torch

from .reference import canonical


_MODES = ("forward_kl", "reverse_kl", "jsd")


def _chunk_value_and_grad_torch(zs, zt, divergence, beta, temperature, need_grad):
    """Closed-form value [C] and d value / d zs [C, V] (float32) for one chunk."""
    inv_tau = 1.0 / temperature
    ls = torch.log_softmax(zs.float() * inv_tau, dim=-1)
    lt = torch.log_softmax(zt.float() * inv_tau, dim=-1)
    ps = ls.exp()
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    live_s = ps > 0
    if divergence == "forward_kl":
        pt = lt.exp()
        live_t = pt > 0
        value = torch.where(live_t, pt * (lt - torch.where(live_t, ls, zero)), zero).sum(-1)
        grad = (ps - pt).mul_(inv_tau) if need_grad else None
        return value, grad
    if divergence == "reverse_kl":
        d = torch.where(live_s, ls - torch.where(live_s, lt, zero), zero)
        value = (ps * d).sum(-1)
        grad = (ps * (d - value[:, None])).mul_(inv_tau) if need_grad else None
        return value, grad
    # jsd, 0 < beta < 1.  D' = log pS - log M + log(1-beta) computed without the constant (see
    # divergence_triton._jsd_dprime): grad = (1-beta) pS (D' - sum pS D') / tau, well conditioned.
    pt = lt.exp()
    live_t = pt > 0
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    ds = torch.where(live_s, ls - torch.where(live_s, lm, zero), zero)
    dt = torch.where(live_t, lt - torch.where(live_t, lm, zero), zero)
    value = beta * (pt * dt).sum(-1) + (1.0 - beta) * (ps * ds).sum(-1)
    grad = None
    if need_grad:
        d = (ls + math.log1p(-beta)) - (lt + math.log(beta))
        dp = torch.where(live_s, d.clamp(max=0.0) - torch.log1p(torch.exp(-d.abs())), zero)
        kp = (ps * dp).sum(-1, keepdim=True)
        grad = (ps * (dp - kp)).mul_((1.0 - beta) * inv_tau)
    return value, grad


def _chunk_value_and_grad(zs, zt, divergence, beta, temperature, need_grad, backend):
    if backend == "triton":
        from . import divergence_triton as dt

        mode = dt.MODES[divergence]
        value, stats = dt.divergence_forward(zs, zt, mode, beta, temperature)
        grad = None
        if need_grad:
            ones = torch.ones_like(value)
            grad = dt.divergence_backward(zs, zt, stats, ones, mode, beta, temperature,
                                          out_dtype=torch.float32)
        return value, grad
    return _chunk_value_and_grad_torch(zs, zt, divergence, beta, temperature, need_grad)


class FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, token_weights, divergence, beta, temperature, chunk_size,
                backend, want_grad):
        N = hs.shape[0]
        values = torch.empty(N, dtype=torch.float32, device=hs.device)
        eager = want_grad and token_weights is not None
        gh_stash = gw_stash = None
        if eager:
            tw = token_weights.detach().to(device=hs.device, dtype=torch.float32).reshape(-1)
            gh_stash = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)
            gw_stash = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device)
        for c0 in range(0, N, chunk_size):
            c1 = min(N, c0 + chunk_size)
            h_c = hs[c0:c1]
            zs = h_c @ ws.t()
            zt = ht[c0:c1] @ wt.t()
            v, g = _chunk_value_and_grad(zs, zt, divergence, beta, temperature, eager, backend)
            del zs, zt
            values[c0:c1] = v
            if eager:
                gd = g.to(ws.dtype)
                gh_stash[c0:c1] = gd @ ws
                gw_stash.add_((g.mul_(tw[c0:c1, None])).to(hs.dtype).t() @ h_c)
                del g, gd
        ctx.save_for_backward(hs, ws, ht, wt, gh_stash, gw_stash,
                              tw if eager else None)
        ctx.cfg = (divergence, beta, temperature, chunk_size, backend)
        return values

    @staticmethod
    def backward(ctx, grad_output):
        hs, ws, ht, wt, gh_stash, gw_stash, tw = ctx.saved_tensors
        divergence, beta, temperature, chunk_size, backend = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        go = grad_output.detach().to(torch.float32).reshape(-1)
        grad_h = grad_w = None

        if gh_stash is not None:
            if need_h:
                grad_h = (gh_stash * go[:, None]).to(hs.dtype)
            if need_w:
                if torch.equal(go, tw):
                    grad_w = gw_stash.to(ws.dtype)
                else:
                    den = float((tw * tw).sum())
                    c = float((go * tw).sum()) / den if den > 0 else 0.0
                    if den > 0 and torch.allclose(go, c * tw, rtol=1e-6, atol=0.0):
                        grad_w = (gw_stash * c).to(ws.dtype)
            if (grad_w is not None or not need_w):
                return grad_h, grad_w, None, None, None, None, None, None, None, None, None
            need_h = False  # grad_h already done; recompute chunks for the weight only

        N = hs.shape[0]
        if need_h:
            grad_h = torch.empty_like(hs)
        gw_acc = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        for c0 in range(0, N, chunk_size):
            c1 = min(N, c0 + chunk_size)
            go_c = go[c0:c1]
            if not bool((go_c != 0).any()):
                if need_h:
                    grad_h[c0:c1].zero_()
                continue
            h_c = hs[c0:c1]
            zs = h_c @ ws.t()
            zt = ht[c0:c1] @ wt.t()
            _, g = _chunk_value_and_grad(zs, zt, divergence, beta, temperature, True, backend)
            del zs, zt
            gd = g.mul_(go_c[:, None]).to(ws.dtype)
            del g
            if need_h:
                grad_h[c0:c1] = gd @ ws
            if need_w:
                gw_acc.add_(gd.t() @ h_c)
            del gd
        if need_w:
            grad_w = gw_acc.to(ws.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def fused_linear_token_divergence_impl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                       divergence, beta, temperature, chunk_size, token_weights,
                                       backend):
    if backend == "auto":
        backend = "triton" if student_hidden.is_cuda else "torch"
    beta = float(beta)
    divergence = canonical(divergence, beta)
    want_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    return FusedLinearDivergence.apply(
        student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), token_weights,
        divergence, beta, float(temperature), int(chunk_size), backend, want_grad,
    )


__all__ = ["FusedLinearDivergence", "fused_linear_token_divergence_impl"]
