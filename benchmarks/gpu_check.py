"""GPU validation and benchmark of the fused Triton KAN kernels.

    python3 benchmarks/gpu_check.py [--device cuda] [--out DIR] [--budget-s 420] [--quick]
    python benchmarks/gpu_check.py --device cpu --quick      # CPU-safe dry run (interpreter, tiny sizes)

Part 1, checks (each prints PASS/FAIL):
  * triton float32 in TF32 and in IEEE, float16 and bfloat16 against the float64
    reference (``kanfast.reference``) on the same parameters, forward and the
    gradients of x, base_weight and coef, relative RMS error under a per-dtype
    tolerance; uniform and sample-adapted knots; inputs inside, on and outside the
    knots; NaN/inf rows (other rows bit-identical to a clean run);
  * two backward passes bit-identical (no atomics);
  * ``torch.compile(fullgraph=True)`` of a FastKANLayer with the triton backend.

Part 2, benchmark of one forward+backward (spline order k = 3), per dtype:
  * ``triton``: the fused kernels (``kan_linear_triton``);
  * ``materialized``: the (batch, in, G + k) basis built by vectorised Cox-de Boor
    and contracted by one GEMM (efficient-kan's formulation), eager and
    ``torch.compile``;
  * ``reference``: ``kanfast.reference.kan_linear_reference`` (small shapes only);
  * ``linear_silu``: ``Linear(in, out)(silu(x))``, the MLP layer of the same shape;
  * ``dense_gemm``: ``torch.matmul`` of (batch, in*(G+k+1)) x (in*(G+k+1), out), the
    dense-GEMM floor of the KAN layer; its forward TFLOP/s are reported, and every
    method's fwd+bwd time is also expressed as "dense-equivalent TFLOP/s"
    (3 such GEMMs: 6 * batch * in*(G+k+1) * out flops).

Measurements that would not fit in memory are recorded as skipped; those left
when the time budget runs out are recorded as skipped too (the budget keeps the
whole script under 8 minutes on an H200). Results go to ``gpu_check.json`` and
``gpu_check.csv`` in ``--out`` (default: ``$OUT`` if set, else
``benchmarks/results``), with the GPU name, versions, date and command.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from kanfast import FastKANLayer
from kanfast.reference import kan_linear_reference

T_START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    a, b = a[fin], b[fin]
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


# ----------------------------------------------------------------------- checks
TOL = {"tf32": 5e-3, "ieee": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


def _fwd_bwd(fn, x, params, gy):
    x = x.detach().requires_grad_()
    ps = [p.detach().requires_grad_() for p in params]
    y = fn(x, *ps)
    grads = torch.autograd.grad(y, [x] + ps, gy.to(y.dtype))
    return [y.detach()] + [g.detach() for g in grads]


def check_accuracy(device: str, quick: bool) -> list:
    from kanfast.triton_backend import kan_linear_triton

    results = []
    shapes = [(37, 7, 17, 3, 5), (300, 64, 48, 3, 20), (129, 33, 9, 5, 12), (64, 16, 16, 1, 3)]
    if quick:
        shapes = shapes[:1] + shapes[3:]
    modes = [("ieee", torch.float32), ("tf32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
    if device == "cpu":
        modes = [m for m in modes if m[0] in ("ieee", "float16")]  # interpreter: no tf32, no bf16
    for n, nin, nout, k, G in shapes:
        for grid_kind in ("uniform", "adapted"):
            torch.manual_seed(n + nin + k)
            layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, dtype=torch.float64)
            if grid_kind == "adapted":
                layer.update_grid(torch.randn(256, nin, dtype=torch.float64) ** 3 * 0.5)
            x = torch.randn(n, nin, dtype=torch.float64) * 1.2
            x[0] = layer.grid[:, k]  # on knots
            x[1, ::2] = 9.0  # outside
            gy = torch.randn(n, nout, dtype=torch.float64)
            coef = layer.scaled_spline_weight.detach()
            params = (coef, layer.base_weight.detach())
            ref = _fwd_bwd(lambda x_, c, b: kan_linear_reference(x_, layer.grid, b, c, None, k), x, params, gy)
            for mode, dtype in modes:
                prec = mode if mode in ("ieee", "tf32") else None
                grid_d = layer.grid.to(device, dtype)

                def fn(x_, c, b):
                    return kan_linear_triton(x_, grid_d, c, b, k, fp32_precision=prec)

                got = _fwd_bwd(fn, x.to(device, dtype), [p.to(device, dtype) for p in params], gy.to(device, dtype))
                # reference on the same (rounded) parameters and inputs
                ref_r = _fwd_bwd(
                    lambda x_, c, b: kan_linear_reference(x_, grid_d.double().cpu(), b, c, None, k),
                    x.to(dtype).double(), [p.to(dtype).double() for p in params], gy.to(dtype).double(),
                ) if dtype != torch.float32 else ref
                errs = {nm: rel_rms(a, b) for nm, a, b in zip(("y", "grad_x", "grad_coef", "grad_base"), got, ref_r)}
                ok = all(e <= TOL[mode] for e in errs.values())
                label = f"accuracy {mode:8s} N={n} in={nin} out={nout} k={k} G={G} {grid_kind}"
                log(f"{'PASS' if ok else 'FAIL'} {label} " + " ".join(f"{a}={e:.1e}" for a, e in errs.items()))
                results.append({"check": label, "ok": ok, **errs, "tol": TOL[mode]})
    return results


def check_nonfinite_and_determinism(device: str) -> list:
    from kanfast.triton_backend import kan_linear_triton

    out = []
    torch.manual_seed(0)
    layer = FastKANLayer(40, 24, grid_size=8, spline_order=3, device=device)
    coef = layer.scaled_spline_weight.detach()
    bw = layer.base_weight.detach()
    x = torch.randn(200, 40, device=device)
    gy = torch.randn(200, 24, device=device)

    def fn(x_, c, b):
        return kan_linear_triton(x_, layer.grid, c, b, 3)

    clean = _fwd_bwd(fn, x, (coef, bw), gy)
    xb = x.clone()
    xb[5] = float("nan")
    xb[17, ::3] = float("inf")
    xb[99, 1::3] = -float("inf")
    xb[150, :] = 1e30
    bad_rows = torch.zeros(200, dtype=torch.bool, device=device)
    bad_rows[[5, 17, 99, 150]] = True
    dirty = _fwd_bwd(fn, xb, (coef, bw), gy)
    ok = torch.equal(dirty[0][~bad_rows], clean[0][~bad_rows]) and torch.equal(dirty[1][~bad_rows], clean[1][~bad_rows])
    xr = xb.double().cpu()
    yr = kan_linear_reference(xr, layer.grid.double().cpu(), bw.double().cpu(), coef.double().cpu(), None, 3)
    nan_ok = torch.equal(torch.isnan(dirty[0].cpu()), torch.isnan(yr))
    log(f"{'PASS' if ok and nan_ok else 'FAIL'} non-finite rows: clean rows bit-identical={ok}, NaN pattern as reference={nan_ok}")
    out.append({"check": "nonfinite rows", "ok": bool(ok and nan_ok)})
    again = _fwd_bwd(fn, x, (coef, bw), gy)
    same = all(torch.equal(a, b) for a, b in zip(clean, again))
    log(f"{'PASS' if same else 'FAIL'} determinism: two fwd+bwd passes bit-identical={same}")
    out.append({"check": "determinism", "ok": bool(same)})
    return out


def check_compile(device: str) -> list:
    torch.manual_seed(1)
    layer = FastKANLayer(32, 16, backend="triton", device=device)
    x = torch.randn(64, 32, device=device, requires_grad=True)
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
        y = compiled(x)
        y.sum().backward()
        eager = copy.deepcopy(layer)
        x2 = x.detach().clone().requires_grad_()
        y2 = eager(x2)
        y2.sum().backward()
        ok = rel_rms(y, y2) < 1e-6 and rel_rms(x.grad, x2.grad) < 1e-6
        log(f"{'PASS' if ok else 'FAIL'} torch.compile(fullgraph=True) matches eager")
        return [{"check": "torch.compile fullgraph", "ok": bool(ok)}]
    except Exception as exc:  # reported, not fatal
        log(f"FAIL torch.compile(fullgraph=True): {type(exc).__name__}: {str(exc)[:300]}")
        return [{"check": "torch.compile fullgraph", "ok": False, "error": repr(exc)[:500]}]


# -------------------------------------------------------------------- benchmark
def materialized(x, grid, coef, base_weight, k: int):
    """Materialised-basis KAN layer: vectorised Cox-de Boor (batch, in, G + k) then one GEMM."""
    xe = x.unsqueeze(-1)
    b = ((xe >= grid[:, :-1]) & (xe < grid[:, 1:])).to(x.dtype)
    for p in range(1, k + 1):
        b = (xe - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)]) * b[..., :-1] + (
            grid[:, p + 1 :] - xe
        ) / (grid[:, p + 1 :] - grid[:, 1:-p]) * b[..., 1:]
    spline = F.linear(b.reshape(x.shape[0], -1), coef.reshape(coef.shape[0], -1))
    return F.linear(F.silu(x), base_weight) + spline


def _timeit(fn, device: str, max_s: float = 0.6, min_reps: int = 3) -> float:
    """Median seconds of fn() (CUDA events on GPU)."""
    fn()  # warm-up (compile, autotune)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    reps = max(min_reps, min(50, int(max_s / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _free_bytes(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    return 8e9


def benchmark(device: str, dtypes, batches, widths, grids, budget_s: float, k: int = 3) -> list:
    from kanfast.triton_backend import kan_linear_triton

    rows = []
    compiled_mat = torch.compile(materialized, dynamic=True) if device == "cuda" else None
    deadline = T_START + budget_s
    for G in grids:
        for width in widths:
            for dtype in dtypes:
                esize = torch.finfo(dtype).bits // 8
                for batch in batches:  # smallest batch first: autotuning happens there (key has no batch)
                    nin = nout = width
                    K1 = G + k + 1
                    dense_flops = 2.0 * batch * nin * K1 * nout
                    torch.manual_seed(0)
                    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, device=device, dtype=dtype)
                    grid = layer.grid
                    coef = layer.scaled_spline_weight.detach().requires_grad_()
                    bw = layer.base_weight.detach().requires_grad_()
                    x = torch.randn(batch, nin, device=device, dtype=dtype).requires_grad_()
                    gy = torch.randn(batch, nout, device=device, dtype=dtype)
                    basis_bytes = batch * nin * (G + 2 * k + 1) * esize
                    methods = {
                        "triton": (lambda: kan_linear_triton(x, grid, coef, bw, k), 4 * batch * max(nin, nout) * esize),
                        "materialized": (lambda: materialized(x, grid, coef, bw, k), basis_bytes * (2 * k + 4)),
                        "linear_silu": (lambda: F.linear(F.silu(x), bw), 4 * batch * max(nin, nout) * esize),
                    }
                    if compiled_mat is not None:
                        methods["materialized_compiled"] = (lambda: compiled_mat(x, grid, coef, bw, k), basis_bytes * 4)
                    if batch <= 4096 and width <= 1024:
                        methods["reference"] = (lambda: kan_linear_reference(x, grid, bw, coef, None, k), basis_bytes * (3 * k + 6))
                    for name, (f, need) in methods.items():
                        row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "in": nin, "out": nout, "G": G,
                               "k": k, "method": name, "pass": "fwd+bwd"}
                        if time.time() > deadline:
                            row["status"] = "skipped (time budget)"
                            rows.append(row)
                            continue
                        if need > 0.8 * _free_bytes(device):
                            row["status"] = f"skipped (needs ~{need / 2**30:.0f} GiB)"
                            rows.append(row)
                            log(f"{name:22s} {row['dtype']:8s} B={batch} w={width} G={G}: {row['status']}")
                            continue

                        def step(f=f):
                            y = f()
                            torch.autograd.grad(y, (x, coef, bw), gy, allow_unused=True)

                        try:
                            t = _timeit(step, device)
                            row.update(status="ok", ms=t * 1e3, dense_equiv_tflops=3 * dense_flops / t / 1e12)
                        except torch.cuda.OutOfMemoryError if device == "cuda" else MemoryError:
                            row["status"] = "oom"
                        except Exception as exc:
                            row["status"] = f"error {type(exc).__name__}: {str(exc)[:200]}"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        log(f"{name:22s} {row['dtype']:8s} B={batch} w={width} G={G}: " + (
                            f"{row['ms']:9.3f} ms fwd+bwd ({row['dense_equiv_tflops']:6.1f} dense-equiv TFLOP/s)"
                            if row["status"] == "ok" else row["status"]))
                    # dense GEMM floor, forward only
                    row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, "in": nin, "out": nout, "G": G,
                           "k": k, "method": "dense_gemm", "pass": "fwd (one GEMM)"}
                    need = (batch * nin * K1 + nin * K1 * nout + batch * nout) * esize
                    if time.time() > deadline:
                        row["status"] = "skipped (time budget)"
                    elif need > 0.8 * _free_bytes(device):
                        row["status"] = f"skipped (needs ~{need / 2**30:.0f} GiB)"
                    else:
                        try:
                            A = torch.randn(batch, nin * K1, device=device, dtype=dtype)
                            B = torch.randn(nin * K1, nout, device=device, dtype=dtype)
                            t = _timeit(lambda: torch.matmul(A, B), device)
                            row.update(status="ok", ms=t * 1e3, tflops=dense_flops / t / 1e12)
                            del A, B
                        except Exception as exc:
                            row["status"] = f"error {type(exc).__name__}: {str(exc)[:200]}"
                    rows.append(row)
                    if row["status"] == "ok":
                        log(f"{'dense_gemm':22s} {row['dtype']:8s} B={batch} w={width} G={G}: {row['ms']:9.3f} ms fwd "
                            f"({row['tflops']:6.1f} TFLOP/s)")
                    del layer, x, gy, coef, bw
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    from kanfast import triton_backend

    meta = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "fp32_precision_default": triton_backend.get_fp32_precision(),
        "autotune": os.environ.get("KANFAST_TRITON_AUTOTUNE", "1") != "0",
    }
    log(f"gpu_check on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})")
    checks = []
    if not args.skip_checks:
        checks = check_accuracy(device, args.quick) + check_nonfinite_and_determinism(device) + check_compile(device)
    n_fail = sum(not c["ok"] for c in checks)
    log(f"checks: {len(checks) - n_fail} passed, {n_fail} failed")
    rows = []
    if not args.skip_bench:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
        if device == "cpu" or args.quick:
            dtypes = [d for d in dtypes if not (device == "cpu" and d == torch.bfloat16)]
            rows = benchmark(device, dtypes, [64], [16], [5], args.budget_s)
        else:
            rows = benchmark(device, dtypes, [4096, 16384, 65536], [256, 1024, 2048], [5, 20], args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gpu_check{args.tag}.json"), "w") as f:
        json.dump({"meta": meta, "checks": checks, "benchmark": rows}, f, indent=1, default=str)
    if rows:
        keys = ["dtype", "batch", "in", "out", "G", "k", "method", "pass", "status", "ms", "dense_equiv_tflops", "tflops"]
        with open(os.path.join(args.out, f"gpu_check{args.tag}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    log(f"wrote {args.out}/gpu_check{args.tag}.json" + (f" and gpu_check{args.tag}.csv" if rows else ""))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
