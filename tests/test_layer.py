"""FastKANLayer / KAN with the fast torch backend against the reference."""

import copy
import io
import math

import pytest
import torch

from kanfast import KAN, FastKANLayer
from kanfast.reference import b_spline_basis, kan_linear_reference

from conftest import assert_close

PARAMS = ("base_weight", "spline_weight", "spline_scaler")


def _rough(layer: FastKANLayer, seed: int = 0) -> FastKANLayer:
    """Give the splines O(1) coefficients so the spline term is not negligible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.spline_weight.copy_(torch.randn(layer.spline_weight.shape, generator=g, dtype=layer.spline_weight.dtype))
    return layer


def _outputs_and_grads(layer, x, backend):
    layer.backend = backend
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x] + [getattr(layer, p) for p in PARAMS], gy)
    return [y] + list(grads)


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("G", [1, 3, 12])
@pytest.mark.parametrize("grid", ["uniform", "adapted"])
def test_torch_backend_matches_reference(dtype, rtol, k, G, grid):
    layer = _rough(FastKANLayer(7, 17, grid_size=G, spline_order=k, dtype=dtype))
    if grid == "adapted":
        layer.update_grid(torch.randn(50, 7, dtype=dtype))  # quantiles: non-uniform knots
    x = torch.randn(3, 11, 7, dtype=dtype) * 1.5  # inside and outside the knots
    x[0, 0] = layer.grid[:, k]  # exactly at knots
    x[0, 1] = layer.grid[:, 0]
    x[0, 2] = layer.grid[:, -1]
    fast = _outputs_and_grads(layer, x, "torch")
    # the oracle runs in float64 on the same (rounded) parameters and inputs
    ref = _outputs_and_grads(copy.deepcopy(layer).double(), x.double(), "reference")
    for name, a, b in zip(["y", "grad_x"] + list(PARAMS), fast, ref):
        assert_close(a, b, rtol, name)
        if dtype == torch.float64:
            assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("k", [1, 3])
def test_gradcheck_float64(k):
    layer = _rough(FastKANLayer(3, 2, grid_size=4, spline_order=k, dtype=torch.float64, backend="torch"))
    x = (torch.rand(5, 3, dtype=torch.float64) * 2.2 - 1.1).requires_grad_(True)

    def f(x, bw, sw, sc):
        from kanfast.torch_backend import kan_linear_torch

        return kan_linear_torch(x, layer.grid, sw * sc.unsqueeze(-1), bw, k)

    inputs = (x, *(getattr(layer, p).detach().clone().requires_grad_(True) for p in PARAMS))
    assert torch.autograd.gradcheck(f, inputs)


def test_shapes_1d_3d_and_errors():
    layer = FastKANLayer(16, 5)
    x = torch.randn(2, 7, 16)
    y = layer(x)
    assert y.shape == (2, 7, 5)
    torch.testing.assert_close(y, layer(x.reshape(14, 16)).reshape(2, 7, 5), rtol=0, atol=0)
    assert layer(x[0, 0]).shape == (5,)
    with pytest.raises(ValueError, match=r"in_features=16.*\(2, 7, 15\)"):
        layer(torch.randn(2, 7, 15))
    with pytest.raises(TypeError, match="float64.*float32"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    empty = layer(torch.randn(0, 16))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"grid_size": 0}, "grid_size"),
        ({"spline_order": -1}, "spline_order"),
        ({"grid_range": (1, 1)}, "grid_range"),
        ({"grid_range": (1, -1)}, "grid_range"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": 0}, "out_features"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, name):
    args = {"in_features": 4, "out_features": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        FastKANLayer(**args)


def test_other_base_activation():
    layer = _rough(FastKANLayer(4, 3, base_activation=torch.nn.Tanh, dtype=torch.float64))
    x = torch.randn(9, 4, dtype=torch.float64)
    want = kan_linear_reference(x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler, 3, torch.tanh)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_initial_curves_are_small_noise_fits():
    """efficient-kan init: spline_weight is the least-squares fit of noise of size scale_noise / G."""
    layer = FastKANLayer(6, 4, grid_size=5, scale_noise=0.1)
    pts = layer.grid[:, 3:-3].t()  # grid points in range, (G+1, in)
    curves = torch.einsum("nij,oij->nio", b_spline_basis(pts, layer.grid, 3), layer.spline_weight)
    assert curves.abs().max() <= 0.1 / 5 / 2 + 1e-6
    assert curves.abs().max() > 0


def _init_noise(seed, nin, nout, G, dtype, scale_noise=0.1):
    """The random curves reset_parameters fits: same RNG draws (base weight first)."""
    torch.manual_seed(seed)
    torch.nn.init.kaiming_uniform_(torch.empty(nout, nin, dtype=dtype), a=math.sqrt(5))
    return ((torch.rand(G + 1, nin, nout) - 0.5) * scale_noise / G).to(dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("G", [1, 2, 7, 300])
def test_initial_coefficients_are_the_least_squares_solution(dtype, rtol, k, G):
    """Issue 14.11: the banded solve gives the coefficients of the former per-feature gelsd
    solve (minimum-norm least squares of the noise at the grid points): same distribution.
    The float32 layer is compared with the solve on the float64 knots (the float32 ones
    are the same uniform grid up to rounding, which the ill-conditioned even orders amplify)."""
    from kanfast.knots import solve_coefficients, uniform_grid
    from kanfast.ops import basis_matrix

    noise = _init_noise(0, 3, 2, G, dtype)
    torch.manual_seed(0)
    layer = FastKANLayer(3, 2, grid_size=G, spline_order=k, dtype=dtype)
    grid = uniform_grid(3, G, k, (-1, 1), dtype=torch.float64)
    want = solve_coefficients(basis_matrix(grid.t()[k : k + G + 1], grid, k), noise.double())
    assert (layer.spline_weight.detach().double() - want).abs().max() <= rtol * want.abs().max()


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_initial_coefficients_in_feature_blocks_are_those_of_one_solve(monkeypatch, k):
    """The initial fit is solved in blocks of features (its float64 work arrays bounded: the
    whole problem at once took ~13x the parameters, 27 GB at 1024 x 1024, G = 500): one feature
    per block gives the coefficients of one block holding every feature, and both the
    minimum-norm least-squares solution per feature (solve_coefficients, gelsd)."""
    from kanfast import knots
    from kanfast.ops import basis_matrix

    G, n_in, n_out = 7, 5, 3
    values = (torch.rand(G + 1, n_in, n_out, generator=torch.Generator().manual_seed(k), dtype=torch.float64) - 0.5)
    whole = knots.uniform_init_coefficients(values, k)
    monkeypatch.setattr(knots, "_INIT_BLOCK_BYTES", 1)  # one feature per block
    blocked = knots.uniform_init_coefficients(values, k)
    assert blocked.shape == (n_out, n_in, G + k)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-13)
    grid = knots.uniform_grid(n_in, G, k, (-1, 1), dtype=torch.float64)
    want = knots.solve_coefficients(basis_matrix(grid.t()[k : k + G + 1], grid, k), values)
    torch.testing.assert_close(blocked, want, rtol=0, atol=1e-9)


def test_construction_at_a_fine_grid_solves_no_dense_system(monkeypatch):
    """Issue 14.11: FastKANLayer(8, 1, grid_size=4000) ran one dense float64 least-squares
    solve per feature (85 s); the fit is now one banded solve. No timing asserted: the
    dense solver is not called, and the curves go through the noise at the grid points."""

    def no_dense_solve(*args, **kwargs):
        raise AssertionError("dense least-squares solve during construction")

    monkeypatch.setattr(torch.linalg, "lstsq", no_dense_solve)
    G = 4000
    assert torch.isfinite(FastKANLayer(8, 1, grid_size=G).spline_weight).all()  # the case (float32)
    torch.manual_seed(3)
    layer = FastKANLayer(8, 1, grid_size=G, dtype=torch.float64)
    noise = _init_noise(3, 8, 1, G, torch.float64)
    # feature 0, in row chunks (the dense basis of one feature is 4001 x 4003)
    g = layer.grid[:1]
    pts = g.t()[3 : 3 + G + 1]
    w = layer.spline_weight[0, 0].detach()
    for s in range(0, G + 1, 500):
        curve = b_spline_basis(pts[s : s + 500], g, 3)[:, 0] @ w
        torch.testing.assert_close(curve, noise[s : s + 500, 0, 0], rtol=0, atol=1e-9 * 0.1 / G)


def test_layer_made_inside_inference_mode():
    """Issue 19.6: FastKANLayer(...) inside torch.inference_mode() raised "Inference tensors do
    not track version counter". It now builds ordinary tensors there: the same layer as
    outside, usable in inference mode, under no_grad and for training afterwards."""
    torch.manual_seed(0)
    want = FastKANLayer(4, 3, grid_size=6, backend="torch")
    x = torch.randn(7, 4)
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = FastKANLayer(4, 3, grid_size=6, backend="torch")
        model = KAN([4, 5, 2], backend="torch")
        y = layer(x)
        assert model(x).shape == (7, 2)
    for name, t in want.state_dict().items():
        assert torch.equal(layer.state_dict()[name], t), name
        assert not layer.state_dict()[name].is_inference()
    torch.testing.assert_close(y, want(x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    opt = torch.optim.SGD(list(layer.parameters()) + list(model.parameters()), lr=0.1)
    (layer(x).square().mean() + model(x).square().mean()).backward()
    opt.step()
    assert layer.spline_weight.grad.abs().sum() > 0
    layer.update_grid(x)
    with torch.inference_mode():  # moved inside inference mode: its tensors are inference tensors now
        half = FastKANLayer(4, 3, backend="torch").double()
        assert half.grid.is_inference()
        half(x.double())
    with torch.no_grad():
        half(x.double())


def _efficient_kan_state_dict(nin, nout, G, k, grid_range=(-1.0, 1.0)):
    """A state_dict laid out as efficient-kan's KANLinear writes it."""
    h = (grid_range[1] - grid_range[0]) / G
    grid = (torch.arange(-k, G + k + 1) * h + grid_range[0]).expand(nin, -1).contiguous()
    return {
        "grid": grid,
        "base_weight": torch.randn(nout, nin),
        "spline_weight": torch.randn(nout, nin, G + k),
        "spline_scaler": torch.randn(nout, nin),
    }


def test_loads_efficient_kan_state_dict():
    sd = _efficient_kan_state_dict(5, 3, 5, 3)
    layer = FastKANLayer(5, 3)
    layer.load_state_dict(sd, strict=True)
    x = torch.rand(20, 5) * 2.4 - 1.2
    want = kan_linear_reference(x, sd["grid"], sd["base_weight"], sd["spline_weight"], sd["spline_scaler"], 3)
    assert_close(layer(x), want, 1e-6, "y")
    model = KAN([5, 3, 2])
    model_sd = {f"layers.0.{n}": v for n, v in sd.items()}
    model_sd.update({f"layers.1.{n}": v for n, v in _efficient_kan_state_dict(3, 2, 5, 3).items()})
    model.load_state_dict(model_sd, strict=True)


def test_save_load_round_trip_after_update_grid():
    model = KAN([4, 6, 2])
    x = torch.randn(64, 4)
    model(x, update_grid=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = KAN([4, 6, 2])
    other.load_state_dict(torch.load(buf))
    assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("k", [3, 5])
def test_update_grid_keeps_outputs(k):
    # Least squares is optimal on x but the new spline space is not the old one: for k = 1, 2 the
    # kinks of the old spline cannot be kept (relative error ~2e-3 to 4e-3 on this data); k >= 3 keeps 1e-3.
    layer = FastKANLayer(5, 4, spline_order=k, dtype=torch.float64)
    x = torch.rand(256, 5, dtype=torch.float64) * 1.6 - 0.8
    y0 = layer(x)
    old_grid = layer.grid.clone()
    layer.update_grid(x)
    assert not torch.equal(old_grid, layer.grid)
    assert (layer.grid[:, 1:] > layer.grid[:, :-1]).all()
    err = (layer(x) - y0).norm() / y0.norm()
    assert err <= 1e-3, err


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.full((64, 3), 0.3),  # constant feature
        lambda: (torch.rand(64, 3) > 0.5).float(),  # two values
        lambda: torch.rand(3, 3) * 2 - 1,  # fewer samples than G + k
        lambda: torch.rand(1, 3) * 2 - 1,  # one sample
    ],
    ids=["constant", "two-valued", "3-samples", "1-sample"],
)
def test_update_grid_degenerate_data(make):
    layer = FastKANLayer(3, 2, dtype=torch.float64)
    x = make().double()
    y0 = layer(x)
    layer.update_grid(x)
    assert (layer.grid[:, 1:] > layer.grid[:, :-1]).all()
    for p in PARAMS:
        assert torch.isfinite(getattr(layer, p)).all()
    y1 = layer(x)
    assert torch.isfinite(y1).all()
    assert (y1 - y0).norm() <= 1e-4 * y0.norm() + 1e-9


def test_update_grid_rejects_empty_and_nonfinite():
    layer = FastKANLayer(3, 2)
    with pytest.raises(ValueError, match="empty"):
        layer.update_grid(torch.empty(0, 3))
    with pytest.raises(ValueError, match="finite"):
        layer.update_grid(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_kan_forward_update_grid_and_regularization():
    model = KAN([3, 5, 2], grid_size=4)
    x = torch.randn(32, 3)
    y = model(x, update_grid=True)
    assert y.shape == (32, 2)
    reg = model.regularization_loss()
    reg.backward()
    assert torch.isfinite(reg)
    assert all(l.spline_weight.grad is not None for l in model.layers)
    # entropy term of the definition: L1 of mean |w| per edge plus entropy of its normalised distribution
    l1 = [l.spline_weight.detach().abs().mean(-1) for l in model.layers]
    want = sum(a.sum() - (a / a.sum() * torch.log(a / a.sum())).sum() for a in l1)
    torch.testing.assert_close(reg.detach(), want)


def test_backend_is_settable_and_auto_uses_torch_on_cpu():
    model = KAN([2, 3, 1])
    assert model.layers[0].resolve_backend(torch.zeros(1, 2)) == "torch"
    model.backend = "reference"
    assert all(l.backend == "reference" for l in model.layers)
    with pytest.raises(ValueError, match="backend"):
        model.backend = "nope"


def test_no_basis_tensor_saved_for_backward():
    """Only x and parameters are saved by the torch backend's autograd node."""
    layer = FastKANLayer(8, 4, grid_size=5)
    x = torch.randn(32, 8, requires_grad=True)
    y = layer(x)
    sizes = []

    def walk(fn, seen):
        if fn is None or fn in seen:
            return
        seen.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    v = getattr(fn, name)
                except Exception:
                    continue
                for t in v if isinstance(v, tuple) else [v]:
                    if isinstance(t, torch.Tensor):
                        sizes.append(t.numel())
        for nxt, _ in fn.next_functions:
            walk(nxt, seen)

    walk(y.grad_fn, set())
    assert max(sizes) < 32 * 8 * (5 + 3), sizes


def test_knots_are_built_in_the_layer_dtype():
    """A float64 layer gets float64 knots (not float32-rounded ones): -2.2 .. 2.2 in steps of 0.4
    (the step rounded to float64's last place at the knots, so that the steps are exactly equal)."""
    layer = FastKANLayer(3, 2, dtype=torch.float64)
    want = torch.arange(-3, 9, dtype=torch.float64) * 0.4 - 1.0
    assert layer.grid.dtype == torch.float64
    torch.testing.assert_close(layer.grid[1], want, rtol=0, atol=1e-14)
    assert (layer.grid[1] - want.float().double()).abs().max() > 1e-9
    steps = layer.grid[1, 1:] - layer.grid[1, :-1]
    assert torch.equal(steps, steps[:1].expand_as(steps))
