"""Sparse contraction engine of the CPU backend: the small-call path.

What: one KAN layer (Liu et al. 2024, eq. 2.10, efficient-kan's parameterisation)

    y[b, o] = sum_i base_weight[o, i] silu(x[b, i]) + sum_i sum_j W[o, i, j] B_j(x[b, i]),
    W = spline_weight * spline_scaler[..., None]

computed by one compiled C call per direction (``kf_sparse_*`` in
:mod:`kanfast.kernels.cpu_spline`): per (row, feature) the span by binary search over the
stored knots (any finite non-decreasing knots, uniform or not: no uniformity test, no
closed form), the ``k + 1`` non-zero bases by de Boor's triangle, contracted directly with
the coefficient rows ``W[i, m - k + r, :]`` of a table laid out ``(in, G + k, out)`` (each row
contiguous, the loop over ``out`` vectorised), plus the SiLU base term. No dense basis block,
no GEMM, no per-call knot tables: the knots are read where they are stored, and the kernel
checks them (finite, non-decreasing; O(in (G + 2k + 1)) compares) in the same call, so no
edit of the grid (in place, through ``.data``, ``load_state_dict``, ``update_grid``,
``extend_grid``, ``.to()``) can leave a stale constant behind. Backward: one more call gives
grad_x (k + 2 dot products per input), and the weight gradients by the transposed scatter
``gW[i, m - k + r, :] += B_r grad_y[b, :]`` over the rows in order (deterministic), turned
into the gradients of ``spline_weight``, ``spline_scaler`` and ``base_weight`` in the same
call. Weights whose bases are 0 on every row get exactly 0.

When (the size rule, :func:`chooses`): a call takes this path when the kernels are built,
x and the parameters are plain float32/float64 CPU tensors of one dtype (no dispatch/function
mode, no ``jit.trace``), and either its dense work ``rows x in x (G + k + 1) x out``
multiply-adds is at most :data:`SMALL_WORK` per thread of ``torch.get_num_threads()`` (every
small call: the dense engine's fixed cost of ~100 small torch ops per call dominates there),
or its coefficient table ``in x (G + k + 1) x out`` takes at most :data:`TABLE_BYTES`
(measured: the sparse kernel then beats the dense GEMMs, forward and backward, at every G).
Else the dense-block engine of :mod:`kanfast.torch_backend` runs. The rule is the same for
training and inference. Large calls are split by rows across the CPU workers
(:mod:`kanfast.cpu_workers`, same rule as the dense engine); backward then gives each worker a
partial weight gradient, summed in worker order: bit-repeatable for a given thread count
(not across thread counts). Inputs outside the knots, NaN and +-inf give the reference's
result (no spline term; the SiLU term carries NaN/inf); knots that are not finite and
non-decreasing make the kernel decline, and the caller falls back to the dense engine (whose
result on such knots is its own).

Memory: nothing saved but x (and the parameters); per thread one packed table of
``in x (G + k + 1) x out`` elements (forward) and one weight-gradient buffer of the same
size (backward, one per worker when split), kept between calls in the CPU engine's per-thread
cache (:func:`kanfast.torch_backend.release_buffers` frees them).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import cpu_buffers, cpu_workers
from .kernels import cpu_spline

__all__ = ["ENABLED", "SMALL_WORK", "TABLE_BYTES", "chooses", "forward", "backward"]

Tensor = torch.Tensor

#: Dense multiply-adds (rows x in x (G + k + 1) x out) per thread up to which a call takes the
#: sparse path whatever its coefficient table's size (the dense engine's fixed cost per call
#: is a few hundred microseconds of small torch ops).
SMALL_WORK = 1 << 24
#: Largest coefficient table (in x (G + k + 1) x out elements, in bytes) of the sparse path
#: for larger calls: its kernel reads the rows of the table it needs once per tile of 64 rows,
#: which stays cheap while the table sits in the last-level cache; past that the dense GEMMs,
#: which block for the cache, win (development VM, one thread, fwd+bwd: in = out = 256, batch
#: 4096: G = 5 (2.4 MB) sparse 148 ms / dense 163 ms, G = 10 168 / 275; in = out = 1024, batch
#: 256: G = 5 (37 MB) 379 / 238, G = 20 (96 MB) 968 / 667).
TABLE_BYTES = 16 << 20
#: Off: every call takes the dense engine (``KANFAST_SPARSE=0`` in the environment at import;
#: tests of the dense engine's own paths set it).
ENABLED = os.environ.get("KANFAST_SPARSE", "1").strip().lower() not in ("0", "false", "no", "off")

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _kernels():
    return cpu_spline.load()


def chooses(x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
            scale: Optional[Tensor]) -> bool:
    """Whether the layer call ``x (N, in)``, ``grid (in, G + 2k + 1)``, ``coef (out, in, G + k)``
    takes the sparse path (the documented size rule of the module docstring), its tensors
    permitting (CPU, one float32/float64 dtype, plain tensors, no recording mode)."""
    dt = x.dtype
    if not ENABLED or dt not in (torch.float32, torch.float64) or not x.is_cpu or x.dim() != 2 or coef.dim() != 3:
        return False
    for t in (x, grid, coef, base_weight, scale):  # (is_cpu: no device object per tensor)
        if t is not None and (type(t) not in _PLAIN or t.dtype != dt or not t.is_cpu):
            return False
    if not 0 <= k < cpu_spline.MAX_ORDER or coef.shape[2] < 1 or grid.shape[1] != coef.shape[2] + k + 1:
        return False
    if (
        torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
    ):
        return False
    N, nin = x.shape
    cols = coef.shape[2] + 1  # bases and the SiLU column per input
    work = N * nin * cols * coef.shape[0]
    table = nin * cols * coef.shape[0] * x.element_size()
    if work > SMALL_WORK * max(1, torch.get_num_threads()) and table > TABLE_BYTES:
        return False
    return _kernels() is not None


def _buffer(name: str, n: int, dtype: torch.dtype) -> Tensor:
    """A work buffer of at least ``n`` elements in the calling thread's cache of the CPU engine,
    kept between calls (freed by :func:`kanfast.torch_backend.release_buffers`, as the dense
    engine's)."""
    bufs = cpu_buffers.thread_buffers()
    key = ("sparse", name, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        bufs.pop(key, None)
        with torch.inference_mode(False):  # written through pointers only; never an inference tensor
            buf = bufs[key] = torch.empty(max(n, 1), dtype=dtype)
    return buf


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def forward(x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
            scale: Optional[Tensor] = None) -> Optional[Tensor]:
    """y ``(N, out)`` of the layer (module docstring) by the sparse kernel, or None when the
    kernel declines (knots not finite and non-decreasing; the caller falls back).

    Args: x ``(N, in)``; grid ``(in, G + 2k + 1)``; coef ``(out, in, G + k)`` spline weights;
    base_weight ``(out, in)`` or None (no SiLU term); k the spline order; scale ``(out, in)``
    or None (``W = coef * scale[..., None]``). All of one dtype on the CPU (:func:`chooses`)."""
    kern = _kernels()
    x = x if (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()
    grid, coef, base_weight, scale = _c(grid), _c(coef), _c(base_weight), _c(scale)
    nout, nin, nb = coef.shape
    N = x.shape[0]
    y = torch.empty(N, nout, dtype=x.dtype)
    nw = nin * nb * nout
    buf = _buffer("W", nw + nin * nout, x.dtype)
    parts = _parts(x, grid, coef, base_weight, scale)
    if len(parts) == 1:
        return None if kern.sparse_fwd(x, grid, k, coef, scale, base_weight, buf, buf[nw:], y, True) else y
    # the knots checked and the table packed once, by the caller; the workers share it (read-only)
    if kern.sparse_fwd(x[:0], grid, k, coef, scale, base_weight, buf, buf[nw:], y[:0], True):
        return None
    cpu_workers.run(
        lambda a, b: kern.sparse_fwd(x[a:b], grid, k, coef, scale, base_weight, buf, buf[nw:], y[a:b], False), parts
    )
    return y


def _parts(x, grid, coef, base_weight, scale):
    """Row ranges of the CPU workers (:mod:`kanfast.cpu_workers`, its rule on the dense work
    ``rows x in x (G + k + 1)``): one range runs inline."""
    N, nin = x.shape
    work = N * nin * (coef.shape[2] + 1)
    return cpu_workers.split(N, cpu_workers.worker_count(work, x, grid, coef, base_weight, scale))


def backward(grad_y: Tensor, x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
             scale: Optional[Tensor], need_x: bool, need_c: bool, need_b: bool, need_s: bool
             ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """``(grad_x, grad_coef, grad_base, grad_scale)`` of :func:`forward` (None where not
    needed), or None when the kernel declines the knots."""
    kern = _kernels()
    x = x if (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()
    grid, coef, base_weight, scale = _c(grid), _c(coef), _c(base_weight), _c(scale)
    grad_y = grad_y.contiguous()
    nout, nin, nb = coef.shape
    dt = x.dtype
    need_b = need_b and base_weight is not None
    need_s = need_s and scale is not None
    need_w = need_c or need_s
    nw = nin * nb * nout
    gx = torch.empty(x.shape, dtype=dt) if need_x else None
    tab = _buffer("W", nw + nin * nout, dt) if need_x else None
    tb = None if tab is None else tab[nw:]
    need_p = need_w or need_b
    parts = _parts(x, grid, coef, base_weight, scale)
    P = len(parts)
    stride = nw + nin * nout
    part = _buffer("gW", P * stride, dt) if need_p else None
    if P == 1:
        rc = kern.sparse_bwd(x, grid, k, grad_y, coef, scale, base_weight, tab, tb, gx, part,
                             part[nw:] if need_b else None, True)
        if rc:
            return None
    else:  # rows split across the workers, each its own partial weight gradient (summed in part order)
        if kern.sparse_bwd(x[:0], grid, k, grad_y[:0], coef, scale, base_weight, tab, tb, None, None, None, True):
            return None

        def rows(a, b):
            p = part[parts.index((a, b)) * stride:] if need_p else None
            kern.sparse_bwd(x[a:b], grid, k, grad_y[a:b], coef, scale, base_weight, tab, tb,
                            None if gx is None else gx[a:b], p, p[nw:] if (need_b and p is not None) else None, False)

        cpu_workers.run(rows, parts)
    gc = torch.empty(nout, nin, nb, dtype=dt) if need_c else None
    gs = torch.empty(nout, nin, dtype=dt) if need_s else None
    gb = torch.empty(nout, nin, dtype=dt) if need_b else None
    if need_p:
        kern.sparse_finish(part, P, stride, nin, nout, nb, need_b, coef, scale, gc, gs, gb)
    return gx, gc, gb, gs
