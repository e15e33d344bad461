"""One GPU window's checks and measurements of the fused Triton kernels (driven by gpu_check.sh).

    python3 benchmarks/gpu_check.py --phase 1 [--device cuda] [--out DIR] [--budget-s 150]
    python3 benchmarks/gpu_check.py --phase 2 --shard 0/8 ...     # (run with KANFAST_TRITON_AUTOTUNE=0)
    python3 benchmarks/gpu_check.py --phase 3 ...
    python3 benchmarks/gpu_check.py --phase compare --model-json gpu_model_target.json --out DIR
    --device cpu: the dry run (Triton's interpreter, tiny shapes; what CI runs)

Phase 1, the target shape (batch 65536, in = out = 1024, G = 5, k = 3, bfloat16; the dry run: a tiny
float32 one), first thing in the window:
  * the first call of each kernel is at the target batch (autotuning, keyed on the layer's dims
    and never on the batch, happens there); compile + autotune seconds and the chosen configs;
  * correctness of the forward and of every gradient (x, spline coefficients, base weight) against
    ``kanfast.reference`` in float64 on the same rounded parameters: ``n_sub`` random rows of the
    forward; the backward with grad_y non-zero on those rows only, so grad_W and grad_base_weight
    of the full-batch kernels equal the float64 sums over those rows, and grad_x is exactly zero on
    every other row; metric max|a - b| / max|b| against ``kanfast.validate.TOLERANCES``;
  * the backward twice, bit-identical;
  * each kernel on its own through its launcher (``triton_backend._forward``, ``_backward`` with one
    output requested: grad_x is ``kan_bwd_x_kernel``; grad_W is ``kan_bwd_w_kernel`` and
    ``kan_bwd_base_kernel`` plus the sums of their batch splits and the layout copies of both
    weight gradients) and forward+backward through
    autograd (``kan_linear_triton``), median of ``triton.testing.do_bench`` (L2 flushed between
    runs); FLOP convention: one GEMM-equivalent is ``2 * batch * in * (G + k + 1) * out`` flops (the
    dense GEMM over the basis and SiLU columns); forward, grad_x and grad_W are one each,
    forward+backward three; TFLOP/s = GEMM-equivalent flops / time;
  * ``torch.matmul`` of the dense-equivalent GEMMs in the same process, same dtype: forward
    ``(batch, in*(G+k+1)) @ (in*(G+k+1), out)``, grad_x ``grad_y @ W^T``, grad_W ``A^T @ grad_y``;
    every kernel's ``ratio_to_gemm`` = its time / the matching GEMM's time (fwd+bwd: / the sum);
  * the materialized baseline (``kanfast.benchmarks.baselines.MaterializedKAN``, efficient-kan's
    formulation) forward+backward eager, then ``torch.compile``'d (compile seconds recorded; skipped
    when less than ``--compile-reserve-s`` of the phase budget is left); peak memory of each.
Phase 2, correctness sweep (first config of each kernel: one compile per specialisation; shards
run as separate processes in parallel): float32 (IEEE products; one TF32 case), bfloat16, float16 x
k in {1, 2, 3, 5} x uniform / non-uniform knots, odd widths (37 -> 29) and an odd batch (3001:
several batch splits of the weight gradient); per case forward and gradients against float64,
NaN/inf rows (the other rows bit-identical to a clean run, NaN where the reference has NaN), the
backward twice bit-identical, and whether the launcher saw the knots as uniform.
Phase 3, as time allows: the target dims at batch 4096..65536 (the autotuning of phase 1, read from
Triton's autotune cache), G = 20 and 50, widths 256 and 2048 (autotuned over the first two configs of
each kernel, at batch 65536); each kernel, forward+backward, the three GEMMs and the peak memory of
the fused path and of the materialized baseline (where it fits).

Every result is one JSON line appended to ``OUT/gpu_check.jsonl`` (flushed) the moment it exists,
with the GPU, versions, date, command, git commit (``KANFAST_COMMIT`` where the folder has no .git,
else ``unknown``) and the kanfast imported. Each phase stops starting new items when its budget
(``--budget-s``) is spent; the shell script also kills it at a hard limit. Exit status: 0 when every
check passed, 1 when one failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
import triton

import kanfast
from kanfast import FastKANLayer
from kanfast import triton_backend as tb
from kanfast.benchmarks.baselines import MaterializedKAN
from kanfast.reference import kan_linear_reference
from kanfast.validate import TOLERANCES

T0 = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the shape this whole exercise is about, and the dry run's stand-in (bfloat16 cannot run
#: through Triton's interpreter on the CPU)
TARGET = {"batch": 65536, "in": 1024, "out": 1024, "G": 5, "k": 3, "dtype": "bfloat16"}
DRY_TARGET = {"batch": 32, "in": 10, "out": 6, "G": 5, "k": 3, "dtype": "float32"}
#: TF32 products: 10 mantissa bits, like float16
TOL_TF32 = 5e-3
KINDS = ("forward", "grad_x", "grad_W", "fwd+bwd")


# ------------------------------------------------------------------ recording
def _commit() -> dict:
    """git commit of the checkout (with a dirty flag), else $KANFAST_COMMIT, else 'unknown'."""
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            st = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
            return {"commit": sha.stdout.strip(), "dirty": bool(st.stdout.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("KANFAST_COMMIT", "").strip()
    return {"commit": env or "unknown", "dirty": None, "source": "KANFAST_COMMIT" if env else "none"}


class Recorder:
    """Appends one JSON line per result to ``path`` (one write call per line, O_APPEND: shards
    running in parallel never interleave inside a line) and prints it."""

    def __init__(self, path: str, run: dict, phase: str):
        self.path, self.run, self.phase = path, run, phase
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.failed = 0

    def __call__(self, kind: str, **fields) -> dict:
        rec = {"phase": self.phase, "kind": kind, **fields,
               "t_phase_s": round(time.time() - T0, 2),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **self.run}
        if fields.get("ok") is False:
            self.failed += 1
        os.write(self.fd, (json.dumps(rec, default=str) + "\n").encode())
        shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in fields.items()
                 if v is not None and k not in ("flop_convention", "what", "configs", "tag")}
        if isinstance(shown.get("shape"), dict):
            sh = shown["shape"]
            shown["shape"] = f"B={sh['batch']} {sh['in']}->{sh['out']} G={sh['G']} k={sh['k']} {sh['dtype']}"
        print(f"[{time.time() - T0:6.1f}s] phase {self.phase} {kind}: " + json.dumps(shown, default=str), flush=True)
        return rec


def run_meta(device: str) -> dict:
    cuda = device == "cuda"
    return {
        "gpu": torch.cuda.get_device_name() if cuda else f"none (CPU dry run, Triton interpreter, {platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda},
        "command": os.environ.get("GPU_CHECK_COMMAND") or "python3 " + " ".join(sys.argv),
        "argv": sys.argv[1:],
        "git": _commit(),
        "kanfast_file": kanfast.__file__,
        "dry_run": not cuda,
    }


# ---------------------------------------------------------------------- tools
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device: str) -> dict:
    """Median (and 20th/80th percentile) milliseconds of fn(): triton.testing.do_bench on CUDA
    (L2 flushed before each run). The CPU dry run times one call (plumbing, not a measurement)."""
    if device == "cuda":
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    return {"ms": ms, "ms_p20": ms, "ms_p80": ms}


def peak_mib(fn, device: str):
    """Peak CUDA memory of fn() beyond what was allocated before it, MiB (None on the CPU)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return round(peak / 2**20, 1)


def free_bytes(device: str) -> float:
    return float(torch.cuda.mem_get_info()[0]) if device == "cuda" else 4e9


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """max|a - b| / max|b| over the entries finite in both (validate's metric), the relative RMS
    error, and whether the non-finite entries sit in the same places."""
    a, b = got.detach().double(), ref.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    same_pattern = bool(torch.equal(fa, fb))
    m = fa & fb
    a, b = a[m], b[m]
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    rms = ((a - b).norm() / b.norm()).item() if b.numel() and b.norm().item() > 0 else diff
    return {"max_rel": diff / scale if scale > 0 else diff, "rel_rms": rms, "nonfinite_match": same_pattern}


def kernels_of(device: str):
    """The kernel module the launchers use for ``device`` (its autotuners carry the configs)."""
    return tb._kernels(torch.device(device))


def chosen_configs(device: str) -> dict:
    km = kernels_of(device)
    out = {}
    for name in ("kan_fwd_kernel", "kan_bwd_x_kernel", "kan_bwd_w_kernel", "kan_bwd_base_kernel"):
        best = getattr(getattr(km, name), "best_config", None)
        out[name] = str(best) if best is not None else None
    return out


def limit_configs(device: str, n) -> dict:
    """Autotune over the first ``n`` configs of each kernel's list (all when None), and cache the
    autotuner's choice on disk (TRITON_CACHE_AUTOTUNING's switch) so later phases reuse it."""
    km = kernels_of(device)
    counts = {}
    for name in ("kan_fwd_kernel", "kan_bwd_x_kernel", "kan_bwd_w_kernel", "kan_bwd_base_kernel"):
        kern = getattr(km, name)
        if not hasattr(kern, "configs"):
            continue
        if not hasattr(kern, "_gpu_check_all_configs"):
            kern._gpu_check_all_configs = list(kern.configs)
        full = kern._gpu_check_all_configs
        kern.configs = list(full[:n]) if n else list(full)
        if device == "cuda" and hasattr(kern, "cache_results"):
            kern.cache_results = True
        counts[name] = len(kern.configs)
    return counts


def make_case(nin, nout, G, k, dtype, knots, device, seed=0):
    """(layer (float32, fp32 knots), coef, base_weight in ``dtype``): spline weights ~ N(0, 1) so
    the spline term dominates the base term; non-uniform knots from update_grid on skewed samples."""
    torch.manual_seed(seed)
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, device=device)
    with torch.no_grad():
        if knots == "nonuniform":
            layer.update_grid(torch.randn(512, nin, device=device) ** 3 * 0.5)
        layer.spline_weight.normal_()
    coef = layer.scaled_spline_weight.detach().to(dtype).contiguous()
    bw = layer.base_weight.detach().to(dtype).contiguous()
    return layer, coef, bw


def reference_grads(x, grid, coef, bw, k, gy):
    """float64 forward and (x, coef, base_weight) gradients of the reference on the given values."""
    x64 = x.detach().double().requires_grad_()
    c64 = coef.detach().double().requires_grad_()
    b64 = bw.detach().double().requires_grad_()
    y = kan_linear_reference(x64, grid.double(), b64, c64, None, k)
    gx, gc, gb = torch.autograd.grad(y, (x64, c64, b64), gy.double())
    return y.detach(), gx, gc, gb


def fused_grads(x, grid, coef, bw, k, gy, prec=None):
    """Forward and gradients through ``kan_linear_triton`` (the registered ops, autograd)."""
    xr = x.detach().requires_grad_()
    cr = coef.detach().requires_grad_()
    br = bw.detach().requires_grad_()
    y = tb.kan_linear_triton(xr, grid, cr, br, k, fp32_precision=prec)
    gx, gc, gb = torch.autograd.grad(y, (xr, cr, br), gy)
    return y.detach(), gx, gc, gb


def gemm_equiv_flops(batch, nin, nout, G, k) -> float:
    return 2.0 * batch * nin * (G + k + 1) * nout


def time_shape(rec, shape: dict, device: str, tag: str, deadline: float, params=None, materialized: bool = True,
               compile_reserve_s=None) -> dict:
    """Each kernel, forward+backward, the three dense GEMMs and peak memory at one shape, and the
    materialized baseline eager (and compiled, when ``compile_reserve_s`` of the budget is left);
    records written as they come. Returns {kernel: ms}."""
    B, I, O, G, k = shape["batch"], shape["in"], shape["out"], shape["G"], shape["k"]
    dtype = getattr(torch, shape["dtype"])
    if params is None:
        params = make_case(I, O, G, k, dtype, "uniform", device)
    layer, coef, bw = params
    grid = layer.grid
    ieee = device != "cuda"
    F1 = gemm_equiv_flops(B, I, O, G, k)
    common = dict(shape=shape, tag=tag, flop_convention="2*batch*in*(G+k+1)*out per GEMM-equivalent")
    esize = torch.finfo(dtype).bits // 8
    K1 = I * (G + k + 1)
    # the dense-equivalent GEMMs, same dtype
    gemm = {}
    need = (2 * B * K1 + K1 * O + 2 * B * O) * esize
    if need > 0.8 * free_bytes(device):
        rec("gemm", **common, status=f"skipped (needs ~{need / 2**30:.1f} GiB)")
    else:
        A = torch.randn(B, K1, device=device).to(dtype)
        Wd = torch.randn(K1, O, device=device).to(dtype)
        gyd = torch.randn(B, O, device=device).to(dtype)
        for name, fn in (("forward", lambda: A @ Wd), ("grad_x", lambda: gyd @ Wd.t()), ("grad_W", lambda: A.t() @ gyd)):
            t = bench_ms(fn, device)
            gemm[name] = t["ms"]
            rec("gemm", **common, what=f"torch.matmul {name}-equivalent", gemm=name, **t,
                tflops=F1 / (t["ms"] * 1e-3) / 1e12)
        gemm["fwd+bwd"] = sum(gemm.values())
        del A, Wd, gyd
    x = (torch.randn(B, I, device=device) * 0.5).to(dtype)
    gy = torch.randn(B, O, device=device).to(dtype)
    xr, cr, br = x.detach().requires_grad_(), coef.detach().requires_grad_(), bw.detach().requires_grad_()

    def fwdbwd():
        y = tb.kan_linear_triton(xr, grid, cr, br, k)
        return torch.autograd.grad(y, (xr, cr, br), gy)

    fns = {
        "forward": (lambda: tb._forward(x, grid, coef, bw, k, ieee), 1),
        "grad_x": (lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, True, False, False), 1),
        "grad_W": (lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, False, True, True), 1),
        "fwd+bwd": (fwdbwd, 3),
    }
    what = {"forward": "kan_fwd_kernel via triton_backend._forward",
            "grad_x": "kan_bwd_x_kernel via triton_backend._backward(need_x only)",
            "grad_W": "kan_bwd_w_kernel + kan_bwd_base_kernel + split sums + layout copies via triton_backend._backward(need_coef, need_base)",
            "fwd+bwd": "kan_linear_triton forward + torch.autograd.grad (x, coef, base_weight)"}
    measured = {}
    for name, (fn, n_gemm) in fns.items():
        if time.time() > deadline:
            rec("timing", **common, kernel=name, status="skipped (phase budget)")
            continue
        t = bench_ms(fn, device)
        measured[name] = t["ms"]
        extra = {}
        if name in gemm:
            extra = {"gemm_ms": gemm[name], "ratio_to_gemm": t["ms"] / gemm[name]}
        if name == "fwd+bwd":
            extra["peak_mib"] = peak_mib(fwdbwd, device)
        rec("timing", **common, kernel=name, what=what[name], **t, tflops=n_gemm * F1 / (t["ms"] * 1e-3) / 1e12,
            configs=chosen_configs(device), status="ok", **extra)
    if materialized:
        _time_materialized(rec, common, layer, x, gy, dtype, device, compile_reserve_s, deadline, F1, gemm)
    return measured


def _time_materialized(rec, common, layer, x, gy, dtype, device, compile_reserve_s, deadline, F1, gemm):
    B, I = x.shape
    G, k = layer.grid_size, layer.spline_order
    esize = torch.finfo(dtype).bits // 8
    need = B * I * (G + 2 * k + 1) * esize * (4 * k + 8)  # the Cox-de Boor table's steps, kept for backward
    m = MaterializedKAN.from_layer(layer).to(dtype)
    params = list(m.parameters())
    xr = x.detach().requires_grad_()
    variants = [("materialized eager", m)]
    if compile_reserve_s is not None:
        if time.time() + compile_reserve_s < deadline:  # the CPU dry run: aot_eager (no C++ build)
            variants.append(("materialized torch.compile", torch.compile(m) if device == "cuda"
                             else torch.compile(m, backend="aot_eager")))
        else:
            rec("baseline", **common, method="materialized torch.compile",
                status=f"skipped (less than {compile_reserve_s:.0f} s of the phase budget left for the compile)")
    for label, mod in variants:
        if need > 0.8 * free_bytes(device):
            rec("baseline", **common, method=label, status=f"skipped (needs ~{need / 2**30:.1f} GiB)")
            continue

        def step(mod=mod):
            y = mod(xr)
            return torch.autograd.grad(y, [xr] + params, gy)

        try:
            t = time.time()
            step()
            sync(device)
            first_s = time.time() - t
            tm = bench_ms(step, device)
            peak = peak_mib(step, device)
            rec("baseline", **common, method=label, **tm, first_call_s=round(first_s, 2), peak_mib=peak,
                tflops=3 * F1 / (tm["ms"] * 1e-3) / 1e12,
                ratio_to_gemm=(tm["ms"] / gemm["fwd+bwd"]) if "fwd+bwd" in gemm else None, status="ok")
        except torch.cuda.OutOfMemoryError as e:
            rec("baseline", **common, method=label, status=f"out of memory: {str(e)[:200]}")
        except Exception as e:  # a failed compile is a result, not the end of the phase
            rec("baseline", **common, method=label, status=f"error {type(e).__name__}: {str(e)[:300]}")
        if device == "cuda":
            torch.cuda.empty_cache()


# -------------------------------------------------------------------- phase 1
def phase1(rec, device: str, dry: bool, budget_s: float, n_sub: int, compile_reserve_s: float) -> None:
    deadline = T0 + budget_s
    shape = dict(DRY_TARGET if dry else TARGET)
    B, I, O, G, k = shape["batch"], shape["in"], shape["out"], shape["G"], shape["k"]
    dtype = getattr(torch, shape["dtype"])
    tol = TOLERANCES[dtype]
    n_configs = limit_configs(device, None)
    params = make_case(I, O, G, k, dtype, "uniform", device)
    layer, coef, bw = params
    grid = layer.grid
    ieee = device != "cuda"
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(B, I, generator=gen) * 0.5).to(device=device, dtype=dtype)
    x[0, : I // 2] = grid[: I // 2, k].to(dtype)  # some inputs on knots
    x[1, ::3] = 3.0  # some outside the knots
    gy = torch.randn(B, O, generator=gen).to(device=device, dtype=dtype)
    rec("start", shape=shape, autotune_configs=n_configs,
        uniform_knots=bool(tb._grid_info(grid, k)[0]))

    # first calls at the target batch: compile + autotune there
    for name, fn in (("forward", lambda: tb._forward(x, grid, coef, bw, k, ieee)),
                     ("grad_x", lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, True, False, False)),
                     ("grad_W", lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, False, True, True))):
        t = time.time()
        fn()
        sync(device)
        rec("compile", shape=shape, kernel=name, first_call_s=round(time.time() - t, 2), configs=chosen_configs(device))

    # correctness on n_sub random rows, the backward with grad_y on those rows only
    rows = torch.randperm(B, generator=gen)[: min(n_sub, B)].sort().values.to(device)
    gy_rows = torch.zeros_like(gy)
    gy_rows[rows] = gy[rows]
    y, gx, gc, gb = fused_grads(x, grid, coef, bw, k, gy_rows)
    ry, rgx, rgc, rgb = reference_grads(x[rows], grid, coef, bw, k, gy[rows])
    other = torch.ones(B, dtype=torch.bool, device=device)
    other[rows] = False
    for name, got, ref in (("forward", y[rows], ry), ("grad_x", gx[rows], rgx),
                           ("grad_coef", gc, rgc), ("grad_base_weight", gb, rgb)):
        e = rel_err(got, ref)
        rec("check", shape=shape, check=f"target {name} vs float64 reference", rows=len(rows), **e, tol=tol,
            ok=bool(e["max_rel"] <= tol and e["nonfinite_match"]))
    zero = bool(torch.count_nonzero(gx[other]).item() == 0) if bool(other.any()) else True
    rec("check", shape=shape, check="target grad_x exactly 0 on rows whose grad_y is 0", ok=zero)
    del y, gx, gc, gb, gy_rows
    a = tb._backward(gy, x, grid, coef, bw, k, ieee, True, True, True)
    b = tb._backward(gy, x, grid, coef, bw, k, ieee, True, True, True)
    same = all(torch.equal(u, v) for u, v in zip(a, b))
    rec("check", shape=shape, check="target backward twice bit-identical (grad_x, grad_coef, grad_base_weight)", ok=same)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    time_shape(rec, shape, device, "target", deadline, params=params, compile_reserve_s=compile_reserve_s)


# -------------------------------------------------------------------- phase 2
def phase2_cases(dry: bool) -> list:
    """(dtype name, fp32 precision, k, knots); the dry run's subset fits the interpreter."""
    if dry:
        return [("float32", "ieee", 3, "uniform"), ("float16", None, 2, "nonuniform")]
    cases = [(dt, "ieee" if dt == "float32" else None, k, knots)
             for dt in ("float32", "bfloat16", "float16") for k in (1, 2, 3, 5) for knots in ("uniform", "nonuniform")]
    return cases + [("float32", "tf32", 3, "uniform")]


def phase2(rec, device: str, dry: bool, budget_s: float, shard: int, n_shards: int) -> None:
    deadline = T0 + budget_s
    B, I, O, G = (24, 7, 5, 4) if dry else (3001, 37, 29, 5)
    cases = phase2_cases(dry)[shard::n_shards]
    rec("start", shard=f"{shard}/{n_shards}", cases=len(cases), autotune_configs=limit_configs(device, None))
    for dt, prec, k, knots in cases:
        label = dict(dtype=dt, fp32_precision=prec, k=k, knots=knots, batch=B, **{"in": I, "out": O}, G=G)
        if time.time() > deadline:
            rec("check", **label, status="skipped (phase budget)")
            continue
        dtype = getattr(torch, dt)
        tol = TOL_TF32 if prec == "tf32" else TOLERANCES[dtype]
        t_case = time.time()
        try:
            layer, coef, bw = make_case(I, O, G, k, dtype, knots, device, seed=k)
            grid = layer.grid
            gen = torch.Generator().manual_seed(k)
            x = (torch.randn(B, I, generator=gen, dtype=torch.float64) * 1.2)
            x[0] = grid[:, k].cpu().double()  # on knots
            x[1, ::2] = 9.0  # outside
            x = x.to(device=device, dtype=dtype)
            gy = torch.randn(B, O, generator=gen).to(device=device, dtype=dtype)
            got = fused_grads(x, grid, coef, bw, k, gy, prec)
            ref = reference_grads(x, grid, coef, bw, k, gy)
            errs = {n: rel_err(a, b) for n, a, b in zip(("y", "grad_x", "grad_coef", "grad_base_weight"), got, ref)}
            acc_ok = all(e["max_rel"] <= tol and e["nonfinite_match"] for e in errs.values())
            # NaN / inf rows
            xb = x.clone()
            bad = [2, 5, B // 2 + 1, B - 1]
            xb[bad[0]] = float("nan")
            xb[bad[1], ::3] = float("inf")
            xb[bad[2], 1::3] = -float("inf")
            xb[bad[3]] = 1e30 if dtype == torch.float32 else torch.finfo(dtype).max
            dirty = fused_grads(xb, grid, coef, bw, k, gy, prec)
            keep = torch.ones(B, dtype=torch.bool, device=device)
            keep[bad] = False
            clean_same = bool(torch.equal(dirty[0][keep], got[0][keep]) and torch.equal(dirty[1][keep], got[1][keep]))
            rdirty = reference_grads(xb, grid, coef, bw, k, gy)
            nan_same = bool(torch.equal(torch.isnan(dirty[0]), torch.isnan(rdirty[0])))
            ecoef = rel_err(dirty[2], rdirty[2])
            nan_ok = clean_same and nan_same and ecoef["max_rel"] <= tol and ecoef["nonfinite_match"]
            again = fused_grads(x, grid, coef, bw, k, gy, prec)
            det_ok = all(torch.equal(a, b) for a, b in zip(got[1:], again[1:]))
            uniform_seen = bool(tb._grid_info(grid, k)[0])
            uni_ok = uniform_seen == (knots == "uniform")
            rec("check", **label, tol=tol, errors=errs, accuracy_ok=acc_ok,
                nonfinite_rows={"other_rows_bit_identical": clean_same, "nan_pattern_as_reference": nan_same,
                                "grad_coef": ecoef},
                deterministic=det_ok, uniform_detected=uniform_seen, case_s=round(time.time() - t_case, 2),
                ok=bool(acc_ok and nan_ok and det_ok and uni_ok))
        except Exception as e:
            rec("check", **label, ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")


# -------------------------------------------------------------------- phase 3
def phase3_shapes(dry: bool) -> list:
    """(shape, configs to autotune over: None = all of them, which phase 1 tuned and cached)."""
    t = dict(DRY_TARGET if dry else TARGET)
    if dry:
        return [(dict(t, batch=20, G=4), 2)]
    shapes = [(dict(t, batch=b), None) for b in (65536, 4096, 16384, 32768)]
    shapes += [(dict(t, G=20), 2), (dict(t, G=50), 2), (dict(t, **{"in": 256, "out": 256}), 2),
               (dict(t, **{"in": 2048, "out": 2048}), 2)]
    return shapes


def phase3(rec, device: str, dry: bool, budget_s: float) -> None:
    deadline = T0 + budget_s
    shapes = phase3_shapes(dry)
    for shape, n_cfg in shapes:
        if time.time() > deadline:
            rec("timing", shape=shape, status="skipped (phase budget)")
            continue
        counts = limit_configs(device, n_cfg)
        t = time.time()
        try:
            params = make_case(shape["in"], shape["out"], shape["G"], shape["k"], getattr(torch, shape["dtype"]),
                               "uniform", device)
            measured = time_shape(rec, shape, device, "sweep", deadline, params=params,
                                  materialized=shape["batch"] == 65536 or (dry and shape is shapes[0][0]))
            rec("shape_done", shape=shape, autotune_configs=counts, measured_ms=measured, shape_s=round(time.time() - t, 1))
        except torch.cuda.OutOfMemoryError as e:
            rec("timing", shape=shape, status=f"out of memory: {str(e)[:200]}")
        except Exception as e:
            rec("timing", shape=shape, ok=False, status=f"error {type(e).__name__}: {str(e)[:400]}")
        if device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------ model comparison
def compare(rec, jsonl: str, model_json: str) -> None:
    """Measured phase-1 times beside ``benchmarks/gpu_model.py``'s modelled ones (its JSON:
    {"kernels": {"forward": {"modelled_ms": ...}, "grad_x": ..., "grad_W": ..., "fwd+bwd": ...}})."""
    with open(model_json) as f:
        model = json.load(f)
    measured = {}
    with open(jsonl) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") == "1" and r.get("kind") == "timing" and r.get("status") == "ok":
                measured[r["kernel"]] = r["ms"]
    print(f"{'kernel':10s} {'measured ms':>12s} {'modelled ms':>12s} {'measured/modelled':>18s}")
    for name in KINDS:
        mod = (model.get("kernels", {}).get(name) or {}).get("modelled_ms")
        got = measured.get(name)
        ratio = got / mod if (got is not None and mod) else None
        print(f"{name:10s} {got if got is not None else float('nan'):12.3f} {mod if mod is not None else float('nan'):12.3f} "
              f"{ratio if ratio is not None else float('nan'):18.2f}")
        rec("model_compare", kernel=name, measured_ms=got, modelled_ms=mod, measured_over_modelled=ratio,
            model_json=os.path.basename(model_json))


# ----------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", required=True, choices=["1", "2", "3", "compare"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run (interpreter, tiny shapes)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"),
                   help="folder of gpu_check.jsonl (default: $OUT, else benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=150.0, help="start no new item after this many seconds")
    p.add_argument("--shard", default="0/1", help="phase 2: i/n runs every n-th case from the i-th")
    p.add_argument("--n-sub", type=int, default=512, help="phase 1: rows checked against float64")
    p.add_argument("--compile-reserve-s", type=float, default=60.0,
                   help="phase 1: compile the materialized baseline only with this much budget left")
    p.add_argument("--model-json", help="compare: the JSON written by benchmarks/gpu_model.py")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu for the dry run)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "gpu_check.jsonl")
    rec = Recorder(jsonl, run_meta(args.device), args.phase)
    print(f"gpu_check phase {args.phase}: kanfast from {kanfast.__file__}; torch {torch.__version__}, "
          f"triton {triton.__version__}; results -> {jsonl}", flush=True)
    dry = args.device == "cpu"
    # NaN/inf inputs make numpy (the interpreter's engine) warn; the values are checked
    warnings.filterwarnings("ignore", message=".*encountered in", category=RuntimeWarning)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs of the reference stay float32
    if args.phase == "1":
        phase1(rec, args.device, dry, args.budget_s, args.n_sub, args.compile_reserve_s)
    elif args.phase == "2":
        i, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= i < n:
            p.error(f"--shard {args.shard}: need 0 <= i < n")
        phase2(rec, args.device, dry, args.budget_s, i, n)
    elif args.phase == "3":
        phase3(rec, args.device, dry, args.budget_s)
    else:
        if not args.model_json:
            p.error("--phase compare needs --model-json")
        compare(rec, jsonl, args.model_json)
    rec("end", failed=rec.failed, elapsed_s=round(time.time() - T0, 1))
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
