"""Peak host memory of KAN forward+backward at scale on CPU (robustness issue, case 8).

    python3 benchmarks/memory_at_scale.py [--batch 16384] [--widths 1152 4608 1152] [--out FILE]

Measures, in this process, the peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs just before the step) of one forward+backward of
KAN(widths) on a float32 batch, with parameter gradients allocated beforehand.
Reports the peak beyond what was resident before the step (parameters, their
gradients, the input) and beyond the activations autograd must keep or produce
(every layer's output and its gradient), and compares it with the size of one
materialised (batch, in, G + k) basis of the first layer, which a materialising
implementation would hold.
"""

from __future__ import annotations

import argparse
import sys
import datetime
import json
import os
import platform
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--widths", type=int, nargs="+", default=[1152, 4608, 1152])
    ap.add_argument("--grid-size", type=int, default=5)
    ap.add_argument("--spline-order", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    from kanfast import KAN

    torch.manual_seed(0)
    model = KAN(args.widths, grid_size=args.grid_size, spline_order=args.spline_order, backend=args.backend)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.rand(args.batch, args.widths[0]) * 2 - 1
    fsize = 4
    act_bytes = 2 * sum(args.batch * w * fsize for w in args.widths[1:])  # outputs and their gradients
    basis_bytes = args.batch * args.widths[0] * (args.grid_size + args.spline_order) * fsize
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # warm-up on a few rows: one-off library workspaces and thread pools are not the step's memory
    model(x[:64]).sum().backward()
    for p in model.parameters():
        p.grad.zero_()
    _reset_peak()
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    y = model(x)
    y.backward(torch.ones_like(y))
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    extra = peak - before - act_bytes
    result = {
        "what": "peak RSS of one forward+backward beyond params, grads, input and activations (outputs + their grads)",
        "widths": args.widths,
        "batch": args.batch,
        "grid_size": args.grid_size,
        "spline_order": args.spline_order,
        "backend": args.backend,
        "dtype": "float32",
        "param_bytes": param_bytes,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "activation_bytes": act_bytes,
        "peak_extra_bytes": extra,
        "one_basis_tensor_bytes": basis_bytes,
        "below_one_basis_tensor": extra < basis_bytes,
        "seconds": seconds,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3 benchmarks/memory_at_scale.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    mb = 1e6
    print(
        f"KAN{args.widths} batch {args.batch} G={args.grid_size} k={args.spline_order} ({args.backend}): "
        f"fwd+bwd {seconds:.1f} s, peak extra {extra / mb:.0f} MB "
        f"(peak RSS {peak / mb:.0f} MB, before {before / mb:.0f} MB, activations {act_bytes / mb:.0f} MB); "
        f"one (batch, in, G+k) basis = {basis_bytes / mb:.0f} MB -> {'OK' if extra < basis_bytes else 'OVER'}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if extra < basis_bytes else 1


if __name__ == "__main__":
    raise SystemExit(main())
