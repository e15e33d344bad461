"""Fast pure-torch KAN backend: the CPU engine.

Algorithm (forward, per chunk of rows):
  1. interval index ``m`` of every input on its knots (uniform grid: closed form
     ``floor((x - t_0) / h)`` corrected against the stored knots; non-uniform:
     ``searchsorted``), clamped before any gather so NaN/inf/huge inputs never
     index out of bounds;
  2. the ``k + 1`` non-zero bases ``B_{m-k..m}`` by de Boor's triangular scheme
     (NURBS Book, alg. A2.2), ``O(k^2)`` element-wise work instead of the
     ``O(k (G + k))`` of the full Cox-de Boor table;
  3. those values are scattered into a dense ``(chunk, in, G + k + 1)`` block
     whose last column is ``silu(x)``; one GEMM against the coefficients
     ``[W | base_weight]`` of shape ``(out, in * (G + k + 1))`` gives ``y``.
     This is exactly the dense-GEMM floor: batch x in*(G+k+1) x out.

Backward recomputes steps 1-3 per chunk (only ``x`` is saved) and issues the two
remaining GEMMs: ``grad_W += grad_y^T @ D`` (accumulated chunk by chunk in a
fixed order: deterministic) and ``grad_D = grad_y @ W``, of which only the
``k + 1`` entries at the non-zero bases (plus the silu column) are gathered and
contracted with the basis derivatives

    dB_{j,k}/dx = k * (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1})).

Memory bound: nothing of size (batch, in, G + k) lives between forward and
backward. The transient dense block is at most ``CHUNK_ELEMENTS`` elements
(plus ``grad_D`` of the same size in backward), i.e. 2 x 16 MiB in float32 by
default, whatever the batch size.

Double backward is supported by autograd only through the reference/einsum
formulation; this Function's backward is not itself differentiable
(``once_differentiable``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["kan_linear_torch", "forward_2d", "backward_2d", "grid_is_uniform", "local_bases", "CHUNK_ELEMENTS"]

#: Largest dense basis block (elements) materialised at once, per chunk of rows.
CHUNK_ELEMENTS = 1 << 22


def grid_is_uniform(grid: torch.Tensor) -> bool:
    """True when every row of ``grid`` (in, n_knots) is equally spaced to rounding."""
    if grid.shape[-1] < 2:
        return False
    d = grid[:, 1:] - grid[:, :-1]
    h = (grid[:, -1:] - grid[:, :1]) / (grid.shape[-1] - 1)
    tol = 16 * torch.finfo(grid.dtype).eps * grid.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return bool(((d - h).abs() <= tol).all()) and bool((h > 0).all())


def _pad_knots(grid: torch.Tensor, k: int) -> torch.Tensor:
    """Extend each knot row by k knots on each side (spacing of the end interval).

    De Boor's scheme for the span [t_m, t_{m+1}) reads t_{m-k+1} .. t_{m+k}; near the
    ends those fall outside the row. Any increasing extension is exact for the
    bases that exist (B_j depends only on t_j .. t_{j+k+1}); the others are dropped.
    """
    if k == 0:
        return grid
    steps = torch.arange(1, k + 1, device=grid.device, dtype=grid.dtype)
    h_lo = (grid[:, 1:2] - grid[:, :1]).clamp_min(1.0)
    h_hi = (grid[:, -1:] - grid[:, -2:-1]).clamp_min(1.0)
    left = grid[:, :1] - h_lo * steps.flip(0)
    right = grid[:, -1:] + h_hi * steps
    return torch.cat([left, grid, right], dim=1)


def local_bases(
    x: torch.Tensor, grid: torch.Tensor, k: int, uniform: bool, need_deriv: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Non-zero bases of every input.

    Args:
        x: ``(rows, in)``.
        grid: ``(in, n)`` knots, ``n = G + 2k + 1``, same dtype as x.
        k: spline order.
        uniform: use the closed form for equally spaced knots.
        need_deriv: also return d/dx of the k+1 bases.

    Returns:
        ``first`` ``(rows, in)`` int64: index (among the G+k bases) of the first of the
        k+1 values, ``m - k`` (may be negative or run past G+k-1 at the ends: those
        slots must be dropped); ``vals`` ``(rows, in, k+1)`` (0 for out-of-range or
        non-finite inputs); ``dvals`` the same shape or None.
    """
    n = grid.shape[1]
    t0 = grid[:, 0]
    tn = grid[:, -1]
    inside = (x >= t0) & (x < tn)
    xs = torch.where(inside, x, t0.expand_as(x))  # finite, in range stand-in
    if uniform:
        h = (tn - t0) / (n - 1)
        m = torch.floor((xs - t0) / h).long().clamp_(0, n - 2)
        # correct rounding against the stored knots (so knots hit exactly agree with the reference)
        rows_idx = torch.arange(grid.shape[0], device=x.device)
        flat = grid.reshape(-1)
        base = rows_idx * n
        t_m = flat[base + m]
        m = torch.where(xs < t_m, m - 1, m)
        m = m.clamp_(0, n - 2)
        t_m1 = flat[base + m + 1]
        m = torch.where(xs >= t_m1, m + 1, m).clamp_(0, n - 2)
        t_m = flat[base + m]
        u = (xs - t_m) / h
        lefts = [u + (j - 1) for j in range(1, k + 1)]  # (x - t_{m+1-j}) / h
        rights = [(j - u) for j in range(1, k + 1)]  # (t_{m+j} - x) / h
        scale = 1.0 / h
    else:
        m = torch.searchsorted(grid, xs.t().contiguous(), right=True).t() - 1
        m = m.clamp_(0, n - 2)
        tp = _pad_knots(grid, k)
        npad = tp.shape[1]
        flat = tp.reshape(-1)
        base = torch.arange(grid.shape[0], device=x.device) * npad + k + m  # index of t_m in the padded row
        lefts = [xs - flat[base + 1 - j] for j in range(1, k + 1)]
        rights = [flat[base + j] - xs for j in range(1, k + 1)]
        scale = None

    # de Boor triangle: N holds the order-p bases B_{m-p..m}
    one = torch.ones_like(xs)
    N = [one]
    N_prev = None
    for p in range(1, k + 1):
        if p == k:
            N_prev = N
        saved = torch.zeros_like(xs)
        new = []
        for r in range(p):
            temp = N[r] / (rights[r] + lefts[p - r - 1])
            new.append(saved + rights[r] * temp)
            saved = lefts[p - r - 1] * temp
        new.append(saved)
        N = new
    vals = torch.stack(N, dim=-1)  # (rows, in, k+1)
    vals = torch.where(inside.unsqueeze(-1), vals, torch.zeros_like(vals))

    dvals = None
    if need_deriv:
        if k == 0:
            dvals = torch.zeros_like(vals)
        else:
            # B_{i,k}' = k * (B_{i,k-1} / (t_{i+k} - t_i) - B_{i+1,k-1} / (t_{i+k+1} - t_{i+1}))
            # for i = m-k+r, r = 0..k; lower-order values N_prev[s] = B_{m-k+1+s, k-1}, s = 0..k-1.
            zero = torch.zeros_like(xs)
            lower = [zero] + list(N_prev) + [zero]  # lower[r] = B_{m-k+r, k-1}
            d = []
            for r in range(k + 1):
                if uniform:  # t_{i+k} - t_i = k h
                    a = lower[r] * (scale / k)
                    b = lower[r + 1] * (scale / k)
                else:
                    i = base - k + r  # padded index of t_{m-k+r}
                    # denominators > 0 wherever the lower basis is non-zero on this span
                    den_a = flat[(i + k).clamp(max=flat.numel() - 1)] - flat[i.clamp(min=0)]
                    den_b = flat[(i + k + 1).clamp(max=flat.numel() - 1)] - flat[(i + 1).clamp(min=0)]
                    a = torch.where(den_a > 0, lower[r] / torch.where(den_a > 0, den_a, one), zero)
                    b = torch.where(den_b > 0, lower[r + 1] / torch.where(den_b > 0, den_b, one), zero)
                d.append(k * (a - b))
            dvals = torch.stack(d, dim=-1)
            dvals = torch.where(inside.unsqueeze(-1), dvals, torch.zeros_like(dvals))
    return m - k, vals, dvals


def _dense_block(x, grid, k, n_basis, uniform, has_base, need_deriv):
    """Dense (rows, in, n_basis + has_base) block of bases (and silu column)."""
    first, vals, dvals = local_bases(x, grid, k, uniform, need_deriv)
    rows, nin = x.shape
    width = n_basis + (1 if has_base else 0)
    idx = first.unsqueeze(-1) + torch.arange(k + 1, device=x.device)
    valid = (idx >= 0) & (idx < n_basis)
    idx_c = idx.clamp(0, n_basis - 1)
    D = torch.zeros(rows, nin, width, dtype=x.dtype, device=x.device)
    # scatter_add: slots that were clamped onto a real index carry value 0
    D.scatter_add_(2, idx_c, torch.where(valid, vals, torch.zeros_like(vals)))
    if has_base:
        D[..., n_basis] = F.silu(x)
    return D, idx_c, valid, dvals


def _chunk_rows(nin: int, width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, nin * width))


def forward_2d(x, grid, weight, spline_order, n_basis, has_base, uniform):
    """y = D(x) @ weight.reshape(out, -1)^T, chunked. x (N, in); weight (out, in, n_basis + has_base)."""
    nout, nin, width = weight.shape
    w2 = weight.reshape(nout, nin * width)
    y = torch.empty(x.shape[0], nout, dtype=x.dtype, device=x.device)
    step = _chunk_rows(nin, width)
    for s in range(0, x.shape[0], step):
        xc = x[s : s + step]
        D, _, _, _ = _dense_block(xc, grid, spline_order, n_basis, uniform, has_base, False)
        torch.mm(D.reshape(xc.shape[0], nin * width), w2.t(), out=y[s : s + step])
    return y


def backward_2d(grad_y, x, grid, weight, spline_order, n_basis, has_base, uniform, need_x=True, need_w=True):
    """Gradients (grad_x (N, in) or None, grad_weight (out, in, width) or None) of forward_2d."""
    k = spline_order
    nout, nin, width = weight.shape
    w2 = weight.reshape(nout, nin * width)
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros(nout, nin * width, dtype=weight.dtype, device=weight.device) if need_w else None
    grad_y = grad_y.contiguous()
    step = _chunk_rows(nin, width)
    for s in range(0, x.shape[0], step):
        xc = x[s : s + step]
        gy = grad_y[s : s + step]
        D, idx_c, valid, dvals = _dense_block(xc, grid, k, n_basis, uniform, has_base, need_x)
        rows = xc.shape[0]
        if need_w:
            grad_w.addmm_(gy.t(), D.reshape(rows, nin * width))
        if need_x:
            gD = torch.mm(gy, w2).reshape(rows, nin, width)
            g_local = torch.gather(gD, 2, idx_c)
            g_local = torch.where(valid, g_local, torch.zeros_like(g_local))
            gx = (g_local * dvals).sum(-1)
            if has_base:
                sig = torch.sigmoid(xc)
                gx = gx + gD[..., n_basis] * (sig * (1 + xc * (1 - sig)))
            grad_x[s : s + step] = gx
    if need_w:
        grad_w = grad_w.reshape(nout, nin, width)
    return grad_x, grad_w


class _KANLinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, weight, spline_order, n_basis, has_base, uniform):
        ctx.save_for_backward(x, grid, weight)
        ctx.cfg = (spline_order, n_basis, has_base, uniform)
        return forward_2d(x, grid, weight, spline_order, n_basis, has_base, uniform)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, grid, weight = ctx.saved_tensors
        need_x, _, need_w = ctx.needs_input_grad[:3]
        grad_x, grad_w = backward_2d(grad_y, x, grid, weight, *ctx.cfg, need_x=need_x, need_w=need_w)
        return grad_x, None, grad_w, None, None, None, None


def kan_linear_torch(
    x: torch.Tensor,
    grid: torch.Tensor,
    coef: torch.Tensor,
    base_weight: Optional[torch.Tensor],
    spline_order: int,
    uniform: Optional[bool] = None,
) -> torch.Tensor:
    """KAN layer on 2-D input with the fast torch backend.

    Args:
        x: ``(N, in_features)``.
        grid: ``(in_features, G + 2k + 1)`` knots (no gradient).
        coef: ``(out_features, in_features, G + k)`` scaled spline coefficients.
        base_weight: ``(out_features, in_features)`` for the fused SiLU base branch,
            or ``None`` to compute the spline term only.
        spline_order: ``k``.
        uniform: knots equally spaced (detected when None).

    Returns:
        ``(N, out_features)`` in x's dtype; differentiable w.r.t. x, coef, base_weight.
    """
    n_basis = coef.shape[-1]
    grid = grid.to(x.dtype)
    if uniform is None:
        uniform = grid_is_uniform(grid)
    has_base = base_weight is not None
    weight = torch.cat([coef, base_weight.unsqueeze(-1)], dim=-1) if has_base else coef
    return _KANLinearTorch.apply(x, grid, weight, int(spline_order), n_basis, has_base, bool(uniform))
