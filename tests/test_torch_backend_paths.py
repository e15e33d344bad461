"""The fast torch backend's internal paths against the reference oracle (float64):
uniform closed form (interior fast path and the masked path), the k <= 1 exact
span correction, non-uniform (de Boor) knots, several chunks, knots hit exactly,
NaN/inf/out-of-range inputs, with and without the fused SiLU base; each with the
compiled block kernels and with the pure-torch ops (fixture ``engine``)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import (
    GRID_CASES,
    assert_close,
    backend_grads,
    compare_to_reference,
    float32_errors,
    grid_case_inputs,
    grid_case_layer,
)
from kanfast import FastKANLayer, cpu_plan, sparse_backend, torch_backend
from kanfast.knots import uniform_grid
from kanfast.kernels import cpu_spline
from kanfast.reference import kan_linear_reference


@pytest.fixture(autouse=True)
def _dense_engine(monkeypatch):
    """These tests exercise the dense-block engine: the small-call path (kanfast.sparse_backend) off."""
    monkeypatch.setattr(sparse_backend, "ENABLED", False)


@pytest.fixture(params=["kernels", "torch-ops"], autouse=True)
def engine(request, monkeypatch):
    """Every test twice: with the compiled block kernels (uniform knots, k >= 2) and with the
    pure-torch ops they replace (the path taken without a C compiler)."""
    if request.param == "kernels":
        if cpu_spline.load() is None:
            pytest.skip("the CPU block kernels are not built here (no C compiler?)")
    else:
        cpu_spline.load()
        monkeypatch.setattr(cpu_spline, "_kernels", None)
    monkeypatch.setattr(cpu_plan, "KERNEL_CHUNK_ELEMENTS", 23 * 7 * 9)  # several chunks, a ragged last one
    return request.param


@pytest.mark.parametrize("k,G,updated,base", list(itertools.product([0, 1, 2, 3, 5], [1, 5, 12], [False, True], [True, False])))
@pytest.mark.parametrize("split", [False, True], ids=["one-group", "feature-groups"])
def test_matches_reference(k, G, updated, base, split, monkeypatch):
    monkeypatch.setattr(cpu_plan, "ROW_ELEMENTS", 7 * 23)  # several chunks, a ragged last one
    if split:  # K-split into feature groups of 3, 3 and a ragged 1 sharing one buffer
        monkeypatch.setattr(cpu_plan, "BLOCK_WIDTH", 3 * (G + k))
        monkeypatch.setattr(cpu_plan, "KERNEL_BLOCK_WIDTH", 3 * (G + k))  # (the kernels' path)
        assert cpu_plan.feature_groups(7, G + k) == [(0, 3), (3, 6), (6, 7)]
    torch.manual_seed(k * 100 + G)
    layer = FastKANLayer(7, 4, grid_size=G, spline_order=k, dtype=torch.float64,
                         base_activation=torch.nn.SiLU if base else torch.nn.GELU)
    if updated:
        layer.update_grid(torch.randn(200, 7, dtype=torch.float64))
    inner = torch.rand(60, 7, dtype=torch.float64) * 1.8 - 0.9  # interior spans only: unmasked path
    wide = torch.randn(60, 7, dtype=torch.float64) * 1.5  # extension region and outside
    knots = layer.grid.t()  # every knot exactly
    odd = torch.zeros(3, 7, dtype=torch.float64)
    odd[0, 0], odd[1, 1], odd[2, 2] = float("nan"), float("inf"), -float("inf")
    special = torch.cat([knots, odd])
    compare_to_reference(layer, inner)
    compare_to_reference(layer, torch.cat([inner, wide, special]))


def test_uniform_paths_flagged():
    layer = FastKANLayer(3, 2, grid_size=5, spline_order=3)
    assert torch_backend.grid_is_uniform(layer.grid)
    layer.update_grid(torch.randn(50, 3))
    assert not torch_backend.grid_is_uniform(layer.grid)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_gradcheck(k):
    torch.manual_seed(0)
    layer = FastKANLayer(3, 2, grid_size=4, spline_order=k, dtype=torch.float64, backend="torch")
    x = (torch.rand(6, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x,) + tuple(layer.parameters()))


def test_public_kan_linear_torch_matches_reference():
    """``kan_linear_torch`` (2-D input, scaled coefficients): values and gradients w.r.t. x,
    coef and base_weight equal the reference's, second derivatives included."""
    torch.manual_seed(0)
    layer = FastKANLayer(6, 5, grid_size=7, spline_order=3, dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64)
    coef = layer.scaled_spline_weight.detach()
    bw = layer.base_weight.detach()
    gy = torch.randn(40, 5, dtype=torch.float64)
    out = []
    for fn in (torch_backend.kan_linear_torch, None):
        xx, cc, bb = (t.clone().requires_grad_(True) for t in (x, coef, bw))
        if fn is None:
            y = kan_linear_reference(xx, layer.grid, bb, cc, None, 3)
        else:
            y = fn(xx, layer.grid, cc, bb, 3)
        g = torch.autograd.grad(y, (xx, cc, bb), gy, create_graph=True)
        gg = torch.autograd.grad(g[0].square().sum(), xx)  # d/dx of |grad_x|^2
        out.append([y.detach(), *(t.detach() for t in g), gg[0]])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_public_kan_linear_torch_rejects_bad_shapes():
    layer = FastKANLayer(6, 5, dtype=torch.float64)
    coef = layer.scaled_spline_weight.detach()
    with pytest.raises(ValueError, match=r"x \(N, in_features\).*got x \(2, 3, 6\)"):
        torch_backend.kan_linear_torch(torch.zeros(2, 3, 6, dtype=torch.float64), layer.grid, coef, None, 3)
    with pytest.raises(ValueError, match=r"got x \(4, 7\)"):
        torch_backend.kan_linear_torch(torch.zeros(4, 7, dtype=torch.float64), layer.grid, coef, None, 3)
    x = torch.zeros(4, 6, dtype=torch.float64)
    for grid, k in ((layer.grid[:, :-1], 3), (layer.grid[:5], 3), (layer.grid, 2), (layer.grid[0], 3)):
        with pytest.raises(ValueError, match=r"grid must be \(in_features, G \+ 2k \+ 1\)"):
            torch_backend.kan_linear_torch(x, grid, coef, None, k)


def test_non_contiguous_input():
    torch.manual_seed(0)
    layer = FastKANLayer(5, 3, dtype=torch.float64)
    x = torch.randn(5, 40, dtype=torch.float64).t()  # (40, 5), transposed strides
    compare_to_reference(layer, x)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_clamped_end_knots_give_finite_input_gradient(k):
    """Repeated end knots (a clamped knot vector): inputs outside or on the last knot are
    evaluated on a zero-length span (0/0 bases); their grad_x must still equal the reference."""
    torch.manual_seed(0)
    layer = FastKANLayer(1, 1, grid_size=2, spline_order=k, dtype=torch.float64)
    inner = torch.linspace(-1.0, 1.0, 2 + 1, dtype=torch.float64)
    knots = torch.cat([inner[:1].repeat(k), inner, inner[-1:].repeat(k)])
    with torch.no_grad():
        layer.grid.copy_(knots.unsqueeze(0))
    x = torch.tensor([[-1.5], [-1.0], [0.5], [1.0], [2.0]], dtype=torch.float64)
    compare_to_reference(layer, x)


def test_stale_uniform_flag_is_verified():
    """A grid edited behind the layer's back (through .data: no version bump) must not keep
    the closed form for uniform knots."""
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64)
    layer = FastKANLayer(3, 2, grid_size=5, dtype=torch.float64)
    layer(x)  # caches "uniform"
    g = layer.grid.clone()
    g[:, 5] += 0.15
    layer.grid.data.copy_(g)
    compare_to_reference(layer, x)


def _record_reduced(monkeypatch):
    """Record the ``reduced`` flag of every feature group's weight (forward and backward; the
    backward's derivative-spline weight is only built for reduced groups)."""
    seen = []
    real = torch_backend.group_weight

    def spy(coef2, base_weight, scale, f0, f1, nb, blk, reduced):
        seen.append((f0, f1, reduced))
        return real(coef2, base_weight, scale, f0, f1, nb, blk, reduced)

    real_d = torch_backend.derivative_weight

    def spy_d(coef2, base_weight, scale, f0, f1, nb, blk, inv_h):  # backward, reduced, uniform knots
        seen.append((f0, f1, True))
        return real_d(coef2, base_weight, scale, f0, f1, nb, blk, inv_h)

    monkeypatch.setattr(torch_backend, "group_weight", spy)  # (where the engine calls it)
    monkeypatch.setattr(torch_backend, "derivative_weight", spy_d)
    return seen


@pytest.mark.parametrize("k,updated", [(1, False), (3, False), (3, True), (4, True)])
def test_reduced_basis_only_where_every_input_is_interior(k, updated, monkeypatch, one_thread):
    """The last basis is dropped (partition of unity) per feature group, only when every
    input of the group lies in the grid range; a group with one input in the extension
    region keeps all bases. Values and every gradient (the dropped basis's weight
    included) equal the reference either way."""
    monkeypatch.setattr(cpu_plan, "BLOCK_WIDTH", 3 * (5 + k + 1))  # groups (0,3), (3,6), (6,7)
    monkeypatch.setattr(cpu_plan, "KERNEL_BLOCK_WIDTH", 3 * (5 + k + 1))  # (the kernels' path)
    torch.manual_seed(k)
    layer = FastKANLayer(7, 4, grid_size=5, spline_order=k, dtype=torch.float64)
    if updated:
        layer.update_grid(torch.rand(300, 7, dtype=torch.float64) * 1.8 - 0.9)
    lo, hi = layer.grid[:, k], layer.grid[:, -k - 1]
    x = lo + torch.rand(50, 7, dtype=torch.float64) * (hi - lo)
    x[0] = lo  # the first knot of the range is inside it
    x[1] = hi - 1e-12 * (hi - lo)  # the last span, just below its end
    x[2:, 1] = hi[1] - torch.rand(48, dtype=torch.float64) * 1e-3  # feature 1: last span only (large grad W_L)
    x[5, 4] = hi[4] + 0.01 * (hi[4] - lo[4])  # feature 4 (group (3, 6)): one input in the extension region
    seen = _record_reduced(monkeypatch)
    compare_to_reference(layer, x)
    assert {(0, 3, True), (3, 6, False), (6, 7, True)} <= set(seen), seen
    assert len(seen) == 6  # each group once in forward, once in backward


@pytest.mark.parametrize("k,G", [(1, 1), (2, 4), (3, 5), (5, 3)])
def test_grad_x_through_the_derivative_spline(k, G, monkeypatch, one_thread):
    """Reduced groups on uniform knots take grad_x from the derivative spline's coefficients
    ((W_j - W_{j-1}) / h on the order-(k-1) bases); grad_x and every other gradient equal
    the reference, with the SiLU base branch in the engine and without (spline term only)."""
    used = []
    real = torch_backend.derivative_weight
    monkeypatch.setattr(torch_backend, "derivative_weight", lambda *a: used.append(a[3:5]) or real(*a))
    for act in (torch.nn.SiLU, torch.nn.Tanh):  # fused into the engine's GEMMs, or not (spline only)
        torch.manual_seed(k)
        layer = FastKANLayer(5, 3, grid_size=G, spline_order=k, base_activation=act, dtype=torch.float64)
        lo, hi = layer.grid[:, k], layer.grid[:, -k - 1]
        x = lo + (0.01 + 0.98 * torch.rand(40, 5, dtype=torch.float64)) * (hi - lo)
        used.clear()
        compare_to_reference(layer, x)
        assert used == [(0, 5)], used


def test_reduced_basis_float32_weight_gradient():
    """float32: the dropped basis's weight gradient is colsum(grad_y) - sum of the others.
    Against the float64 reference, also for a basis no input reaches (true gradient 0)."""
    torch.manual_seed(0)
    layer = FastKANLayer(16, 8, grid_size=5, spline_order=3)
    x = torch.rand(3000, 16) * 1.4 - 1.0  # inside [-1, 0.4]: the last span [0.6, 1) never reached
    gy = torch.randn(3000, 8, dtype=torch.float64)

    def grads(model, xx, backend):
        return backend_grads(model, xx, backend, gy=gy)

    got = grads(layer, x, "torch")
    ref = grads(copy.deepcopy(layer).double(), x.double(), "reference")
    names = ["y", "grad_x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, ref):
        assert_close(a, b, 2e-6, name)
    gw, gw_ref = got[names.index("spline_weight")], ref[names.index("spline_weight")]
    assert (gw_ref[..., -1] == 0).all()
    assert (gw[..., -1].abs() <= 1e-5 * gw_ref.abs().amax()).all()  # basis L: zero up to float32 rounding


@pytest.mark.parametrize("case", ["large-last-coefficient", "update_grid-refit"])
def test_reduction_declined_where_it_would_cancel(case):
    """float32: dropping the last basis subtracts W_L from every other coefficient and adds it
    back; when |W_L| dwarfs the coefficients in use that cancels to far more than rounding
    (1e-3 relative). The engine then keeps every basis: output and grad_x match a float64
    evaluation as closely as the float32 reference backend does."""
    torch.manual_seed(0)
    if case == "large-last-coefficient":
        layer = FastKANLayer(8, 4)
        with torch.no_grad():
            layer.spline_weight.normal_()
            layer.spline_weight[..., -1] = 1e4
        x = torch.rand(1024, 8) - 1  # the last basis is 0 on these inputs
    else:  # least squares gives the never-reached end bases huge coefficients
        layer = FastKANLayer(4, 2, grid_range=(-1e-5, 1e-5))
        with torch.no_grad():
            layer.spline_weight.normal_()
            layer.base_weight.zero_()
        layer.update_grid(torch.randn(3000, 4) ** 3 * 5e-6)
        x = torch.randn(3000, 4) ** 3 * 5e-6
    exact = FastKANLayer(layer.in_features, layer.out_features, grid_size=layer.grid_size, dtype=torch.float64)
    exact.load_state_dict({n: t.double() for n, t in layer.state_dict().items()})
    gy = torch.randn(x.shape[0], layer.out_features, dtype=torch.float64)
    truth = backend_grads(exact, x.double(), "reference", gy=gy)
    ref32 = backend_grads(layer, x, "reference", gy=gy)
    got = backend_grads(layer, x, "torch", gy=gy)
    for name, t, r, g in zip(["y", "grad_x"], truth, ref32, got):
        scale = t.abs().max()
        err_ref = float((r.double() - t).abs().max() / scale)
        err = float((g.double() - t).abs().max() / scale)
        assert err <= max(10 * err_ref, 1e-6), f"{name}: {err:.2e} vs the float32 reference's {err_ref:.2e}"


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_float32_error_on_far_and_fine_grids(case):
    """float32 on knots far from 0 against their spacing, very fine, rounded one by one or
    jittered within the uniformity tolerance: output and every gradient within 10x of the
    float32 reference backend's error, both against a float64 evaluation on the same stored
    knots. (The closed form used to take the knots as t_0 + j h and its local coordinate from
    (x - t_0) / h: 5e-4 relative at (1e3, 1e3 + 1), 0.5 at (1e6, 1e6 + 1), 6e-5 at G = 1000.)"""
    layer = grid_case_layer(case)
    x = grid_case_inputs(layer, 64)
    for name, (err, err_ref) in float32_errors(layer, x, "torch").items():
        assert err <= 10 * err_ref, f"{case} {name}: {err:.2e} vs the float32 reference's {err_ref:.2e}"


def test_uniformity_is_relative_to_the_spacing():
    """The closed form only where the stored knots are equally spaced to a few eps of h: the
    layer's own knots (exactly equal steps) are; knots rounded one by one from a fine or offset
    grid, coincident, swapped, constant or non-finite knots are not."""
    for G in (5, 10, 20, 50, 500):
        for dtype in (torch.float32, torch.float64):
            assert torch_backend.grid_is_uniform(uniform_grid(2, G, 3, (-1.0, 1.0), dtype=dtype)), (G, dtype)
    assert torch_backend.grid_is_uniform(FastKANLayer(2, 1, grid_size=50).grid)
    for case in ("far-1e3-G50", "far-1e4-G50", "far-1e6-G50", "fine-G1000-rounded", "default-G50-rounded"):
        # (also the layer's own knots at (-1, 1), G = 1000: equal steps would move them too far)
        assert not torch_backend.grid_is_uniform(grid_case_layer(case).grid), case
    assert torch_backend.grid_is_uniform(grid_case_layer("default-G20-jittered").grid)
    assert torch_backend.grid_is_uniform(grid_case_layer("fine-G500").grid)
    assert not torch_backend.grid_is_uniform(uniform_grid(2, 1000, 3, (-1.0, 1.0)))
    t = FastKANLayer(1, 1).grid
    far = uniform_grid(1, 50, 3, (1e6, 1e6 + 1))
    assert bool((far[0, 1:] == far[0, :-1]).any())  # coincident stored knots
    swapped = t.clone()
    swapped[0, [4, 5]] = swapped[0, [5, 4]]
    nan = t.clone()
    nan[0, 3] = float("nan")
    for bad in (far, swapped, nan, torch.zeros_like(t), t.flip(1)):
        assert not torch_backend.grid_is_uniform(bad)


@pytest.mark.parametrize("k", [2, 3])
def test_untouched_last_basis_gets_exactly_zero_gradient(k):
    """Inputs in [-1, 0.6) on the default knots: the last basis (support [t_L, t_last) = [0.6, 2.2))
    is 0 on every row, so its weight's gradient is exactly 0, as the reference's. The reduced
    form (last basis dropped, its weight turned into a bias) used to return its column as
    sum_b grad_y - sum_{j<L} gW_j: rounding noise up to ~1e-6, which Adam (scale-free) turned
    into steps of lr per iteration on weights no input reaches."""
    torch.manual_seed(0)
    layer = FastKANLayer(4, 3, spline_order=k)
    x = torch.rand(256, 4) * 1.6 - 1
    assert float(x.max()) < float(layer.grid[:, -k - 2].min())  # below t_L (0.6)
    ref = backend_grads(layer, x, "reference")[3]
    got = backend_grads(layer, x, "torch")[3]
    assert torch.equal(ref[..., -1], torch.zeros_like(ref[..., -1]))
    assert torch.equal(got[..., -1], torch.zeros_like(got[..., -1]))
    assert got[..., :-1].abs().amax() > 0


def test_adam_leaves_untouched_weights_bit_identical():
    torch.manual_seed(0)
    layer = FastKANLayer(4, 3, backend="torch")
    x = torch.rand(128, 4) * 1.6 - 1
    target = torch.sin(3 * x).sum(-1, keepdim=True).expand(-1, 3)
    before = layer.spline_weight.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
    after = layer.spline_weight.detach()
    assert torch.equal(after[..., -1], before[..., -1])
    assert not torch.equal(after[..., :-1], before[..., :-1])
