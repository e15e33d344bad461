"""Sparse contraction engine of the CPU backend (issue 18).

What: one KAN layer (Liu et al. 2024, eq. 2.10, efficient-kan's parameterisation)

    y[b, o] = sum_i base_weight[o, i] silu(x[b, i]) + sum_i sum_j W[o, i, j] B_j(x[b, i]),
    W = spline_weight * spline_scaler[..., None]

computed by compiled C calls (``kf_sparse_*`` in :mod:`kanfast.kernels.cpu_spline`; its header
has the algorithm): per (row, feature) the span by search over the stored knots (any finite
non-decreasing knots, uniform or not: no uniformity test, no closed form), the ``k + 1``
non-zero bases by de Boor's triangle, contracted directly with the coefficient rows they select
in a table packed per call as ``(in, G + 3k, out)`` (each row contiguous, k zero rows either side
of a feature's rows: no branch at the ends; the loops over ``out`` vectorised), plus the SiLU
base term. No dense basis block, no GEMM: k + 2 multiply-adds per (row, input, output) forward,
2k + 4 backward, whatever G. The knots are read where they are stored and checked (finite,
non-decreasing) in every call, so no edit of the grid (in place, through ``.data``,
``load_state_dict``, ``update_grid``, ``extend_grid``, ``.to()``) can leave a stale constant.
Forward: tiles of up to FWD_ROWS rows (:func:`_fwd_blocks`), per tile and feature the rows sorted
by span (the rows of one span share the table rows held in registers); rows split across threads
when the call's estimated time pays for the split (:func:`_workers`): where the kernels were built
with OpenMP (torch's runtime) the one C entry splits itself across the caller's OpenMP team
(:data:`OMP_WORKER_NS`), else (and in a forked child) the CPU workers of :mod:`kanfast.cpu_workers`
run ranges (:data:`WORKER_NS`). A call on one worker is one C entry per direction (``kf_sparse_fwd_call``: check, pack,
forward; ``kf_sparse_bwd_call``: check, non-finite grad_y rows, backward). Backward: split by input
features across the workers; per block of features (:func:`_bwd_features`) tiles of rows, each feature's rows sorted by span: grad_x (one dot product
per input), the transposed scatter ``gW[i, m + r, :] += B_r grad_y[b, :]`` into weight-gradient rows
held in registers while their span lasts, then the gradients of ``spline_weight``,
``spline_scaler`` and ``base_weight`` of those features written directly.

When (the size rule, :func:`chooses`): a call takes this path when the kernels are built,
x and the parameters are plain float32/float64 CPU tensors of one dtype (no dispatch/function
mode, no ``jit.trace``), and either its dense work ``rows x in x (G + k + 1) x out``
multiply-adds is at most :data:`SMALL_WORK` per thread of ``torch.get_num_threads()`` (every
small call: the dense engine's fixed cost of ~100 small torch ops per call dominates there),
or its coefficient table ``in x (G + k + 1) x out`` takes at most :data:`TABLE_BYTES`, or its
rows amortise the passes over a larger table (:data:`ROWS_PER_TABLE_ROW`). Else the dense-block
engine of :mod:`kanfast.torch_backend` runs. The rule is the same for training and inference.

Determinism: every y[b, o] is one chain of multiply-adds over the features in order, every
weight gradient one sum over all rows in a fixed order (tile by tile, by span within a tile), every
grad_x one dot product: nothing depends on how rows (forward) or features (backward) are split
across the workers, so the results are bit-identical run to run and for every thread count.

Non-finite values: inputs outside the knots, NaN and +-inf give the reference's result (no spline
term; the SiLU term carries NaN/inf). Weight gradients follow the reference's
``sum_b grad_y[b, o] B_j(x_bi)`` over every row: exactly 0 for a weight whose basis is 0 on every
row (finite grad_y), NaN where a non-finite ``grad_y[b, o]`` meets a basis that is 0 at row b
(0 * inf), and grad_x is NaN on such rows. Knots that are not finite and non-decreasing make the
kernel decline, and the caller falls back to the dense engine (whose result on such knots is
its own).

Memory: nothing saved but x (and the parameters). Kept between calls in the CPU engine's
per-thread cache (:func:`kanfast.torch_backend.release_buffers` frees them): the packed table,
``in x (G + 3k + 1) x out`` elements, one per calling thread (the workers share it; on one worker the forward tile follows it in the
same buffer); per worker
thread a forward tile (a sorted tile of R rows: ``R (k + 2)`` elements, ``3R + G + 2k + 1`` int32,
and when out is not a whole number of 64-byte vectors the tile's y padded to them) and a backward
block, at most ``max(BWD_BLOCK_BYTES, 2 (G + 3k + 1) out elements)`` (one feature's table rows and
gradient) plus its sorted tiles (``cpu_spline.BWD_GROUP`` of ``cpu_spline.BWD_ROWS`` rows). Per call:
the outputs and a list of the rows with a non-finite grad_y (one int64 per row). Nothing grows
with batch x G.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import cpu_buffers, cpu_workers
from .kernels import cpu_spline

__all__ = ["ENABLED", "SMALL_WORK", "TABLE_BYTES", "ROWS_PER_TABLE_ROW", "WORKER_NS", "OMP_WORKER_NS", "chooses", "forward",
           "backward"]

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
#: Past TABLE_BYTES the call is still sparse when its rows amortise the passes over the table
#: (packing it, forward and backward, and writing the weight gradient, O(in (G + 3k) out) each):
#: when rows x (3 (G + k + 1) - (3k + 6)) >= ROWS_PER_TABLE_ROW x (G + 3k), i.e. when the dense
#: multiply-adds it saves per (in, out) pair pay for its table rows. With the span-sorted kernels
#: the sparse path matches or beats the dense one down to small batches (development VM, quiet,
#: in = out = 1024, fwd+bwd, ms, dense / sparse: 1 thread, batch 64: G = 3 115 / 111, G = 5 122 /
#: 113, G = 20 374 / 244; batch 128: G = 3 132 / 139, G = 5 175 / 151; batch 256: G = 3 251 / 219,
#: G = 5 259 / 233, G = 20 816 / 380; 2 threads, batch 256: G = 5 172 / 117, G = 20 427 / 186),
#: hence the break-even at about 64 rows for G = 3 (it was 550 with the earlier kernels).
ROWS_PER_TABLE_ROW = 32
#: Forward tiles: at most FWD_ROWS rows per tile, fewer when the tile's y (rows x out, padded to
#: whole vectors) would exceed FWD_TILE_BYTES (each feature's rows of a tile are sorted by span:
#: the longer the tile, the more rows share the table rows held in registers; measured on the
#: development VM, batch 4096, 256 -> 256, one thread: G = 200 forward 164 / 97 / 77 ms at 256 /
#: 512 / 1024 rows, G = 5 49 / 46 / 45 ms), in chunks of FWD_NV vectors of 64 bytes of out.
FWD_ROWS = 1024
FWD_TILE_BYTES = 1 << 20
FWD_NV = 4
#: Backward: features per block so that their table rows and weight gradient take at most this.
BWD_BLOCK_BYTES = 512 << 10
#: The split rule (:func:`_workers`): a call's estimated time on one thread, ``pairs x (PAIR_NS +
#: VECTOR_NS x v) + table x TABLE_NS`` nanoseconds (pairs = rows x in, v the 64-byte vectors of one
#: row of out, table = in x (G + 3k) x out elements packed and swept per call), is split into
#: ``min(torch.get_num_threads(), estimate // WORKER_NS)`` parts, when that is 2 or more. A split
#: costs ~0.1-0.3 ms (waking the pool twice per forward, releasing the caller's OpenMP team) and
#: halves the rows each forward tile sorts, so it pays only for calls of a few milliseconds.
#: Development VM (AMD EPYC, 2 cores), quiet, kernel alone, one thread, ns per pair forward:
#: float32 out = 1 11.6, out = 64 15.8, out = 256 34.8; float64 out = 1 17.3, out = 256 83. Split (2
#: workers) against inline, the best of 9 interleaved samples, forward / fwd+bwd: 64 -> 64, batch
#: 1024 (estimate 1.05 ms): 1.14 / 1.35 (slower); 784 -> 10, batch 128 (1.2 ms): 1.37 / 1.20;
#: 784 -> 64, batch 128 (1.6 ms): 0.85 / 1.47; 784 -> 64, batch 192 (2.4 ms): 0.83 / 0.66; 128 -> 128,
#: batch 1024 (2.9 ms): 0.73 / 0.73; 256 -> 256, batch 256 (2.2 ms): 0.74 / 0.62; 256 -> 256, batch
#: 1024: 0.56 / 0.55. (The earlier rule, 2 workers from 65536 pairs whatever out, was tuned on a
#: loaded host and split the first two, which then ran slower.)
PAIR_NS = {4: 10.0, 8: 16.0}
VECTOR_NS = {4: 1.5, 8: 2.0}
TABLE_NS = 0.5
WORKER_NS = 1_000_000
#: The same rule's unit where the kernels were built with OpenMP (``CpuSplineKernels.openmp``; not in
#: a forked child): the one-entry C call splits itself across the caller's OpenMP team, whose fork
#: and join cost microseconds, so 2 threads from a 50 us estimate. Development VM, quiet, best of 9
#: interleaved samples, 2 threads against 1, forward / fwd+bwd: 16 -> 16, batch 64 (14 us): 0.93 /
#: 0.89; 64 -> 32, batch 256 (0.2 ms): 0.83 / 0.79; 64 -> 64, batch 1024: 0.69 / 0.67; 784 -> 64,
#: batch 128: 0.60 / 0.54; 256 -> 256, batch 256: 0.64 / 0.53; 64 -> 10, batch 4096: 0.52 / 0.52.
OMP_WORKER_NS = 25_000
#: Off: every call takes the dense engine (``KANFAST_SPARSE=0`` in the environment at import;
#: tests of the dense engine's own paths set it).
ENABLED = os.environ.get("KANFAST_SPARSE", "1").strip().lower() not in ("0", "false", "no", "off")

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_F32, _F64 = torch.float32, torch.float64


def _kernels():
    return cpu_spline.load()


#: True in a process forked from one that imported this module: libgomp is not fork-safe (a child's
#: parallel region would wait for the parent's team threads, which do not exist there), so a split
#: call there runs on the child's own Python worker pool (:mod:`kanfast.cpu_workers`), never on
#: the OpenMP team the one-entry calls use elsewhere.
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_team(kern) -> bool:
    """Whether split calls run as one C call on the caller's OpenMP team (the kernels built with
    OpenMP, not in a forked child), else on the Python worker pool."""
    return kern.openmp and not _forked


def chooses(x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
            scale: Optional[Tensor]) -> bool:
    """Whether the layer call ``x (N, in)``, ``grid (in, G + 2k + 1)``, ``coef (out, in, G + k)``
    takes the sparse path (the documented size rule of the module docstring), its tensors
    permitting (CPU, one float32/float64 dtype, plain tensors, no recording mode)."""
    dt = x.dtype
    if not ENABLED or (dt is not _F32 and dt is not _F64) or x.dim() != 2 or coef.dim() != 3 or grid.dim() != 2:
        return False
    for t in (x, grid, coef, base_weight, scale):  # (is_cpu: no device object per tensor)
        if t is not None and (type(t) not in _PLAIN or t.dtype is not dt or not t.is_cpu):
            return False
    nout, nin, nb = coef.shape
    if not 0 <= k < cpu_spline.MAX_ORDER or nb < 1 or grid.shape[1] != nb + k + 1:
        return False
    if (
        torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
    ):
        return False
    N = x.shape[0]
    work = N * nin * (nb + 1) * nout  # dense multiply-adds: the bases and the SiLU column per input
    if work > SMALL_WORK and work > SMALL_WORK * max(1, torch.get_num_threads()):
        table = nin * (nb + 1) * nout * dt.itemsize
        G = nb - k
        amortised = N * (3 * G - 3) >= ROWS_PER_TABLE_ROW * (G + 3 * k)  # rows pay for the table passes
        if table > TABLE_BYTES and not amortised:
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


def _fwd_blocks(nb: int, k: int, nout: int, dt: torch.dtype) -> Tuple[int, int, int]:
    """(R, FB, NV): the forward's tiles (the C header): R rows (FWD_ROWS, or fewer so that the
    tile's y takes at most FWD_TILE_BYTES; a multiple of 64), chunks of NV = FWD_NV vectors of 64
    bytes of out; FB sizes the work buffer (``fwd_work``) to cover a sorted tile
    (:meth:`~kanfast.kernels.cpu_spline.CpuSplineKernels.fwd_units`)."""
    s = dt.itemsize
    op = -(-nout // (64 // s)) * (64 // s)
    R = max(64, min(FWD_ROWS, FWD_TILE_BYTES // (op * s)) // 64 * 64)
    return R, cpu_spline.CpuSplineKernels.fwd_units(R, k, nb + k + 1, nout, dt), FWD_NV


def _bwd_features(nb: int, k: int, nout: int, dt: torch.dtype) -> int:
    """FB: features per block of the backward, so that their table rows and weight gradient,
    2 FB (nb + 2k + 1) out elements, fit BWD_BLOCK_BYTES (at least one feature)."""
    s = dt.itemsize
    return max(1, BWD_BLOCK_BYTES // (2 * (nb + 2 * k + 1) * nout * s))


def _kernel_layout(x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], scale: Optional[Tensor]):
    """The call's tensors as the kernels read them: x with unit feature stride, the rest contiguous
    (copies only where they are not)."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    if not grid.is_contiguous():
        grid = grid.contiguous()
    if not coef.is_contiguous():
        coef = coef.contiguous()
    if base_weight is not None and not base_weight.is_contiguous():
        base_weight = base_weight.contiguous()
    if scale is not None and not scale.is_contiguous():
        scale = scale.contiguous()
    return x, grid, coef, base_weight, scale


def forward(x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
            scale: Optional[Tensor] = None) -> Optional[Tensor]:
    """y ``(N, out)`` of the layer (module docstring) by the sparse kernel, or None when the
    kernel declines (knots not finite and non-decreasing; the caller falls back).

    Args: x ``(N, in)``; grid ``(in, G + 2k + 1)``; coef ``(out, in, G + k)`` spline weights;
    base_weight ``(out, in)`` or None (no SiLU term); k the spline order; scale ``(out, in)``
    or None (``W = coef * scale[..., None]``). All of one dtype on the CPU (:func:`chooses`).

    A call on one worker is one C entry (check, pack, forward: ``kf_sparse_fwd_call``), its
    table and work area in one cached buffer; split calls pack and run by ranges on the workers."""
    kern = _kernels()
    x, grid, coef, base_weight, scale = _kernel_layout(x, grid, coef, base_weight, scale)
    nout, nin, nb = coef.shape
    N, dt = x.shape[0], x.dtype
    y = torch.empty(N, nout, dtype=dt)
    nw = nin * (nb + 2 * k) * nout
    R, FB, NV = _fwd_blocks(nb, k, nout, dt)
    wlen = kern.fwd_work(R, FB, k, dt)
    team = _on_team(kern)
    P = _workers(x, grid, coef, base_weight, scale, team)
    if P == 1 or team:
        off_w = (nw + nin * nout + 15) & ~15  # (64-byte aligned work area after Wt and Bt)
        wall = P * ((wlen + 15) & ~15)  # (P > 1: the C call's team, a work area each)
        rc = kern.sparse_fwd_call(x, grid, k, coef, scale, base_weight, y, R, FB, NV,
                                  _buffer("W", off_w + wall, dt), nw, off_w, wall, P)
        if rc == 1:
            return None
        assert rc == 0, f"kf_sparse_fwd_call returned {rc}"
        return y
    if kern.sparse_check(grid):
        return None
    table = _buffer("W", nw + nin * nout, dt)  # the packed table (one per call, shared by the workers)
    Bt = table[nw:] if base_weight is not None else None

    def pack(a, b):
        kern.sparse_pack(a, b, k, coef, scale, base_weight, table[a * (nb + 2 * k) * nout:],
                         None if Bt is None else Bt[a * nout:])

    def rows(a, b):
        rc = kern.sparse_fwd(x[a:b], grid, k, table, Bt, y[a:b], R, FB, NV, _buffer("fwork", wlen, dt))
        assert rc == 0, f"kf_sparse_fwd returned {rc}"

    cpu_workers.run(pack, cpu_workers.split(nin, P))
    cpu_workers.run(rows, cpu_workers.split(N, P))
    return y


def _workers(x, grid, coef, base_weight, scale, team: bool) -> int:
    """Number of CPU workers for a call (1 runs inline): ``estimate // unit`` parts of the call's
    estimated time on one thread (the split rule at :data:`WORKER_NS`; the unit is
    :data:`OMP_WORKER_NS` where the C calls split themselves on the OpenMP team, ``team``), capped by
    :func:`kanfast.cpu_workers.worker_count` (threads, usable CPUs, tensor kinds, recording
    modes), to which the estimate is passed in its units of ``MIN_ELEMENTS`` per worker."""
    N, nin = x.shape
    nout, _, nb = coef.shape
    s = x.dtype.itemsize
    k = grid.shape[1] - nb - 1
    est = (N * nin * (PAIR_NS[s] + VECTOR_NS[s] * -(-nout * s // 64))
           + nin * (nb + 2 * k) * nout * TABLE_NS)
    unit = OMP_WORKER_NS if team else WORKER_NS
    if est < 2 * unit:
        return 1  # (worker_count's own first answer, without its calls)
    work = int(est / unit * cpu_workers.MIN_ELEMENTS)
    return cpu_workers.worker_count(work, x, grid, coef, base_weight, scale)


def backward(grad_y: Tensor, x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], k: int,
             scale: Optional[Tensor], need_x: bool, need_c: bool, need_b: bool, need_s: bool
             ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """``(grad_x, grad_coef, grad_base, grad_scale)`` of :func:`forward` (None where not
    needed), or None when the kernel declines the knots. Split by input features across the
    CPU workers, each weight gradient one sum over the rows in order: the same bits for any
    thread count. A call on one worker is one C entry (check, rows with a non-finite grad_y,
    backward: ``kf_sparse_bwd_call``)."""
    kern = _kernels()
    x, grid, coef, base_weight, scale = _kernel_layout(x, grid, coef, base_weight, scale)
    if not grad_y.is_contiguous():
        grad_y = grad_y.contiguous()
    nout, nin, nb = coef.shape
    N, dt = x.shape[0], x.dtype
    need_b = need_b and base_weight is not None
    need_s = need_s and scale is not None
    need_w = need_c or need_s
    if not (need_x or need_w or need_b):
        return None if kern.sparse_check(grid) else (None, None, None, None)
    gx = torch.empty(x.shape, dtype=dt) if need_x else None
    gc = torch.empty(nout, nin, nb, dtype=dt) if need_c else None
    gs = torch.empty(nout, nin, dtype=dt) if need_s else None
    gb = torch.empty(nout, nin, dtype=dt) if need_b else None
    # the rows with a NaN or +-inf in grad_y (the reference's 0 * inf)
    bad = torch.empty(N, dtype=torch.int64) if (need_w or need_x) and N else None
    FB = _bwd_features(nb, k, nout, dt)
    wlen = kern.bwd_work(FB, nb, k, nout, need_x, need_w or need_b, dt)
    team = _on_team(kern)
    P = _workers(x, grid, coef, base_weight, scale, team)
    if P == 1 or team:
        wall = P * ((wlen + 15) & ~15)
        rc = kern.sparse_bwd_call(x, grid, k, grad_y, coef, scale, base_weight, gx, gc, gs, gb, bad, FB,
                                  _buffer("bwork", wall, dt), P)
        if rc == 1:
            return None
        assert rc == 0, f"kf_sparse_bwd_call returned {rc}"
        return gx, gc, gb, gs
    if kern.sparse_check(grid):
        return None
    nbad = kern.sparse_bad_rows(grad_y, bad) if bad is not None else 0

    def feats(a, b):
        rc = kern.sparse_bwd(x, grid, k, grad_y, coef, scale, base_weight, a, b, gx, gc, gs, gb, nbad, bad, FB,
                             _buffer("bwork", wlen, dt))
        assert rc == 0, f"kf_sparse_bwd returned {rc}"

    cpu_workers.run(feats, cpu_workers.split(nin, P))
    return gx, gc, gb, gs
