import os

# SDFT_TEST_DEVICE=cuda runs every test here on a GPU with compiled Triton; on CPU, Triton's interpreter (set
# before any triton import).
DEVICE = os.environ.get("SDFT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels  # noqa: E402
from kernels import fused_linear_token_divergence, reference, token_divergence  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN noise in the interpreter


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor a test creates without naming a device lands on DEVICE."""
    with torch.device(DEVICE):
        yield

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
MODES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)]
BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------------------------------------
# independent float64 oracle: probability space, autograd for the gradient
# ---------------------------------------------------------------------------------------------


def _oracle(zs, zt, divergence, beta=0.5, tau=1.0):
    a = zs.double() / tau
    b = zt.detach().double() / tau

    def logp(x):
        m = x.max(-1, keepdim=True).values.detach()
        e = torch.exp(x - m)
        return x - m - torch.log(e.sum(-1, keepdim=True))

    ls, lt = logp(a), logp(b)
    ps, pt = ls.exp(), lt.exp()

    def kl(lp, p, lq):  # sum p (lp - lq), 0 * anything = 0
        live = p > 0
        return torch.where(live, p * (torch.where(live, lp, 0.0) - torch.where(live, lq, 0.0)), 0.0).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl(lt, pt, ls)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl(ls, ps, lt)
    m = (1 - beta) * ps + beta * pt
    lm = torch.log(torch.where(m > 0, m, 1.0))
    return beta * kl(lt, pt, lm) + (1 - beta) * kl(ls, ps, lm)


def _rel(x, ref, floor=1e-6):
    """Norm-wise relative error; ``floor`` bounds the denominator away from 0."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm()) / max(float(ref.norm()), floor)


def _check(zs, zt, divergence, beta=0.5, tau=1.0, backend="torch", go=None, tol=None, grad_floor=0.0):
    """Compare values and grads (with an arbitrary grad_output) against the float64 oracle."""
    tol = tol if tol is not None else TOL[zs.dtype]
    zs = zs.detach().requires_grad_(True)
    out = token_divergence(zs, zt, divergence=divergence, beta=beta, temperature=tau, backend=backend)
    assert out.dtype == torch.float32 and out.shape == zs.shape[:-1]
    if go is None:
        go = torch.randn(out.shape)
    (g,) = torch.autograd.grad(out, zs, go)
    assert g.dtype == zs.dtype
    z64 = zs.detach().double().requires_grad_(True)
    ref = _oracle(z64, zt, divergence, beta, tau)
    (gref,) = torch.autograd.grad(ref, z64, go.double())
    assert _rel(out, ref) <= tol, (divergence, backend, _rel(out, ref))
    gerr = _rel(g, gref, max(grad_floor, 1e-6))
    assert gerr <= tol, (divergence, backend, gerr)
    return out, g


def _pair(n, v, dtype=torch.float32, scale=1.0):
    return (torch.randn(n, v) * scale).to(dtype), (torch.randn(n, v) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# reference: finite-difference gradcheck
# ---------------------------------------------------------------------------------------------


def _log_probs64(s, t, temperature):
    return (torch.log_softmax(s.double() / temperature, -1),
            torch.log_softmax(t.detach().double() / temperature, -1))


@pytest.mark.parametrize("divergence,beta", MODES + [("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0), ("topk", 0.5)])
def test_reference_gradcheck(divergence, beta, monkeypatch):
    """The reference formulas, run in float64, pass finite-difference gradcheck and match the oracle."""
    monkeypatch.setattr(reference, "_log_probs", _log_probs64)
    zs = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 7, dtype=torch.float64)

    def f(x):
        return reference.reference_divergence(x, zt, divergence, beta, 1.7, topk=3)

    assert torch.autograd.gradcheck(f, (zs,))
    ref = _topk_oracle(zs, zt, 3, 1.7) if divergence == "topk" else _oracle(zs, zt, divergence, beta, 1.7)
    assert torch.allclose(f(zs), ref, rtol=1e-10, atol=1e-12)


def _topk_oracle(zs, zt, k, tau):
    ps = torch.softmax(zs.double() / tau, -1)
    pt = torch.softmax(zt.double() / tau, -1)
    idx = pt.topk(k, -1).indices
    ps_k, pt_k = ps.gather(-1, idx), pt.gather(-1, idx)
    ps_b = torch.cat([ps_k, 1 - ps_k.sum(-1, keepdim=True)], -1)
    pt_b = torch.cat([pt_k, 1 - pt_k.sum(-1, keepdim=True)], -1)
    return (pt_b * (pt_b.log() - ps_b.log())).sum(-1)


# ---------------------------------------------------------------------------------------------
# values & gradients vs float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", MODES)
@pytest.mark.parametrize("shape", [(5, 300), (1, 1), (1, 33), (3, 2100)])
def test_values_and_grads(backend, dtype, divergence, beta, shape):
    zs, zt = _pair(*shape, dtype=dtype, scale=1.5)
    _check(zs, zt, divergence, beta, backend=backend)


@pytest.mark.parametrize("divergence,beta", MODES)
@pytest.mark.parametrize("block_v", [16, 64])
def test_triton_multi_block(divergence, beta, block_v):
    """Several vocab blocks with a masked tail (V not a multiple of the block)."""
    from kernels.divergence_triton import triton_token_divergence

    zs, zt = _pair(4, 203, scale=3.0)
    zs.requires_grad_(True)
    go = torch.randn(4)
    out = triton_token_divergence(zs, zt, divergence, beta, 0.7, block_v=block_v)
    (g,) = torch.autograd.grad(out, zs, go)
    z64 = zs.detach().double().requires_grad_(True)
    ref = _oracle(z64, zt, divergence, beta, 0.7)
    (gref,) = torch.autograd.grad(ref, z64, go.double())
    assert _rel(out, ref) <= 1e-5 and _rel(g, gref) <= 1e-5


@pytest.mark.parametrize("divergence,beta", MODES + [("jsd", 0.1), ("jsd", 0.9)])
def test_triton_peaked_well_conditioned(divergence, beta):
    """Peaked distributions (effective logit scale ~6).  The Triton gradients stay within 1e-5 of
    float64; the plain autograd-through-log_softmax reference only reaches ~5e-5 on JSD here
    (cancellation of the constant -log(1-beta) in log pS - log M), so it is not held to this."""
    zs, zt = _pair(6, 150, scale=3.0)
    _check(zs, zt, divergence, beta, tau=0.5, backend="triton")


def test_fp16_triton():
    zs, zt = _pair(3, 129, dtype=torch.float16)
    _check(zs, zt, "jsd", 0.3, backend="triton")


def test_canonical_maps_only_the_jsd_end_points():
    assert reference.canonical("jsd", 0.0) == "forward_kl"
    assert reference.canonical("jsd", 1) == "reverse_kl"
    assert reference.canonical("jsd", 0.5) == "jsd"
    assert reference.canonical("forward_kl", 1.0) == "forward_kl"
    assert reference.canonical("topk", 0.0) == "topk"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_beta_sweep(backend, beta):
    zs, zt = _pair(4, 150, scale=2.0)
    out, g = _check(zs, zt, "jsd", beta, tau=1.5, backend=backend)
    if beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
        zs2 = zs.clone().requires_grad_(True)
        kl = token_divergence(zs2, zt, divergence=name, temperature=1.5, backend=backend)
        j = token_divergence(zs2, zt, divergence="jsd", beta=beta, temperature=1.5, backend=backend)
        assert torch.equal(kl, j)
        go = torch.randn(4)
        assert torch.equal(torch.autograd.grad(kl, zs2, go)[0], torch.autograd.grad(j, zs2, go)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize("divergence,beta", MODES + [("jsd", 0.8)])
def test_temperature(backend, tau, divergence, beta):
    zs, zt = _pair(3, 97, scale=1.0)
    _check(zs, zt, divergence, beta, tau=tau, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", MODES)
def test_large_magnitude(backend, divergence, beta):
    """Logits of magnitude 1e4 (near one-hot distributions)."""
    zs, zt = _pair(4, 77, scale=1e4)
    # near one-hot: the reverse-KL gradient is ~0 in exact arithmetic but is a difference of
    # O(1e4) fp32 quantities, so its error is measured relative to that scale.
    _check(zs, zt, divergence, beta, backend=backend, grad_floor=1e4 * 4)
    # a peaked case where the gradients are O(1), plus a huge common offset (log-softmax shift)
    zs, zt = _pair(4, 77, scale=1.5)
    _check(zs + 1e4, zt - 5e3, divergence, beta, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta,where", [
    ("forward_kl", 0.5, "both"), ("forward_kl", 0.5, "teacher"),
    ("reverse_kl", 0.5, "both"), ("reverse_kl", 0.5, "student"),
    ("jsd", 0.5, "both"), ("jsd", 0.3, "teacher"), ("jsd", 0.7, "student"), ("jsd", 0.5, "disjoint"),
])
def test_neg_inf_entries(backend, divergence, beta, where):
    zs, zt = _pair(4, 90, scale=2.0)
    cols = torch.rand(4, 90) < 0.3
    cols[:, 0] = False  # keep a finite entry in every row
    if where in ("both", "student"):
        zs = zs.masked_fill(cols, float("-inf"))
    if where in ("both", "teacher"):
        zt = zt.masked_fill(cols, float("-inf"))
    if where == "disjoint":
        zs = zs.masked_fill(cols, float("-inf"))
        other = (torch.rand(4, 90) < 0.3) & ~cols
        other[:, 0] = False
        zt = zt.masked_fill(other, float("-inf"))
    out, g = _check(zs, zt, divergence, beta, tau=1.3, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    if where in ("both", "student"):
        assert (g[cols] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", MODES)
def test_masked_rows_exact_zero(backend, divergence, beta):
    zs, zt = _pair(6, 70)
    go = torch.randn(6)
    go[[1, 4]] = 0.0
    _, g = _check(zs, zt, divergence, beta, backend=backend, go=go)
    assert (g[[1, 4]] == 0).all()
    assert (g[[0, 2, 3, 5]] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", MODES)
def test_non_contiguous(backend, divergence, beta):
    big_s = torch.randn(5, 2 * 71)
    big_t = torch.randn(71, 9)
    zs = big_s[:, ::2]  # strided last dim
    zt = big_t.t()[2:7]  # transposed
    assert not zs.is_contiguous() and not zt.is_contiguous()
    _check(zs, zt, divergence, beta, backend=backend)
    rows = torch.randn(10, 64)[::2]  # row stride 128, unit last stride (kernel uses the stride)
    _check(rows, torch.randn(5, 64), divergence, beta, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_empty(backend):
    zs, zt = _pair(6, 40)
    out = token_divergence(zs.view(2, 3, 40), zt.view(2, 3, 40), backend=backend)
    assert out.shape == (2, 3)
    assert torch.allclose(out.reshape(-1), token_divergence(zs, zt, backend=backend))
    e = token_divergence(torch.randn(0, 40, requires_grad=True), torch.randn(0, 40), backend=backend)
    assert e.shape == (0,)


# ---------------------------------------------------------------------------------------------
# errors / approximations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_mismatch(backend):
    with pytest.raises(ValueError, match=r"(?s)student.*V=50.*teacher.*V=51"):
        token_divergence(torch.randn(2, 50), torch.randn(2, 51), backend=backend)
    with pytest.raises(ValueError, match=r"V=50.*V=51"):
        fused_linear_token_divergence(torch.randn(2, 8), torch.randn(50, 8), torch.randn(2, 8), torch.randn(51, 8))


def test_bad_arguments():
    zs, zt = _pair(2, 10)
    with pytest.raises(ValueError):
        token_divergence(zs, zt, divergence="nope")
    with pytest.raises(ValueError):
        token_divergence(zs, zt, divergence="topk", backend="triton")
    with pytest.raises(ValueError):
        token_divergence(zs, zt, divergence="sampled")
    with pytest.raises(ValueError):
        token_divergence(zs, zt, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError):
        token_divergence(zs, zt, temperature=0.0)
    with pytest.raises(ValueError):
        token_divergence(zs, zt, backend="cuda")


def test_topk():
    zs, zt = _pair(5, 40, scale=2.0)
    # k >= V: exactly forward KL (values and grads)
    for k in (40, 100):
        a = zs.clone().requires_grad_(True)
        b = zs.clone().requires_grad_(True)
        t = token_divergence(a, zt, divergence="topk", topk=k, temperature=1.3)
        f = token_divergence(b, zt, divergence="forward_kl", temperature=1.3)
        assert torch.equal(t, f)
        go = torch.randn(5)
        assert torch.equal(torch.autograd.grad(t, a, go)[0], torch.autograd.grad(f, b, go)[0])
    # k < V: k+1 bucket forward KL vs float64
    a = zs.clone().requires_grad_(True)
    t = token_divergence(a, zt, divergence="topk", topk=7, temperature=1.3)
    z64 = zs.double().requires_grad_(True)
    ref = _topk_oracle(z64, zt, 7, 1.3)
    assert _rel(t, ref) <= 1e-5
    go = torch.randn(5)
    assert _rel(torch.autograd.grad(t, a, go)[0], torch.autograd.grad(ref, z64, go.double())[0]) <= 1e-5
    # the bucketed KL never exceeds the full KL (data processing inequality)
    assert (t <= token_divergence(zs, zt, temperature=1.3) + 1e-6).all()


def test_sampled_policy_gradient():
    tau = 1.4
    zs, zt = _pair(6, 30, scale=2.0)
    y = torch.randint(0, 30, (6,))
    a = zs.clone().requires_grad_(True)
    out = token_divergence(a, zt, divergence="sampled", sampled_ids=y, temperature=tau)
    ls = torch.log_softmax(zs.double() / tau, -1)
    lt = torch.log_softmax(zt.double() / tau, -1)
    ratio = ls[torch.arange(6), y] - lt[torch.arange(6), y]
    assert _rel(out, ratio) <= 1e-5  # value = log pS(y) - log pT(y)
    go = torch.randn(6)
    (g,) = torch.autograd.grad(out, a, go)
    # policy-gradient form: go * ratio * d log pS(y) / dz = go * ratio * (onehot(y) - pS) / tau
    onehot = torch.nn.functional.one_hot(y, 30).double()
    expect = (go.double() * ratio)[:, None] * (onehot - ls.exp()) / tau
    assert _rel(g, expect) <= 1e-5
    # ... which is NOT the gradient of the value itself
    (g_naive,) = torch.autograd.grad(
        (torch.log_softmax(a / tau, -1) - torch.log_softmax(zt / tau, -1))[torch.arange(6), y], a, go)
    assert _rel(g, g_naive) > 1e-2


# ---------------------------------------------------------------------------------------------
# fused linear
# ---------------------------------------------------------------------------------------------


def _fused_case(dtype, n=37, h=16, ht=12, v=150):
    hs = torch.randn(n, h).to(dtype)
    ws = (torch.randn(v, h) / math.sqrt(h) * 3).to(dtype)
    hteach = torch.randn(n, ht).to(dtype)
    wt = (torch.randn(v, ht) / math.sqrt(ht) * 3).to(dtype)
    return hs, ws, hteach, wt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", MODES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("hint", ["none", "equal", "scaled", "other"])
def test_fused_linear_matches_logits_level(dtype, divergence, beta, hint):
    hs, ws, hteach, wt = _fused_case(dtype)
    n = hs.shape[0]
    go = torch.rand(n) * (torch.rand(n) > 0.2)
    tw = {"none": None, "equal": go, "scaled": go * 7.0, "other": torch.rand(n)}[hint]
    # logits level, float64 (values and grads of hidden and weight)
    h64, w64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = _oracle(h64 @ w64.t(), hteach.double() @ wt.double().t(), divergence, beta, 1.3)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h64, w64), go.double())
    # logits level through the public API (same dtype)
    a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    lv = token_divergence(a @ b.t(), hteach @ wt.t(), divergence=divergence, beta=beta, temperature=1.3)
    gh_l, gw_l = torch.autograd.grad(lv, (a, b), go)
    # fused
    a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    fv = fused_linear_token_divergence(a, b, hteach, wt, divergence=divergence, beta=beta, temperature=1.3,
                                       chunk_size=8, token_weights=tw)
    gh_f, gw_f = torch.autograd.grad(fv, (a, b), go)
    assert fv.dtype == torch.float32 and gh_f.dtype == dtype and gw_f.dtype == dtype
    tol = TOL[dtype]
    if dtype == torch.float32:
        assert _rel(fv, ref) <= tol and _rel(gh_f, gh_ref) <= tol and _rel(gw_f, gw_ref) <= tol
        assert _rel(fv, lv) <= tol and _rel(gh_f, gh_l) <= tol and _rel(gw_f, gw_l) <= tol
    else:  # bf16 logits themselves differ from float64 ones; compare to the same-dtype logits path
        assert _rel(fv, lv) <= tol and _rel(gh_f, gh_l) <= 2 * tol and _rel(gw_f, gw_l) <= 2 * tol
    assert (gh_f[go == 0] == 0).all()


def test_fused_linear_triton_chunks_and_no_grad():
    hs, ws, hteach, wt = _fused_case(torch.float32, n=9, v=70)
    go = torch.randn(9)
    outs = []
    for backend in ("torch", "triton"):
        for tw in (None, go):
            a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
            v = fused_linear_token_divergence(a, b, hteach, wt, divergence="jsd", beta=0.4, chunk_size=4,
                                              token_weights=tw, backend=backend)
            outs.append((v, *torch.autograd.grad(v, (a, b), go)))
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert _rel(x, y) <= 1e-5
    with torch.no_grad():
        v = fused_linear_token_divergence(hs, ws, hteach, wt, divergence="jsd", beta=0.4, token_weights=go)
    assert _rel(v, outs[0][0]) <= 1e-5 and not v.requires_grad


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("hint", [False, True])
def test_fused_linear_never_materialises_logits(hint):
    T, V, H, chunk = 4096, 2048, 8, 256
    hs = torch.randn(T, H, requires_grad=True)
    ws = torch.randn(V, H, requires_grad=True)
    hteach, wt = torch.randn(T, H), torch.randn(V, H)
    go = torch.rand(T)
    with _MaxNumel() as m:
        v = fused_linear_token_divergence(hs, ws, hteach, wt, chunk_size=chunk, token_weights=go if hint else None)
        (v * go).sum().backward()
    assert hs.grad is not None and ws.grad is not None
    assert m.max_numel < T * V and m.max_numel <= chunk * V, m.max_numel
    with _MaxNumel() as m2:  # sanity: the logits-level path does allocate [T, V]
        torch.randn(T, H) @ ws.detach().t()
    assert m2.max_numel >= T * V


def test_import_is_lazy():
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'; " \
           "assert not hasattr(kernels, 'get_kernel') and not hasattr(kernels, '__version__')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
    assert set(kernels.__all__) >= {"token_divergence", "fused_linear_token_divergence"}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "topk", "sampled"])
def test_reference_propagates_nan(divergence):
    """A diverged model must not read as KL 0: a NaN (or +inf) logit makes its row NaN, other rows are untouched."""
    zs, zt = torch.randn(3, 11), torch.randn(3, 11)
    ids = torch.tensor([1, 2, 3])
    clean = kernels.token_divergence(zs, zt, divergence=divergence, sampled_ids=ids, topk=4)
    zs[1, 5], zt[2, 0] = float("nan"), float("inf")
    got = kernels.token_divergence(zs, zt, divergence=divergence, sampled_ids=ids, topk=4)
    assert torch.isnan(got[1]) and torch.isnan(got[2]) and torch.equal(got[0], clean[0])


# ---------------------------------------------------------------------------------------------
# sparse teacher: top-k ids + log-probs (+ tail bucket)
# ---------------------------------------------------------------------------------------------


# the value is a sum of O(1) terms P (log P - log Q) that can nearly cancel (e.g. K = 1): fp32 gets it to ~1e-7
# absolute, so value errors are measured against max(|value|, 0.1)
SPARSE_FLOOR = 0.1


def _q_scale(zs, go):
    """Size of the terms the gradient is a difference of (go * q): autograd's tail gradient (S + P_tail) q_v -
    P_tail q_v / Q_tail cancels when Q_tail ~ P_tail (1 - S rounds in fp32), so the torch reference is held to
    fp32 relative to this scale; the Triton kernel's form r_v (S - Q_ids) is held to the gradient itself."""
    return float((go.double()[:, None] * torch.softmax(zs.double(), -1)).norm())


def _sparse_case(n, v, k, dtype=torch.float32, scale=2.0, id_dtype=torch.long):
    """Student logits [n, v]; the teacher's k ids per row (a random subset, random order) and their log-probs
    under a full-vocabulary teacher softmax (also returned, [n, v])."""
    zs = (torch.randn(n, v) * scale).to(dtype)
    zt = torch.randn(n, v) * scale
    ids = torch.stack([torch.randperm(v)[:k] for _ in range(n)]).to(id_dtype)
    lp = torch.log_softmax(zt, -1).gather(-1, ids.long())
    return zs, ids, lp, zt


def _sparse_oracle64(zs, ids, lp, tail):
    """float64, straight from the definition (probability space; the student's tail mass summed directly)."""
    q = torch.softmax(zs.double(), -1)
    ids = ids.long()
    p = lp.double().exp()
    lq = q.gather(-1, ids).log()
    val = torch.where(p > 0, p * (torch.where(p > 0, lp.double(), 0.0) - lq), 0.0).sum(-1)
    if tail and ids.shape[-1] < zs.shape[-1]:
        outside = torch.ones_like(q, dtype=torch.bool).scatter_(-1, ids, False)
        q_tail = (q * outside).sum(-1)
        p_tail = (1 - p.sum(-1)).clamp_min(0)
        val = val + torch.where(p_tail > 0, p_tail * (torch.where(p_tail > 0, p_tail, 1.0).log() - q_tail.log()), 0.0)
    return val


def _sparse_grad64(zs, ids, lp, tail):
    """The closed-form d value / d z (float64): tail: q_v - P_v on the ids, q_v (1 - P_tail / Q_tail) elsewhere
    (times S + P_tail, which is 1 unless the log-probs sum above 1); no tail: S q_v - P_v [v in ids]."""
    q = torch.softmax(zs.double(), -1)
    ids = ids.long()
    p = lp.double().exp()
    s = p.sum(-1, keepdim=True)
    p_full = torch.zeros_like(q).scatter_(-1, ids, p)
    if not (tail and ids.shape[-1] < zs.shape[-1]):
        return s * q - p_full
    outside = torch.ones_like(q, dtype=torch.bool).scatter_(-1, ids, False)
    p_tail = (1 - s).clamp_min(0)
    ratio = torch.where(p_tail > 0, p_tail / (q * outside).sum(-1, keepdim=True), 0.0)
    return (s + p_tail) * q - p_full - torch.where(outside, ratio * q, 0.0)


def _sparse_run(zs, ids, lp, tail, backend, go, **kw):
    """Value and grad (with grad_output go) through the public API, or the Triton launcher when kw picks blocks."""
    zs = zs.detach().clone().requires_grad_(True)
    if kw:
        from kernels.sparse_triton import triton_sparse_topk_divergence

        out = triton_sparse_topk_divergence(zs, ids, lp, tail, **kw)
    else:
        out = kernels.sparse_topk_divergence(zs, ids, lp, tail=tail, backend=backend)
    assert out.dtype == torch.float32 and out.shape == zs.shape[:-1]
    (g,) = torch.autograd.grad(out, zs, go)
    assert g.dtype == zs.dtype
    return out, g


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [1, 5, 29, 30])
def test_sparse_reference_matches_float64(tail, k):
    """The torch reference = the float64 definition; its autograd gradient = the closed form."""
    zs, ids, lp, zt = _sparse_case(4, 30, k)
    go = torch.randn(4)
    out, g = _sparse_run(zs, ids, lp, tail, "torch", go)
    assert _rel(out, _sparse_oracle64(zs, ids, lp, tail), SPARSE_FLOOR) <= 1e-5
    assert _rel(g, go.double()[:, None] * _sparse_grad64(zs, ids, lp, tail), _q_scale(zs, go)) <= 1e-5
    if tail:  # K + 1 buckets coarsen the teacher's full distribution: never above the full KL
        assert (out <= reference.forward_kl(zs, zt) + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_full_vocab_is_forward_kl(backend):
    """K == V (ids = the whole vocabulary, permuted): the tail is empty and this is forward_kl."""
    zs, ids, lp, zt = _sparse_case(4, 64, 64, scale=2.0)
    go = torch.randn(4)
    out, g = _sparse_run(zs, ids, lp, True, backend, go)
    a = zs.clone().requires_grad_(True)
    ref = reference.forward_kl(a, zt)
    (gref,) = torch.autograd.grad(ref, a, go)
    assert _rel(out, ref) <= 1e-5 and _rel(g, gref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("k", [1, 7, 64, 150])
def test_sparse_triton_matches_reference(dtype, tail, k):
    """Several vocab blocks (BLOCK_V=32, V=150 not a multiple), K in chunks (BLOCK_K=16), -inf teacher log-probs,
    -inf student logits, zero grad_output rows, int32 ids."""
    n, v = 4, 150
    zs, ids, lp, _ = _sparse_case(n, v, k, dtype, id_dtype=torch.int32 if k == 7 else torch.long)
    if k > 1:
        lp[1, 1::2] = float("-inf")  # teacher categories of zero probability
        zs[1, ids[1, 1::2].long()] = float("-inf")  # ... where the student has none either (else KL = inf)
    if k < v:
        outside = torch.ones(n, v, dtype=torch.bool).scatter_(-1, ids.long(), False)
        zs[2] = zs[2].masked_fill(outside[2] & (torch.rand(v) < 0.3), float("-inf"))
    go = torch.randn(n)
    go[3] = 0.0
    out, g = _sparse_run(zs, ids, lp, tail, "triton", go, block_v=32, block_k=16)
    ref, gref = _sparse_run(zs, ids, lp, tail, "torch", go)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert _rel(out, ref, SPARSE_FLOOR) <= 1e-5
    assert _rel(g, gref, _q_scale(zs, go)) <= TOL[dtype]
    assert (g[3] == 0).all() and (g[:3] != 0).any()
    assert (g[zs == float("-inf")] == 0).all()
    if dtype == torch.float32:
        assert _rel(out, _sparse_oracle64(zs, ids, lp, tail), SPARSE_FLOOR) <= 1e-5
        assert _rel(g, go.double()[:, None] * _sparse_grad64(zs, ids, lp, tail)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_peaked_complement_is_exact(backend):
    """The student's top-k hold 1 - ~1e-9 of its mass while the teacher leaves 5% in the tail: log Q_tail must
    come from the complement itself (1 - sum Q_i is ~0 in fp32 and the tail term would be off by O(1))."""
    n, v, k = 3, 100, 5
    zs, ids, lp, _ = _sparse_case(n, v, k)
    outside = torch.ones(n, v, dtype=torch.bool).scatter_(-1, ids, False)
    zs = torch.where(outside, -23.7 + 0.3 * torch.randn(n, v), 0.5 * torch.randn(n, v))
    lp = torch.log_softmax(torch.randn(n, k), -1) + math.log(0.95)
    go = torch.randn(n)
    out, g = _sparse_run(zs, ids, lp, True, backend, go)
    q_tail = (torch.softmax(zs.double(), -1) * outside).sum(-1)
    assert ((q_tail > 1e-10) & (q_tail < 1e-8)).all()
    ref = _sparse_oracle64(zs, ids, lp, True)
    assert _rel(out, ref) <= 1e-5
    assert _rel(g, go.double()[:, None] * _sparse_grad64(zs, ids, lp, True)) <= 1e-5
    naive_q_tail = (1 - torch.softmax(zs, -1).gather(-1, ids).sum(-1)).clamp_min(1e-30)  # fp32, cancels
    naive = ref + 0.05 * (q_tail.log() - naive_q_tail.double().log())
    assert _rel(naive, ref) > 1e-2  # the check above does tell the two apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_nan_rows_and_empty(backend):
    """NaN / +inf student logits or a NaN teacher log-prob make that row NaN; other rows are untouched; a zero
    grad_output row gets an exact zero gradient (Triton) even when NaN."""
    zs, ids, lp, _ = _sparse_case(4, 40, 6)
    go = torch.tensor([1.0, 0.0, 0.0, 0.0])
    clean, gclean = _sparse_run(zs, ids, lp, True, backend, go)
    zs[1, 3], zs[2, ids[2, 0]], lp[3, 2] = float("nan"), float("inf"), float("nan")
    out, g = _sparse_run(zs, ids, lp, True, backend, go)
    assert torch.isnan(out[1:]).all() and torch.equal(out[0], clean[0]) and torch.equal(g[0], gclean[0])
    if backend == "triton":
        assert (g[1:] == 0).all()
    e = kernels.sparse_topk_divergence(torch.randn(0, 40, requires_grad=True), torch.zeros(0, 3, dtype=torch.long),
                                       torch.zeros(0, 3), backend=backend)
    assert e.shape == (0,)
    out3 = kernels.sparse_topk_divergence(zs[:1].view(1, 1, 40), ids[:1].view(1, 1, 6), lp[:1].view(1, 1, 6),
                                          backend=backend)
    assert out3.shape == (1, 1) and torch.equal(out3.reshape(1), clean[:1])


def test_sparse_bad_arguments():
    zs, ids, lp, _ = _sparse_case(2, 10, 3)
    f = kernels.sparse_topk_divergence
    with pytest.raises(ValueError, match="teacher_ids.*teacher_logprobs.*same shape"):
        f(zs, ids, lp[:, :2])
    with pytest.raises(ValueError, match="token counts"):
        f(zs[:1], ids, lp)
    with pytest.raises(ValueError, match="K >= 1"):
        f(zs, ids[:, :0], lp[:, :0])
    with pytest.raises(ValueError, match=r"K=11.*V=10"):
        f(zs, torch.arange(11).repeat(2, 1), torch.zeros(2, 11))
    with pytest.raises(ValueError, match="teacher_ids must be an integer"):
        f(zs, ids.float(), lp)
    with pytest.raises(ValueError, match="teacher_logprobs must be a floating"):
        f(zs, ids, ids)
    with pytest.raises(ValueError, match="backend"):
        f(zs, ids, lp, backend="cuda")
    bad = ids.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"\[0, V=10\)"):
        f(zs, bad, lp)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"\[0, V=10\)"):
        f(zs, bad, lp, backend="triton")
    bad[1, 2] = bad[1, 0]
    with pytest.raises(ValueError, match="distinct"):
        f(zs, bad, lp)
    assert "sparse_topk_divergence" in kernels.__all__ and "sparse_topk_forward_kl" in reference.__all__
