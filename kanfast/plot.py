"""Network diagram of a KAN with every edge's learned function (Liu et al. 2024,
arXiv:2404.19756, sec. 2.5 and its figures): nodes bottom (inputs) to top
(outputs); each edge is a small panel with the curve ``phi(x)`` over the
edge's input range, drawn with opacity ``tanh(beta * |phi|_1)``; symbolic edges
are red and labelled with their function.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["plot"]


def _edge_curves(layer, xs: torch.Tensor) -> torch.Tensor:
    """(P, in, out) edge values on the per-feature sample points xs (P, in)."""
    from .workflow import edge_functions

    return edge_functions(layer, xs)


@torch.no_grad()
def plot(
    model,
    x: Optional[torch.Tensor] = None,
    path: Optional[str] = None,
    beta: float = 3.0,
    in_vars: Optional[Sequence[str]] = None,
    out_vars: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    n_points: int = 100,
    max_edges_per_layer: int = 400,
    dpi: int = 150,
    node_labels: bool = True,
):
    """Draw the network (matplotlib, Agg backend).

    Args:
        model: a :class:`kanfast.KAN`.
        x: optional ``(N, in_features)`` batch: edge magnitudes (opacity) and each
            curve's x-range come from the activations of this batch; without it, the
            range is each feature's grid range and the magnitude is measured on
            ``n_points`` uniform points over it.
        path: write the figure there (format from the suffix, e.g. ``.png``).
        beta: opacity ``= tanh(beta * |phi|_1)`` (the paper uses 3).
        in_vars, out_vars: labels of the input / output nodes (one string per node; matplotlib
            mathtext such as ``"$x_1$"`` works). Default: ``x_1 .. x_n`` under the inputs and
            ``y_1 .. y_m`` over the outputs.
        title: figure title.
        n_points: points per curve.
        max_edges_per_layer: layers with more edges are drawn as lines only.
        dpi: resolution of the figure and of the written file.
        node_labels: draw the default labels: the inputs' and outputs' above, and ``h_{l,j}``
            (node ``j`` after layer ``l``, both from 1) beside each hidden node. Layers wider than
            32 nodes get no default labels (they would not be readable). ``in_vars`` /
            ``out_vars`` given explicitly are drawn either way.

    Returns:
        the ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib missing. ValueError: bad ``x`` shape, or ``in_vars`` /
        ``out_vars`` of the wrong length.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise ImportError("kanfast.plot needs matplotlib: pip install kanfast[plot]") from e
    from .workflow import edge_magnitudes, layer_inputs

    layers = list(model.layers)
    widths = [layers[0].in_features] + [l.out_features for l in layers]
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != widths[0]:
            raise ValueError(f"plot expects x of shape (N, in_features={widths[0]}), got {getattr(x, 'shape', x)}")
        x = x.reshape(-1, widths[0])
        ins = [h.detach() for h in layer_inputs(model, x)]
    else:
        ins = None

    L = len(layers)
    for name, given, w in (("in_vars", in_vars, widths[0]), ("out_vars", out_vars, widths[-1])):
        if given is not None and len(given) != w:
            raise ValueError(f"plot: {name} has {len(given)} labels for {w} nodes")
    max_w = max(widths)
    fig_w = max(4.0, 1.4 * max(max_w, max(a * b for a, b in zip(widths[:-1], widths[1:])) ** 0.5 * 1.2))
    fig_h = 2.2 * L + 1.0
    fig = plt.figure(figsize=(min(fig_w, 30), min(fig_h, 30)), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")

    def node_xy(l, n):
        w = widths[l]
        xpos = (n + 0.5) / w
        ypos = (l + 0.35) / (L + 0.7)
        return xpos, ypos

    def node_label(l, n):
        if l == 0 and in_vars is not None:
            return str(in_vars[n])
        if l == L and out_vars is not None:
            return str(out_vars[n])
        if not node_labels or widths[l] > 32:
            return None
        return f"$x_{{{n + 1}}}$" if l == 0 else f"$y_{{{n + 1}}}$" if l == L else f"$h_{{{l},{n + 1}}}$"

    for l, w in enumerate(widths):
        fs = 11 if w <= 8 else 9 if w <= 16 else 7
        for n in range(w):
            px, py = node_xy(l, n)
            ax.scatter([px], [py], s=60, c="black", zorder=3)
            label = node_label(l, n)
            if label is None:
                continue
            if l in (0, L):  # inputs below, outputs above
                ax.text(px, py + (-0.035 if l == 0 else 0.035), label, ha="center", va="center", fontsize=fs)
            else:  # hidden: beside the node, on a light box so the edges behind stay readable
                ax.annotate(label, (px, py), xytext=(7, 0), textcoords="offset points", ha="left", va="center",
                            fontsize=fs - 1, color="#333333", zorder=4,
                            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))

    for l, layer in enumerate(layers):
        nin, nout = layer.in_features, layer.out_features
        k = layer.spline_order
        if ins is not None:
            h = ins[l]
            lo = torch.nan_to_num(h.amin(0), nan=-1.0)
            hi = torch.nan_to_num(h.amax(0), nan=1.0)
            mag = edge_magnitudes(layer, h)  # (out, in)
        else:
            lo = layer.grid[:, k]
            hi = layer.grid[:, -k - 1]
        hi = torch.where(hi > lo, hi, lo + 1.0)
        u = torch.linspace(0, 1, n_points, dtype=layer.grid.dtype, device=layer.grid.device).unsqueeze(1)
        xs = (lo + u * (hi - lo)).to(layer.base_weight.dtype)  # (P, in)
        curves = _edge_curves(layer, xs)  # (P, in, out)
        if ins is None:
            mag = curves.abs().mean(0).t()
        alpha = torch.tanh(beta * mag).clamp(0, 1).cpu()
        sym_mask = layer.symbolic.mask if layer.symbolic is not None else torch.zeros(nout, nin)
        numeric_on = layer.edge_mask if layer.edge_mask is not None else torch.ones(nout, nin)
        n_edges = nin * nout
        draw_panels = n_edges <= max_edges_per_layer
        y0 = node_xy(l, 0)[1]
        y1 = node_xy(l + 1, 0)[1]
        ymid = 0.5 * (y0 + y1)
        pan_h = min(0.55 * (y1 - y0), 0.12)
        pan_w = min(0.8 / n_edges, pan_h * 1.3)
        for i in range(nin):
            for o in range(nout):
                sym = float(sym_mask[o, i]) != 0
                if not sym and float(numeric_on[o, i]) == 0:
                    continue  # pruned edge
                a = float(alpha[o, i])
                color = "red" if sym else "black"
                xi, yi = node_xy(l, i)
                xo, yo = node_xy(l + 1, o)
                e = i * nout + o
                cx = (e + 0.5) / n_edges
                if draw_panels:
                    ax.plot([xi, cx], [yi, ymid - pan_h / 2], color=color, alpha=a, lw=1)
                    ax.plot([cx, xo], [ymid + pan_h / 2, yo], color=color, alpha=a, lw=1)
                    sub = fig.add_axes([cx - pan_w / 2, ymid - pan_h / 2, pan_w, pan_h])
                    sub.plot(xs[:, i].cpu().numpy(), curves[:, i, o].cpu().numpy(), color=color, alpha=max(a, 0.02), lw=2)
                    sub.set_xticks([])
                    sub.set_yticks([])
                    for spine in sub.spines.values():
                        spine.set_alpha(max(a, 0.02))
                    if sym:
                        sub.set_title(layer.symbolic.names[o][i], fontsize=7, color="red", pad=1,
                                      bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none"))
                else:
                    ax.plot([xi, xo], [yi, yo], color=color, alpha=a, lw=1)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
