"""Dispatch of the dense-block engine's chunks to the compiled block kernels
(:mod:`kanfast.kernels.cpu_spline`, C built on first use and cached): whether they can run
a chunk (:func:`block_kernels`), and the fused steps 1-3 that write its dense block row by
row (:func:`kernel_fill`). Backward's fused grad_x (``kern.grad_x``) is called by the engine
(:mod:`kanfast.torch_backend`) on the same kernels object. When they cannot run, the torch
ops of :mod:`kanfast.cpu_bases` do the same work.
"""

from __future__ import annotations

import torch

from .cpu_knots import Grid
from .cpu_plan import Block
from .kernels import cpu_spline

__all__ = ["block_kernels", "kernel_fill"]


def block_kernels(x: torch.Tensor, g: Grid):
    """The compiled block kernels (:mod:`kanfast.kernels.cpu_spline`) when they can run the
    chunks of x (N, in) on knots g: uniform knots, k >= 2 (the spans of k <= 1 are corrected
    against the stored knots, which the kernels do not do), float32 or float64 with unit
    feature stride, knots in x's dtype, and the kernels built (a C compiler; not disabled by
    ``KANFAST_CPU_KERNEL=0``), and nothing recording ops (``torch.jit.trace``, a
    ``TorchDispatchMode``/``TorchFunctionMode``: the kernels write through raw pointers,
    which such a recording would not see). Else None: the pure-torch ops, exact too."""
    if not (g.uniform and g.k >= 2) or g.t0.dtype != x.dtype or x.device.type != "cpu":
        return None
    if (
        torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
    ):
        return None
    kern = cpu_spline.load()
    return kern if kern is not None and kern.supports(x, g.k) else None


def kernel_fill(kern, blk: Block, rows: int, xc: torch.Tensor, g: Grid, C: int) -> torch.Tensor:
    """The chunk's dense block (rows, blk.C * in), its first C column blocks written by the
    fill kernel (SiLU block included when the block has one): steps 1-3 in one pass."""
    D = blk.rows(rows)
    kern.fill(xc, g.h, g.t0, g.tn, g.inv_h, g.n, g.k, g.polys[0], D, blk.off, C,
              blk.scratch("kf", (g.k + 3) * blk.nin))
    return D
