"""Reference KAN layer: plain Cox-de Boor, the oracle for every test.

This module is deliberately slow and obvious. It shares no code with the fast
paths (``kanfast.torch_backend``, ``kanfast.kernels``): a bug in one of them
cannot hide behind the same bug here.

Definitions (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks", arXiv:2404.19756,
eq. 2.2-2.3; parameterisation of efficient-kan's ``KANLinear``):

    y[..., o] = sum_i base_weight[o, i] * silu(x[..., i])
              + sum_i sum_j W[o, i, j] * B_j(x[..., i]; grid[i])
    W = spline_weight * spline_scaler[..., None]

``B_j(.; t)`` are the ``G + k`` B-spline basis functions of order (degree) ``k``
on the knot vector ``t`` of ``G + 2k + 1`` non-decreasing knots, by the
Cox-de Boor recursion

    B_{j,0}(x) = 1 if t_j <= x < t_{j+1} else 0
    B_{j,p}(x) = (x - t_j) / (t_{j+p} - t_j) * B_{j,p-1}(x)
               + (t_{j+p+1} - x) / (t_{j+p+1} - t_{j+1}) * B_{j+1,p-1}(x)

with the convention that a term whose denominator is 0 (repeated knots) is 0.
Every basis is 0 outside ``[t_0, t_last)``; that includes NaN and +-inf inputs,
so the spline term of such an input is exactly 0 (its base term still carries
the NaN/inf through silu).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["b_spline_basis", "kan_linear_reference"]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 -> 0 (and no NaN in the gradient of the unused branch)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def b_spline_basis(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """All B-spline basis functions of every input feature, by Cox-de Boor.

    Args:
        x: ``(..., in_features)`` inputs, floating point.
        grid: ``(in_features, n_knots)`` per-feature non-decreasing knots
            (``n_knots = G + 2k + 1`` for a KAN layer, any ``n_knots >= k + 2`` here).
        spline_order: ``k >= 0``.

    Returns:
        ``(..., in_features, n_knots - k - 1)`` basis values, dtype of ``x``.
        Differentiable with respect to ``x`` through torch autograd.
    """
    if grid.dim() != 2 or x.shape[-1] != grid.shape[0]:
        raise ValueError(f"grid of shape {tuple(grid.shape)} does not fit x of shape {tuple(x.shape)}")
    k = int(spline_order)
    t = grid.to(x.dtype)
    lo, hi = t[:, 0], t[:, -1]
    inside = (x >= lo) & (x < hi)  # False for NaN, +-inf and everything outside the knots
    # Arithmetic happens on an in-range stand-in so that huge or non-finite inputs
    # never make inf * 0 = NaN; their bases are set to exactly 0 below.
    xs = torch.where(inside, x, lo.expand_as(x)).unsqueeze(-1)
    bases = ((xs >= t[:, :-1]) & (xs < t[:, 1:])).to(x.dtype)
    for p in range(1, k + 1):
        left = _ratio(xs - t[:, : -(p + 1)], t[:, p:-1] - t[:, : -(p + 1)])
        right = _ratio(t[:, p + 1 :] - xs, t[:, p + 1 :] - t[:, 1:-p])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return torch.where(inside.unsqueeze(-1), bases, torch.zeros_like(bases))


def kan_linear_reference(
    x: torch.Tensor,
    grid: torch.Tensor,
    base_weight: torch.Tensor,
    spline_weight: torch.Tensor,
    spline_scaler: Optional[torch.Tensor],
    spline_order: int,
    base_activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """The KAN layer, written as the definition reads.

    Args:
        x: ``(..., in_features)``.
        grid: ``(in_features, G + 2k + 1)`` knots.
        base_weight: ``(out_features, in_features)``.
        spline_weight: ``(out_features, in_features, G + k)``.
        spline_scaler: ``(out_features, in_features)`` or ``None`` (no standalone scale).
        spline_order: ``k``.
        base_activation: the base branch's activation (SiLU in the paper).

    Returns:
        ``(..., out_features)``.
    """
    w = spline_weight if spline_scaler is None else spline_weight * spline_scaler.unsqueeze(-1)
    basis = b_spline_basis(x, grid, spline_order)  # (..., in, G+k): materialised, on purpose
    spline = torch.einsum("...ij,oij->...o", basis, w)
    base = F.linear(base_activation(x), base_weight)
    return base + spline
