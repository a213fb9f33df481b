"""Benchmark of the per-token divergence kernels (forward + backward), GPU-oriented.

    python benchmarks/kl_kernel.py                       # CUDA, bf16, (4096, 32000) and (16384, 151936)
    python benchmarks/kl_kernel.py --divergence jsd --beta 0.5
    python benchmarks/kl_kernel.py --device cpu --quick  # tiny smoke run (Triton interpreter)

Steps: (1) correctness of the Triton and fused-linear paths vs a float64 computation on the
device; (2) the bandwidth floor (bytes that must move for the logits-level op: read both logits
once + write the student-logits grad once, divided by the measured device-to-device copy
bandwidth) and, for the fused-linear rows, a GEMM floor (8 N V H flops at the measured bf16 matmul
rate); (3) a table of fwd+bwd time and peak extra memory per method:
  logits level : torch eager reference | torch.compile(reference) | Liger LigerJSD | ours (Triton)
  hidden level : eager lm_head + reference | lm_head + ours (Triton) | Liger LigerFusedLinearJSD |
                 ours fused-linear (recompute backward) | ours fused-linear (token_weights hint)
"Peak extra" is torch.cuda.max_memory_allocated() during one fwd+bwd minus the memory allocated
before it (inputs already allocated; includes the gradients produced).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (smoke test)")
    p.add_argument("--shapes", default="4096x32000,16384x151936", help="comma list of TxV")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size H for the fused-linear rows")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--beta", type=float, default=0.5, help="jsd beta (Liger rows use the equivalent beta)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--no-fused", action="store_true", help="skip the hidden-level (lm_head) rows")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from kernels import fused_linear_token_divergence, reference, token_divergence  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, reps, warmup):
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra(fn, dev):
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(dev, nbytes):
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), dev, reps=5 if dev.type == "cpu" else 20, warmup=2)
    return 2 * x.numel() * 4 / t  # read + write


def matmul_flops(dev, dtype, n):
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = timeit(lambda: a @ b, dev, reps=5 if dev.type == "cpu" else 20, warmup=2)
    return 2 * n ** 3 / t


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm()) / max(float(ref.norm()), 1e-12)


def oracle64(zs, zt, divergence, beta, tau):
    """float64 evaluation of the reference definition (tests/test_kernels.py checks it independently)."""
    return reference.reference_divergence(zs.double(), zt.double().detach(), divergence, beta, tau)


# ------------------------------------------------------------------------------------------------
# (1) correctness on the device
# ------------------------------------------------------------------------------------------------


def correctness(dev, args):
    print("== correctness vs float64 on", dev, "==")
    n, v, h = (8, 1000, 16) if args.quick else (37, 32003, 64)
    ok = True
    for divergence, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5)]:
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
            zs = (torch.randn(n, v, device=dev) * 2).to(dtype).requires_grad_(True)
            zt = (torch.randn(n, v, device=dev) * 2).to(dtype)
            go = torch.randn(n, device=dev)
            out = token_divergence(zs, zt, divergence=divergence, beta=beta, temperature=1.3, backend="triton")
            (g,) = torch.autograd.grad(out, zs, go)
            z64 = zs.detach().double().requires_grad_(True)
            ref = oracle64(z64, zt, divergence, beta, 1.3)
            (gref,) = torch.autograd.grad(ref, z64, go.double())
            ev, eg = rel(out, ref), rel(g, gref)
            good = ev <= tol and eg <= tol
            ok &= good
            print(f"  triton {divergence:10s} beta={beta:<4} {str(dtype)[6:]:9s} value {ev:.1e} grad {eg:.1e} "
                  f"{'PASS' if good else 'FAIL'}")
        # fused linear, fp32
        hs = torch.randn(n, h, device=dev, requires_grad=True)
        ws = (torch.randn(v, h, device=dev) / math.sqrt(h) * 2).requires_grad_(True)
        ht, wt = torch.randn(n, h, device=dev), torch.randn(v, h, device=dev) / math.sqrt(h) * 2
        out = fused_linear_token_divergence(hs, ws, ht, wt, divergence=divergence, beta=beta, temperature=1.3,
                                            chunk_size=16)
        gh, gw = torch.autograd.grad(out, (hs, ws), go)
        h64, w64 = hs.detach().double().requires_grad_(True), ws.detach().double().requires_grad_(True)
        ref = oracle64(h64 @ w64.t(), ht.double() @ wt.double().t(), divergence, beta, 1.3)
        gh_r, gw_r = torch.autograd.grad(ref, (h64, w64), go.double())
        errs = rel(out, ref), rel(gh, gh_r), rel(gw, gw_r)
        # fp32 GEMMs on GPUs may use TF32; allow for it
        tol = 1e-5 if dev.type == "cpu" or not torch.backends.cuda.matmul.allow_tf32 else 1e-2
        good = max(errs) <= tol
        ok &= good
        print(f"  fused  {divergence:10s} beta={beta:<4} float32   value {errs[0]:.1e} grad_h {errs[1]:.1e} "
              f"grad_w {errs[2]:.1e} {'PASS' if good else 'FAIL'}")
    print("correctness:", "PASS" if ok else "FAIL")
    return ok


# ------------------------------------------------------------------------------------------------
# (2)+(3) timing / memory
# ------------------------------------------------------------------------------------------------


def liger_modules():
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD
        return LigerJSD, LigerFusedLinearJSD
    except Exception:  # noqa: BLE001
        return None


def liger_beta(args):
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": args.beta}[args.divergence]


def run_method(name, fn, dev, args, rows, floor=None):
    try:
        t = timeit(fn, dev, args.reps, args.warmup)
        mem = peak_extra(fn, dev)
        rows.append((name, t, mem, floor))
    except torch.OutOfMemoryError:
        rows.append((name, None, "OOM", floor))
    except Exception as exc:  # noqa: BLE001
        rows.append((name, None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}", floor))
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def bench_shape(T, V, dev, dtype, args, bw, flops):
    print(f"\n== T={T} V={V} {str(dtype)[6:]} divergence={args.divergence}"
          f"{' beta=%g' % args.beta if args.divergence == 'jsd' else ''} tau={args.temperature} ==")
    div, beta, tau = args.divergence, args.beta, args.temperature
    esize = torch.finfo(dtype).bits // 8
    floor_bytes = 3 * T * V * esize
    floor_t = floor_bytes / bw
    print(f"bandwidth floor: {floor_bytes / 2**30:.2f} GiB (read 2 logits + write 1 grad) / "
          f"{bw / 1e9:.0f} GB/s copy bw = {floor_t * 1e3:.3f} ms")
    rows = []
    zs = torch.randn(T, V, device=dev, dtype=dtype).requires_grad_(True)
    zt = torch.randn(T, V, device=dev, dtype=dtype)
    w = torch.rand(T, device=dev)

    def step(f):
        def run():
            zs.grad = None
            (f(zs, zt) * w).sum().backward()
        return run

    run_method("torch eager reference", step(
        lambda a, b: token_divergence(a, b, divergence=div, beta=beta, temperature=tau)), dev, args, rows, floor_t)
    if args.no_compile or dev.type == "cpu":
        rows.append(("torch.compile(reference)", None, "skipped" + (" on cpu" if dev.type == "cpu" else ""), None))
    else:
        comp = torch.compile(lambda a, b: reference.reference_divergence(a, b, div, beta, tau))
        run_method("torch.compile(reference)", step(comp), dev, args, rows, floor_t)
    liger = liger_modules()
    if liger is None:
        print("liger-kernel not installed")
        rows.append(("Liger LigerJSD", None, "liger-kernel not installed", None))
    elif dev.type == "cpu":
        rows.append(("Liger LigerJSD", None, "skipped on cpu", None))
    else:
        jsd_mod = liger[0](beta=liger_beta(args))

        def liger_run():
            zs.grad = None
            # LigerJSD takes log-probs and returns the token mean (no per-token weights)
            lq = torch.log_softmax(zs.float() / tau, -1)
            lp = torch.log_softmax(zt.float() / tau, -1)
            jsd_mod(lq, lp).backward()
        run_method("Liger LigerJSD (+log_softmax)", liger_run, dev, args, rows, floor_t)
    run_method("ours triton (logits level)", step(
        lambda a, b: token_divergence(a, b, divergence=div, beta=beta, temperature=tau, backend="triton")),
        dev, args, rows, floor_t)
    del zs, zt

    if not args.no_fused:
        H = args.hidden
        gemm_floor = 8 * T * V * H / flops
        print(f"GEMM floor (fused rows): 8*T*V*H = {8 * T * V * H / 1e12:.2f} TFLOP / {flops / 1e12:.0f} "
              f"TFLOP/s = {gemm_floor * 1e3:.3f} ms")
        hs = torch.randn(T, H, device=dev, dtype=dtype).requires_grad_(True)
        ws = (torch.randn(V, H, device=dev, dtype=dtype) / math.sqrt(H)).requires_grad_(True)
        ht = torch.randn(T, H, device=dev, dtype=dtype)
        wt = torch.randn(V, H, device=dev, dtype=dtype) / math.sqrt(H)

        def hstep(f):
            def run():
                hs.grad = ws.grad = None
                (f() * w).sum().backward()
            return run

        run_method("eager lm_head + reference", hstep(lambda: token_divergence(
            hs @ ws.t(), ht @ wt.t(), divergence=div, beta=beta, temperature=tau)), dev, args, rows, gemm_floor)
        run_method("lm_head + ours triton", hstep(lambda: token_divergence(
            hs @ ws.t(), ht @ wt.t(), divergence=div, beta=beta, temperature=tau, backend="triton")),
            dev, args, rows, gemm_floor)
        if liger is None:
            rows.append(("Liger LigerFusedLinearJSD", None, "liger-kernel not installed", None))
        elif dev.type == "cpu":
            rows.append(("Liger LigerFusedLinearJSD", None, "skipped on cpu", None))
        else:
            fl = liger[1](jsd_beta=liger_beta(args), temperature=tau)

            def liger_fused():
                hs.grad = ws.grad = None
                fl(hs, ws, ht, wt, None).backward()  # no labels to ignore (shift_labels=None): token mean
            run_method("Liger LigerFusedLinearJSD", liger_fused, dev, args, rows, gemm_floor)
        for hint in (False, True):
            run_method(f"ours fused-linear ({'token_weights' if hint else 'recompute bwd'})", hstep(
                lambda hint=hint: fused_linear_token_divergence(
                    hs, ws, ht, wt, divergence=div, beta=beta, temperature=tau, chunk_size=args.chunk_size,
                    token_weights=w if hint else None)), dev, args, rows, gemm_floor)
        del hs, ws, ht, wt

    print(f"{'method':40s} {'fwd+bwd ms':>11s} {'x floor':>8s} {'peak extra GiB':>15s}")
    for name, t, mem, floor in rows:
        ts = f"{t * 1e3:11.3f}" if t is not None else f"{'-':>11s}"
        xf = f"{t / floor:8.2f}" if (t is not None and floor) else f"{'-':>8s}"
        if isinstance(mem, (int, float)):
            ms = f"{mem / 2**30:15.2f}"
        else:
            ms = f"{'n/a' if mem is None else mem:>15s}"
        print(f"{name:40s} {ts} {xf} {ms}")
    return rows


def main(args):
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --quick for a smoke run")
        return 2
    dtype = DTYPES[args.dtype]
    if args.quick:
        shapes, args.hidden, args.reps, args.warmup = [(16, 1000)], 32, 2, 1
        args.chunk_size = min(args.chunk_size, 8)
    else:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; kernels from {os.path.dirname(kernels.__file__)}")
    ok = correctness(dev, args)
    bw = copy_bandwidth(dev, 2**24 if args.quick else 2**30)
    flops = matmul_flops(dev, dtype, 256 if args.quick else 8192)
    print(f"measured copy bandwidth {bw / 1e9:.1f} GB/s; {str(dtype)[6:]} matmul {flops / 1e12:.1f} TFLOP/s")
    for T, V in shapes:
        bench_shape(T, V, dev, dtype, args, bw, flops)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
