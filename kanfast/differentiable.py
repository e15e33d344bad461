"""The autograd formula every engine shares, and the differentiable formulation behind it.

Every engine's autograd Function and custom op (:class:`kanfast.torch_backend.EagerTorchKAN`,
``kanfast::kan_fwd``, the sparse path and the Triton op of :mod:`kanfast.ops`) saves its
inputs with :func:`setup_context` and takes its backward from :func:`make_backward`:

* a first-order backward (the training loop) runs the engine's own fast backward kernel;
* a backward with ``create_graph=True`` (grad mode on inside backward: physics-informed
  losses on dy/dx, d2y/dx2) cannot: the fast backward kernels are not themselves
  differentiable. The gradient is then computed by autograd through
  :func:`kan_linear_differentiable` (``O(G + k)`` work and an ``(N, in, G + k)`` basis per
  call), so second and higher derivatives are exact, never zero or None.

Why the differentiable formulation is the oracle's (:func:`kanfast.reference.b_spline_basis`)
and not one of its own: it must be plain torch ops (so autograd differentiates it to any
order) on the stored knots, with the reference's conventions (outside the knots and NaN give
0, repeated knots 0/0 := 0) so that the gradients of every order match the engines' values;
Cox-de Boor's recursion in torch ops is exactly that, and a second copy of it here would be a
duplicate of the oracle, which is kept plain so that it stays easy to check. The same holds
for the dense basis of least-squares fits when autograd must see through it
(:func:`kanfast.ops.basis_matrix`): both go through :func:`basis`, the one place the oracle is
reused. Imports only the oracle.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import b_spline_basis

__all__ = ["basis", "kan_linear_differentiable", "grads_by_autograd", "setup_context", "make_backward"]

Tensor = torch.Tensor


def basis(x: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """The dense basis ``(..., in, G + k)`` of ``x`` ``(..., in)`` on ``grid`` ``(in, G + 2k + 1)``,
    differentiable to any order: the oracle's Cox-de Boor (:func:`kanfast.reference.b_spline_basis`;
    why the oracle, see the module docstring)."""
    return b_spline_basis(x, grid, spline_order)


def kan_linear_differentiable(
    x: Tensor, grid: Tensor, coef: Tensor, base_weight: Optional[Tensor], spline_order: int
) -> Tensor:
    """Differentiable-to-any-order formulation (plain torch autograd, Cox-de Boor).

    Args: x ``(N, in)``, grid ``(in, G + 2k + 1)``, coef ``(out, in, G + k)``,
    base_weight ``(out, in)`` or None. Computes in at least float32 (16-bit knots
    would collapse) and returns ``(N, out)`` in x's dtype.
    """
    comp = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(comp)
    B = basis(xc, grid.to(comp), spline_order)  # (N, in, G + k)
    y = torch.einsum("nij,oij->no", B, coef.to(comp))
    if base_weight is not None:
        y = y + F.linear(F.silu(xc), base_weight.to(comp))
    return y.to(x.dtype)


def grads_by_autograd(grad_y, pairs, fn):
    """create_graph=True path: gradients of ``fn()`` (built from the tensors of
    ``pairs`` = [(tensor, needed), ...]) by autograd, kept in the graph; None where
    not needed, zeros where unused."""
    wanted = [t for t, need in pairs if need]
    with torch.enable_grad():
        y = fn()
        grads = list(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    out = []
    for t, need in pairs:
        if not need:
            out.append(None)
            continue
        g = grads.pop(0)
        out.append(torch.zeros_like(t) if g is None else g)
    return out


def setup_context(ctx, inputs, output):
    """Save what :func:`make_backward`'s formula reads: the tensors (x, grid, coef, base_weight,
    scale or None) and ``(spline_order, flag, number of inputs)``."""
    x, grid, coef, base_weight, spline_order, flag = inputs[:6]
    scale = inputs[6] if len(inputs) > 6 else None
    ctx.save_for_backward(x, grid, coef, base_weight, scale)
    ctx.cfg = (spline_order, flag, len(inputs))


def make_backward(fast_backward):
    """Autograd formula shared by the custom ops and the eager Function: the fast
    backward for a first-order pass, autograd through the differentiable
    formulation under ``create_graph=True`` (grad mode on inside backward).
    ``fast_backward(grad_y, x, grid, coef, base_weight, k, flag, need_x, need_c,
    need_b[, scale, need_scale])`` returns 3 gradients, or 4 for an op with a scale."""

    def backward(ctx, grad_y):
        x, grid, coef, base_weight, scale = ctx.saved_tensors
        spline_order, flag, n_inputs = ctx.cfg
        need_x, _, need_c, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and base_weight is not None
        need_s = n_inputs > 6 and scale is not None and ctx.needs_input_grad[6]
        gs = None
        if torch.is_grad_enabled():  # backward(create_graph=True): keep the gradient differentiable
            gx, gc, gb, gs = grads_by_autograd(
                grad_y,
                [(x, need_x), (coef, need_c), (base_weight, need_b), (scale, need_s)],
                lambda: kan_linear_differentiable(
                    x, grid, coef if scale is None else coef * scale.unsqueeze(-1), base_weight, spline_order
                ),
            )
        else:
            extra = (scale, need_s) if n_inputs > 6 else ()
            # the eager Function's knot constants, verified in its forward (autograd's version
            # check guarantees the saved grid was not modified in place since)
            kw = {"knots": ctx.knots} if getattr(ctx, "knots", None) is not None else {}
            gx, gc, gb, *rest = fast_backward(
                grad_y, x, grid, coef, base_weight, spline_order, flag, need_x, need_c, need_b, *extra, **kw
            )
            gs = rest[0] if rest else None
        grads = [(gx if need_x else None), None, (gc if need_c else None), (gb if need_b else None), None, None]
        if n_inputs > 6:
            grads.append(gs if need_s else None)
        return tuple(grads)

    return backward
