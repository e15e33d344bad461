"""Triton backend: launchers, autograd and torch.library registration of the fused
KAN kernels in :mod:`kanfast.kernels.kan_spline`.

Entry point: :func:`kan_linear_triton` (same contract as
:func:`kanfast.torch_backend.kan_linear_torch`).

* CUDA tensors run the compiled kernels (autotuned per (in, out, G + k, k,
  dtype, uniform, base, precision), never per batch size).
* CPU tensors run the same kernels through Triton's interpreter, for
  validation only (slow). If ``TRITON_INTERPRET=1`` was not set before Triton was
  imported, an interpreted copy of the kernel module is loaded on first use (the
  environment is restored afterwards), so no global setting is needed. The
  interpreter is not thread-safe: interpreted launches hold a lock (one at a time,
  whichever threads make them); compiled GPU launches do not.
* float64 falls back to the torch backend (Triton's ``tl.dot`` has no useful
  fp64 path).
* Wide layers at fine grids take the wide-layer path (:func:`use_wide_path`:
  float16/bfloat16, ``out >= 128`` and ``G >= 50``, where the static sm_90 model
  says it wins): per chunk of rows a Triton
  kernel (:mod:`kanfast.kernels.basis_block`) writes the dense basis block
  ``D = [silu(x) | B(x)]`` in x's dtype, and ``torch.mm`` (cuBLAS) makes
  ``y = D @ Wcat^T``, ``grad_W = grad_y^T @ D`` (fp32, chunks summed in a fixed
  order) and ``gD = grad_y @ Wcat`` (reduced to grad_x by a second kernel). Chunks
  are sized so D is about half the assumed 50 MB L2 (:data:`WIDE_L2_BYTES`): memory
  flat in batch x G. Only x and the weights are saved. ``KANFAST_TRITON_WIDE=auto|wide|fused``
  (read at import) forces either path. On this path float32 products follow torch's
  matmul precision setting (not :func:`set_fp32_precision`), and on CUDA
  ``torch.use_deterministic_algorithms(True)`` needs ``CUBLAS_WORKSPACE_CONFIG``
  set, as for any cuBLAS call.

float32 uses TF32 tensor cores by default on the GPU; call
``set_fp32_precision("ieee")``, pass ``fp32_precision="ieee"``, or set the
environment variable ``KANFAST_TRITON_FP32=ieee`` for IEEE fp32 products (CPU
runs are always IEEE). float16/bfloat16 multiply in their own dtype and accumulate in fp32;
the output has the input's dtype.

Determinism: no atomics; the backward is bit-identical run to run in a process.
Across processes the autotuner may pick other tile sizes (another summation
order): ``torch.use_deterministic_algorithms(True)`` pins each kernel to its
first config, so results are then bit-identical across processes as well.

Ops registered with :mod:`torch.library` (``custom_op``, so the kernels stay
opaque to ``torch.compile`` and ``fullgraph=True`` traces through them):
``kanfast::kan_linear_triton_fwd`` and ``kanfast::kan_linear_triton_bwd``.
"""

from __future__ import annotations

import importlib.util
import math
import contextlib
import os
import threading
import weakref
from typing import Optional, Tuple

import torch

from .knots import grid_is_uniform
from .knots import pad_knots as _pad_knots
from .torch_backend import kan_linear_torch

__all__ = [
    "AVAILABLE", "kan_linear_triton", "set_fp32_precision", "get_fp32_precision", "use_wide_path",
    "MAX_SPLINE_ORDER", "MAX_N_BASIS",
]

def _load_kernel_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


try:  # pragma: no cover - depends on the installation
    import triton  # noqa: F401
    from triton import knobs as _knobs

    from .kernels import kan_spline as _kmod
    from .kernels import basis_block as _bmod

    AVAILABLE = True
except Exception:  # pragma: no cover
    _kmod = None
    _bmod = None
    AVAILABLE = False

#: Largest spline order k and number of bases G + k the kernels accept (see kanfast/kernels/kan_spline.py).
MAX_SPLINE_ORDER = _kmod.MAX_SPLINE_ORDER if _kmod is not None else 7
MAX_N_BASIS = _kmod.MAX_N_BASIS if _kmod is not None else 4096

#: float32 dot precision on the GPU; the environment variable KANFAST_TRITON_FP32=ieee|tf32 sets the default.
_FP32_PRECISION = os.environ.get("KANFAST_TRITON_FP32", "tf32").strip().lower()
if _FP32_PRECISION not in ("tf32", "ieee"):
    raise ValueError(f"KANFAST_TRITON_FP32 must be 'tf32' or 'ieee', got {_FP32_PRECISION!r}")
_interp_mod = None
#: Triton's interpreter is not thread-safe (it patches triton.language and keeps the launch
#: grid in module state for the duration of a launch): interpreted launches, and the one-time
#: interpreter setup, run one at a time. Compiled GPU launches are not serialised.
_INTERPRETER_LOCK = threading.Lock()
_SETUP_LOCK = threading.Lock()


def _fresh_locks() -> None:
    """In a forked child: fresh locks (a parent thread that held one does not exist here)."""
    global _INTERPRETER_LOCK, _SETUP_LOCK
    _INTERPRETER_LOCK, _SETUP_LOCK = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks)


def set_fp32_precision(precision: str) -> None:
    """Product precision of float32 ``tl.dot`` on the GPU: ``"tf32"`` (default) or ``"ieee"``."""
    global _FP32_PRECISION
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32' or 'ieee', got {precision!r}")
    _FP32_PRECISION = precision


def get_fp32_precision() -> str:
    """Current float32 dot precision (see :func:`set_fp32_precision`)."""
    return _FP32_PRECISION


_INDEX_FIXED = False


def _fix_interpreter_index() -> None:
    """Let Triton's interpreter use runtime scalars as ``range`` bounds under numpy >= 2.4.

    The interpreter (triton 3.6) implements ``tensor.__index__`` as
    ``int(handle.data)`` on a shape-(1,) array, which numpy 2.4 rejects
    (TypeError: only 0-dimensional arrays can be converted to Python scalars), so
    every ``for i in range(0, n, BLOCK)`` with a runtime ``n`` fails. We wrap the
    interpreter's per-launch tensor patching to install a size-1 tolerant
    ``__index__``; it is undone with the rest of the interpreter's patches after
    each launch. Applied only when the bug is present.
    """
    global _INDEX_FIXED
    if _INDEX_FIXED:
        return
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        _INDEX_FIXED = True
        return
    except TypeError:
        pass
    from triton.runtime import interpreter as _interp

    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - a triton without this hook
        _INDEX_FIXED = True
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _INDEX_FIXED = True


def _kernels(device: torch.device):
    """The kernel module for tensors on ``device`` (compiled for CUDA, interpreted for CPU)."""
    global _interp_mod
    if not AVAILABLE:
        raise RuntimeError("kanfast triton backend: triton is not installed or failed to import")
    if _kmod.INTERPRETED:
        if not _INDEX_FIXED:
            with _SETUP_LOCK:
                _fix_interpreter_index()
        return _kmod
    if device.type == "cuda":
        return _kmod
    if device.type != "cpu":
        raise RuntimeError(f"kanfast triton backend supports CUDA tensors (and CPU through the interpreter), got {device}")
    if _interp_mod is not None:
        return _interp_mod
    with _SETUP_LOCK:  # one copy, and the knob scope below is process-global
        if _interp_mod is not None:
            return _interp_mod
        # A private copy of the kernel module, decorated while the interpreter knob is on;
        # knobs.runtime.scope() restores the knob and TRITON_INTERPRET afterwards.
        with _knobs.runtime.scope():
            _knobs.runtime.interpret = True
            mod = _load_kernel_file("kanfast.kernels._kan_spline_interpreted", _kmod.__file__)
        if not mod.INTERPRETED:  # pragma: no cover
            raise RuntimeError(
                "kanfast triton backend: running on CPU tensors needs Triton's interpreter; "
                "set TRITON_INTERPRET=1 in the environment before importing triton"
            )
        _fix_interpreter_index()
        _interp_mod = mod
        return _interp_mod


# ----------------------------------------------------------------- knot setup
_GRID_CACHE: dict = {}


def _grid_info(grid: torch.Tensor, k: int):
    """(uniform, padded knots, t0, t_last, 1/h, kernel table) of ``grid`` (see
    :func:`_knot_tables`), cached per grid tensor object, version counter and k: the
    uniformity test costs a host sync, paid once per grid change (update_grid writes the
    buffer in place, which bumps its version)."""
    key = id(grid)
    hit = _GRID_CACHE.get(key)
    if hit is not None and hit[0]() is grid and hit[1] == grid._version and hit[2] == k and hit[3] == grid.device:
        return hit[4]
    info = (grid_is_uniform(grid),) + _knot_tables(grid, k)
    try:
        ref = weakref.ref(grid, lambda _r, key=key: _GRID_CACHE.pop(key, None))
        _GRID_CACHE[key] = (ref, grid._version, k, grid.device, info)
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return info


def forget_grid(grid: torch.Tensor) -> None:
    """Drop the cached knot tables of ``grid`` (after it was written without a version
    bump, e.g. through ``grid.data``); :meth:`FastKANLayer.refresh_grid_cache` calls it."""
    _GRID_CACHE.pop(id(grid), None)


def _knot_tables(grid: torch.Tensor, k: int):
    """fp32 (padded knots tp (in, n + 2k), t0 (in,), t_last (in,), 1/h (in,), table (in, n + 2k, k + 1))
    for the kernels, computed once per grid change (see :func:`_grid_info`).

    ``table[i, a, 0] = tp[i, a]`` and ``table[i, a, p] = 1 / (tp[i, a + p] - tp[i, a])``
    (p = 1..k; 0 where that difference is not positive or ``a + p`` is past the row): the
    fused kernels' de Boor triangle multiplies by these instead of dividing, all of an
    element's gathers at constant offsets from one address. The reciprocals are those of the
    exact differences of the fp32 knots, rounded once (computed in float64; float32 where the
    device has no float64). ``h = (t_last - t0) / (n - 1)`` (fp32) and 1/h likewise. The wide
    path's kernels read ``tp``."""
    g = grid.detach().to(torch.float32).contiguous()
    n = g.shape[1]
    tp = _pad_knots(g, k).contiguous()
    t0 = g[:, 0].contiguous()
    tn = g[:, -1].contiguous()
    wide = torch.float64 if tp.device.type in ("cpu", "cuda") else torch.float32
    h = (tn - t0) / (n - 1)
    hinv = (1.0 / h.to(wide)).to(torch.float32).contiguous()
    tw = tp.to(wide)
    cols = [tp]
    for p in range(1, k + 1):
        d = torch.zeros_like(tw)
        d[:, : tw.shape[1] - p] = tw[:, p:] - tw[:, :-p]
        cols.append(torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0).to(torch.float32))
    table = torch.stack(cols, dim=2).contiguous()
    return tp, t0, tn, hinv, table


def _prec(dtype: torch.dtype, ieee: bool) -> str:
    return "ieee" if (ieee or dtype != torch.float32) else "tf32"


def _n_steps(n_knots: int) -> int:
    return max(1, math.ceil(math.log2(max(2, n_knots - 1))))


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """x unless its last dim is strided (then a contiguous copy)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


# ------------------------------------------------------------------- launchers
def _launch(kernel, grid_fn, *args, interpreted: bool, **kwargs):
    """Launch an autotuned kernel. Under ``torch.use_deterministic_algorithms(True)`` the
    first (fixed) config is used instead of the autotuned one, so results are
    bit-identical across processes too (autotuning may pick different tile sizes,
    hence a different summation order, in different processes). ``interpreted``: the
    kernel runs in Triton's interpreter, so the launch holds :data:`_INTERPRETER_LOCK`."""
    with _INTERPRETER_LOCK if interpreted else contextlib.nullcontext():
        if torch.are_deterministic_algorithms_enabled() and hasattr(kernel, "configs"):
            cfg = kernel.configs[0]
            meta = {**kwargs, **cfg.kwargs}
            kernel.fn[grid_fn(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            kernel[grid_fn](*args, **kwargs)


#: Basis indices per chunk of the fused forward / grad_x kernels' contraction (a power of two): each
#: dot has K = BLOCK_I * chunk (forward) or N = BLOCK_I * chunk (grad_x); G + k is padded to a multiple.
MAX_J_CHUNK = 8


def _j_chunks(nb: int) -> Tuple[int, int]:
    """(JC, NC): basis indices per chunk (the next power of two >= nb, at most MAX_J_CHUNK) and chunks."""
    jc = min(MAX_J_CHUNK, 1 << max(0, (nb - 1).bit_length()))
    return jc, -(-nb // jc)


def _chunked_coef(coef: torch.Tensor, jc: int, nc: int) -> torch.Tensor:
    """coef (out, in, nb) zero-padded to nc * jc bases and viewed (out, in, nc, jc)."""
    nout, nin, nb = coef.shape
    return torch.nn.functional.pad(coef.detach(), (0, nc * jc - nb)).view(nout, nin, nc, jc)


def _forward(x, grid, coef, base_weight, k, ieee):
    N, nin = x.shape
    nout, _, nb = coef.shape
    y = torch.empty(N, nout, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    if _wide_selected(nin, nout, nb - k, k, x.dtype):
        return _wide_forward(x, grid, coef, base_weight, k, y)
    km = _kernels(x.device)
    x = _row_major(x)
    uniform, _, t0, tn, hinv, table = _grid_info(grid, k)
    n_knots = grid.shape[1]
    jc, nc = _j_chunks(nb)
    w = _chunked_coef(coef, jc, nc).permute(2, 1, 3, 0).contiguous()  # (nc, in, jc, out)
    has_base = base_weight is not None
    wb = base_weight.detach() if has_base else w  # dummy pointer when absent
    s_wbo, s_wbi = (wb.stride(0), wb.stride(1)) if has_base else (0, 0)

    def grid_fn(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(nout, meta["BLOCK_O"]))

    _launch(
        km.kan_fwd_kernel_fp32 if x.dtype == torch.float32 else km.kan_fwd_kernel, grid_fn,
        x, table, t0, tn, hinv, w, wb, y,
        N, nin, nout, nb, n_knots, _n_steps(n_knots),
        x.stride(0), x.stride(1), s_wbo, s_wbi, y.stride(0), y.stride(1),
        UNIFORM=uniform, K=k, HAS_BASE=has_base, PREC=_prec(x.dtype, ieee), JC=jc, NC=nc,
        interpreted=km.INTERPRETED,
    )
    return y


#: Tests set this to force several batch splits in the weight-gradient kernels on CPU.
_SPLIT_ROWS_OVERRIDE: Optional[int] = None
#: Nominal tile of the weight-gradient kernels for the batch-split count (which must not depend on
#: the autotuned config): (in, out, basis indices) of kan_bwd_w_kernel's first config, and the in
#: width of kan_bwd_base_kernel's.
_W_NOMINAL_TILE = (16, 256, 8, 128)


def _split_rows(N: int, n_programs: int, device: torch.device) -> int:
    """Rows per batch split of the weight-gradient kernel (a function of shapes only: deterministic)."""
    if _SPLIT_ROWS_OVERRIDE is not None:
        return int(_SPLIT_ROWS_OVERRIDE)
    if device.type != "cuda":
        return max(N, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(-(-4 * sms // max(1, n_programs)), -(-N // 1024), 64))
    rows = -(-N // splits)
    return max(256, -(-rows // 256) * 256)


def _backward(grad_y, x, grid, coef, base_weight, k, ieee, need_x, need_coef, need_base):
    N, nin = x.shape
    nout, _, nb = coef.shape
    has_base = base_weight is not None
    gx = torch.empty(0, dtype=x.dtype, device=x.device)
    gc = torch.empty(0, dtype=coef.dtype, device=x.device)
    gb = torch.empty(0, dtype=coef.dtype, device=x.device)
    if need_x:
        gx = torch.empty(N, nin, dtype=x.dtype, device=x.device)
    if N == 0:
        if need_coef:
            gc = torch.zeros_like(coef)
        if need_base and has_base:
            gb = torch.zeros_like(base_weight)
        return gx, gc, gb
    if _wide_selected(nin, nout, nb - k, k, x.dtype):
        return _wide_backward(grad_y, x, grid, coef, base_weight, k, gx, need_x, need_coef, need_base)
    km = _kernels(x.device)
    x = _row_major(x)
    grad_y = _row_major(grad_y)
    uniform, _, t0, tn, hinv, table = _grid_info(grid, k)
    n_knots = grid.shape[1]
    steps = _n_steps(n_knots)
    prec = _prec(x.dtype, ieee)
    if need_x:
        jc, nc = _j_chunks(nb)
        wt = _chunked_coef(coef, jc, nc).permute(2, 0, 1, 3).contiguous()  # (nc, out, in, jc)
        wb = base_weight.detach() if has_base else wt
        s_wbo, s_wbi = (wb.stride(0), wb.stride(1)) if has_base else (0, 0)

        def grid_x(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(nin, meta["BLOCK_I"] * meta["SUB"]))

        _launch(
            km.kan_bwd_x_kernel_fp32 if x.dtype == torch.float32 else km.kan_bwd_x_kernel, grid_x,
            x, table, t0, tn, hinv, wt, wb, grad_y, gx,
            N, nin, nout, nb, n_knots, steps,
            x.stride(0), x.stride(1), s_wbo, s_wbi, grad_y.stride(0), grad_y.stride(1), gx.stride(0), gx.stride(1),
            UNIFORM=uniform, K=k, HAS_BASE=has_base, PREC=prec, JC=jc, NC=nc, interpreted=km.INTERPRETED,
        )
    want_base = need_base and has_base
    # grad_W and grad_base_weight: per-split fp32 partials summed in a fixed order (no atomics)
    if need_coef:
        nominal = -(-nin // _W_NOMINAL_TILE[0]) * -(-nout // _W_NOMINAL_TILE[1]) * -(-nb // _W_NOMINAL_TILE[2])
        rows = _split_rows(N, nominal, x.device)
        splits = -(-N // rows)
        part = torch.empty(splits, nout, nb, nin, dtype=torch.float32, device=x.device)

        def grid_w(meta, splits=splits):
            return (triton.cdiv(nin, meta["BLOCK_I"]) * triton.cdiv(nout, meta["BLOCK_O"]),
                    triton.cdiv(nb, meta["SLOTS"]), splits)

        _launch(
            km.kan_bwd_w_kernel, grid_w,
            x, table, t0, tn, hinv, grad_y, part,
            N, nin, nout, nb, n_knots, steps, rows,
            x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
            UNIFORM=uniform, K=k, PREC=prec, interpreted=km.INTERPRETED,
        )
        total = part[0] if splits == 1 else part.sum(0)  # fixed-order reduction: deterministic
        # a fresh tensor (never a view of the partials: custom-op outputs must not alias)
        gc = torch.empty_like(coef, memory_format=torch.contiguous_format)
        gc.copy_(total.permute(0, 2, 1))
    if want_base:
        nominal = -(-nin // _W_NOMINAL_TILE[3]) * -(-nout // _W_NOMINAL_TILE[1])
        rows = _split_rows(N, nominal, x.device)
        splits = -(-N // rows)
        part = torch.empty(splits, nin, nout, dtype=torch.float32, device=x.device)

        def grid_b(meta, splits=splits):
            return (triton.cdiv(nin, meta["BLOCK_I"]) * triton.cdiv(nout, meta["BLOCK_O"]), splits)

        _launch(
            km.kan_bwd_base_kernel, grid_b,
            x, grad_y, part,
            N, nin, nout, rows,
            x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
            PREC=prec, interpreted=km.INTERPRETED,
        )
        total = part[0] if splits == 1 else part.sum(0)
        gb = torch.empty_like(base_weight, memory_format=torch.contiguous_format)
        gb.copy_(total.t())
    return gx, gc, gb


# ------------------------------------------------------------ wide-layer path
# y = D @ Wcat^T per chunk of rows, D the dense basis block written by a Triton kernel
# (kanfast/kernels/basis_block.py), the products by torch.mm (cuBLAS on the GPU).

#: Assumed L2 cache size of the target GPU (H100/H200: 50 MB; not queried). The wide path
#: sizes a chunk's basis block D to half of it, so that D and the backward's gD chunk fit
#: in L2 together.
WIDE_L2_BYTES = 50 * 10**6
#: Smallest rows per chunk (a GEMM needs some rows to run at rate; past this the block
#: outgrows L2 but stays flat in batch).
WIDE_MIN_CHUNK_ROWS = 128
#: Path choice: "auto" (the rule of :func:`use_wide_path`), "wide" or "fused" (forced);
#: the environment variable KANFAST_TRITON_WIDE sets it at import.
_WIDE_MODE = os.environ.get("KANFAST_TRITON_WIDE", "auto").strip().lower()
if _WIDE_MODE not in ("auto", "wide", "fused"):
    raise ValueError(f"KANFAST_TRITON_WIDE must be 'auto', 'wide' or 'fused', got {_WIDE_MODE!r}")
#: Tests set this to force small chunks (several per batch) on CPU.
_WIDE_CHUNK_ROWS_OVERRIDE: Optional[int] = None
_interp_bmod = None


def use_wide_path(in_features: int, out_features: int, grid_size: int, spline_order: int, dtype: torch.dtype) -> bool:
    """True when the wide-layer path (dense basis block + ``torch.mm``) is chosen over the
    fused kernels for a layer of this shape and dtype (KANFAST_TRITON_WIDE=auto).

    Rule: float16/bfloat16, ``out_features >= 128`` and ``grid_size >= 50``.

    Why: the static sm_90 model (``benchmarks/wide_model.py`` on ``benchmarks/gpu_model.py``;
    a MODEL, not a measurement; it assumes cuBLAS reaches 790 TFLOP/s on every GEMM) at
    batch 65536, k = 3, bf16, forward + backward, wide vs fused (the kernels of issue 17:
    long-K forward and grad_x, grad_W v2, cardinal-piece basis), in x out: at G = 5,
    1024 x 1024: 7.76 vs 6.62 ms; 256 x 256: 1.05 vs 0.55; 128 x 256: 0.52 vs 0.30;
    1024 x 128: 3.85 vs 1.67; 1024 x 64: 3.84 vs 1.51; 64 x 1024: 0.49 vs 0.51 (the only
    G = 5 shape where wide wins, by 4%); at G = 50, 1024 x 1024: 38.9 vs 40.0 ms. The fused
    kernels pay for the zero bases of their dense tiles like the wide path's GEMMs, but
    their forward spills at G = 50 and their L2 traffic grows with G, so the wide path
    (cuBLAS at the dense rate) takes over at fine grids; ``out >= 128`` keeps the GEMMs
    wide enough to pay for the basis block. G between 5 and 50 was not modelled: the
    threshold is the modelled point, not a crossover. float32 stays on the fused
    kernels: cuBLAS float32 follows torch's matmul precision setting (IEEE by default, far
    below the fused kernels' TF32), not :func:`set_fp32_precision`. Figures and commands:
    ``benchmarks/results/wide_model_*.json``, ``gpu_model_v2_G*.json``.

    Args:
        in_features, out_features, grid_size (G), spline_order (k): the layer's sizes.
        dtype: the compute dtype (x's dtype).

    Returns:
        bool; a pure function of its arguments.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return out_features >= 128 and grid_size >= 50


def _wide_selected(nin: int, nout: int, G: int, k: int, dtype: torch.dtype) -> bool:
    if _WIDE_MODE == "wide":
        return True
    if _WIDE_MODE == "fused":
        return False
    return use_wide_path(nin, nout, G, k, dtype)


def _wide_kernels(device: torch.device):
    """The basis-block kernel module for ``device`` (compiled, or an interpreted copy on CPU)."""
    global _interp_bmod
    if _kernels(device) is _kmod:  # compiled for CUDA, or everything interpreted (TRITON_INTERPRET=1)
        return _bmod
    if _interp_bmod is not None:
        return _interp_bmod
    with _SETUP_LOCK:
        if _interp_bmod is None:
            with _knobs.runtime.scope():
                _knobs.runtime.interpret = True
                _interp_bmod = _load_kernel_file("kanfast.kernels._basis_block_interpreted", _bmod.__file__)
        return _interp_bmod


def _wide_chunk_rows(n_cols: int, elt: int) -> int:
    """Rows per chunk: the basis block D of a chunk takes about half the assumed L2."""
    if _WIDE_CHUNK_ROWS_OVERRIDE is not None:
        return int(_WIDE_CHUNK_ROWS_OVERRIDE)
    rows = (WIDE_L2_BYTES // 2) // max(1, n_cols * elt)
    return max(WIDE_MIN_CHUNK_ROWS, rows // WIDE_MIN_CHUNK_ROWS * WIDE_MIN_CHUNK_ROWS)


#: Basis columns per feature in the wide path's block: G + k rounded up to a multiple of this
#: (16 bytes of a 16-bit dtype: each feature's slice starts aligned, so stores vectorise).
WIDE_COL_ALIGN = 8


def _wide_nbp(nb: int) -> int:
    return -(-nb // WIDE_COL_ALIGN) * WIDE_COL_ALIGN


def _wide_weights(coef, base_weight, dtype):
    """Wcat (out, [in] + in * nbp) = [base_weight | coef zero-padded to nbp, reshaped] in ``dtype``."""
    nout, nin, nb = coef.shape
    nbp = _wide_nbp(nb)
    w = torch.nn.functional.pad(coef.detach().to(dtype), (0, nbp - nb)).reshape(nout, nin * nbp)
    if base_weight is None:
        return w.contiguous()
    return torch.cat([base_weight.detach().to(dtype), w], dim=1)


def _wide_cfg(bm, nb):
    """(basis-block config, grad_x config). On the GPU: ptxas for sm_90 (bf16, k = 1..7)
    reports no spills for either; the block kernel uses 105-246 registers (162 at k = 3:
    3 CTAs of 4 warps per SM), the grad_x kernel 61-103 (80 at k = 3)."""
    if bm.INTERPRETED:
        cfg = dict(BLOCK_N=16, BLOCK_I=16, NBP=_wide_nbp(nb), num_warps=1)
        return dict(cfg, BLOCK_J=16), cfg
    return (dict(BLOCK_N=16, BLOCK_I=16, BLOCK_J=8, NBP=_wide_nbp(nb), num_warps=4),
            dict(BLOCK_N=32, BLOCK_I=16, NBP=_wide_nbp(nb), num_warps=4))


def _basis_block(bm, xc, tables, nb, k, has_base, d):
    """Fill d (rows, C) with the basis block of the rows xc (rows, in)."""
    tp, t0, tn, n_knots = tables
    rows, nin = xc.shape
    cfg, _ = _wide_cfg(bm, nb)
    _launch(
        bm.basis_block_kernel, lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(nin, meta["BLOCK_I"])),
        xc, tp, t0, tn, d,
        rows, nin, nb, n_knots, _n_steps(n_knots),
        xc.stride(0), xc.stride(1), d.stride(0),
        K=k, HAS_BASE=has_base, **cfg, interpreted=bm.INTERPRETED,
    )


def _acc_gemm(acc, a, b):
    """acc (fp32) += a @ b, the product accumulated in fp32 whatever a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.device.type != "cpu":  # CUDA (and meta tensors): a 16-bit GEMM with fp32 output
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError):  # pragma: no cover - a torch without mm(out_dtype=)
            pass
    acc.addmm_(a.float(), b.float())


def _wide_forward(x, grid, coef, base_weight, k, y):
    """y (N, out) = D_chunk @ Wcat^T for each chunk of rows (only x and the weights are read)."""
    N, nin = x.shape
    nout, _, nb = coef.shape
    bm = _wide_kernels(x.device)
    x = _row_major(x)
    _, tp, t0, tn, _, _ = _grid_info(grid, k)
    tables = (tp, t0, tn, grid.shape[1])
    has_base = base_weight is not None
    wt = _wide_weights(coef, base_weight, x.dtype).t()
    rows = _wide_chunk_rows(wt.shape[0], x.element_size())
    d = torch.empty(min(rows, N), wt.shape[0], dtype=x.dtype, device=x.device)
    for a in range(0, N, rows):
        b = min(N, a + rows)
        dc = d[: b - a]
        _basis_block(bm, x[a:b], tables, nb, k, has_base, dc)
        torch.mm(dc, wt, out=y[a:b])
    return y


def _wide_backward(grad_y, x, grid, coef, base_weight, k, gx, need_x, need_coef, need_base):
    """Per chunk (in a fixed order): D recomputed from x; grad_x from gD = grad_y @ Wcat by
    :func:`basis_grad_x_kernel`; grad_Wcat += grad_y^T @ D in fp32 (no atomics)."""
    N, nin = x.shape
    nout, _, nb = coef.shape
    has_base = base_weight is not None
    want_base = need_base and has_base
    gc = torch.empty(0, dtype=coef.dtype, device=x.device)
    gb = torch.empty(0, dtype=coef.dtype, device=x.device)
    bm = _wide_kernels(x.device)
    x = _row_major(x)
    grad_y = _row_major(grad_y.to(x.dtype))
    _, tp, t0, tn, _, _ = _grid_info(grid, k)
    tables = (tp, t0, tn, grid.shape[1])
    n_knots = grid.shape[1]
    wcat = _wide_weights(coef, base_weight, x.dtype)
    n_cols = wcat.shape[1]
    rows = _wide_chunk_rows(n_cols, x.element_size())
    want_w = need_coef or want_base
    d = torch.empty(min(rows, N), n_cols, dtype=x.dtype, device=x.device) if want_w else None
    gd = torch.empty(min(rows, N), n_cols, dtype=x.dtype, device=x.device) if need_x else None
    acc = torch.zeros(nout, n_cols, dtype=torch.float32, device=x.device) if want_w else None
    _, cfg = _wide_cfg(bm, nb)
    for a in range(0, N, rows):
        b = min(N, a + rows)
        xc, gyc = x[a:b], grad_y[a:b]
        if need_x:
            gdc = gd[: b - a]
            torch.mm(gyc, wcat, out=gdc)
            gxc = gx[a:b]
            _launch(
                bm.basis_grad_x_kernel,
                lambda meta: (triton.cdiv(b - a, meta["BLOCK_N"]), triton.cdiv(nin, meta["BLOCK_I"])),
                xc, tp, t0, tn, gdc, gxc,
                b - a, nin, nb, n_knots, _n_steps(n_knots),
                xc.stride(0), xc.stride(1), gdc.stride(0), gxc.stride(0), gxc.stride(1),
                K=k, HAS_BASE=has_base, **cfg, interpreted=bm.INTERPRETED,
            )
        if want_w:
            dc = d[: b - a]
            _basis_block(bm, xc, tables, nb, k, has_base, dc)
            _acc_gemm(acc, gyc.t(), dc)
    base = nin if has_base else 0
    # fresh tensors (never views of acc: custom-op outputs must not alias)
    if need_coef:
        gc = torch.empty_like(coef, memory_format=torch.contiguous_format)
        gc.copy_(acc[:, base:].reshape(nout, nin, -1)[:, :, :nb])
    if want_base:
        gb = torch.empty_like(base_weight, memory_format=torch.contiguous_format)
        gb.copy_(acc[:, :nin])
    return gx, gc, gb


# ------------------------------------------------------------ torch.library ops
@torch.library.custom_op("kanfast::kan_linear_triton_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, grid: torch.Tensor, coef: torch.Tensor, base_weight: Optional[torch.Tensor], spline_order: int, ieee: bool
) -> torch.Tensor:
    return _forward(x, grid, coef, base_weight, spline_order, ieee)


@_fwd_op.register_fake
def _(x, grid, coef, base_weight, spline_order, ieee):
    return x.new_empty(x.shape[0], coef.shape[0])


@torch.library.custom_op("kanfast::kan_linear_triton_bwd", mutates_args=())
def _bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    grid: torch.Tensor,
    coef: torch.Tensor,
    base_weight: Optional[torch.Tensor],
    spline_order: int,
    ieee: bool,
    need_x: bool,
    need_coef: bool,
    need_base: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_y, x, grid, coef, base_weight, spline_order, ieee, need_x, need_coef, need_base)


@_bwd_op.register_fake
def _(grad_y, x, grid, coef, base_weight, spline_order, ieee, need_x, need_coef, need_base):
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gc = coef.new_empty(coef.shape) if need_coef else coef.new_empty(0)
    gb = base_weight.new_empty(base_weight.shape) if (need_base and base_weight is not None) else coef.new_empty(0)
    return gx, gc, gb


def _setup_context(ctx, inputs, output):
    x, grid, coef, base_weight, spline_order, ieee = inputs
    ctx.save_for_backward(x, grid, coef, base_weight)
    ctx.cfg = (spline_order, ieee)


def _backward_fn(ctx, grad_y):
    x, grid, coef, base_weight = ctx.saved_tensors
    need_x, _, need_coef, need_base = ctx.needs_input_grad[:4]
    gx, gc, gb = _bwd_op(grad_y, x, grid, coef, base_weight, *ctx.cfg, need_x, need_coef, need_base and base_weight is not None)
    return (
        gx if need_x else None,
        None,
        gc if need_coef else None,
        gb if (need_base and base_weight is not None) else None,
        None,
        None,
    )


_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def check_arguments(x: torch.Tensor, grid: torch.Tensor, coef: torch.Tensor, base_weight: Optional[torch.Tensor], k: int) -> None:
    """Shapes, spline order and basis count the kernels accept (ValueError/TypeError naming the problem)."""
    if x.dim() != 2:
        raise ValueError(f"kan_linear_triton expects x of shape (N, in_features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"kan_linear_triton expects a floating-point x, got {x.dtype}")
    if coef.dim() != 3 or grid.dim() != 2:
        raise ValueError(f"coef must be (out, in, G + k) and grid (in, G + 2k + 1); got {tuple(coef.shape)}, {tuple(grid.shape)}")
    nout, nin, nb = coef.shape
    if x.shape[1] != nin or grid.shape[0] != nin:
        raise ValueError(f"in_features mismatch: x {tuple(x.shape)}, grid {tuple(grid.shape)}, coef {tuple(coef.shape)}")
    if k < 0 or grid.shape[1] != nb + k + 1 or nb < 1:
        raise ValueError(f"grid with {grid.shape[1]} knots does not fit {nb} bases of order {k} (need G + 2k + 1 knots)")
    if k > MAX_SPLINE_ORDER:
        raise ValueError(f"the triton kernels support spline_order <= {MAX_SPLINE_ORDER}, got {k} (use backend='torch')")
    if nb > MAX_N_BASIS:
        raise ValueError(f"the triton kernels support G + k <= {MAX_N_BASIS} bases, got {nb} (use backend='torch')")
    if base_weight is not None and tuple(base_weight.shape) != (nout, nin):
        raise ValueError(f"base_weight must be (out, in) = {(nout, nin)}, got {tuple(base_weight.shape)}")


def check_dtype_device(x: torch.Tensor) -> None:
    """bfloat16 cannot run on CPU tensors (TypeError)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError(
            "kan_linear_triton: bfloat16 cannot run through Triton's interpreter on CPU (its tl.dot "
            "misreads bfloat16 operands); use backend='torch' on CPU, or CUDA tensors"
        )


# ----------------------------------------------------------------- entry point
def kan_linear_triton(
    x: torch.Tensor,
    grid: torch.Tensor,
    coef: torch.Tensor,
    base_weight: Optional[torch.Tensor],
    spline_order: int,
    *,
    fp32_precision: Optional[str] = None,
) -> torch.Tensor:
    """KAN layer on 2-D input through the fused Triton kernels.

    ``y = silu(x) @ base_weight^T + sum_{i,j} coef[:, i, j] B_j(x[:, i]; grid[i])``
    (Liu et al. 2024, arXiv:2404.19756, eq. 2.10 with efficient-kan's parameterisation).

    CUDA tensors run the compiled kernels; CPU tensors run them through Triton's
    interpreter (slow, for validation). float64 falls back to
    :func:`kanfast.torch_backend.kan_linear_torch`.

    Args:
        x: ``(N, in_features)``, float32/float16/bfloat16 (float64: torch fallback);
            any strides (copied only when the last dim is not contiguous); N may be 0.
        grid: ``(in_features, G + 2k + 1)`` non-decreasing knots (no gradient).
        coef: ``(out_features, in_features, G + k)`` scaled spline coefficients.
        base_weight: ``(out_features, in_features)`` for the fused SiLU base branch, or None.
        spline_order: ``k``, ``0 <= k <= MAX_SPLINE_ORDER`` (7).
        fp32_precision: ``"tf32"`` / ``"ieee"`` for float32 products (default: the
            module setting, see :func:`set_fp32_precision`). Ignored on CPU (IEEE).

    Returns:
        ``(N, out_features)`` in x's dtype (under autocast: the autocast dtype, x and the
        weights being cast to it as for ``F.linear``); differentiable w.r.t. x, coef,
        base_weight (once: the backward is not itself differentiable).

    Raises:
        ValueError: shapes that do not fit, k or G + k beyond the kernel limits.
        TypeError: non-floating input; bfloat16 on CPU (the interpreter cannot run it).
        RuntimeError: triton unavailable, or a device other than CUDA/CPU.
    """
    k = int(spline_order)
    check_arguments(x, grid, coef, base_weight, k)
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        # like F.linear under autocast: x and the weights in the autocast dtype (knots stay as they are)
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        coef = coef.to(dt)
        base_weight = None if base_weight is None else base_weight.to(dt)
    check_dtype_device(x)
    if x.dtype == torch.float64:
        return kan_linear_torch(x, grid, coef.to(x.dtype), None if base_weight is None else base_weight.to(x.dtype), k)
    if coef.dtype != x.dtype:  # autocast or mixed call: compute in the input's dtype
        coef = coef.to(x.dtype)
    if base_weight is not None and base_weight.dtype != x.dtype:
        base_weight = base_weight.to(x.dtype)
    prec = fp32_precision or _FP32_PRECISION
    if prec not in ("tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32' or 'ieee', got {prec!r}")
    ieee = prec == "ieee" or x.device.type != "cuda"
    return _fwd_op(x, grid, coef, base_weight, k, ieee)
