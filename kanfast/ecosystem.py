"""Fitting kanfast into existing PyTorch code.

* :func:`kanify`: swap the ``nn.Linear`` modules of a model for KAN layers;
* :func:`from_efficient_kan`, :func:`from_pykan`: load checkpoints of the two
  reference KAN implementations into a :class:`kanfast.KAN`;
* :func:`export_onnx`: ONNX export through the plain-torch formulation;
* :func:`update_grid_distributed`: grid update under ``torch.distributed``.

KAN math: Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks", arXiv:2404.19756
(eq. 2.10 for the base + spline parameterisation, sec. 2.2 for grid updates).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from .layer import KAN, FastKANLayer

__all__ = [
    "kanify",
    "FastKANLayerWithBias",
    "from_efficient_kan",
    "from_pykan",
    "export_onnx",
    "update_grid_distributed",
    "kan_layers",
]


# ------------------------------------------------------------------ kanify
class FastKANLayerWithBias(FastKANLayer):
    """:class:`FastKANLayer` plus an additive ``bias`` ``(out_features,)``, the
    module :func:`kanify` puts in place of an ``nn.Linear`` that has a bias.
    Same arguments as :class:`FastKANLayer`; ``y = FastKANLayer(x) + bias``."""

    def __init__(self, in_features: int, out_features: int, *args, **kwargs):
        super().__init__(in_features, out_features, *args, **kwargs)
        self.bias = nn.Parameter(
            torch.zeros(out_features, device=self.base_weight.device, dtype=self.base_weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.bias.to(y.dtype)


def kanify(
    model: nn.Module,
    *,
    filter: Optional[Callable[[str, nn.Linear], bool]] = None,
    **layer_kwargs,
) -> nn.Module:
    """Replace ``nn.Linear`` modules of ``model`` by KAN layers, in place.

    Each selected ``nn.Linear(in, out)`` becomes a :class:`FastKANLayer` (or a
    :class:`FastKANLayerWithBias` when it had a bias) with the same
    ``in_features``/``out_features``, on the same device and dtype.

    Seeding: ``base_weight`` is a copy of the linear layer's ``weight`` and
    ``bias`` of its ``bias``; the spline weights get the usual small random
    initialisation (``scale_noise``). The new layer therefore computes
    ``weight @ silu(x) + bias + spline(x)`` (Liu et al. 2024, eq. 2.10), not the old
    ``weight @ x + bias``: kanify changes the function; train or fine-tune
    afterwards (and build the optimizer after kanify: the parameters are new).

    Modules that read a child's ``.weight``/``.bias`` themselves instead of
    calling it (torch 2.13's ``torch/nn``, checked by reading its sources):

    * ``nn.MultiheadAttention`` (and subclasses) passes ``out_proj.weight`` and
      ``out_proj.bias`` straight to ``F.multi_head_attention_forward`` on every
      path, and ``nn.LinearCrossEntropyLoss`` reads ``linear.weight``: their
      ``nn.Linear`` children are never replaced (a KAN there would need a
      rewrite of the attention/loss itself); the rest of the model is kanified.
    * ``nn.TransformerEncoderLayer``'s inference fast path
      (``torch._transformer_encoder_layer_fwd``, taken in ``eval()`` mode when no
      gradient is needed) reads ``linear1.weight``/``linear2.weight`` as a plain
      feed-forward block. When kanify replaces either of them it turns that fast
      path off, so the layer always runs its ordinary (slow-path) forward, which
      calls the KAN layers: it sets the layer's ``activation_relu_or_gelu`` to
      0 (torch's value for "another activation", one of the conditions the fast
      path checks; the activation applied, ``layer.activation``, is
      unchanged), and ``use_nested_tensor = False`` on every ``nn.TransformerEncoder`` holding such a layer (its
      nested-tensor path would hand the KAN layers nested tensors). Train and
      eval modes, with and without ``no_grad``, then compute the same function.
    * ``nn.TransformerDecoderLayer`` and ``nn.Transformer`` have no other such
      read: their linears are replaced.

    Args:
        model: any module; modified in place.
        filter: ``filter(qualified_name, linear) -> bool`` selects the layers to
            replace (default: all). Names are those of ``model.named_modules()``.
        **layer_kwargs: passed to :class:`FastKANLayer` (``grid_size``,
            ``spline_order``, ``grid_range``, ``backend``, ...).

    Returns:
        ``model`` (the same object; the root itself is returned replaced if it is
        an ``nn.Linear``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kanify expects an nn.Module, got {type(model).__name__}")
    if "device" in layer_kwargs or "dtype" in layer_kwargs:
        raise TypeError("kanify takes device and dtype from each replaced nn.Linear; do not pass them")

    def convert(name: str, lin: nn.Linear) -> FastKANLayer:
        w = lin.weight
        cls = FastKANLayerWithBias if lin.bias is not None else FastKANLayer
        new = cls(lin.in_features, lin.out_features, device=w.device, dtype=w.dtype, **layer_kwargs)
        with torch.no_grad():
            new.base_weight.copy_(w)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.train(lin.training)
        return new

    def selected(name: str, mod: nn.Module) -> bool:
        return isinstance(mod, nn.Linear) and (filter is None or bool(filter(name, mod)))

    if selected("", model):
        return convert("", model)
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, _READS_LINEAR_WEIGHTS):
            continue
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if selected(full, child):
                targets.append((mod, child_name, full, child))
    for parent, child_name, full, child in targets:
        setattr(parent, child_name, convert(full, child))
    _disable_transformer_fast_paths(model)
    return model


# Modules whose forward reads the weight/bias of their nn.Linear children directly (torch/nn sources):
# their linears are left alone by kanify.
_READS_LINEAR_WEIGHTS = tuple(
    cls for cls in (nn.MultiheadAttention, getattr(nn, "LinearCrossEntropyLoss", None)) if cls is not None
)


def _ffn_replaced(layer: nn.Module) -> bool:
    return not (isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear))


def _disable_transformer_fast_paths(model: nn.Module) -> None:
    """Send every ``nn.TransformerEncoderLayer`` whose feed-forward linears were replaced
    (and the ``nn.TransformerEncoder`` holding it) down torch's ordinary forward: the fused
    inference path reads ``linear1.weight``/``linear2.weight`` as a plain MLP (see :func:`kanify`)."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and _ffn_replaced(mod):
            # the fast path requires this flag (transformer.py: "activation_relu_or_gelu was not True");
            # the slow path applies mod.activation whatever the flag says
            mod.activation_relu_or_gelu = 0
        elif isinstance(mod, nn.TransformerEncoder) and any(
            isinstance(layer, nn.TransformerEncoderLayer) and _ffn_replaced(layer) for layer in mod.layers
        ):
            mod.use_nested_tensor = False


def kan_layers(model: nn.Module) -> Iterator[FastKANLayer]:
    """The :class:`FastKANLayer` modules of ``model`` (DDP/FSDP wrappers included), in order."""
    for mod in model.modules():
        if isinstance(mod, FastKANLayer):
            yield mod


# -------------------------------------------------------------- converters
def _load_maybe_path(src) -> Mapping[str, torch.Tensor]:
    if isinstance(src, (str, os.PathLike)):
        obj = torch.load(src, map_location="cpu", weights_only=True)
    else:
        obj = src
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (mapping of tensors), a module or a path, got {type(src).__name__}")
    return obj


def _infer_orders(grid: torch.Tensor, n_basis: int, where: str):
    n_knots = grid.shape[-1]
    k = n_knots - n_basis - 1
    G = n_basis - k
    if k < 0 or G < 1:
        raise ValueError(
            f"{where}: {n_knots} knots and {n_basis} coefficients per curve do not make a B-spline "
            f"(need knots = G + 2k + 1 and coefficients = G + k)"
        )
    return G, k


def from_efficient_kan(state_dict, **kan_kwargs) -> KAN:
    """Build a :class:`kanfast.KAN` from an efficient-kan ``KAN`` checkpoint.

    efficient-kan (github.com/Blealtan/efficient-kan) ``KANLinear`` stores
    ``layers.{l}.base_weight (out, in)``, ``layers.{l}.spline_weight (out, in, G + k)``,
    ``layers.{l}.spline_scaler (out, in)`` (absent when standalone scaling is
    off: taken as 1) and the buffer ``layers.{l}.grid (in, G + 2k + 1)``, with the
    same Cox-de Boor bases on the extended grid: kanfast's layout, so the
    tensors are loaded unchanged. ``G`` and ``k`` are inferred from the shapes.

    Args:
        state_dict: a state_dict, an efficient-kan module, or a path to one saved
            with ``torch.save``.
        **kan_kwargs: extra :class:`kanfast.KAN` arguments (e.g. ``backend``,
            ``grid_eps``, ``base_activation`` if not SiLU).

    Returns:
        a :class:`kanfast.KAN` (float32 unless the checkpoint is another dtype)
        whose outputs equal efficient-kan's to rounding.

    Raises:
        ValueError: no ``layers.0.*`` keys, inconsistent shapes, or layers with
            different grid sizes/orders.
    """
    sd = _load_maybe_path(state_dict)
    widths, G, k, new_sd = [], None, None, {}
    l = 0
    while f"layers.{l}.spline_weight" in sd:
        p = f"layers.{l}."
        sw, bw, grid = sd[p + "spline_weight"], sd[p + "base_weight"], sd[p + "grid"]
        out_f, in_f, nb = sw.shape
        if bw.shape != (out_f, in_f) or grid.shape[0] != in_f:
            raise ValueError(f"efficient-kan layer {l}: inconsistent shapes {tuple(bw.shape)}, {tuple(sw.shape)}, {tuple(grid.shape)}")
        Gl, kl = _infer_orders(grid, nb, f"efficient-kan layer {l}")
        if G is not None and (Gl, kl) != (G, k):
            raise ValueError(f"efficient-kan layer {l} has (grid_size, spline_order) {(Gl, kl)}, layer 0 has {(G, k)}")
        G, k = Gl, kl
        if widths and widths[-1] != in_f:
            raise ValueError(f"efficient-kan layer {l} takes {in_f} inputs but layer {l - 1} gives {widths[-1]}")
        if not widths:
            widths.append(in_f)
        widths.append(out_f)
        scaler = sd.get(p + "spline_scaler", torch.ones(out_f, in_f, dtype=sw.dtype))
        new_sd.update({p + "grid": grid, p + "base_weight": bw, p + "spline_weight": sw, p + "spline_scaler": scaler})
        l += 1
    if not widths:
        raise ValueError("not an efficient-kan KAN state_dict: no 'layers.0.spline_weight' key")
    g0 = new_sd["layers.0.grid"]
    kan_kwargs.setdefault("grid_range", (float(g0[0, k]), float(g0[0, -k - 1])))
    model = KAN(widths, grid_size=G, spline_order=k, dtype=g0.dtype, **kan_kwargs)
    model.load_state_dict(new_sd, strict=True)
    return model


def from_pykan(state_dict, **kan_kwargs) -> KAN:
    """Build a :class:`kanfast.KAN` from a pykan ``MultKAN`` checkpoint.

    pykan (github.com/KindXiaoming/pykan, ``KANLayer``) stores per layer ``l``:
    ``act_fun.{l}.grid (in, G + 2k + 1)`` (the uniform ``grid_range`` grid extended by
    ``k`` knots each side, the same convention as kanfast), ``act_fun.{l}.coef
    (in, out, G + k)``, ``act_fun.{l}.scale_base (in, out)``, ``act_fun.{l}.scale_sp
    (in, out)``, ``act_fun.{l}.mask (in, out)``, and in ``MultKAN`` the node affine
    maps ``subnode_scale.{l}``, ``subnode_bias.{l}``, ``node_scale.{l}``,
    ``node_bias.{l}`` (out,). Its layer computes

        y_o = node_scale_o * (subnode_scale_o * sum_i mask_io (scale_base_io silu(x_i)
              + scale_sp_io sum_j coef_ioj B_j(x_i)) + subnode_bias_o) + node_bias_o

    with the same Cox-de Boor bases (half-open spans, zero outside the knots), so
    with ``s_o = node_scale_o * subnode_scale_o``:
    ``base_weight[o, i] = s_o mask_io scale_base_io``,
    ``spline_weight[o, i, :] = coef[i, o, :]``,
    ``spline_scaler[o, i] = s_o mask_io scale_sp_io`` (exact).

    Not representable, hence rejected with ValueError: non-zero node/subnode
    biases, multiplication nodes (``width`` entries ``[n, m]`` with ``m > 0``),
    active symbolic functions (``symbolic_fun.{l}.mask`` non-zero) and a
    permuted/pruned input (``input_id`` not ``0..n-1``). The base function is
    assumed to be pykan's default SiLU.

    Args:
        state_dict: ``MultKAN.state_dict()``, the module, or a path to it (pykan's
            ``saveckpt`` writes ``<path>_state``).
        **kan_kwargs: extra :class:`kanfast.KAN` arguments.

    Returns:
        a :class:`kanfast.KAN` reproducing the pykan model's output to rounding.
    """
    sd = _load_maybe_path(state_dict)
    if "act_fun.0.coef" not in sd:
        raise ValueError("not a pykan MultKAN state_dict: no 'act_fun.0.coef' key")
    if "input_id" in sd:
        iid = sd["input_id"].long()
        if not torch.equal(iid, torch.arange(iid.numel())):
            raise ValueError("pykan input_id is a permutation/subset of the inputs (pruned model); not supported")
    widths, G, k, new_sd = [], None, None, {}
    l = 0
    while f"act_fun.{l}.coef" in sd:
        p = f"act_fun.{l}."
        coef, grid = sd[p + "coef"], sd[p + "grid"]
        in_f, out_f, nb = coef.shape
        dtype = coef.dtype
        sb, ssp = sd[p + "scale_base"], sd[p + "scale_sp"]
        mask = sd.get(p + "mask", torch.ones(in_f, out_f, dtype=dtype))
        for name, t in (("scale_base", sb), ("scale_sp", ssp), ("mask", mask)):
            if t.shape != (in_f, out_f):
                raise ValueError(f"pykan layer {l}: {name} has shape {tuple(t.shape)}, expected {(in_f, out_f)}")
        if grid.shape[0] != in_f:
            raise ValueError(f"pykan layer {l}: grid has {grid.shape[0]} rows for {in_f} inputs")
        Gl, kl = _infer_orders(grid, nb, f"pykan layer {l}")
        if G is not None and (Gl, kl) != (G, k):
            raise ValueError(f"pykan layer {l} has (grid, k) {(Gl, kl)}, layer 0 has {(G, k)}")
        G, k = Gl, kl
        if widths and widths[-1] != in_f:
            raise ValueError(
                f"pykan layer {l} takes {in_f} inputs but layer {l - 1} has {widths[-1]} outputs: "
                f"multiplication nodes are not supported"
            )
        s = torch.ones(out_f, dtype=dtype)
        for key in (f"subnode_scale.{l}", f"node_scale.{l}"):
            if key in sd:
                s = s * sd[key].to(dtype)
        for key in (f"subnode_bias.{l}", f"node_bias.{l}"):
            if key in sd and bool((sd[key] != 0).any()):
                raise ValueError(f"pykan {key} is non-zero: kanfast layers have no bias; not supported")
        sym = sd.get(f"symbolic_fun.{l}.mask")
        if sym is not None and bool((sym != 0).any()):
            raise ValueError(f"pykan layer {l} has active symbolic functions (symbolic_fun.{l}.mask); not supported")
        m = mask.to(dtype)
        q = f"layers.{l}."
        new_sd[q + "grid"] = grid.to(dtype)
        new_sd[q + "base_weight"] = (s[None, :] * m * sb.to(dtype)).t().contiguous()
        new_sd[q + "spline_weight"] = coef.permute(1, 0, 2).contiguous()
        new_sd[q + "spline_scaler"] = (s[None, :] * m * ssp.to(dtype)).t().contiguous()
        if not widths:
            widths.append(in_f)
        widths.append(out_f)
        l += 1
    g0 = new_sd["layers.0.grid"]
    kan_kwargs.setdefault("grid_range", (float(g0[0, k]), float(g0[0, -k - 1])))
    model = KAN(widths, grid_size=G, spline_order=k, dtype=g0.dtype, **kan_kwargs)
    model.load_state_dict(new_sd, strict=True)
    return model


# -------------------------------------------------------------------- ONNX
@contextlib.contextmanager
def _backend(model: nn.Module, backend: str):
    layers = list(kan_layers(model))
    saved = [layer.backend for layer in layers]
    try:
        for layer in layers:
            layer.backend = backend
        yield
    finally:
        for layer, b in zip(layers, saved):
            layer.backend = b


def export_onnx(model: nn.Module, x: torch.Tensor, path: Union[str, os.PathLike], *, opset_version: int = 17, dynamic_batch: bool = True, **kwargs) -> None:
    """Export ``model`` (any module containing KAN layers) to ONNX at ``path``.

    The fast backends are custom ops that ONNX does not know, so during export
    every :class:`FastKANLayer` runs its ``"reference"`` formulation (Cox-de Boor
    bases with ``Where``/``Less`` and an ``Einsum``: standard ONNX operators);
    backends are restored afterwards. Uses the TorchScript-based exporter
    (``torch.onnx.export(..., dynamo=False)``), with a dynamic leading (batch)
    axis when ``dynamic_batch``.

    Args:
        model: the module (put it in ``eval()`` mode first if it has dropout/BN).
        x: example input ``(batch, ..., in_features)`` (one tensor).
        path: output file.
        opset_version: ONNX opset (>= 12 for Einsum).
        **kwargs: passed to ``torch.onnx.export``.

    Raises:
        ImportError: the ``onnx`` package is missing (``pip install kanfast[test]``).
        NotImplementedError: the model has symbolic edges (``fix_symbolic``).
    """
    try:
        import onnx  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("export_onnx needs the 'onnx' package: pip install onnx") from e
    if dynamic_batch:
        kwargs.setdefault("dynamic_axes", {"x": {0: "batch"}, "y": {0: "batch"}})
    kwargs.setdefault("input_names", ["x"])
    kwargs.setdefault("output_names", ["y"])
    kwargs.setdefault("dynamo", False)
    import warnings

    if any(type(m).get_extra_state is not nn.Module.get_extra_state for m in model.modules()):
        # symbolic branches (kanfast.fix_symbolic) keep their formulas as non-tensor extra state and
        # scatter per edge; the TorchScript exporter takes neither correctly
        raise NotImplementedError(
            "export_onnx does not support models with symbolic edges (fix_symbolic/auto_symbolic); "
            "export before fixing formulas, or use kanfast.symbolic_formula(model) for the closed form"
        )
    with _backend(model, "reference"), torch.no_grad(), warnings.catch_warnings():
        # shape checks in Python are constants for a fixed in_features: harmless tracer warnings
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(path), opset_version=opset_version, **kwargs)


# ------------------------------------------------------------- distributed
def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same trailing shape, any number of rows), in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    pad = torch.zeros((top - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    buf = [torch.empty((top,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(buf, torch.cat([x, pad]).contiguous(), group=group)
    return torch.cat([b[:s] for b, s in zip(buf, sizes)])


def _is_fsdp(module: nn.Module) -> bool:
    """A module wrapped by FSDP (``fully_shard``, FSDP2) or ``FullyShardedDataParallel``."""
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (torch >= 2.6)
    except ImportError:
        FSDPModule = ()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = ()
    return isinstance(module, FSDPModule) or isinstance(module, FullyShardedDataParallel)


@torch.no_grad()
def update_grid_distributed(model: nn.Module, x: torch.Tensor, *, group=None, src: int = 0, margin: float = 0.01) -> nn.Module:
    """Grid update (Liu et al. 2024 sec. 2.2) that leaves every rank identical.

    Rule: the samples of all ranks are gathered (so the knots are the quantiles
    of the *global* batch, exactly as a single process would compute on it),
    every rank runs the same update on them, then every KAN layer's knots and
    weights are broadcast from rank ``src`` (bitwise identity even where the
    device's reductions are not deterministic). Works on a plain model or a
    ``DistributedDataParallel`` wrapper (call it at the same point on every
    rank; it is a collective). Without an initialised process group it is a
    plain local update. Layers are updated in order, each on the activations
    that reach it (as ``KAN.update_grid``), through forward pre-hooks, so any
    kanified model works.

    Args:
        model: module containing :class:`FastKANLayer` s (or a DDP wrapper).
        x: this rank's input batch ``(n_local, ...)``; ranks may hold different n.
        group: process group (default: the world).
        src: rank whose result is broadcast.
        margin: see :meth:`FastKANLayer.update_grid`.

    Returns:
        ``model``.
    """
    import torch.distributed as dist

    net = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    layers = list(kan_layers(net))
    # FSDP: after a forward, FSDP2 may leave the parameters unsharded as plain tensors,
    # so the parameter type alone does not tell; the wrapper does.
    sharded = any(type(p.data) is not torch.Tensor for layer in layers for p in layer.parameters(recurse=False))
    if sharded or any(_is_fsdp(m) for m in model.modules()):
        raise TypeError(
            "update_grid_distributed: the model is sharded by FSDP (its KAN layers' parameters are DTensor "
            "shards, or unsharded views between forward and backward); in-place updates are not written "
            "back. Load the full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True))) into an unsharded replica, call "
            "update_grid_distributed on the replica, and set_model_state_dict it back; see docs"
        )
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        x = _gather_rows(x, group)
    # Every rank runs the (deterministic) update on the same global samples, so that
    # wrappers whose forward issues collectives stay in step; the broadcast below then
    # makes the result bitwise identical whatever the device's reduction order.
    def pre_hook(mod, args):
        mod.update_grid(args[0], margin=margin)  # returns None: the input is not replaced

    hooks = [layer.register_forward_pre_hook(pre_hook) for layer in layers]
    was_training = net.training
    try:
        net.eval()  # no dropout noise in the activations that place the knots
        net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    if distributed:
        g_src = dist.get_global_rank(group, src) if group is not None else src
        for layer in layers:
            for t in [layer.grid, *layer.parameters(recurse=False)]:
                dist.broadcast(t.data, src=g_src, group=group)
            layer.refresh_grid_cache()
    return model
