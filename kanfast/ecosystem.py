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
import re
from typing import Callable, Iterator, Mapping, Optional, Union

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


_PYKAN_BASE_FUNS = ("silu", "identity", "zero")


def _pykan_base_name(fn, where: str) -> str:
    """Which of pykan's base functions ``fn`` is ('silu', 'identity', 'zero'), told by its values
    (pykan keeps a name only on the top model, and ``prune_input`` replaces it by the module)."""
    if isinstance(fn, str):
        if fn not in _PYKAN_BASE_FUNS:
            raise ValueError(f"{where}: base function {fn!r} is not one of {_PYKAN_BASE_FUNS}; not supported")
        return fn
    t = torch.cat([torch.linspace(-8.0, 8.0, 161, dtype=torch.float64), torch.tensor([-0.3, 1e-3, 0.7])])
    try:
        with torch.no_grad():
            v = fn(t)
    except Exception as e:  # noqa: BLE001 - any failure means "not one we know"
        raise ValueError(f"{where}: cannot evaluate the base function {fn!r} ({e}); not supported") from e
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.shape == t.shape:
        for name, want in (("silu", torch.nn.functional.silu(t)), ("identity", t), ("zero", torch.zeros_like(t))):
            if bool(((v - want).abs() <= 1e-12 * (1.0 + want.abs())).all()):
                return name
    raise ValueError(
        f"{where}: the base function {fn!r} is not silu, identity or zero (pykan's choices kanfast can "
        f"represent); not supported"
    )


def _pykan_config(path) -> Optional[dict]:
    """pykan's ``saveckpt(p)`` writes ``p_state`` and ``p_config.yml``: the config of a ``*_state`` file."""
    path = os.fspath(path)
    if not path.endswith("_state"):
        return None
    cfg_path = path[: -len("_state")] + "_config.yml"
    if not os.path.isfile(cfg_path):
        return None
    try:
        import yaml  # pykan's own dependency; optional here
    except ImportError:
        return None
    with open(cfg_path) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            # pykan writes the base function module itself after prune_input (!!python/object tags)
            return {"_unreadable": f"{cfg_path} is not plain YAML ({type(e).__name__})"}
    return cfg if isinstance(cfg, dict) else None


_PYKAN_KEY = re.compile(
    r"act_fun\.(\d+)\.(grid|coef|mask|scale_base|scale_sp)|symbolic_fun\.(\d+)\.(mask|affine)"
    r"|(?:sub)?node_(?:scale|bias)_(\d+)|input_id"
)


def from_pykan(
    state_dict,
    *,
    base_fun: Optional[str] = None,
    n_inputs: Optional[int] = None,
    **kan_kwargs,
) -> KAN:
    """Build a :class:`kanfast.KAN` from a pykan 0.2.x ``MultKAN`` (the module, its
    ``state_dict()``, or the ``<path>_state`` file its ``saveckpt`` writes).

    pykan (github.com/KindXiaoming/pykan, 0.2.8) stores per layer ``l``:
    ``act_fun.{l}.grid (in, G + 2k + 1)`` (the same extended knot vector as kanfast),
    ``act_fun.{l}.coef (in, out, G + k)``, ``act_fun.{l}.scale_base``, ``scale_sp``,
    ``mask`` ``(in, out)``, ``symbolic_fun.{l}.mask (out, in)`` / ``.affine``, and the
    node affine maps ``subnode_scale_{l}``, ``subnode_bias_{l}``, ``node_scale_{l}``,
    ``node_bias_{l}`` ``(out,)``. Its layer computes (``b`` the base function)

        y_o = node_scale_o * (subnode_scale_o * S_o + subnode_bias_o) + node_bias_o,
        S_o = sum_i mask_io (scale_base_io b(x_i) + scale_sp_io sum_j coef_ioj B_j(x_i))

    with the same Cox-de Boor bases (half-open spans, zero outside the knots). So
    ``y_o = s_o S_o + c_o`` with ``s_o = node_scale_o subnode_scale_o`` and
    ``c_o = node_scale_o subnode_bias_o + node_bias_o``, and the conversion is

    * ``base_weight[o, i] = s_o mask_io scale_base_io``, ``spline_weight[o, i, :] = coef[i, o, :]``,
      ``spline_scaler[o, i] = s_o mask_io scale_sp_io``: the scale folds exactly (a
      scale on a sum of splines and base terms scales each term);
    * the offset ``c_o`` of a hidden node has a place only where the next layer reads
      node ``o`` through splines alone: ``B_j(x + c)`` on knots ``t`` is ``B_j(x)`` on
      knots ``t - c``, so ``c_o`` is folded exactly into the next layer's knots of input
      ``o`` when every base term of that input there is zero (``mask * scale_base == 0``
      on row ``o``, or ``b = 0``). A base term ``w b(x + c)`` is no ``w' b(x)``, and
      kanfast's layers have no bias, so any other non-zero offset -- in particular any on
      the output layer -- is refused with ValueError naming the key;
    * ``b = silu`` -> :class:`nn.SiLU`, ``identity`` -> :class:`nn.Identity` (the
      model's ``base_activation``), ``zero`` -> SiLU with ``base_weight = 0`` (exact;
      further training then also trains the base terms). From a module, ``b`` is read
      from every ``act_fun`` layer (by its values); from a state_dict it is not recorded:
      pass ``base_fun`` (default ``'silu'``); from a ``<path>_state`` file it is read
      from pykan's ``<path>_config.yml`` beside it when that parses.
    * inputs: pykan's forward reads the columns ``input_id`` of ``x`` (``prune_input``
      keeps a subset; ``input_id`` is a plain attribute, so only a module has it). With
      ``n_inputs`` the KAN takes ``n_inputs`` columns and reads the same ones (the
      other columns' edges have zero weights, so they must be finite); without it an
      ``input_id`` other than ``0..n-1`` is refused. A model pruned to a prefix
      (``input_id = [0, 1]`` of 3) is indistinguishable from a 2-input model in pykan
      0.2.8's state, except when its ``cache_data`` still holds the wider samples (then
      it is refused without ``n_inputs``): pass ``n_inputs`` after ``prune_input``.

    Refused with ValueError: multiplication nodes, active symbolic edges (from a module
    with ``symbolic_enabled=False`` they are ignored, as pykan does), layers with
    different grid sizes or orders, another base function, unexpected keys (another
    pykan layout), non-finite affine parameters.

    Args:
        state_dict: ``MultKAN``, ``MultKAN.state_dict()``, or a path to a ``torch.save`` of it.
        base_fun: ``'silu'``, ``'identity'`` or ``'zero'``: the pykan model's base function
            when it cannot be read (state_dict); checked against the module/config otherwise.
        n_inputs: number of columns of the ``x`` fed to pykan's model (see above).
        **kan_kwargs: extra :class:`kanfast.KAN` arguments (``backend`` ...).

    Returns:
        a :class:`kanfast.KAN` (pykan's dtype, float32 by default) whose output equals the
        pykan model's to rounding, shape ``(batch, n_inputs or in) -> (batch, out)``.

    Raises:
        ValueError: as listed above. TypeError: not a state_dict, module or path.
    """
    if base_fun is not None and base_fun not in _PYKAN_BASE_FUNS:
        raise ValueError(f"base_fun must be one of {_PYKAN_BASE_FUNS}, got {base_fun!r}")
    module = state_dict if isinstance(state_dict, nn.Module) else None
    base_names: Optional[list] = None  # per layer, when known
    symbolic_on = True
    input_id = None
    cached_width = None
    if module is not None:
        if not isinstance(getattr(module, "act_fun", None), nn.ModuleList):
            raise ValueError(f"not a pykan MultKAN module: {type(module).__name__} has no act_fun ModuleList")
        width = getattr(module, "width", None)
        if width is not None and any(isinstance(w, (list, tuple)) and len(w) > 1 and w[1] for w in width):
            raise ValueError(f"pykan model has multiplication nodes (width={width}); not supported")
        base_names = [
            _pykan_base_name(getattr(layer, "base_fun", None), f"pykan layer {l}")
            for l, layer in enumerate(module.act_fun)
        ]
        symbolic_on = bool(getattr(module, "symbolic_enabled", True))
        input_id = getattr(module, "input_id", None)
        cache = getattr(module, "cache_data", None)
        if isinstance(cache, torch.Tensor) and cache.dim() == 2:
            cached_width = int(cache.shape[1])
        sd = module.state_dict()
    else:
        sd = _load_maybe_path(state_dict)
        cfg = _pykan_config(state_dict) if isinstance(state_dict, (str, os.PathLike)) else None
        if cfg is not None and "_unreadable" in cfg:
            if base_fun is None:
                raise ValueError(
                    f"{cfg['_unreadable']}: cannot tell the pykan model's base function; pass base_fun="
                )
        elif cfg is not None:
            name = cfg.get("base_fun_name")
            if name is not None:
                base_names = [_pykan_base_name(name, "pykan config base_fun_name")]
            width = cfg.get("width")
            if isinstance(width, list) and any(isinstance(w, list) and len(w) > 1 and w[1] for w in width):
                raise ValueError(f"pykan model has multiplication nodes (width={width}); not supported")
            symbolic_on = bool(cfg.get("symbolic_enabled", True))
        if "input_id" in sd:
            input_id = sd["input_id"]
    if "act_fun.0.coef" not in sd:
        raise ValueError("not a pykan MultKAN state_dict: no 'act_fun.0.coef' key")
    sd = {key: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for key, v in sd.items()}
    unknown = [k for k in sd if not _PYKAN_KEY.fullmatch(k)]
    if unknown:
        raise ValueError(
            f"unexpected keys {unknown[:5]} in the pykan state_dict: this converter reads pykan 0.2.x's "
            f"MultKAN layout (act_fun.{{l}}.*, symbolic_fun.{{l}}.*, node_scale_{{l}} ...)"
        )
    if base_names is not None and base_fun is not None and any(n != base_fun for n in base_names):
        raise ValueError(f"base_fun={base_fun!r} but the pykan model's base function is {base_names[0]!r}")
    if base_names is None:
        base_names = [base_fun or "silu"]
    if len(set(base_names)) != 1:
        raise ValueError(f"pykan layers use different base functions {base_names}; not supported")
    bname = base_names[0]
    if bname == "identity":
        if kan_kwargs.get("base_activation", nn.Identity) is not nn.Identity:
            raise ValueError("the pykan model's base function is the identity; do not pass base_activation")
        kan_kwargs["base_activation"] = nn.Identity
    elif "base_activation" in kan_kwargs and kan_kwargs["base_activation"] is not nn.SiLU:
        raise ValueError(f"the pykan model's base function is {bname!r}; do not pass another base_activation")

    f64 = torch.float64
    widths, G, k, new_sd = [], None, None, {}
    pending_shift = None  # offsets of the previous layer's outputs, folded into this layer's knots
    n_layers = 0
    while f"act_fun.{n_layers}.coef" in sd:
        n_layers += 1
    for l in range(n_layers):
        p = f"act_fun.{l}."
        coef, grid = sd[p + "coef"], sd[p + "grid"]
        if coef.dim() != 3:
            raise ValueError(f"pykan layer {l}: coef has shape {tuple(coef.shape)}, expected (in, out, G + k)")
        in_f, out_f, nb = coef.shape
        dtype = coef.dtype
        missing = [key for key in (p + "grid", p + "scale_base", p + "scale_sp") if key not in sd]
        missing += [f"{n}_{l}" for n in ("node_scale", "node_bias", "subnode_scale", "subnode_bias") if f"{n}_{l}" not in sd]
        if missing:
            raise ValueError(f"pykan layer {l}: missing {missing} (not a pykan 0.2.x MultKAN state_dict)")
        sb, ssp = sd[p + "scale_base"].to(f64), sd[p + "scale_sp"].to(f64)
        mask = sd.get(p + "mask", torch.ones(in_f, out_f)).to(f64)
        for name, t in (("scale_base", sb), ("scale_sp", ssp), ("mask", mask)):
            if t.shape != (in_f, out_f):
                raise ValueError(f"pykan layer {l}: {name} has shape {tuple(t.shape)}, expected {(in_f, out_f)}")
        if grid.dim() != 2 or grid.shape[0] != in_f:
            raise ValueError(f"pykan layer {l}: grid has shape {tuple(grid.shape)} for {in_f} inputs")
        Gl, kl = _infer_orders(grid, nb, f"pykan layer {l}")
        if G is not None and (Gl, kl) != (G, k):
            raise ValueError(f"pykan layer {l} has (grid, k) {(Gl, kl)}, layer 0 has {(G, k)}; kanfast's KAN needs one")
        G, k = Gl, kl
        if widths and widths[-1] != in_f:
            raise ValueError(
                f"pykan layer {l} takes {in_f} inputs but layer {l - 1} has {widths[-1]} outputs: "
                f"multiplication nodes are not supported"
            )
        aff = {n: sd[f"{n}_{l}"].to(f64).reshape(-1) for n in ("node_scale", "node_bias", "subnode_scale", "subnode_bias")}
        for n, t in aff.items():
            if t.shape != (out_f,):
                raise ValueError(
                    f"pykan {n}_{l} has {t.numel()} entries for {out_f} outputs of layer {l}: "
                    f"multiplication nodes are not supported"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"pykan {n}_{l} has non-finite entries")
        sym = sd.get(f"symbolic_fun.{l}.mask")
        if symbolic_on and sym is not None and bool((sym != 0).any()):
            raise ValueError(f"pykan layer {l} has active symbolic functions (symbolic_fun.{l}.mask); not supported")
        scale = aff["node_scale"] * aff["subnode_scale"]
        offset = aff["node_scale"] * aff["subnode_bias"] + aff["node_bias"]
        base_w = (scale[None, :] * mask * sb).t()  # (out, in)
        if bname == "zero":
            base_w = torch.zeros_like(base_w)
        knots = grid.to(f64)
        if pending_shift is not None:
            # previous layer's offsets: x + c through splines only = x on knots shifted by -c
            rows = torch.nonzero(pending_shift != 0).reshape(-1).tolist()
            for i in rows:
                if bool((base_w[:, i] != 0).any()):
                    raise ValueError(
                        f"pykan layer {l - 1}: node {i} has a non-zero offset c = node_scale_{l - 1} * "
                        f"subnode_bias_{l - 1} + node_bias_{l - 1} = {float(pending_shift[i]):.6g} and layer {l} "
                        f"reads it through a base term (mask * scale_base != 0): b(x + c) has no place in "
                        f"kanfast's layers (no bias); not representable"
                    )
            knots = knots - pending_shift[:, None]
            if not bool((knots[:, 1:] > knots[:, :-1]).all()):
                raise ValueError(f"pykan layer {l}: knots shifted by the offsets of layer {l - 1} are not increasing")
        q = f"layers.{l}."
        new_sd[q + "grid"] = knots.to(grid.dtype)
        new_sd[q + "base_weight"] = base_w.to(dtype).contiguous()
        new_sd[q + "spline_weight"] = coef.permute(1, 0, 2).contiguous()
        new_sd[q + "spline_scaler"] = (scale[None, :] * mask * ssp).t().to(dtype).contiguous()
        if not widths:
            widths.append(in_f)
        widths.append(out_f)
        pending_shift = offset if bool((offset != 0).any()) else None
    if pending_shift is not None:
        keys = [f"{n}_{n_layers - 1}" for n in ("subnode_bias", "node_bias") if bool((sd[f"{n}_{n_layers - 1}"] != 0).any())]
        raise ValueError(
            f"pykan {' and '.join(keys)} non-zero: an offset on the model's outputs "
            f"({pending_shift.tolist()}) has no place in kanfast's KAN (its layers have no bias); not representable"
        )

    # which columns of x pykan's forward reads
    n0 = widths[0]
    iid = list(range(n0)) if input_id is None else [int(v) for v in torch.as_tensor(input_id).reshape(-1).tolist()]
    if len(iid) != n0:
        raise ValueError(f"pykan input_id has {len(iid)} entries for {n0} inputs of layer 0")
    if len(set(iid)) != n0 or min(iid) < 0:
        raise ValueError(f"pykan input_id {iid} repeats an input or is negative; not supported")
    if n_inputs is None:
        if iid != list(range(n0)):
            raise ValueError(
                f"the pykan model reads columns input_id={iid} of its input (prune_input); pass n_inputs= the "
                f"number of columns of the x you feed it, to get a KAN that reads the same columns"
            )
        if cached_width is not None and cached_width != n0:
            raise ValueError(
                f"the pykan model's cache_data has {cached_width} columns but it reads {n0} (input_id={iid}): "
                f"it was pruned with prune_input; pass n_inputs= the number of columns of the x you feed it"
            )
        n_inputs = n0
    if not isinstance(n_inputs, int) or n_inputs <= max(iid):
        raise ValueError(f"n_inputs={n_inputs!r} must be an int > max(input_id) = {max(iid)}")

    g0 = new_sd["layers.0.grid"]
    kan_kwargs.setdefault("grid_range", (float(g0[0, k]), float(g0[0, -k - 1])))
    model = KAN([n_inputs] + widths[1:], grid_size=G, spline_order=k, dtype=sd["act_fun.0.coef"].dtype, **kan_kwargs)
    if iid != list(range(n_inputs)):
        # layer 0 over all n_inputs columns: pykan's rows at input_id, zero edges elsewhere
        fresh = model.layers[0]
        idx = torch.tensor(iid)
        grid_full = fresh.grid.detach().clone().to(g0.dtype)
        grid_full[idx] = g0
        bw = torch.zeros_like(fresh.base_weight)
        bw[:, idx] = new_sd["layers.0.base_weight"]
        sw = torch.zeros_like(fresh.spline_weight)
        sw[:, idx] = new_sd["layers.0.spline_weight"]
        sc = torch.zeros_like(fresh.spline_scaler)
        sc[:, idx] = new_sd["layers.0.spline_scaler"]
        new_sd.update({"layers.0.grid": grid_full, "layers.0.base_weight": bw, "layers.0.spline_weight": sw,
                       "layers.0.spline_scaler": sc})
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
