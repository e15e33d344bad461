"""The KAN layer as registered ``torch.library`` custom ops.

Why: ``torch.compile`` cannot trace into an ``autograd.Function`` whose forward
does data-dependent Python work (chunk loops, ``.item()``), and an opaque call is
a graph break. Registering the backends as custom ops with a fake (meta) kernel
and an autograd formula lets Dynamo/AOTAutograd treat one KAN layer as a single
node of known output shape, with ``fullgraph=True`` and dynamic batch sizes.

Ops (namespace ``kanfast``), all on 2-D input ``x: (N, in)``, knots
``grid: (in, G + 2k + 1)``, spline coefficients ``coef: (out, in, G + k)``
and an optional SiLU base weight ``base_weight: (out, in)``:

* ``kanfast::kan_fwd(x, grid, coef, base_weight?, spline_order, uniform, scale?) -> y (N, out)``:
  the fast torch backend (:mod:`kanfast.torch_backend`; grid in x's dtype). With
  ``scale: (out, in)`` the coefficients are ``coef * scale[..., None]`` (efficient-kan's
  ``spline_weight * spline_scaler``), formed inside the op: the scaled tensor is
  neither saved for backward nor given a gradient of its own, so a layer's
  fwd+bwd holds one weight-sized temporary instead of three;
* ``kanfast::kan_bwd(grad_y, x, grid, coef, base_weight?, spline_order, uniform,
  need_x, need_coef, need_base, scale?, need_scale) -> (grad_x, grad_coef, grad_base,
  grad_scale)``: its backward; a gradient that is not needed comes back as an
  empty ``(0,)`` tensor;
* ``kanfast::kan_triton_fwd(x, grid, coef, base_weight?, spline_order, ieee) -> y``:
  the Triton kernels (``kanfast::kan_linear_triton_fwd/bwd`` of
  :mod:`kanfast.triton_backend`) under an autograd formula that stays
  differentiable with ``create_graph=True`` (the backend's own registration is
  first-order only). It takes 16-bit operands with float32 knots and float32
  accumulation.

Eager dispatch (:func:`kan_linear_op`, and :func:`kan_linear_small`, its sparse half for the
modules' common call): a call that :func:`kanfast.sparse_backend.chooses`
(the size rule documented there: small calls, or a coefficient table that fits in cache)
runs the sparse contraction kernels (one C call forward, one backward, through
``_SparseKAN``); the others the dense-block engine of :mod:`kanfast.torch_backend`
(``EagerTorchKAN``). When no gradient is needed (``torch.no_grad()``, ``inference_mode()``,
or no input requiring grad) either engine's forward runs without an autograd node, so
nothing is saved. Compiled graphs keep the dense custom op.

The ``uniform`` flag (closed-form interval search for equally spaced knots) is
an op argument decided by the caller in Python, so no ``.item()`` runs inside a
compiled graph; :class:`kanfast.FastKANLayer` computes it when its grid is set.

Higher-order derivatives (physics-informed losses on dy/dx, d2y/dx2): every op and
Function here takes the autograd formula of :mod:`kanfast.differentiable`: a first-order
backward (the training loop) always runs the fast kernel, a backward with
``create_graph=True`` goes through :func:`kan_linear_differentiable` (plain-torch Cox-de
Boor), so second and higher derivatives are exact, never zero or None.

Also here, for the modules (:mod:`kanfast.layer`) and the workflow, which reach the engines
only through this module: :func:`basis_matrix` (the dense basis of least-squares fits),
:func:`triton_available` and :func:`forget_grid` (the Triton engine's knot tables).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Optional, Tuple

import torch

from . import sparse_backend, torch_backend
from .cpu_bases import dense_block
from .differentiable import basis, kan_linear_differentiable, make_backward, setup_context
from .knots import grid_is_uniform

__all__ = [
    "kan_fwd",
    "kan_bwd",
    "kan_linear_op",
    "kan_linear_small",
    "kan_linear_differentiable",
    "triton_ops_available",
    "triton_available",
    "forget_grid",
    "basis_matrix",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------- torch
@torch.library.custom_op("kanfast::kan_fwd", mutates_args=())
def kan_fwd(
    x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], spline_order: int, uniform: bool,
    scale: Optional[Tensor] = None,
) -> Tensor:
    return torch_backend.forward(x.contiguous(), grid.contiguous(), coef, base_weight, spline_order, uniform, scale)


@kan_fwd.register_fake
def _kan_fwd_fake(x, grid, coef, base_weight, spline_order, uniform, scale=None):
    return x.new_empty(x.shape[0], coef.shape[0])


@torch.library.custom_op("kanfast::kan_bwd", mutates_args=())
def kan_bwd(
    grad_y: Tensor,
    x: Tensor,
    grid: Tensor,
    coef: Tensor,
    base_weight: Optional[Tensor],
    spline_order: int,
    uniform: bool,
    need_x: bool,
    need_coef: bool,
    need_base: bool,
    scale: Optional[Tensor] = None,
    need_scale: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    need_base = need_base and base_weight is not None
    need_scale = need_scale and scale is not None
    gx, gc, gb, gs = torch_backend.backward(
        grad_y.contiguous(), x.contiguous(), grid.contiguous(), coef, base_weight, spline_order, uniform,
        need_x, need_coef, need_base, scale, need_scale,
    )
    # outputs must not alias inputs and must be tensors: empty where not needed
    return (
        gx if need_x else x.new_empty(0),
        gc if need_coef else coef.new_empty(0),
        gb if need_base else coef.new_empty(0),
        gs if need_scale else coef.new_empty(0),
    )


@kan_bwd.register_fake
def _kan_bwd_fake(grad_y, x, grid, coef, base_weight, spline_order, uniform, need_x, need_coef, need_base,
                  scale=None, need_scale=False):
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gc = coef.new_empty(coef.shape) if need_coef else coef.new_empty(0)
    gb = base_weight.new_empty(base_weight.shape) if (need_base and base_weight is not None) else coef.new_empty(0)
    gs = scale.new_empty(scale.shape) if (need_scale and scale is not None) else coef.new_empty(0)
    return gx, gc, gb, gs


kan_fwd.register_autograd(make_backward(kan_bwd), setup_context=setup_context)


# -------------------------------------------------------------------- sparse
def _sparse_backward(
    grad_y, x, grid, coef, base_weight, k, uniform, need_x, need_c, need_b, scale=None, need_s=False, knots=None
):
    """The sparse engine's backward; the dense engine's when the kernel declines the knots
    (edited through ``.data`` between forward and backward to non-finite or decreasing ones)."""
    out = sparse_backend.backward(grad_y, x, grid, coef, base_weight, k, scale, need_x, need_c, need_b, need_s)
    if out is None:
        if uniform is None:  # (the modules' small call leaves the flag to the fallback: see kan_linear_small)
            uniform = grid_is_uniform(grid)
        return torch_backend.eager_backward(grad_y, x, grid, coef, base_weight, k, uniform, need_x, need_c, need_b,
                                            scale, need_s)
    return out


def _dense_forward(x, grid, coef, base_weight, k, uniform, scale) -> Tensor:
    """The dense engine's forward with no autograd node (inference, or inside ``_SparseKAN``'s
    fallback); ``uniform`` None: the flag is decided from the grid here."""
    if uniform is None:
        uniform = grid_is_uniform(grid)
    return torch_backend.forward(x.contiguous(), grid.contiguous(), coef, base_weight, k, bool(uniform), scale)


class _SparseKAN(torch.autograd.Function):
    """The small-call path (:mod:`kanfast.sparse_backend`): one kernel call forward, one
    backward, only the inputs saved; the same autograd formula (and ``create_graph``
    route) as the dense engine. Forward falls back to the dense engine when the kernel
    declines the knots. ``uniform`` None: the dense engine's flag is computed from the grid
    only on such a fallback (the sparse kernels do not use it)."""

    @staticmethod
    def forward(ctx, x, grid, coef, base_weight, spline_order, uniform, scale):
        setup_context(ctx, (x, grid, coef, base_weight, spline_order, uniform, scale), None)
        y = sparse_backend.forward(x, grid, coef, base_weight, spline_order, scale)
        return _dense_forward(x, grid, coef, base_weight, spline_order, uniform, scale) if y is None else y

    backward = staticmethod(make_backward(_sparse_backward))


def _needs_graph(x, coef, base_weight, scale) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or coef.requires_grad or (base_weight is not None and base_weight.requires_grad)
        or (scale is not None and scale.requires_grad)
    )


# -------------------------------------------------------------------- triton
_TRITON_OPS = None  # (fwd_op, triton_backend module) once registered, False when unavailable
_TRITON_OPS_LOCK = threading.Lock()  # registration happens once, whichever threads call first


def _fresh_triton_ops_lock() -> None:
    """In a forked child: a fresh lock (a parent thread that held it does not exist here)."""
    global _TRITON_OPS_LOCK
    _TRITON_OPS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_triton_ops_lock)


def _register_triton_ops():
    """Register ``kanfast::kan_triton_fwd`` around the Triton backend's registered
    kernels ``kanfast::kan_linear_triton_fwd/bwd`` (:mod:`kanfast.triton_backend`),
    with an autograd formula that is differentiable under ``create_graph=True``.
    Returns ``(fwd_op, triton_backend_module)`` or None when Triton is unavailable.
    Thread-safe: the op is registered once, under a lock (two registrations of the same
    name destroy the first one's library while another thread may be calling it)."""
    if _TRITON_OPS is not None:
        return _TRITON_OPS or None
    with _TRITON_OPS_LOCK:
        if _TRITON_OPS is None:
            _define_triton_ops()
        return _TRITON_OPS or None


def _define_triton_ops() -> None:
    """The registration itself (:func:`_register_triton_ops`, under its lock)."""
    global _TRITON_OPS
    try:
        from . import triton_backend as tb

        raw_fwd = torch.ops.kanfast.kan_linear_triton_fwd.default
        raw_bwd = torch.ops.kanfast.kan_linear_triton_bwd.default
    except Exception:  # triton missing or broken
        _TRITON_OPS = False
        return

    @torch.library.custom_op("kanfast::kan_triton_fwd", mutates_args=())
    def tfwd(
        x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], spline_order: int, ieee: bool
    ) -> Tensor:
        return raw_fwd(x, grid, coef, base_weight, spline_order, ieee)

    @tfwd.register_fake
    def _(x, grid, coef, base_weight, spline_order, ieee):
        return x.new_empty(x.shape[0], coef.shape[0])

    # the same formula as the torch op: kernels first-order, differentiable path under create_graph
    backward = make_backward(raw_bwd)

    tfwd.register_autograd(backward, setup_context=setup_context)
    _TRITON_OPS = (tfwd, tb)


def triton_ops_available() -> bool:
    """True when ``kanfast::kan_triton_fwd`` is registered (Triton importable)."""
    return _register_triton_ops() is not None


def _kan_linear_triton_op(x, grid, coef, base_weight, spline_order):
    ops = _register_triton_ops()
    if ops is None:
        raise RuntimeError("backend 'triton' needs triton (pip install triton) and kanfast.triton_backend")
    tfwd, tb = ops
    k = int(spline_order)
    tb.check_arguments(x, grid, coef, base_weight, k)
    tb.check_dtype_device(x)
    coef = coef.to(x.dtype)
    base_weight = None if base_weight is None else base_weight.to(x.dtype)
    ieee = tb.get_fp32_precision() == "ieee" or x.device.type != "cuda"
    return tfwd(x, grid, coef, base_weight, k, ieee)


# ------------------------------------------------------------------ dispatch
def kan_linear_op(
    x: Tensor,
    grid: Tensor,
    coef: Tensor,
    base_weight: Optional[Tensor],
    spline_order: int,
    uniform: bool,
    backend: str = "torch",
    scale: Optional[Tensor] = None,
) -> Tensor:
    """One KAN layer on 2-D input through the registered ops.

    Args:
        x: ``(N, in)``; grid ``(in, G + 2k + 1)`` (cast to x's dtype for the torch
        backend; the Triton kernels read float32 knots whatever x's dtype);
        coef: ``(out, in, G + k)`` spline weights; base_weight ``(out, in)``
        or None (spline term only); spline_order ``k``; uniform: knots equally
        spaced (a Python bool, decided by the caller); backend ``"torch"`` or
        ``"triton"``; scale: ``(out, in)`` or None, the coefficients used are
        ``coef * scale[..., None]`` (formed inside the torch op, see the module
        docstring).

    Returns:
        ``(N, out)`` in x's dtype, differentiable (to any order) w.r.t. x, coef,
        base_weight and scale.
    """
    if backend == "triton" and x.dtype != torch.float64:  # float64: the torch path (as kan_linear_triton does)
        if scale is not None:
            coef = coef * scale.unsqueeze(-1)
        return _kan_linear_triton_op(x, grid, coef, base_weight, spline_order)
    if grid.dtype != x.dtype:
        grid = grid.to(x.dtype)
    k = int(spline_order)
    if torch.compiler.is_compiling():  # one opaque graph node for Dynamo/AOTAutograd
        return kan_fwd(x, grid, coef, base_weight, k, bool(uniform), scale)
    y = kan_linear_small(x, grid, coef, base_weight, k, scale, uniform=bool(uniform))  # the size rule's sparse calls
    if y is not None:
        return y
    if not _needs_graph(x, coef, base_weight, scale):  # inference on the dense engine: no autograd node, nothing saved
        return _dense_forward(x, grid, coef, base_weight, k, bool(uniform), scale)
    return torch_backend.EagerTorchKAN.apply(x, grid, coef, base_weight, k, bool(uniform), scale)


def kan_linear_small(
    x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], spline_order: int,
    scale: Optional[Tensor] = None, uniform: Optional[bool] = None,
) -> Optional[Tensor]:
    """:func:`kan_linear_op`'s call on the sparse engine (its eager torch-backend calls that the
    size rule, :func:`kanfast.sparse_backend.chooses`, gives that engine; the modules' common case
    calls it directly: grid of x's dtype, the caller's guards), or None when that engine does not
    take it: then call :func:`kan_linear_op`. The same engine, calls and fallback to the dense
    engine when the kernel declines the knots. ``uniform``: the "uniform knots" flag, which only
    that fallback reads; None: computed from the grid there. Args and returns as
    :func:`kan_linear_op`'s."""
    if not sparse_backend.chooses(x, grid, coef, base_weight, spline_order, scale):
        return None
    if _needs_graph(x, coef, base_weight, scale):
        return _SparseKAN.apply(x, grid, coef, base_weight, spline_order, uniform, scale)
    y = sparse_backend.forward(x, grid, coef, base_weight, spline_order, scale)  # inference: nothing saved
    return _dense_forward(x, grid, coef, base_weight, spline_order, uniform, scale) if y is None else y


# ----------------------------------------------------------- for the modules
def basis_matrix(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """Dense basis ``(N, in, G + k)`` of 2-D ``x`` (N, in) via the fast local
    evaluation. Used for least-squares fits (grid update/extension), not for the
    forward pass. When autograd must see through it (x requires grad, grad mode
    on: e.g. activation-based regularisation), the differentiable Cox-de Boor
    formulation (:func:`kanfast.differentiable.basis`, the oracle's) is used instead: the
    fast evaluation writes into preallocated buffers."""
    if x.requires_grad and torch.is_grad_enabled():
        return basis(x, grid.to(x.dtype), spline_order)
    n_basis = grid.shape[1] - spline_order - 1
    uniform = grid_is_uniform(grid)
    D, _, _, _ = dense_block(x, grid.to(x.dtype), spline_order, n_basis, uniform, False, False)
    return D


def triton_available() -> bool:
    """True when the Triton engine imports and can run (:data:`kanfast.triton_backend.AVAILABLE`)."""
    try:
        from . import triton_backend  # noqa: F401

        return triton_backend.AVAILABLE
    except Exception:  # pragma: no cover - triton missing or broken
        return False


def forget_grid(grid: Tensor) -> None:
    """Drop what the engines cache about ``grid``'s values (the Triton engine's knot tables),
    after the grid changed; nothing when the Triton engine was never loaded."""
    tb = sys.modules.get("kanfast.triton_backend")
    if tb is not None:
        tb.forget_grid(grid)
