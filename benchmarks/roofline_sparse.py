"""Roofline of the CPU engine's sparse path (kf_sparse_* in kanfast/kernels/cpu_spline.c).

    python3 benchmarks/roofline_sparse.py [--batch 4096] [--in 256] [--out 256] [--grid 5,20,50,200]
        [--k 3] [--threads 1,2] [--repeats 7] [--json benchmarks/results/roofline_sparse.json]

Measures this machine's memory bandwidth (STREAM-like copy and triad on 256 MiB float32 arrays,
torch ops, 1 and 2 threads) and float32 multiply-add rate (a 4096^3 float32 GEMM, torch/MKL, 1 and 2
threads), then times the sparse kernels alone (``kanfast.sparse_backend.forward`` and ``backward``
with every gradient, float32, min of ``--repeats``) and prints them next to the roofline bound.

Work and traffic per row (N rows, in -> out, G grid intervals, order k, s bytes per element,
nb = G + k bases per input, of which k + 1 are non-zero):

    forward   FMAs  in (k + 2) out                 (k + 1 coefficient rows + the SiLU row per input)
    backward  FMAs  in (2k + 4) out                (grad_x: k + 2 dot products of length out per input;
                                                    grad_W, grad_base: k + 2 axpys of length out)
    compulsory bytes (memory): forward  s (in + out) per row + s in nb out per call (the table, once);
                               backward s (2 in + out) per row + 3 s in nb out per call (the table,
                               the gradient written, its transposed copy)
    cache bytes (one load per multiply-add, the rows a (row, input) selects): forward s in (k + 2) out,
                               backward 3 s in (k + 2) out (W rows read; grad_W rows read and written)

The bound printed is max(FMAs / FMA rate, compulsory bytes / triad bandwidth) of the call; the
"cache" column is the cache bytes over the same bandwidth (the time if every selected row came
from memory: the table does not stay in cache). On one thread the calls run on the calling thread,
whose CPU time (``time.thread_time``) is given too: on a loaded host it is the better measure. The dense floor of the same layer does
(G + k + 1) in out multiply-adds per row forward and 3x that forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from kanfast import FastKANLayer, sparse_backend


def _best(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = clock()
        fn()
        ts.append(clock() - t)
    return min(ts)


def machine(threads: int, repeats: int) -> dict:
    """Triad/copy bandwidth (GB/s) and float32 GEMM multiply-add rate (GFMA/s) on ``threads`` threads."""
    torch.set_num_threads(threads)
    n = 64 << 20  # 256 MiB per float32 array
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    copy = _best(lambda: c.copy_(a), repeats)
    triad = _best(lambda: torch.add(a, b, alpha=3.0, out=c), repeats)
    m = 4096
    A, B, C = torch.rand(m, m), torch.rand(m, m), torch.empty(m, m)
    gemm = _best(lambda: torch.mm(A, B, out=C), max(2, repeats // 2))
    return {"threads": threads, "copy_GBs": 2 * 4 * n / copy / 1e9, "triad_GBs": 3 * 4 * n / triad / 1e9,
            "gemm_GFMAs": m ** 3 / gemm / 1e9}


def model(N: int, nin: int, nout: int, G: int, k: int, s: int) -> dict:
    """Multiply-adds and bytes of one forward and one backward call (module docstring)."""
    nb = G + k
    return {
        "fwd_fma": N * nin * (k + 2) * nout,
        "bwd_fma": N * nin * (2 * k + 4) * nout,
        "fwd_bytes": s * N * (nin + nout) + s * nin * nb * nout,
        "bwd_bytes": s * N * (2 * nin + nout) + 3 * s * nin * nb * nout,
        "fwd_cache_bytes": s * N * nin * (k + 2) * nout,
        "bwd_cache_bytes": 3 * s * N * nin * (k + 2) * nout,
        "dense_floor_fma_fwd_bwd": 3 * N * nin * (G + k + 1) * nout,
    }


def kernel_times(N: int, nin: int, nout: int, G: int, k: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k)
    lo, hi = layer.grid_range
    x = torch.rand(N, nin) * (hi - lo) + lo
    gy = torch.randn(N, nout)
    args = (x, layer.grid, layer.spline_weight.detach(), layer.base_weight.detach(), k,
            layer.spline_scaler.detach())
    assert sparse_backend.forward(*args) is not None
    f = lambda: sparse_backend.forward(*args)
    b = lambda: sparse_backend.backward(gy, *args, True, True, True, True)
    fwd, bwd = _best(f, repeats), _best(b, repeats)
    out = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_bwd_ms": (fwd + bwd) * 1e3}
    if threads == 1:  # the calls run on this thread: its CPU time too (what a loaded host does not inflate)
        fc, bc = _best(f, repeats, time.thread_time), _best(b, repeats, time.thread_time)
        out.update({"fwd_cpu_ms": fc * 1e3, "bwd_cpu_ms": bc * 1e3, "fwd_bwd_cpu_ms": (fc + bc) * 1e3})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--in", dest="nin", type=int, default=256)
    p.add_argument("--out", dest="nout", type=int, default=256)
    p.add_argument("--grid", default="5,20,50,200")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-machine", action="store_true", help="skip the bandwidth/GEMM measurement")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    grids = [int(g) for g in a.grid.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    loads = [os.getloadavg()]
    mach = {} if a.no_machine else {t: machine(t, a.repeats) for t in threads}
    for t, m in mach.items():
        print(f"machine, {t} thread(s): copy {m['copy_GBs']:.1f} GB/s, triad {m['triad_GBs']:.1f} GB/s, "
              f"float32 GEMM {m['gemm_GFMAs']:.1f} GFMA/s")
    rows = []
    print(f"{'G':>5} {'thr':>3} {'fwd ms':>8} {'bound':>7} {'cache':>7} {'bwd ms':>8} {'bound':>7} {'cache':>7} "
          f"{'f+b ms':>8} {'GFMA/s':>7} {'cpu fwd':>8} {'cpu bwd':>8}")
    for G in grids:
        mo = model(a.batch, a.nin, a.nout, G, a.k, 4)
        for t in threads:
            r = kernel_times(a.batch, a.nin, a.nout, G, a.k, t, a.repeats)
            row = {"batch": a.batch, "in": a.nin, "out": a.nout, "G": G, "k": a.k, "threads": t, **mo, **r}
            m = mach.get(t)
            if m:
                bw, fr = m["triad_GBs"] * 1e9, m["gemm_GFMAs"] * 1e9
                for d in ("fwd", "bwd"):
                    row[f"{d}_bound_ms"] = 1e3 * max(mo[f"{d}_fma"] / fr, mo[f"{d}_bytes"] / bw)
                    row[f"{d}_cache_ms"] = 1e3 * mo[f"{d}_cache_bytes"] / bw
            row["achieved_GFMAs"] = (mo["fwd_fma"] + mo["bwd_fma"]) / (r["fwd_bwd_ms"] * 1e6)
            rows.append(row)
            f = lambda key: f"{row[key]:7.1f}" if key in row else f"{'-':>7}"
            print(f"{G:>5} {t:>3} {r['fwd_ms']:8.1f} {f('fwd_bound_ms')} {f('fwd_cache_ms')} {r['bwd_ms']:8.1f} "
                  f"{f('bwd_bound_ms')} {f('bwd_cache_ms')} {r['fwd_bwd_ms']:8.1f} {row['achieved_GFMAs']:7.1f} "
                  f"{r.get('fwd_cpu_ms', float('nan')):8.1f} {r.get('bwd_cpu_ms', float('nan')):8.1f}")
    loads.append(os.getloadavg())
    if a.json:
        meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
                "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "torch": torch.__version__, "loadavg_start_end": loads}
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "machine": list(mach.values()), "results": rows}, fh, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
