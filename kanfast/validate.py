"""``kanfast validate``: every available backend against the float64 reference.

For each case (layer shape, spline order k, uniform or sample-adapted knots,
inputs inside and outside the grid; and float32's hard grids: knots far from 0 against
their spacing, (1e3, 1e3 + 1) and (1e6, 1e6 + 1) at G = 50, fine grids on (-1, 1): G = 500
(the layer's own, exactly equal steps) and G = 1000 with knots rounded one by one; spline
term alone so that its error shows) the backend's output and the gradients of
x, base_weight, spline_weight and spline_scaler are compared with
``kanfast.reference`` evaluated in float64 on the CPU. Errors are reported as
max abs error and relative error ``max|a - b| / max|b|``; a relative error over
the dtype's tolerance is a mismatch (exit status 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import copy
from dataclasses import dataclass
from typing import Dict, List

import torch

from .cli_checks import int_range

__all__ = ["TOLERANCES", "Case", "default_cases", "validate_case", "add_arguments", "check_arguments", "run"]

#: relative tolerance (max abs error / max abs reference) per compute dtype
TOLERANCES: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    lead: tuple  # leading batch shape
    in_features: int
    out_features: int
    grid_size: int
    spline_order: int
    grid: str  # "uniform" (the layer's own knots), "adapted", or "rounded" (each knot rounded from lo + j h)
    inputs: str  # "inside" or "wide" (about a third outside the knots)
    grid_range: tuple = (-1.0, 1.0)
    base: bool = True  # False: base_weight 0, the spline term alone

    def label(self) -> str:
        extra = "" if self.grid_range == (-1.0, 1.0) else f" on ({self.grid_range[0]:g}, {self.grid_range[1]:g})"
        extra += "" if self.base else " spline only"
        return (
            f"x{self.lead}+({self.in_features}) out={self.out_features} G={self.grid_size} "
            f"k={self.spline_order} {self.grid} {self.inputs}{extra}"
        )


def default_cases(quick: bool = False) -> List[Case]:
    shapes = [((33,), 7, 17), ((2, 5), 33, 9), ((1,), 1, 1)]
    orders = [1, 2, 3, 5]
    cases = []
    for si, (lead, i, o) in enumerate(shapes):
        for k in orders:
            for gi, grid in enumerate(("uniform", "adapted")):
                G = (5, 3, 12)[(si + k + gi) % 3]
                inputs = "wide" if (k + gi) % 2 else "inside"
                cases.append(Case(lead, i, o, G, k, grid, inputs))
    if quick:
        cases = cases[::4]
    # float32's hard grids (the closed form once took knots as t_0 + j h: 5e-4 relative at
    # (1e3, 1e3 + 1), 0.5 at (1e6, 1e6 + 1), 6e-5 at G = 1000)
    hard = [((1e3, 1e3 + 1), 50, "uniform"), ((1e6, 1e6 + 1), 50, "uniform"), ((-1.0, 1.0), 500, "uniform"),
            ((-1.0, 1.0), 1000, "rounded")]
    if quick:
        hard = hard[1:2] + hard[3:]
    cases += [Case((16,), 2, 3, G, 3, grid, "inside", grid_range=rng, base=False) for rng, G, grid in hard]
    return cases


def _make_layer(case: Case, seed: int):
    from .knots import uniform_grid
    from .layer import FastKANLayer

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kw = dict(grid_size=case.grid_size, spline_order=case.spline_order, grid_range=case.grid_range, dtype=torch.float64)
    if case.grid_size < 200:
        layer = FastKANLayer(case.in_features, case.out_features, **kw)
    else:  # the constructor's least-squares init of spline_weight (replaced below) costs O(in G^3)
        layer = FastKANLayer(case.in_features, case.out_features, device="meta", **kw).to_empty(device="cpu")
        with torch.no_grad():
            layer.grid.copy_(uniform_grid(case.in_features, case.grid_size, case.spline_order, case.grid_range))
            for p in (layer.base_weight, layer.spline_scaler):
                torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        layer.refresh_grid_cache()
    with torch.no_grad():
        if case.grid == "uniform":  # a float32 layer's knots (exact in float64 too): both dtypes take the closed form
            layer.grid.copy_(uniform_grid(case.in_features, case.grid_size, case.spline_order, case.grid_range,
                                          dtype=torch.float32))
            layer.refresh_grid_cache()
        layer.spline_weight.copy_(torch.randn(layer.spline_weight.shape, generator=g, dtype=torch.float64))
        if not case.base:
            layer.base_weight.zero_()
        if case.grid == "rounded":  # each knot rounded from lo + j h (in float64 here, to float32 by the cast)
            lo, hi = case.grid_range
            k = case.spline_order
            steps = torch.arange(-k, case.grid_size + k + 1, dtype=torch.float64)
            layer.grid.copy_((steps * ((hi - lo) / case.grid_size) + lo).expand_as(layer.grid))
            layer.refresh_grid_cache()
        if case.grid == "adapted":
            samples = torch.randn(64, case.in_features, generator=g, dtype=torch.float64) ** 3 * 0.5
            layer.update_grid(samples)
    return layer


def _inputs(case: Case, layer, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = layer.grid[:, 0], layer.grid[:, -1]
    u = torch.rand(*case.lead, case.in_features, generator=g, dtype=torch.float64)
    if case.inputs == "wide":
        u = u * 1.6 - 0.3  # about 35% outside [lo, hi]
    x = lo + u * (hi - lo)
    # a few inputs exactly on knots
    flat = x.reshape(-1, case.in_features)
    if flat.shape[0] > 2:
        flat[0] = layer.grid[:, layer.spline_order]
        flat[1] = layer.grid[:, 0]
    return x


def _grads(layer, x: torch.Tensor, gy_seed: int):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    g = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    params = [layer.base_weight, layer.spline_weight, layer.spline_scaler]
    grads = torch.autograd.grad(y, [x] + params, gy)
    return {"y": y, "grad_x": grads[0], "grad_base_weight": grads[1], "grad_spline_weight": grads[2], "grad_spline_scaler": grads[3]}


def validate_case(case: Case, backend: str, device: str, dtype: torch.dtype, seed: int = 0) -> Dict[str, tuple]:
    """Errors ``{name: (max_abs, rel)}`` of ``backend`` against the float64 reference."""
    master = _make_layer(case, seed)
    x = _inputs(case, master, seed).to(device=device, dtype=dtype)
    layer = copy.deepcopy(master).to(device=device, dtype=dtype)
    # the oracle sees the same rounded parameters and inputs: the error measured is the backend's alone
    ref_layer = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    ref_layer.backend = "reference"
    expected = _grads(ref_layer, x.to("cpu", torch.float64), seed + 2)
    layer.backend = backend
    got = _grads(layer, x, seed + 2)
    out = {}
    for name, e in expected.items():
        a = got[name].detach().to("cpu", torch.float64)
        err = (a - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        out[name] = (err, err / scale if scale > 0 else err)
    return out


def available_backends(device: str) -> List[str]:
    backends = ["torch"]
    try:
        from . import triton_backend

        if triton_backend.AVAILABLE:  # on CPU tensors: Triton's interpreter (slow, small cases only)
            backends.append("triton")
    except Exception:
        pass
    return backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device of the backends under test (reference runs on CPU in float64)")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=list(DTYPES), help="dtype(s) of the backends under test")
    parser.add_argument("--backends", nargs="+", default=None, choices=["torch", "triton", "reference"],
                        help="backends to check (default: all available)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the cases")
    parser.add_argument("--seed", type=int_range(0, 2**63 - 1), default=0, help="seed of the parameters and inputs")


def check_arguments(args) -> None:
    """The device exists here (before any work). Raises ValueError (one line)."""
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"bad --device {args.device!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def run(args) -> int:
    try:
        check_arguments(args)
    except ValueError as exc:
        print(f"kanfast validate: {exc}", file=sys.stderr)
        return 2
    dtypes = [args.dtype] if isinstance(args.dtype, str) else list(args.dtype)
    status = 0
    for name in dtypes:
        status |= _run_dtype(args, DTYPES[name])
    return status


def _run_dtype(args, dtype: torch.dtype) -> int:
    device = args.device
    backends = args.backends or available_backends(device)
    if dtype == torch.float64 and "triton" in backends and len(backends) > 1:
        backends = [b for b in backends if b != "triton"]
        print("float64: the triton backend runs the torch backend (tl.dot has no useful fp64 path); checked as 'torch'")
    tol = TOLERANCES[dtype]
    if "triton" in backends and dtype == torch.float32:
        # exactness check: IEEE fp32 products (the GPU default is TF32, ~1e-3 relative)
        from . import triton_backend

        previous = triton_backend.get_fp32_precision()
        triton_backend.set_fp32_precision("ieee")
        print("triton float32 products: IEEE (TF32 is the default for training; see kanfast.triton_backend)")
        try:
            return _run_cases(backends, device, dtype, tol, args)
        finally:
            triton_backend.set_fp32_precision(previous)
    return _run_cases(backends, device, dtype, tol, args)


def _run_cases(backends, device, dtype, tol, args) -> int:
    cases = default_cases(args.quick)
    if device == "cpu" and "triton" in backends:
        cases = [c for c in cases if c.in_features * c.out_features <= 300] or cases[:2]
    print(f"kanfast validate: backends={backends} device={device} dtype={str(dtype).replace('torch.', '')} rel tol={tol:g} ({len(cases)} cases each)")
    names = ["y", "grad_x", "grad_base_weight", "grad_spline_weight", "grad_spline_scaler"]
    header = f"{'backend':8s} {'case':58s} " + " ".join(f"{n:>18s}" for n in names)
    print(header)
    print("-" * len(header))
    failures = 0
    worst: Dict[str, float] = {}
    for backend in backends:
        for case in cases:
            try:
                errs = validate_case(case, backend, device, dtype, args.seed)
            except Exception as exc:  # a crash is a mismatch, reported
                print(f"{backend:8s} {case.label():58s} ERROR {type(exc).__name__}: {exc}")
                failures += 1
                continue
            bad = [n for n in names if not (errs[n][1] <= tol)]
            failures += bool(bad)
            worst[backend] = max([worst.get(backend, 0.0)] + [errs[n][1] for n in names])
            cells = " ".join(f"{errs[n][0]:8.1e}/{errs[n][1]:8.1e}" + ("!" if n in bad else " ") for n in names)
            print(f"{backend:8s} {case.label():58s} {cells}")
    print("cells: max abs error / relative error; '!' marks a mismatch")
    for b, w in worst.items():
        print(f"{b}: worst relative error {w:.2e} (tolerance {tol:g})")
    if failures:
        print(f"FAILED: {failures} mismatching case(s)")
        return 1
    print("OK: every backend matches the reference")
    return 0
