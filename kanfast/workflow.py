"""The KAN paper's interpretability workflow on the fast layers (Liu et al. 2024,
arXiv:2404.19756, sec. 2.5): edge magnitudes, sparsification regularisation from
the activations, pruning, and an LBFGS trainer for small KANs.

Edge function (layer ``l``, input node ``i``, output node ``o``)::

    phi_{o,i}(x) = m_{o,i} (base_weight[o,i] silu(x) + sum_j W[o,i,j] B_j(x)) + s_{o,i}(x)

with ``m`` the layer's per-edge mask (``layer.edge_mask``, 1 when absent) and
``s`` the symbolic branch (:mod:`kanfast.symbolic`, 0 when absent).
Magnitude (eq. 2.17): ``|phi_{o,i}|_1 = mean_n |phi_{o,i}(x_{n,i})|``.

The workflow builds on the model: this module attaches :func:`prune` and
:func:`activation_regularization` to :class:`kanfast.KAN` as methods (``model.prune(x)``,
``model.regularization_loss(mode="activation")``); ``from kanfast import KAN`` loads it.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .knots import grid_is_uniform
from .layer import KAN, FastKANLayer
from .ops import basis_matrix, kan_linear_op

__all__ = [
    "edge_functions",
    "edge_magnitudes",
    "layer_inputs",
    "activation_regularization",
    "prune_masks",
    "apply_edge_masks",
    "prune",
    "fit_lbfgs",
]

#: Largest (rows, in, max(out, G+k)) block materialised at once by edge_magnitudes.
CHUNK_ELEMENTS = 1 << 20

#: :func:`edge_functions` evaluates a layer through the engines (one call on block-diagonal
#: coefficients, ``in * out * in * (G + k)`` elements) up to this size, else by a dense basis.
EDGE_ENGINE_ELEMENTS = 1 << 16


def edge_functions(layer: FastKANLayer, x: torch.Tensor, include_symbolic: bool = True) -> torch.Tensor:
    """Every edge's value on a batch: ``(N, in, out)`` (materialised; use on small
    batches or chunks, see :func:`edge_magnitudes`).

    Small layers (``in * out * in * (G + k) <= EDGE_ENGINE_ELEMENTS``, float32/float64 on the
    CPU) go through the engines: one :func:`kanfast.ops.kan_linear_op` call from the ``in``
    inputs to ``in * out`` outputs with block-diagonal coefficients (output ``(i, o)`` reads
    input ``i`` only), so that the bases and their gradient in ``x`` are the engines' fast
    ones. Otherwise a dense basis (:func:`kanfast.ops.basis_matrix`; when ``x`` requires grad,
    its differentiable Cox-de Boor, whose autograd made the regularised training of the paper's
    [2, 5, 1] cost ~9x the plain loss per step) contracted with the weights. Same values and
    gradients to rounding, differentiable to any order either way.

    Args:
        layer: a :class:`kanfast.FastKANLayer`.
        x: ``(N, in_features)``.
        include_symbolic: add the symbolic branch's edge values.

    Returns:
        ``phi[n, i, o]``, differentiable w.r.t. ``x`` and the layer's parameters.
    """
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"edge_functions expects x of shape (N, {layer.in_features}), got {tuple(x.shape)}")
    W = layer.scaled_spline_weight
    base = layer.base_weight
    if layer.edge_mask is not None:
        W = W * layer.edge_mask.unsqueeze(-1)
        base = base * layer.edge_mask
    n_in, n_out, nb = layer.in_features, layer.out_features, W.shape[-1]
    if x.is_cpu and x.dtype in (torch.float32, torch.float64) and n_in * n_out * n_in * nb <= EDGE_ENGINE_ELEMENTS:
        grid = layer.grid.to(x.dtype)
        # coef[(i, o), i', j] = W[o, i, j] when i' == i, else 0: (out, nb, in, in) [o, j, i, i'] -> (in * out, in, nb)
        coef = torch.diag_embed(W.to(x.dtype).permute(0, 2, 1)).permute(2, 0, 3, 1).reshape(n_in * n_out, n_in, nb)
        spline = kan_linear_op(x, grid, coef, None, layer.spline_order, grid_is_uniform(grid), "torch")
        phi = spline.view(-1, n_in, n_out)
    else:
        D = basis_matrix(x, layer.grid, layer.spline_order)  # (N, in, nb), autograd-differentiable in x
        phi = torch.einsum("nij,oij->nio", D, W.to(x.dtype))
    phi = phi + layer.base_activation(x).unsqueeze(-1) * base.t().to(x.dtype)
    if include_symbolic and layer.symbolic is not None:
        phi = phi + layer.symbolic.edge_values(x)
    return phi


def _chunk_abs_sum(layer, include_symbolic, xc):
    return edge_functions(layer, xc, include_symbolic).abs().sum(0)  # (in, out)


def edge_magnitudes(
    layer: FastKANLayer,
    x: torch.Tensor,
    include_symbolic: bool = True,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-edge L1 magnitude ``|phi_{o,i}|_1 = mean_n |phi_{o,i}(x_{n,i})|``
    (Liu et al. 2024 eq. 2.17): ``(out, in)``.

    Computed chunk by chunk over the batch: no ``(N, in, out)`` tensor exists at
    once, also not for the backward (each chunk is recomputed there by
    ``torch.utils.checkpoint``). Differentiable w.r.t. ``x`` and the parameters.

    Args:
        x: ``(N, in_features)``, N >= 1.
        chunk_rows: rows per chunk (default: about ``2**20`` elements per block).
    """
    if x.dim() != 2 or x.shape[1] != layer.in_features or x.shape[0] == 0:
        raise ValueError(f"edge_magnitudes expects x of shape (N >= 1, {layer.in_features}), got {tuple(x.shape)}")
    n = x.shape[0]
    if chunk_rows is None:
        width = max(layer.out_features, layer.grid.shape[1])
        chunk_rows = max(1, CHUNK_ELEMENTS // (layer.in_features * width))
    track = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    total = None
    for s in range(0, n, chunk_rows):
        xc = x[s : s + chunk_rows]
        if track and n > chunk_rows:
            part = checkpoint(_chunk_abs_sum, layer, include_symbolic, xc, use_reentrant=False)
        else:
            part = _chunk_abs_sum(layer, include_symbolic, xc)
        total = part if total is None else total + part
    return (total / n).t()


def layer_inputs(model: KAN, x: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """The 2-D input of every layer: a forward of ``x`` (keeping the graph when grad
    is enabled), or the inputs kept by the last forward (``model.keep_inputs``).

    Raises:
        ValueError: no ``x`` and no kept inputs.
    """
    if x is not None:
        if x.dim() == 0 or x.shape[-1] != model.layers[0].in_features:
            raise ValueError(
                f"expected x of shape (N, in_features={model.layers[0].in_features}), got {tuple(x.shape)}"
            )
        h = x.reshape(-1, model.layers[0].in_features)
        ins = []
        for layer in model.layers:
            ins.append(h)
            h = layer(h)
        return ins
    ins = [layer.last_input for layer in model.layers]
    if any(t is None for t in ins):
        raise ValueError(
            "no activations: pass x=(N, in_features), or set model.keep_inputs = True and run a forward first"
        )
    return ins


def _entropy(mag: torch.Tensor) -> torch.Tensor:
    total = mag.sum()
    p = mag / total.clamp_min(torch.finfo(mag.dtype).tiny)
    pos = p > 0
    return -torch.where(pos, p * torch.log(torch.where(pos, p, torch.ones_like(p))), torch.zeros_like(p)).sum()


def activation_regularization(
    model: KAN,
    x: Optional[torch.Tensor] = None,
    lamb_l1: float = 1.0,
    lamb_entropy: float = 2.0,
    sample_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The paper's sparsification regulariser (Liu et al. 2024 sec. 2.5, eq. 2.17-2.20)::

        sum_l  lamb_l1 * |Phi_l|_1 + lamb_entropy * S(Phi_l),
        |Phi_l|_1 = sum_{o,i} |phi_{o,i}|_1,   S = -sum p log p,  p = |phi_{o,i}|_1 / |Phi_l|_1

    (the paper's total loss is ``loss_pred + lambda * this``).

    Args:
        model: a :class:`kanfast.KAN`.
        x: ``(N, in_features)`` batch (one extra forward), or None for the inputs
            kept by the last forward (``model.keep_inputs = True``; gradients then
            flow through that forward's graph).
        sample_size: use a random subset of this many rows (None: all).
        generator: for the subset.

    Returns:
        a scalar; gradients reach every parameter (and ``x``).

    Raises:
        ValueError: no activations available, or ``sample_size < 1``.
    """
    if sample_size is not None and sample_size < 1:
        raise ValueError(f"sample_size must be >= 1 or None, got {sample_size!r}")

    def subset(n):
        if sample_size is None or sample_size >= n:
            return None
        return torch.randperm(n, generator=generator)[:sample_size]

    if x is not None:
        x2 = x.reshape(-1, model.layers[0].in_features)
        idx = subset(x2.shape[0])
        ins = layer_inputs(model, x2 if idx is None else x2[idx.to(x2.device)])
    else:
        ins = layer_inputs(model, None)
        idx = subset(ins[0].shape[0])
        if idx is not None:
            ins = [h[idx.to(h.device)] for h in ins]
    reg = None
    for layer, h in zip(model.layers, ins):
        mag = edge_magnitudes(layer, h)
        term = lamb_l1 * mag.sum() + lamb_entropy * _entropy(mag)
        reg = term if reg is None else reg + term
    return reg


# -------------------------------------------------------------------- pruning
def _check_threshold(name: str, value) -> float:
    """``value`` as a float, or ValueError: a NaN threshold keeps nothing (every comparison is
    False) and an infinite one everything or nothing, silently giving a network that outputs 0."""
    try:
        v = None if isinstance(value, (str, bytes, bool)) else float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        v = None
    if v is None or not math.isfinite(v) or v < 0:
        raise ValueError(f"prune: {name} must be a finite number >= 0, got {value!r}")
    return v


@torch.no_grad()
def prune_masks(
    model: KAN,
    x: torch.Tensor,
    node_threshold: float = 1e-2,
    edge_threshold: float = 3e-2,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Which hidden nodes and edges survive pruning (Liu et al. 2024 sec. 2.5.2).

    A hidden node survives when its incoming score ``max_i |phi_{l-1, node, i}|_1``
    and its outgoing score ``max_o |phi_{l, o, node}|_1`` both exceed
    ``node_threshold`` (at least the best node of every hidden layer is kept, so
    the network stays connected). An edge survives when its magnitude exceeds
    ``edge_threshold`` and both its end nodes survive. Inputs and outputs are kept.

    Args:
        x: ``(N, in_features)`` batch on which the magnitudes are measured.
        node_threshold, edge_threshold: finite numbers >= 0 (ValueError otherwise).

    Returns:
        ``(nodes, edges)``: ``nodes[l]`` bool ``(width_l,)`` for l = 0..L (inputs and
        outputs all True); ``edges[l]`` bool ``(out_l, in_l)``.
    """
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    ins = layer_inputs(model, x)
    mags = [edge_magnitudes(layer, h) for layer, h in zip(model.layers, ins)]
    L = len(mags)
    nodes = [torch.ones(model.layers[0].in_features, dtype=torch.bool, device=mags[0].device)]
    for l in range(1, L):
        score_in = mags[l - 1].amax(dim=1)  # (width_l,) max over incoming edges
        score_out = mags[l].amax(dim=0)  # (width_l,) max over outgoing edges
        keep = (score_in > node_threshold) & (score_out > node_threshold)
        if not keep.any():
            keep[int(torch.argmax(torch.minimum(score_in, score_out)))] = True
        nodes.append(keep)
    nodes.append(torch.ones(model.layers[-1].out_features, dtype=torch.bool, device=mags[0].device))
    edges = [(mags[l] > edge_threshold) & nodes[l + 1].unsqueeze(1) & nodes[l].unsqueeze(0) for l in range(L)]
    return nodes, edges


@torch.no_grad()
def apply_edge_masks(model: KAN, edges: Sequence[torch.Tensor]) -> KAN:
    """Mask edges in place: ``edge_mask *= edges[l]`` and the same on the symbolic
    branch. Returns the model."""
    for layer, keep in zip(model.layers, edges):
        m = keep.to(layer.base_weight.dtype)
        if tuple(m.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"edge mask of shape {tuple(m.shape)} does not fit layer {layer}")
        layer.edge_mask = m.clone() if layer.edge_mask is None else layer.edge_mask * m
        if layer.symbolic is not None:
            layer.symbolic.mask.mul_(m)
    return model


def _slice_layer(layer: FastKANLayer, out_idx: torch.Tensor, in_idx: torch.Tensor, keep: torch.Tensor) -> None:
    """Replace the layer's parameters, in place, by the rows out_idx / columns in_idx."""
    layer.in_features = len(in_idx)
    layer.out_features = len(out_idx)
    layer.base_weight = nn.Parameter(layer.base_weight.detach()[out_idx][:, in_idx].clone())
    layer.spline_weight = nn.Parameter(layer.spline_weight.detach()[out_idx][:, in_idx].clone())
    if layer.enable_standalone_scale_spline:
        layer.spline_scaler = nn.Parameter(layer.spline_scaler.detach()[out_idx][:, in_idx].clone())
    layer.grid = layer.grid[in_idx].clone()
    m = keep[out_idx][:, in_idx].to(layer.base_weight.dtype)
    if layer.edge_mask is not None:
        m = layer.edge_mask[out_idx][:, in_idx] * m
    layer.edge_mask = None if bool((m == 1).all()) else m.clone()
    if layer.symbolic is not None:
        layer.symbolic = layer.symbolic.select(out_idx, in_idx)
        layer.symbolic.mask.mul_(keep[out_idx][:, in_idx].to(layer.symbolic.mask.dtype))
    layer.last_input = None


@torch.no_grad()
def prune(
    model: KAN,
    x: torch.Tensor,
    node_threshold: float = 1e-2,
    edge_threshold: float = 3e-2,
) -> KAN:
    """A new, smaller KAN: the unimportant hidden nodes removed (parameters and
    grids sliced) and the weak edges masked (``layer.edge_mask``), see
    :func:`prune_masks` (Liu et al. 2024 sec. 2.5.2).

    The result computes exactly the function of the original with
    :func:`apply_edge_masks` applied (the original is not modified).

    Args:
        x: ``(N, in_features)`` batch on which the magnitudes are measured.

    Returns:
        the pruned copy (same backend, options and device).

    Raises:
        ValueError: x is empty or not finite (magnitudes would be NaN), or a threshold is
            not a finite number >= 0.
    """
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("prune needs a non-empty batch of finite samples; x is empty or contains NaN or inf")
    nodes, edges = prune_masks(model, x, node_threshold, edge_threshold)
    kept = [layer.last_input for layer in model.layers]
    try:  # the copy gets no kept activations (they belong to the original's last forward)
        for layer in model.layers:
            layer.last_input = None
        new = copy.deepcopy(model)
    finally:
        for layer, t in zip(model.layers, kept):
            layer.last_input = t
    for l, layer in enumerate(new.layers):
        in_idx = torch.nonzero(nodes[l]).reshape(-1).to(layer.grid.device)
        out_idx = torch.nonzero(nodes[l + 1]).reshape(-1).to(layer.grid.device)
        _slice_layer(layer, out_idx, in_idx, edges[l].to(layer.grid.device))
    return new


# ------------------------------------------------------------------- training
def fit_lbfgs(
    model: KAN,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    lamb: float = 0.0,
    lamb_l1: float = 1.0,
    lamb_entropy: float = 2.0,
    update_grid_every: Optional[int] = None,
    stop_grid_update_step: int = 50,
    params: Optional[Sequence[torch.Tensor]] = None,
    lr: float = 1.0,
    history_size: int = 10,
    callback=None,
) -> List[float]:
    """Train a small KAN with ``torch.optim.LBFGS`` (strong Wolfe line search), as
    the paper does: loss = MSE + ``lamb`` * :func:`activation_regularization`
    (on the activations of the same forward). LBFGS minimises the loss divided by its
    value at the start (same minimiser): torch's LBFGS drops its curvature pairs once
    ``y.s <= 1e-10``, so on an unscaled loss it stalls into steepest descent as the MSE
    nears 1e-10; scaled, it keeps its quasi-Newton steps down to rounding (the precision
    of pykan's own LBFGS, whose threshold is a parameter).

    Args:
        x: ``(N, in)``; y: ``(N, out)``.
        steps: optimizer steps (each up to 20 function evaluations).
        update_grid_every: adapt the grids to the activations (:meth:`KAN.update_grid`)
            every this many steps, before ``stop_grid_update_step``.
        params: parameters to train (default: all that require grad).
        callback: ``callback(step, loss)`` after every step.

    Returns:
        the MSE after every step.

    Raises:
        ValueError: the loss at the start is not finite.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    opt = torch.optim.LBFGS(
        params,
        lr=lr,
        history_size=history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-32,
        tolerance_change=1e-32,
    )
    keep_before = model.keep_inputs
    model.keep_inputs = lamb > 0
    history = []

    def objective() -> torch.Tensor:
        loss = torch.mean((model(x) - y) ** 2)
        if lamb > 0:
            loss = loss + lamb * activation_regularization(model, None, lamb_l1, lamb_entropy)
        return loss

    try:
        # The objective LBFGS sees is the loss over its value at the start: torch's LBFGS skips its
        # curvature update whenever y.s <= 1e-10 (a fixed threshold), which an unscaled loss near
        # 1e-10 always meets, and it then crawls by line-searched steepest descent.
        with torch.no_grad():
            start = float(objective())
        if not math.isfinite(start):
            raise ValueError(f"fit_lbfgs: the loss at the start is {start} (non-finite inputs, targets or weights)")
        scale = 1.0 / start if start > 0 else 1.0
        for step in range(steps):
            if update_grid_every and step % update_grid_every == 0 and step < stop_grid_update_step:
                model.update_grid(x)

            def closure():
                opt.zero_grad()
                loss = objective() * scale
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                mse = float(torch.mean((model(x) - y) ** 2))
            history.append(mse)
            if callback is not None:
                callback(step, mse)
    finally:
        model.keep_inputs = keep_before
    return history


# the workflow's methods of the model (``model.prune(x)``, ``model.regularization_loss(mode="activation")``):
# attached here, so that the model does not import the workflow built on it
KAN.prune = prune
KAN.activation_regularization = activation_regularization
