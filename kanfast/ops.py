"""The KAN layer as registered ``torch.library`` custom ops.

Why: ``torch.compile`` cannot trace into an ``autograd.Function`` whose forward
does data-dependent Python work (chunk loops, ``.item()``), and an opaque call is
a graph break. Registering the backends as custom ops with a fake (meta) kernel
and an autograd formula lets Dynamo/AOTAutograd treat one KAN layer as a single
node of known output shape, with ``fullgraph=True`` and dynamic batch sizes.

Ops (namespace ``kanfast``), all on 2-D input ``x: (N, in)``, knots
``grid: (in, G + 2k + 1)`` in x's dtype and packed weights
``weight: (out, in, G + k + has_base)`` (``[W | base_weight]``, the layout of
:mod:`kanfast.torch_backend`):

* ``kanfast::kan_fwd(x, grid, weight, spline_order, has_base, uniform) -> y (N, out)``
  the fast torch backend (:func:`kanfast.torch_backend.forward_2d`);
* ``kanfast::kan_bwd(grad_y, x, grid, weight, spline_order, has_base, uniform,
  need_x, need_w) -> (grad_x, grad_weight)`` its backward
  (:func:`kanfast.torch_backend.backward_2d`); a gradient that is not needed
  comes back as an empty ``(0,)`` tensor;
* ``kanfast::kan_triton_fwd`` / ``kanfast::kan_triton_bwd``: the same for the
  Triton kernels, registered only when :mod:`kanfast.triton_backend` exposes the
  raw entry points ``triton_forward(x, grid, coef, base_w_or_None, k) -> y`` and
  ``triton_backward(grad_y, x, grid, coef, base_w_or_None, k, need_x, need_w)
  -> (grad_x, grad_coef, grad_base_or_None)``. Without them the layer calls
  ``kan_linear_triton`` through :func:`nested_autograd` (eager: a graph break
  under compile; first-order backward replays the kernel's own backward).

The ``uniform`` flag (closed-form interval search for equally spaced knots) is
an op argument decided by the caller in Python, so no ``.item()`` runs inside a
compiled graph; :class:`kanfast.FastKANLayer` computes it when its grid is set.

Higher-order derivatives (physics-informed losses on dy/dx, d2y/dx2): the fast
backward kernels are not themselves differentiable. When autograd calls the
backward with ``create_graph=True`` (grad mode on inside backward) the gradient
is instead computed by autograd through :func:`kan_linear_differentiable`, a
plain-torch Cox-de Boor formulation (``O(G + k)`` work and an ``(N, in, G + k)``
basis per call), so second and higher derivatives are exact, never zero or
None. A first-order backward (the training loop) always takes the fast kernel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import torch_backend
from .reference import b_spline_basis

__all__ = ["kan_fwd", "kan_bwd", "kan_linear_op", "kan_linear_differentiable", "nested_autograd", "triton_ops_available"]

Tensor = torch.Tensor


def kan_linear_differentiable(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, has_base: bool) -> Tensor:
    """Differentiable-to-any-order formulation of the packed op (plain torch autograd).

    Args: as ``kanfast::kan_fwd``: x ``(N, in)``, grid ``(in, G + 2k + 1)``,
    weight ``(out, in, G + k + has_base)``. Returns ``(N, out)``.
    """
    nb = weight.shape[-1] - int(has_base)
    basis = b_spline_basis(x, grid.to(x.dtype), spline_order)  # (N, in, nb)
    y = torch.einsum("nij,oij->no", basis, weight[..., :nb])
    if has_base:
        y = y + F.linear(F.silu(x), weight[..., nb])
    return y


def _grads_by_autograd(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w):
    """create_graph=True path: gradients of the differentiable formulation, kept in the graph."""
    wanted = [t for t, need in ((x, need_x), (weight, need_w)) if need]
    with torch.enable_grad():
        y = kan_linear_differentiable(x, grid, weight, spline_order, has_base)
        grads = torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True)
    grads = list(grads)
    gx = grads.pop(0) if need_x else None
    gw = grads.pop(0) if need_w else None
    if need_x and gx is None:
        gx = torch.zeros_like(x)
    if need_w and gw is None:
        gw = torch.zeros_like(weight)
    return gx, gw


# --------------------------------------------------------------------- torch
@torch.library.custom_op("kanfast::kan_fwd", mutates_args=())
def kan_fwd(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, has_base: bool, uniform: bool) -> Tensor:
    n_basis = weight.shape[-1] - int(has_base)
    return torch_backend.forward_2d(
        x.contiguous(), grid.contiguous(), weight.contiguous(), spline_order, n_basis, has_base, uniform
    )


@kan_fwd.register_fake
def _kan_fwd_fake(x, grid, weight, spline_order, has_base, uniform):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("kanfast::kan_bwd", mutates_args=())
def kan_bwd(
    grad_y: Tensor,
    x: Tensor,
    grid: Tensor,
    weight: Tensor,
    spline_order: int,
    has_base: bool,
    uniform: bool,
    need_x: bool,
    need_w: bool,
) -> Tuple[Tensor, Tensor]:
    n_basis = weight.shape[-1] - int(has_base)
    gx, gw = torch_backend.backward_2d(
        grad_y.contiguous(),
        x.contiguous(),
        grid.contiguous(),
        weight.contiguous(),
        spline_order,
        n_basis,
        has_base,
        uniform,
        need_x=need_x,
        need_w=need_w,
    )
    gx = gx if need_x else x.new_empty(0)
    gw = gw if need_w else weight.new_empty(0)
    return gx, gw


@kan_bwd.register_fake
def _kan_bwd_fake(grad_y, x, grid, weight, spline_order, has_base, uniform, need_x, need_w):
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, grid, weight = inputs[:3]
    ctx.save_for_backward(x, grid, weight)
    ctx.cfg = tuple(inputs[3:])


def _kan_fwd_backward(ctx, grad_y):
    x, grid, weight = ctx.saved_tensors
    spline_order, has_base, uniform = ctx.cfg
    need_x, _, need_w = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # backward(create_graph=True): keep the gradient differentiable
        gx, gw = _grads_by_autograd(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w)
    else:
        gx, gw = kan_bwd(grad_y, x, grid, weight, spline_order, has_base, uniform, need_x, need_w)
    return (gx if need_x else None), None, (gw if need_w else None), None, None, None


kan_fwd.register_autograd(_kan_fwd_backward, setup_context=_setup_context)


# -------------------------------------------------------------------- triton
_TRITON_OPS = None  # (fwd_op, bwd_op) once registered, False when unavailable


def _register_triton_ops():
    """Register ``kanfast::kan_triton_fwd/bwd`` around the Triton backend's raw
    entry points (see the module docstring); returns the forward op or None."""
    global _TRITON_OPS
    if _TRITON_OPS is not None:
        return _TRITON_OPS or None
    try:
        from . import triton_backend as tb

        t_fwd, t_bwd = tb.triton_forward, tb.triton_backward
    except Exception:  # module missing, triton missing, or no raw entry points
        _TRITON_OPS = False
        return None

    def split(weight, has_base):
        nb = weight.shape[-1] - int(has_base)
        return weight[..., :nb].contiguous(), (weight[..., nb].contiguous() if has_base else None)

    @torch.library.custom_op("kanfast::kan_triton_fwd", mutates_args=(), device_types="cuda")
    def tfwd(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, has_base: bool) -> Tensor:
        coef, base_w = split(weight, has_base)
        return t_fwd(x.contiguous(), grid.contiguous(), coef, base_w, spline_order)

    @tfwd.register_fake
    def _(x, grid, weight, spline_order, has_base):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.custom_op("kanfast::kan_triton_bwd", mutates_args=(), device_types="cuda")
    def tbwd(
        grad_y: Tensor, x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, has_base: bool,
        need_x: bool, need_w: bool,
    ) -> Tuple[Tensor, Tensor]:
        coef, base_w = split(weight, has_base)
        gx, gc, gb = t_bwd(grad_y.contiguous(), x.contiguous(), grid.contiguous(), coef, base_w, spline_order, need_x, need_w)
        gx = gx if need_x else x.new_empty(0)
        if need_w:
            gw = torch.cat([gc, gb.unsqueeze(-1)], dim=-1) if has_base else gc
        else:
            gw = weight.new_empty(0)
        return gx, gw

    @tbwd.register_fake
    def _(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w):
        gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
        gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
        return gx, gw

    def backward(ctx, grad_y):
        x, grid, weight = ctx.saved_tensors
        spline_order, has_base = ctx.cfg
        need_x, _, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: route to the differentiable path
            gx, gw = _grads_by_autograd(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w)
        else:
            gx, gw = tbwd(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w)
        return (gx if need_x else None), None, (gw if need_w else None), None, None

    tfwd.register_autograd(backward, setup_context=_setup_context)
    _TRITON_OPS = (tfwd, tbwd)
    return _TRITON_OPS


class _NestedAutograd(torch.autograd.Function):
    """Runs ``fn(x, grid, coef, base_w_or_None, k)`` (any autograd-aware
    implementation, e.g. a ``once_differentiable`` kernel Function) as an inner
    graph, and differentiates it: first-order backward replays the inner graph
    (no recomputation); ``create_graph=True`` uses the differentiable
    formulation instead, so higher derivatives are exact whatever ``fn`` is."""

    @staticmethod
    def forward(ctx, x, grid, weight, spline_order, has_base, fn):
        need_x, _, need_w = ctx.needs_input_grad[:3]
        nb = weight.shape[-1] - int(has_base)
        with torch.enable_grad():
            xi = x.detach().requires_grad_(need_x)
            wi = weight.detach().requires_grad_(need_w)
            y = fn(xi, grid, wi[..., :nb].contiguous(), wi[..., nb].contiguous() if has_base else None, spline_order)
        ctx.inner = (xi, wi, y)
        ctx.save_for_backward(x, grid, weight)
        ctx.cfg = (spline_order, has_base)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        x, grid, weight = ctx.saved_tensors
        spline_order, has_base = ctx.cfg
        need_x, _, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            gx, gw = _grads_by_autograd(grad_y, x, grid, weight, spline_order, has_base, need_x, need_w)
        else:
            xi, wi, y = ctx.inner
            wanted = [t for t, need in ((xi, need_x), (wi, need_w)) if need]
            grads = list(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
            gx = grads.pop(0) if need_x else None
            gw = grads.pop(0) if need_w else None
            gx = torch.zeros_like(x) if need_x and gx is None else gx
            gw = torch.zeros_like(weight) if need_w and gw is None else gw
        return gx, None, gw, None, None, None


@torch.compiler.disable
def nested_autograd(fn, x: Tensor, grid: Tensor, weight: Tensor, spline_order: int, has_base: bool) -> Tensor:
    """Differentiable-to-any-order call of a kernel ``fn(x, grid, coef, base_w_or_None, k)``
    on packed weights (used for a Triton backend without raw entry points; eager only)."""
    return _NestedAutograd.apply(x, grid, weight, spline_order, has_base, fn)


def triton_ops_available() -> bool:
    """True when ``kanfast::kan_triton_fwd`` is registered (Triton backend with raw entry points)."""
    return _register_triton_ops() is not None


# ------------------------------------------------------------------ dispatch
def kan_linear_op(
    x: Tensor,
    grid: Tensor,
    coef: Tensor,
    base_weight: Optional[Tensor],
    spline_order: int,
    uniform: bool,
    backend: str = "torch",
) -> Tensor:
    """One KAN layer on 2-D input through the registered ops.

    Args:
        x: ``(N, in)``; grid ``(in, G + 2k + 1)`` (cast to x's dtype);
        coef: ``(out, in, G + k)`` scaled spline weights; base_weight ``(out, in)``
        or None (spline term only); spline_order ``k``; uniform: knots equally
        spaced (a Python bool, decided by the caller); backend ``"torch"`` or
        ``"triton"``.

    Returns:
        ``(N, out)`` in x's dtype, differentiable (to any order) w.r.t. x, coef,
        base_weight.
    """
    has_base = base_weight is not None
    weight = torch.cat([coef, base_weight.unsqueeze(-1)], dim=-1) if has_base else coef
    grid = grid.to(x.dtype)
    if backend == "triton":
        ops = _register_triton_ops()
        if ops is not None and x.is_cuda:
            return ops[0](x, grid, weight, int(spline_order), has_base)
        from .triton_backend import kan_linear_triton

        return nested_autograd(kan_linear_triton, x, grid, weight, int(spline_order), has_base)
    return kan_fwd(x, grid, weight, int(spline_order), has_base, bool(uniform))
