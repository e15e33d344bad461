"""FastKANLayer and KAN: the drop-in modules.

Names, shapes and the state_dict layout follow efficient-kan's ``KANLinear``
(``base_weight``, ``spline_weight``, ``spline_scaler``, buffer ``grid``), so its
checkpoints load unchanged.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _mm

from .knots import adaptive_grid, grid_is_uniform, solve_coefficients, uniform_grid, uniform_init_coefficients
from .ops import basis_matrix, forget_grid, kan_linear_op, kan_linear_small, triton_available
from .reference import kan_linear_reference
from .symbolic_branch import SymbolicBranch

# uniform_grid (kanfast.knots), basis_matrix (kanfast.ops) and solve_coefficients (kanfast.knots)
# are defined below this module; they stay importable from here as before
__all__ = ["FastKANLayer", "KAN", "BACKENDS", "uniform_grid", "basis_matrix", "solve_coefficients"]

BACKENDS = ("auto", "reference", "torch", "triton")


def _check_positive_int(name: str, value, minimum: int) -> int:
    """``value`` as a Python int (numpy and torch integers accepted), or ValueError naming ``name``."""
    try:
        ivalue = operator.index(value)
    except TypeError:
        ivalue = None
    if isinstance(value, bool) or ivalue is None or ivalue < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(ivalue)


def _check_margin(margin) -> float:
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    return float(margin)


def _grid_key(g: torch.Tensor) -> tuple:
    """What identifies a grid's values for the uniform-knots cache: storage, version
    counter, dtype, shape, device. Inference tensors (made inside ``torch.inference_mode``,
    e.g. by ``.to()`` there) have no version counter; they cannot be written outside
    inference mode, and inside it only without a version bump (call
    ``refresh_grid_cache()`` then, as after writes through ``grid.data``)."""
    version = None if g.is_inference() else g._version
    return (g.data_ptr(), version, g.dtype, tuple(g.shape), g.device)


_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _under_torch_func(*tensors: torch.Tensor) -> bool:
    """Any of ``tensors`` wrapped by a torch.func transform (grad/vmap levels)."""
    is_wrapped = _is_functorch_wrapped
    return is_wrapped is not None and any(is_wrapped(t) for t in tensors)


_Tensor = torch.Tensor
_PLAIN_DTYPES = (torch.float32, torch.float64)  # the dtypes the general path computes in unchanged
_EAGER_BACKENDS = ("auto", "torch")  # the backends a CPU input resolves to "torch" under


class FastKANLayer(nn.Module):
    r"""A Kolmogorov-Arnold layer: a learnable B-spline plus a SiLU base on every edge.

    .. math::
        y_o = \sum_i w^{base}_{oi}\,\mathrm{silu}(x_i) + \sum_i \sum_j W_{oij} B_j(x_i),
        \quad W = \text{spline\_weight} \cdot \text{spline\_scaler}[..., None]

    (Liu et al. 2024, arXiv:2404.19756, eq. 2.10; efficient-kan's parameterisation.)

    Args:
        in_features: size of each input sample (>= 1).
        out_features: size of each output sample (>= 1).
        grid_size: number of grid intervals ``G`` on ``grid_range`` (>= 1).
        spline_order: B-spline order (degree) ``k`` (>= 0).
        scale_noise: amplitude of the random initial spline curves.
        scale_base: gain of the base weight initialisation.
        scale_spline: gain of the spline scaler initialisation (or of the spline
            weights when ``enable_standalone_scale_spline`` is False).
        enable_standalone_scale_spline: learn a per-edge ``spline_scaler``.
        base_activation: module class of the base branch (SiLU is fused into the
            fast kernels; anything else runs in torch beside them).
        grid_eps: in ``update_grid``, the weight of the uniform grid against the
            sample-adaptive one (1: uniform, 0: quantiles).
        grid_range: ``(lo, hi)`` with ``lo < hi``: initial knot range.
        backend: ``"auto"`` (triton kernels for CUDA tensors when available,
            else ``"torch"``), ``"torch"`` (fast pure-torch path, any device),
            ``"triton"`` (fused kernels; on CPU tensors they run through Triton's
            interpreter, for validation only), ``"reference"`` (the slow oracle).
            Settable after construction.

    Shapes:
        input ``(..., in_features)`` (1-D allowed), output ``(..., out_features)``.

    Attributes:
        base_weight: ``(out_features, in_features)``.
        spline_weight: ``(out_features, in_features, G + k)``.
        spline_scaler: ``(out_features, in_features)`` (when standalone scaling is on).
        grid: buffer ``(in_features, G + 2k + 1)`` of per-feature knots.

    Checkpoints:
        ``load_state_dict`` refuses, naming the layer and what differs, a checkpoint of
        other sizes (in/out features, grid_size, spline_order) and knots that are not
        finite or not non-decreasing in the layer's knot dtype (naming the row, i.e. the
        input feature); the layer is then left exactly as it was (parameters, buffers,
        symbolic branch, knot caches). Repeated knots load (Cox-de Boor's 0/0 := 0).

    Raises:
        ValueError: an argument out of range (named in the message).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        enable_standalone_scale_spline: bool = True,
        base_activation: Type[nn.Module] = nn.SiLU,
        grid_eps: float = 0.02,
        grid_range: Sequence[float] = (-1, 1),
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_features = _check_positive_int("in_features", in_features, 1)
        out_features = _check_positive_int("out_features", out_features, 1)
        grid_size = _check_positive_int("grid_size", grid_size, 1)
        spline_order = _check_positive_int("spline_order", spline_order, 0)
        if len(grid_range) != 2 or not (float(grid_range[0]) < float(grid_range[1])):
            raise ValueError(f"grid_range must be (lo, hi) with lo < hi, got {tuple(grid_range)!r}")
        if not all(math.isfinite(float(v)) for v in grid_range):
            raise ValueError(f"grid_range must be finite, got {tuple(grid_range)!r}")
        for name, v in (("scale_noise", scale_noise), ("scale_base", scale_base), ("scale_spline", scale_spline)):
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be finite, got {v!r}")
        if not 0.0 <= float(grid_eps) <= 1.0:
            raise ValueError(f"grid_eps must be in [0, 1], got {grid_eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.grid_size = grid_size
        self.spline_order = spline_order
        self.scale_noise = scale_noise
        self.scale_base = scale_base
        self.scale_spline = scale_spline
        self.enable_standalone_scale_spline = enable_standalone_scale_spline
        self.grid_eps = grid_eps
        self.grid_range = (float(grid_range[0]), float(grid_range[1]))
        self.backend = backend
        # Built as ordinary tensors even inside torch.inference_mode(): inference tensors
        # have no version counter (the knot cache reads it) and cannot be trained or
        # updated in place afterwards; this way a layer made there works everywhere.
        with torch.inference_mode(False):
            self.base_activation = base_activation()

            self.register_buffer("grid", uniform_grid(in_features, grid_size, spline_order, self.grid_range, **factory))
            self.base_weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            nb = grid_size + spline_order
            self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, nb, **factory))
            if enable_standalone_scale_spline:
                self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features, **factory))
            # Paper workflow (kanfast.workflow / kanfast.symbolic), all off by default and
            # absent from the state_dict while off: per-edge 0/1 mask ``(out, in)`` on the
            # numeric (base + spline) edge functions; symbolic branch added to the output;
            # keep the last forward's 2-D input for activation-based regularisation.
            self.register_buffer("edge_mask", None)
            self.add_module("symbolic", None)
            self.keep_input = False
            self.last_input: Optional[torch.Tensor] = None
            self.reset_parameters()  # also refreshes the grid cache, except on the meta device
            if self.spline_weight.is_meta:
                self.refresh_grid_cache()

    def __getstate__(self):
        # deepcopy/pickle: the kept input (``keep_input``) may be a non-leaf tensor of the
        # last forward's graph, which deepcopy refuses and which means nothing to a copy;
        # the copy keeps its values, detached. The layer itself keeps its graph tensor
        # (activation_regularization(model, None) backpropagates through it).
        state = super().__getstate__()
        if state.get("last_input") is not None:
            state["last_input"] = state["last_input"].detach()
        return state

    # ------------------------------------------------------------------ setup
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def n_basis(self) -> int:
        """Number of basis functions per feature, ``G + k``."""
        return self.grid_size + self.spline_order

    def reset_parameters(self) -> None:
        """efficient-kan's initialisation: uniform knots on ``grid_range``; Kaiming-uniform
        base weights; spline weights fitted (least squares) to small random curves
        sampled at the grid points; Kaiming-uniform spline scalers. On the ``meta``
        device only shapes exist: after ``to_empty(device=...)`` call this again."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        if self.spline_weight.is_meta:  # deferred init: shapes only; call reset_parameters() after to_empty()
            return
        with torch.no_grad():
            # the knots too: uniform on grid_range (also what a to_empty() layer needs)
            self.grid.copy_(
                uniform_grid(self.in_features, self.grid_size, self.spline_order, self.grid_range,
                             device=self.grid.device, dtype=self.grid.dtype)
            )
            self.refresh_grid_cache()
            G, k = self.grid_size, self.spline_order
            noise = (torch.rand(G + 1, self.in_features, self.out_features) - 0.5) * self.scale_noise / G
            # the curves at the grid points t_k..t_{k+G}, fitted with the minimum-norm least-squares
            # coefficients (what a gelsd solve per feature gives), in O(G k^2) for all features at once
            coef = uniform_init_coefficients(noise.to(self.spline_weight.dtype), k)
            del noise
            gain = 1.0 if self.enable_standalone_scale_spline else self.scale_spline
            # cast and scale in place (the same float ops as gain * coef.to(dtype), no more full copies)
            self.spline_weight.copy_(coef)
            del coef
            if gain != 1.0:
                self.spline_weight.mul_(gain)
            if self.enable_standalone_scale_spline:
                nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}, "
            f"spline_order={self.spline_order}, backend={self.backend!r}"
        )

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        """``W = spline_weight * spline_scaler[..., None]``: ``(out, in, G + k)``."""
        if self.enable_standalone_scale_spline:
            return self.spline_weight * self.spline_scaler.unsqueeze(-1)
        return self.spline_weight

    # ------------------------------------------------- efficient-kan's helpers
    def _check_2d(self, what: str, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() != 2:
            raise ValueError(f"{what} expects x of shape (batch, in_features={self.in_features}), got {tuple(x.shape)}")
        # 16-bit layers keep float32 knots: evaluate in (at least) float32
        return x.to(torch.promote_types(self.grid.dtype, x.dtype))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """efficient-kan's ``KANLinear.b_splines``: every basis at every input, on the layer's knots.

        Args:
            x: ``(batch, in_features)``, the layer's dtype and device.

        Returns:
            ``(batch, in_features, G + k)``: ``B_j(x[n, i]; grid[i])`` of order ``k`` (Cox-de Boor,
            Liu et al. 2024 eq. 2.2-2.3; zero outside the knots, NaN inputs give 0), in
            ``promote(grid.dtype, x.dtype)`` (float32 for 16-bit layers).
            Materialises the dense basis: for fits and inspection, not the forward pass.

        Raises:
            ValueError: ``x`` is not 2-D with ``in_features`` columns. TypeError: a dtype mismatch.
            RuntimeError: a device mismatch.
        """
        x = self._check_2d("b_splines", x)
        return basis_matrix(x, self.grid, self.spline_order).contiguous()

    def curve2coeff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """efficient-kan's ``KANLinear.curve2coeff``: least-squares spline coefficients of curves.

        Args:
            x: ``(batch, in_features)`` sample points.
            y: ``(batch, in_features, out_features)``: the value of edge ``(o, i)``'s curve at ``x[n, i]``.

        Returns:
            ``(out_features, in_features, G + k)``: per feature ``i``, the minimum-norm least-squares
            ``C`` with ``sum_j C[o, i, j] B_j(x[n, i]) ~= y[n, i, o]`` on the layer's knots (float64
            ``gelsd``, so rank-deficient systems give finite weights), in ``y``'s dtype. These are
            unscaled coefficients (efficient-kan's ``scaled_spline_weight``); nothing is written.

        Raises:
            ValueError: ``x`` or ``y`` has the wrong shape. TypeError / RuntimeError: dtype / device
            mismatch of ``x``.
        """
        xc = self._check_2d("curve2coeff", x)
        want = (x.shape[0], self.in_features, self.out_features)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"curve2coeff expects y of shape (batch, in_features, out_features) = {want}, got {got}")
        return solve_coefficients(basis_matrix(xc, self.grid, self.spline_order), y)

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FastKANLayer expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FastKANLayer expects input of shape (..., in_features={self.in_features}), "
                f"got shape {tuple(x.shape)}"
            )
        w = self.base_weight
        if x.device != w.device:
            raise RuntimeError(
                f"FastKANLayer: input is on {x.device} but the parameters are on {w.device}; move one of them"
            )
        if not x.is_floating_point():
            raise TypeError(f"FastKANLayer expects a floating-point input, got dtype {x.dtype}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"FastKANLayer: input dtype {x.dtype} does not match parameter dtype {w.dtype}; "
                f"cast the input or the layer (no silent cast is done)"
            )

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend a call on ``x`` will use."""
        if self._backend != "auto":
            return self._backend
        if x.is_cuda and x.dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"

    # Uniform-knot detection is a data-dependent decision (``.item()``); it is made
    # here in Python, when the grid changes, and handed to the kernels as a flag so
    # compiled graphs contain no sync and no graph break.
    def refresh_grid_cache(self) -> None:
        """Recompute the cached "knots equally spaced" flag from ``grid`` and drop the
        Triton kernels' cached knot tables. Called automatically after
        ``update_grid``/``extend_grid``/``load_state_dict``/``.to()``; call it yourself
        after editing ``grid`` in place inside a compiled region or through
        ``grid.data`` (no version bump)."""
        g = self.grid
        forget_grid(g)
        if g.is_meta:  # deferred init (e.g. FSDP): no values yet; decided once the grid is materialised
            self._grid_uniform, self._grid_key = None, None
            return
        self._grid_uniform = bool(grid_is_uniform(g.detach()))
        self._grid_key = _grid_key(g)

    def _uniform_flag(self) -> bool:
        if torch.compiler.is_compiling() and getattr(self, "_grid_uniform", None) is not None:
            return self._grid_uniform  # a Python constant for the compiler (guarded)
        return self._uniform_flag_of(self.grid)

    def _uniform_flag_of(self, grid: torch.Tensor) -> bool:
        """The cached flag of ``grid`` (the layer's own grid), refreshed when its key changed."""
        if getattr(self, "_grid_key", None) != _grid_key(grid):
            self.refresh_grid_cache()
        return self._grid_uniform

    def _apply(self, fn, recurse=True):
        # model.half()/bfloat16(): fp16 has 10 mantissa bits, so knots of a fine grid
        # (or a grid far from 0) would collapse onto each other and B_j become 0/0.
        # The grid buffer therefore stays float32 when the layer goes to a 16-bit
        # dtype; the forward computes in float32 and returns the 16-bit dtype.
        old = self.grid
        super()._apply(fn, recurse)
        if self.grid.dtype in (torch.float16, torch.bfloat16) and old.dtype not in (torch.float16, torch.bfloat16):
            self.grid = old.detach().to(device=self.grid.device, dtype=torch.float32)
        self.refresh_grid_cache()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        problem = self._checkpoint_problem(state_dict, prefix)
        if problem is not None:
            # the layer stays exactly as it was: none of its own tensors is loaded, and its
            # children (the symbolic branch) are handed their current state (load_state_dict
            # gives each module a copy of the dict it may edit; the children's entries are
            # taken from it after this call)
            error_msgs.append(problem)
            for name, child in self._modules.items():
                if child is None:
                    continue
                child_prefix = prefix + name + "."
                for key in [key for key in state_dict if key.startswith(child_prefix)]:
                    del state_dict[key]
                state_dict.update(child.state_dict(prefix=child_prefix))
            return
        # a checkpoint of a pruned / symbolic layer carries the optional workflow state:
        # create the slots so it loads into a freshly built layer of the same shape
        w = self.base_weight
        if self.edge_mask is None and prefix + "edge_mask" in state_dict:
            self.edge_mask = torch.ones_like(w).detach()
        if self.symbolic is None and prefix + "symbolic.affine" in state_dict:
            self.symbolic = SymbolicBranch(self.in_features, self.out_features, device=w.device, dtype=w.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.refresh_grid_cache()

    def _checkpoint_problem(self, state_dict, prefix: str) -> Optional[str]:
        """Why this layer cannot take its entries of ``state_dict`` (None: it can).

        Shapes: the layer built with other ``in_features``/``out_features``/``grid_size``/
        ``spline_order`` than the checkpoint's (each difference named; k and G are read
        from the knots ``G + 2k + 1`` and ``spline_weight``'s ``G + k``). Knots: every
        row must be finite and non-decreasing in the layer's knot dtype (a NaN or a
        swapped pair gives NaN or backend-dependent outputs; repeated knots are fine:
        the 0/0 := 0 convention of Cox-de Boor)."""
        where = prefix.rstrip(".") or "the layer"
        k, G = self.spline_order, self.grid_size
        own = {"grid": self.grid, "base_weight": self.base_weight, "spline_weight": self.spline_weight}
        if self.enable_standalone_scale_spline:
            own["spline_scaler"] = self.spline_scaler
        own["edge_mask"] = self.base_weight if self.edge_mask is None else self.edge_mask
        got = {n: state_dict[prefix + n] for n in own if isinstance(state_dict.get(prefix + n), torch.Tensor)}
        mismatch = [n for n, t in got.items() if tuple(t.shape) != tuple(own[n].shape)]
        if mismatch:
            sizes = []  # (what, checkpoint's, this layer's)
            g, sw = got.get("grid"), got.get("spline_weight")
            if sw is not None and sw.dim() == 3:
                sizes += [("out_features", sw.shape[0], self.out_features), ("in_features", sw.shape[1], self.in_features)]
            elif g is not None and g.dim() == 2:
                sizes.append(("in_features", g.shape[0], self.in_features))
            if g is not None and g.dim() == 2 and sw is not None and sw.dim() == 3:
                k_ck = g.shape[1] - sw.shape[2] - 1  # (G + 2k + 1) - (G + k) - 1
                sizes += [("spline_order", k_ck, k), ("grid_size", sw.shape[2] - k_ck, G)]
            elif g is not None and g.dim() == 2:
                sizes.append(("knots per row (G + 2k + 1)", g.shape[1], self.grid.shape[1]))
            elif sw is not None and sw.dim() == 3:
                sizes.append(("bases per edge (G + k)", sw.shape[2], self.n_basis))
            differ = [f"{what} {a} vs {b}" for what, a, b in sizes if a != b]
            shapes = ", ".join(f"{n} {tuple(got[n].shape)} vs {tuple(own[n].shape)}" for n in mismatch)
            return (
                f"size mismatch for {where} (checkpoint vs this layer): {'; '.join(differ) or shapes} "
                f"(tensor shapes: {shapes}); build the layer with the checkpoint's sizes "
                f"(in_features, out_features, grid_size, spline_order), or extend_grid() before saving"
            )
        g = got.get("grid")
        if g is None or g.is_meta or self.grid.is_meta:
            return None
        knots = g.detach().to(self.grid.dtype)
        bad = ~torch.isfinite(knots)
        if bool(bad.any()):
            r, j = (int(v) for v in bad.nonzero()[0])
            rows = sorted({int(v) for v in bad.any(1).nonzero().reshape(-1)})
            cast = "" if g.dtype == knots.dtype else f" (as {knots.dtype})"
            return (
                f"invalid knots in {prefix}grid: row {r} (input feature {r}) has a non-finite knot{cast}: "
                f"{float(knots[r, j])} at position {j}; rows with non-finite knots: {rows}"
            )
        down = knots[:, 1:] < knots[:, :-1]
        if bool(down.any()):
            r, j = (int(v) for v in down.nonzero()[0])
            rows = sorted({int(v) for v in down.any(1).nonzero().reshape(-1)})
            return (
                f"invalid knots in {prefix}grid: row {r} (input feature {r}) is not increasing: knot {j + 1} = "
                f"{float(knots[r, j + 1])!r} < knot {j} = {float(knots[r, j])!r}; rows out of order: {rows} "
                f"(each row of knots must be non-decreasing)"
            )
        return None

    def _compute_dtypes(self, x: torch.Tensor, backend: str):
        """(compute dtype, output dtype, autocast on).

        torch/reference backends compute in float32 at least (16-bit inputs, weights
        and autocast regions). The Triton kernels take 16-bit operands themselves
        (float32 knots, float32 accumulation), so they get the autocast dtype (or
        x's). The output has the autocast dtype under autocast, else x's dtype."""
        autocast = torch.is_autocast_enabled(x.device.type)
        out = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if backend == "triton" and x.dtype != torch.float64:
            comp = out
        else:
            comp = torch.promote_types(torch.promote_types(x.dtype, self.base_weight.dtype), torch.float32)
        return comp, out, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., in_features)``. Returns ``(..., out_features)``.

        Precision: float16/bfloat16 inputs or weights, and autocast regions
        (``torch.autocast("cuda"|"cpu", dtype=float16|bfloat16)``), evaluate the
        bases on float32 knots and accumulate in float32 (torch backend: all in
        float32; Triton kernels: 16-bit operands); the result has the autocast
        dtype (under autocast) or x's dtype.

        Raises:
            ValueError: last dimension is not ``in_features``.
            TypeError: dtype differs from the parameters' (outside autocast).
            RuntimeError: device differs from the parameters'.
        """
        if type(x) is _Tensor and x.dim() == 2 and x.is_cpu and not torch.is_autocast_enabled("cpu"):
            y = self._forward_plain(x)  # the common case: the same call without the no-op casts
            if y is not None:
                return y
        self._check_input(x)
        backend = self.resolve_backend(x)
        comp, out_dtype, autocast = self._compute_dtypes(x, backend)
        if autocast:
            with torch.autocast(x.device.type, enabled=False):
                y = self._forward_impl(x, comp, backend)
        else:
            y = self._forward_impl(x, comp, backend)
        return y.to(out_dtype)

    def _forward_plain(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`forward` of a plain 2-D CPU float32/float64 tensor ``x`` (outside CPU autocast;
        the caller's guard) when it is the common case, or None (then the general path runs).

        The common case: x of the parameters' dtype, backend ``"auto"``/``"torch"``, SiLU base,
        no symbolic branch, parameters read from the module's own dicts (a parametrized or
        swapped-out entry: not the common case), not compiling, no torch.func wrapper. Every
        cast, reshape and dtype/backend decision of the general path is then a no-op, so this
        makes the same :func:`kanfast.ops.kan_linear_op` call on the same tensors without them
        (and without the view that reshaping gives): the same checks pass, the same result.
        Calls the size rule gives the sparse engine go through :func:`kanfast.ops.kan_linear_small`
        (the same engine and calls, without the cached "uniform knots" flag only the dense engine
        reads; the flag is refreshed on the calls that reach the dense engine).
        The per-call Python cost of a small layer is otherwise mostly these no-op calls."""
        if x.shape[1] != self.in_features or self._backend not in _EAGER_BACKENDS:
            return None
        params, modules = self._parameters, self._modules
        bw, sw, grid = params.get("base_weight"), params.get("spline_weight"), self._buffers.get("grid")
        dt = x.dtype
        if (
            bw is None or sw is None or grid is None or dt not in _PLAIN_DTYPES or bw.dtype != dt
            or sw.dtype != dt or grid.dtype != dt or not bw.is_cpu
            or modules.get("symbolic") is not None or type(modules.get("base_activation")) is not nn.SiLU
        ):
            return None
        scale = params.get("spline_scaler") if self.enable_standalone_scale_spline else None
        if self.enable_standalone_scale_spline and (scale is None or scale.dtype != dt):
            return None
        if torch.compiler.is_compiling() or (
            _is_functorch_wrapped is not None
            and (_is_functorch_wrapped(x) or _is_functorch_wrapped(sw) or _is_functorch_wrapped(bw))
        ):
            return None  # (the general path: the compiled op, or the torch.func error)
        if self.keep_input:
            self.last_input = x
        mask = self._buffers.get("edge_mask")
        if mask is not None:
            bw = bw * mask
            scale = mask if scale is None else scale * mask
            if scale.dtype != dt:
                scale = scale.to(dt)
            if bw.dtype != dt:
                bw = bw.to(dt)
        # the sparse engine when the size rule takes the call (it reads the knots themselves, no
        # flag of them); else the dense engine, with the layer's cached "uniform knots" flag
        y = kan_linear_small(x, grid, sw, bw, self.spline_order, scale)
        if y is not None:
            return y
        return kan_linear_op(x, grid, sw, bw, self.spline_order, self._uniform_flag_of(grid), "torch", scale)

    def _forward_impl(self, x: torch.Tensor, comp: torch.dtype, backend: str) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.to(comp)
        # knots never go below float32 (the Triton kernels read float32 knots themselves)
        grid = self.grid.to(torch.promote_types(comp, torch.float32))
        x2 = x.reshape(-1, self.in_features)
        if self.keep_input:
            self.last_input = x2
        mask = self.edge_mask
        base_weight = self.base_weight if mask is None else self.base_weight * mask
        base_weight = base_weight.to(comp)
        if backend == "reference":
            scaler = self.spline_scaler.to(comp) if self.enable_standalone_scale_spline else None
            spline_weight = self.spline_weight if mask is None else self.spline_weight * mask.unsqueeze(-1)
            y = kan_linear_reference(
                x2, grid, base_weight, spline_weight.to(comp), scaler, self.spline_order, self.base_activation
            )
        else:
            if not torch.compiler.is_compiling() and _under_torch_func(x2, self.spline_weight, self.base_weight):
                raise RuntimeError(
                    f"FastKANLayer: torch.func transforms (grad, jacrev, vmap, hessian, functional_call "
                    f"under them) are not supported by backend {backend!r}, whose autograd Function has no "
                    f"functorch rules; use backend='reference' for them (same parameters, plain torch ops)"
                )
            fused_silu = type(self.base_activation) is nn.SiLU
            # the op forms spline_weight * (spline_scaler * mask) itself: no scaled copy is
            # saved for backward (one weight-sized temporary per fwd+bwd instead of three)
            scale = self.spline_scaler if self.enable_standalone_scale_spline else None
            if mask is not None:
                scale = mask if scale is None else scale * mask
            y = kan_linear_op(
                x2, grid, self.spline_weight.to(comp), base_weight if fused_silu else None, self.spline_order,
                self._uniform_flag(), backend, None if scale is None else scale.to(comp),
            )
            if not fused_silu:
                y = y + F.linear(self.base_activation(x2), base_weight)
        if self.symbolic is not None:
            wdt = self.base_weight.dtype
            y = y + self.symbolic(x2 if x2.dtype == wdt else x2.to(wdt)).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    # ------------------------------------------------------------ grid update
    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> "FastKANLayer":
        """Adapt the knots to the samples ``x`` and refit the spline weights.

        New knots = ``grid_eps`` * uniform + (1 - ``grid_eps``) * quantiles of x
        (efficient-kan/pykan rule, Liu et al. 2024 sec. 2.2 "grid extension"), the
        uniform part spanning ``[min - margin, max + margin]``, extended by ``k``
        knots each side. The spline weights are refitted by least squares so the
        layer's spline term on ``x`` is kept; knots are made strictly increasing
        even for constant or few-valued data.

        Args:
            x: ``(N, in_features)`` (or ``(..., in_features)``), finite, N >= 1.
            margin: padding of the uniform grid beyond the sample range.

        Everything is computed first and checked (knots finite and strictly increasing
        in the layer's knot dtype, a finite fit, finite weights in the parameter dtype);
        only a valid result is written, else the layer is left exactly as it was.

        Raises:
            ValueError: empty batch, wrong feature size, non-finite samples, or samples
                whose grid or fit cannot be represented in the layer's dtypes (e.g. float32
                samples near +-3e38, whose knots overflow); the layer is then unchanged.

        Returns:
            self.
        """
        self._check_input(x)
        # 16-bit layers keep float32 knots: fit in (at least) float32 too
        comp = torch.promote_types(self.grid.dtype, self.spline_weight.dtype)
        x = x.reshape(-1, self.in_features).to(comp)
        if x.shape[0] == 0:
            raise ValueError("update_grid needs at least one sample; got an empty batch")
        if not torch.isfinite(x).all():
            raise ValueError("update_grid needs finite samples; x contains NaN or inf")
        margin = _check_margin(margin)
        G, k = self.grid_size, self.spline_order
        old_curves = torch.einsum("nij,oij->nio", basis_matrix(x, self.grid, k), self.scaled_spline_weight.to(comp))
        new_grid = adaptive_grid(x, G, k, self.grid_eps, margin, dtype=self.grid.dtype).to(self.grid.dtype)
        self._check_new_knots("update_grid", new_grid, x)
        weight, scaler = self._refit("update_grid", x, new_grid, old_curves)
        self.grid.copy_(new_grid)
        self.refresh_grid_cache()
        self.spline_weight.copy_(weight)
        if scaler is not None:
            self.spline_scaler.copy_(scaler)
        return self

    @torch.no_grad()
    def extend_grid(self, new_grid_size: int, x: Optional[torch.Tensor] = None, margin: float = 0.01) -> "FastKANLayer":
        """Change the number of grid intervals, keeping the learned functions
        (grid extension, Liu et al. 2024 sec. 2.4).

        Without ``x`` the new knots split each feature's current interior range
        ``[grid[:, k], grid[:, -k-1]]`` in ``new_grid_size`` equal intervals; with
        ``x`` they adapt to the samples as in :meth:`update_grid`. The new
        coefficients are the least-squares fit of the old spline term on
        ``max(64, 4 (G' + k))`` points per feature spread over the old interior range
        (with ``x``: over the samples' range, plus the samples). When the new grid
        refines the old one the fit is exact to rounding.

        ``spline_weight`` and ``grid`` are replaced by tensors of the new size: build
        the optimizer again afterwards. As in :meth:`update_grid`, the result is
        computed and checked before anything is written.

        Args:
            new_grid_size: the new ``G'`` (>= 1).
            x: optional samples ``(..., in_features)``.

        Raises:
            ValueError: a bad argument, or new knots / a fit that cannot be represented in
                the layer's dtypes (e.g. ``G'`` intervals finer than the knot dtype resolves
                at the grid's magnitude); the layer is then unchanged.

        Returns:
            self.
        """
        new_grid_size = _check_positive_int("new_grid_size", new_grid_size, 1)
        margin = _check_margin(margin)
        k = self.spline_order
        dtype, device = self.grid.dtype, self.grid.device
        lo = self.grid[:, k].to(torch.float64)
        hi = self.grid[:, -k - 1].to(torch.float64)
        n_pts = max(64, 4 * (new_grid_size + k))
        u = torch.linspace(0, 1, n_pts, dtype=torch.float64, device=device).unsqueeze(1)
        if x is not None:
            self._check_input(x)
            xs = x.detach().reshape(-1, self.in_features).to(dtype)
            if xs.shape[0] == 0 or not torch.isfinite(xs).all():
                raise ValueError("extend_grid needs finite samples and a non-empty batch")
            # fit where the new (sample-adapted) grid lives: the samples' range, not the old grid's
            s_lo, s_hi = xs.amin(0).to(torch.float64), xs.amax(0).to(torch.float64)
            pts = torch.cat([(s_lo + u * (s_hi - s_lo)).to(dtype), xs], dim=0)
        else:
            pts = (lo + u * (hi - lo) * (1 - 1e-9)).to(dtype)  # (n_pts, in), stays inside [lo, hi)
        wdt = torch.promote_types(self.grid.dtype, self.spline_weight.dtype)  # float32 knots of 16-bit layers
        old = torch.einsum("nij,oij->nio", basis_matrix(pts.to(wdt), self.grid, k), self.scaled_spline_weight.to(wdt))
        if x is not None:
            new_grid = adaptive_grid(xs, new_grid_size, k, self.grid_eps, margin, dtype=dtype)
        else:
            steps = torch.arange(-k, new_grid_size + k + 1, dtype=torch.float64, device=device)
            h = (hi - lo) / new_grid_size
            new_grid = lo.unsqueeze(1) + steps.unsqueeze(0) * h.unsqueeze(1)
        new_grid = new_grid.to(dtype).contiguous()
        self._check_new_knots("extend_grid", new_grid, xs if x is not None else None)
        weight, scaler = self._refit("extend_grid", pts.to(wdt), new_grid, old)
        self.grid = new_grid
        self.grid_size = new_grid_size
        self.refresh_grid_cache()
        self.spline_weight = nn.Parameter(weight)
        if scaler is not None:
            self.spline_scaler.copy_(scaler)
        return self

    def _check_new_knots(self, what: str, grid: torch.Tensor, x: Optional[torch.Tensor]) -> None:
        """ValueError unless every row of ``grid`` is finite and strictly increasing."""
        ok = torch.isfinite(grid)
        rows = (~ok).any(1)
        problem = "are not finite"
        if not bool(rows.any()):
            rows = (grid[:, 1:] <= grid[:, :-1]).any(1)
            problem = "are not strictly increasing"
        if bool(rows.any()):
            r = int(rows.nonzero()[0])
            seen = "" if x is None else f" (its samples span [{float(x[:, r].min())!r}, {float(x[:, r].max())!r}])"
            raise ValueError(
                f"{what}: the new knots of row {r} (input feature {r}){seen} {problem} in {grid.dtype}; "
                f"rows affected: {rows.nonzero().reshape(-1).tolist()}. The layer is unchanged; scale the "
                f"inputs into a range the knot dtype resolves (or use a wider dtype, or fewer intervals)"
            )

    def _refit(self, what: str, pts: torch.Tensor, grid: torch.Tensor, curves: torch.Tensor):
        """Least-squares coefficients of ``curves`` ``(N, in, out)`` at ``pts`` on knots
        ``grid``, split into (spline_weight, spline_scaler or None) in the parameter
        dtype, checked finite (ValueError otherwise). Writes nothing."""
        basis = basis_matrix(pts, grid, self.spline_order)
        if not (bool(torch.isfinite(basis).all()) and bool(torch.isfinite(curves).all())):
            raise ValueError(
                f"{what}: the spline basis or the curves to keep are not finite on the new knots in "
                f"{basis.dtype} (knot spans overflow); the layer is unchanged"
            )
        weight, scaler = self._split_scaled(solve_coefficients(basis, curves))
        if not (bool(torch.isfinite(weight).all()) and (scaler is None or bool(torch.isfinite(scaler).all()))):
            raise ValueError(
                f"{what}: the refitted spline weights overflow {weight.dtype}; the layer is unchanged"
            )
        return weight, scaler

    def _split_scaled(self, coef: torch.Tensor):
        """(spline_weight, spline_scaler or None) storing W = coef in the parameter dtype: coef is
        divided by the scaler where it is usable, the scaler folded to 1 where not."""
        wdt = self.spline_weight.dtype
        if not self.enable_standalone_scale_spline:
            return coef.to(wdt), None
        s = self.spline_scaler.detach()
        ok = s.abs() > 1e-12
        weight = torch.where(ok.unsqueeze(-1), coef / torch.where(ok, s, 1).unsqueeze(-1), coef)
        return weight.to(wdt), torch.where(ok, s, torch.ones_like(s))

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        """efficient-kan's cheap sparsification surrogate from the coefficients:
        L1 of mean |spline_weight| per edge plus the entropy of its normalised
        distribution (an approximation of Liu et al. 2024 sec. 2.5 eq. 2.17-2.19)."""
        l1 = self.spline_weight.abs().mean(-1)
        total = l1.sum()
        p = l1 / total.clamp_min(torch.finfo(l1.dtype).tiny)
        entropy = -torch.sum(torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), torch.zeros_like(p)))
        return regularize_activation * total + regularize_entropy * entropy


def _calls_plain(layers) -> bool:
    """Whether ``layer(x)`` is exactly ``layer.forward(x)`` for every layer: no module hooks (the
    layers' own or global ones), no ``Module.compile()``'d layer, no ``jit.trace`` (which calls
    ``_slow_forward``), nothing but FastKANLayer's own ``forward``. (The per-call cost of
    nn.Module's dispatch is a sizeable part of a small layer's.)"""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or (
        _mm._global_forward_hooks or _mm._global_forward_pre_hooks or _mm._global_backward_hooks
        or _mm._global_backward_pre_hooks
    ):
        return False
    for layer in layers:
        if (
            type(layer) is not FastKANLayer or getattr(layer, "_compiled_call_impl", None) is not None
            or layer._forward_hooks
            or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks
            or "forward" in layer.__dict__
        ):
            return False
    return True


class _all_layers_or_none:
    """Context for a grid change of every layer of a KAN: if it raises, each layer's knots,
    grid_size, spline weights and scalers (the same tensor objects, with their values),
    kept input and the model's grid_size are put back."""

    def __init__(self, model: "KAN"):
        self.model = model

    def __enter__(self):
        self.saved = []
        with torch.no_grad():
            for layer in self.model.layers:
                tensors = [layer.grid, layer.spline_weight]
                if layer.enable_standalone_scale_spline:
                    tensors.append(layer.spline_scaler)
                self.saved.append(
                    ([(t, t.detach().clone()) for t in tensors], layer.grid_size, layer.last_input)
                )
        self.grid_size = getattr(self.model, "grid_size", None)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        with torch.no_grad():
            for layer, (tensors, grid_size, last_input) in zip(self.model.layers, self.saved):
                layer.grid = tensors[0][0]
                layer.spline_weight = tensors[1][0]
                for t, v in tensors:
                    t.copy_(v)
                layer.grid_size = grid_size
                layer.last_input = last_input
                layer.refresh_grid_cache()
        self.model.grid_size = self.grid_size
        return False


class KAN(nn.Module):
    """A stack of :class:`FastKANLayer` (Liu et al. 2024, eq. 2.7).

    Args:
        layers_hidden: widths ``[in, h1, ..., out]`` (at least two entries).
        grid_size, spline_order, scale_noise, scale_base, scale_spline,
        base_activation, grid_eps, grid_range: passed to every layer.
        backend: passed to every layer (settable later via :attr:`backend`).

    Shapes: ``(..., layers_hidden[0]) -> (..., layers_hidden[-1])``.

    The paper workflow's methods, :meth:`prune` and :meth:`activation_regularization` (behind
    ``regularization_loss(mode="activation")``), are :func:`kanfast.workflow.prune` and
    :func:`kanfast.workflow.activation_regularization`, attached to this class by
    :mod:`kanfast.workflow` (which ``from kanfast import KAN`` loads): the workflow builds on
    the model, not the other way round.
    """

    def __init__(
        self,
        layers_hidden: Sequence[int],
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        base_activation: Type[nn.Module] = nn.SiLU,
        grid_eps: float = 0.02,
        grid_range: Sequence[float] = (-1, 1),
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        widths = list(layers_hidden)
        if len(widths) < 2:
            raise ValueError(f"layers_hidden needs at least [in, out], got {widths!r}")
        self.grid_size = grid_size
        self.spline_order = spline_order
        self.layers = nn.ModuleList(
            FastKANLayer(
                i,
                o,
                grid_size=grid_size,
                spline_order=spline_order,
                scale_noise=scale_noise,
                scale_base=scale_base,
                scale_spline=scale_spline,
                base_activation=base_activation,
                grid_eps=grid_eps,
                grid_range=grid_range,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for i, o in zip(widths[:-1], widths[1:])
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all layers or none: every layer's entries are
        checked first (sizes; finite, non-decreasing knots: see :class:`FastKANLayer`,
        "Checkpoints"), so a bad layer leaves the whole model as it was, not only itself.

        Raises:
            RuntimeError: as ``nn.Module.load_state_dict``, naming each bad layer.
        """
        problems = [layer._checkpoint_problem(state_dict, f"layers.{i}.") for i, layer in enumerate(self.layers)]
        problems = [p for p in problems if p is not None]
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @backend.setter
    def backend(self, value: str) -> None:
        for layer in self.layers:
            layer.backend = value

    def forward(self, x: torch.Tensor, update_grid: bool = False) -> torch.Tensor:
        """Args: x ``(..., in)``; update_grid: adapt each layer's knots to its
        input first (see :meth:`FastKANLayer.update_grid`; all layers or none)."""
        if not update_grid:
            layers = self.layers._modules.values()
            if _calls_plain(layers):  # layer(x) would be layer.forward(x): skip nn.Module's dispatch
                for layer in layers:
                    x = layer.forward(x)
            else:
                for layer in layers:
                    x = layer(x)
            return x
        with _all_layers_or_none(self):
            for layer in self.layers:
                layer.update_grid(x)
                x = layer(x)
        return x

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> "KAN":
        """Update every layer's grid on the activations that reach it (see
        :meth:`FastKANLayer.update_grid`). All layers or none: when a layer refuses
        (ValueError), the layers before it are restored, and the model is unchanged."""
        with _all_layers_or_none(self):
            for layer in self.layers:
                layer.update_grid(x, margin=margin)
                x = layer(x)
        return self

    @torch.no_grad()
    def extend_grid(self, new_grid_size: int, x: Optional[torch.Tensor] = None) -> "KAN":
        """Extend every layer's grid to ``new_grid_size`` (see
        :meth:`FastKANLayer.extend_grid`); with ``x``, each layer adapts to the
        activations that reach it. All layers or none, as :meth:`update_grid`.
        Returns self; rebuild the optimizer afterwards."""
        with _all_layers_or_none(self):
            for layer in self.layers:
                y = layer(x) if x is not None else None
                layer.extend_grid(new_grid_size, x)
                x = y
            self.grid_size = new_grid_size
        return self

    @property
    def keep_inputs(self) -> bool:
        """When True every layer keeps the 2-D input of its last forward
        (``layer.last_input``), for ``regularization_loss(mode="activation")``."""
        return all(layer.keep_input for layer in self.layers)

    @keep_inputs.setter
    def keep_inputs(self, value: bool) -> None:
        for layer in self.layers:
            layer.keep_input = bool(value)
            if not value:
                layer.last_input = None

    def regularization_loss(
        self,
        regularize_activation: float = 1.0,
        regularize_entropy: float = 1.0,
        *,
        mode: str = "coef",
        x: Optional[torch.Tensor] = None,
        lamb_l1: float = 1.0,
        lamb_entropy: float = 2.0,
        sample_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Sparsification loss summed over the layers.

        ``mode="coef"`` (default): efficient-kan's cheap surrogate from the
        coefficients, weighted by ``regularize_activation`` / ``regularize_entropy``.
        ``mode="activation"``: the paper's definition (Liu et al. 2024 sec. 2.5,
        eq. 2.17-2.20) from the edge activations on ``x`` (or on the inputs kept by
        the last forward, see :attr:`keep_inputs`), weighted by ``lamb_l1`` /
        ``lamb_entropy``; see :func:`kanfast.workflow.activation_regularization`.
        """
        if mode == "coef":
            return sum(layer.regularization_loss(regularize_activation, regularize_entropy) for layer in self.layers)
        if mode == "activation":  # the paper's definition, attached to KAN by kanfast.workflow
            activation_regularization = getattr(self, "activation_regularization", None)
            if activation_regularization is None:
                raise RuntimeError(
                    "regularization_loss(mode='activation') is kanfast.workflow's: import kanfast.workflow "
                    "(`from kanfast import KAN` does)"
                )
            return activation_regularization(x, lamb_l1=lamb_l1, lamb_entropy=lamb_entropy, sample_size=sample_size)
        raise ValueError(f"regularization_loss: mode must be 'coef' or 'activation', got {mode!r}")
