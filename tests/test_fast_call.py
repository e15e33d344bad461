"""FastKANLayer.forward's common-case call (``_forward_plain``: a plain 2-D CPU float32/float64
input of the parameters' dtype, backend auto/torch, SiLU base, no symbolic branch) against the
general path it shortcuts and against the reference: the same values and gradients bit for bit
(float32/float64, odd shapes, NaN/inf rows, inputs outside the grid, pruned edges), every case
it must leave to the general path (and that path's errors), and the knot edits that must never
leave the cached uniform flag stale on the dense engine it also reaches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from conftest import rel_rms
from kanfast import KAN, FastKANLayer, sparse_backend
from kanfast.reference import kan_linear_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def plain(monkeypatch):
    """Counts of the common-case calls that returned a result (the shortcut taken)."""
    n = {"taken": 0, "declined": 0}
    real = FastKANLayer._forward_plain

    def spy(self, x):
        y = real(self, x)
        n["taken" if y is not None else "declined"] += 1
        return y

    monkeypatch.setattr(FastKANLayer, "_forward_plain", spy)
    return n


def _layer(nin, nout, G, dtype, seed, mask=False):
    torch.manual_seed(seed)
    layer = FastKANLayer(nin, nout, grid_size=G, dtype=torch.float64)
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.spline_scaler.normal_()
    if mask:
        layer.edge_mask = (torch.rand(nout, nin, dtype=torch.float64) > 0.4).double()
    return layer.to(dtype)


def _inputs(nin, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand(n, nin, generator=g, dtype=torch.float64) * 2 - 1,
                   torch.randn(n, nin, generator=g, dtype=torch.float64) * 2])  # outside the grid too
    odd = torch.zeros(3, nin, dtype=torch.float64)
    odd[0, 0], odd[1, -1], odd[2, nin // 2] = float("nan"), float("inf"), -float("inf")
    return torch.cat([x, odd]).to(dtype)


def _run(layer, x, gy, lead=False):
    """[y, grad_x, grad base_weight, grad spline_weight, grad spline_scaler]; ``lead``: x as (1, N, in)
    (the general path: a reshape)."""
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = layer(xx.unsqueeze(0) if lead else xx)
    y = y.reshape(x.shape[0], -1)
    y.backward(gy)
    return [y.detach(), xx.grad, layer.base_weight.grad, layer.spline_weight.grad, layer.spline_scaler.grad]


def _same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(torch.isnan(u), torch.isnan(v))
        assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(v))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,mask", [((1, 1, 1), False), ((7, 3, 4), False), ((5, 9, 6), True)],
                         ids=["1x1", "7-3", "5-9-pruned"])
def test_same_as_general_path_and_reference(shape, mask, dtype, sparse, plain, monkeypatch):
    monkeypatch.setattr(sparse_backend, "ENABLED", sparse)
    nin, nout, G = shape
    layer = _layer(nin, nout, G, dtype, seed=nin * 7 + nout, mask=mask)
    x = _inputs(nin, 11, dtype, seed=nin)
    gy = torch.randn(x.shape[0], nout, dtype=dtype, generator=torch.Generator().manual_seed(5))
    fast = _run(layer, x, gy)
    assert plain == {"taken": 1, "declined": 0}
    general = _run(layer, x, gy, lead=True)
    assert plain == {"taken": 1, "declined": 0}  # 3-D input: the general path
    _same(fast, general)
    # and the reference (masked edges: its base and spline weights times the mask)
    m = layer.edge_mask if mask else torch.ones(nout, nin, dtype=dtype)
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = kan_linear_reference(xx, layer.grid, layer.base_weight * m, layer.spline_weight * m.unsqueeze(-1),
                             layer.spline_scaler, layer.spline_order)
    y.backward(gy)
    want = [y.detach(), xx.grad, layer.base_weight.grad, layer.spline_weight.grad, layer.spline_scaler.grad]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(["y", "grad_x", "grad_base", "grad_spline", "grad_scaler"], fast, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        fin = torch.isfinite(b)
        assert rel_rms(a[fin], b[fin]) <= tol, name


def test_keep_input_and_inference(plain):
    layer = _layer(3, 2, 5, torch.float32, seed=1)
    x = torch.rand(8, 3) * 2 - 1
    layer.keep_input = True
    y = layer(x)
    assert layer.last_input is x and y.grad_fn is not None
    with torch.no_grad():
        y0 = layer(x)
    assert y0.grad_fn is None and torch.equal(y0, y.detach())
    assert plain["taken"] == 2


def test_declined_cases_take_the_general_path(plain):
    """Each case the shortcut leaves alone still gives the general path's result or error."""
    layer = _layer(3, 2, 5, torch.float64, seed=2)
    x = torch.rand(6, 3, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        want = layer(x)
    assert plain == {"taken": 1, "declined": 0}
    # errors of the general path: dtype, feature count (and 16-bit and autocast below)
    with pytest.raises(TypeError, match="does not match parameter dtype"):
        layer(x.float())
    with pytest.raises(ValueError, match="in_features=3"):
        layer(torch.zeros(6, 4, dtype=torch.float64))
    # the reference backend
    layer.backend = "reference"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    layer.backend = "auto"
    # CPU autocast: float32 compute, bfloat16 output
    l32 = _layer(3, 2, 5, torch.float32, seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert l32(x.float()).dtype == torch.bfloat16
    # another base activation
    other = _layer(3, 2, 5, torch.float64, seed=2)
    other.base_activation = nn.GELU()
    with torch.no_grad():
        y = other(x)
        ref = kan_linear_reference(x, other.grid, other.base_weight, other.spline_weight, other.spline_scaler,
                                   3, other.base_activation)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # grid of another dtype than the parameters (cast by the general path)
    mixed = _layer(3, 2, 5, torch.float32, seed=2)
    mixed.grid = mixed.grid.double()
    with torch.no_grad():
        torch.testing.assert_close(mixed(x.float()), _layer(3, 2, 5, torch.float32, seed=2)(x.float()), rtol=0,
                                   atol=0)
    # declined: the GELU layer and the mixed-dtype grid (the errors raise before the shortcut's guard returns)
    assert plain["declined"] >= 2


def test_parametrized_and_swapped_parameters():
    """A parametrization of a weight, and torch.func.functional_call's swapped tensors, are seen."""
    layer = _layer(3, 2, 5, torch.float64, seed=3)
    x = torch.rand(6, 3, dtype=torch.float64) * 2 - 1

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    with torch.no_grad():
        base_only = kan_linear_reference(x, layer.grid, layer.base_weight, 0 * layer.spline_weight, None, 3)
        y = layer(x)
    spline = y - base_only
    swapped = {"spline_weight": layer.spline_weight.detach() * 3}
    with torch.no_grad():
        y3 = torch.func.functional_call(layer, swapped, (x,))
    torch.testing.assert_close(y3 - base_only, 3 * spline, rtol=1e-12, atol=1e-12)
    parametrize.register_parametrization(layer, "spline_weight", Double())
    with torch.no_grad():
        y2 = layer(x)
    torch.testing.assert_close(y2 - base_only, 2 * spline, rtol=1e-12, atol=1e-12)


def test_torch_func_still_refused():
    layer = _layer(3, 2, 5, torch.float64, seed=4)
    x = torch.rand(6, 3, dtype=torch.float64) * 2 - 1
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda t: layer(t).sum())(x)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(layer)(x.unsqueeze(1))


@pytest.mark.parametrize("edit", ["data", "load_state_dict", "update_grid", "extend_grid", "to"])
def test_uniform_flag_never_stale_on_the_dense_engine(edit, plain, monkeypatch):
    """The shortcut hands kan_linear_op the layer's cached "uniform knots" flag (the dense engine's
    closed form); after each way of changing the knots the result is the reference's."""
    monkeypatch.setattr(sparse_backend, "ENABLED", False)
    layer = _layer(3, 2, 5, torch.float64, seed=7)
    x = torch.rand(40, 3, dtype=torch.float64) * 2.4 - 1.2

    def check():
        with torch.no_grad():
            y = layer(x)
            ref = kan_linear_reference(x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler, 3)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    check()
    assert layer._grid_uniform
    if edit == "data":  # uneven knots, no version bump
        v = layer.grid._version
        layer.grid.data.copy_(layer.grid * 1.3 + 0.1 * torch.arange(layer.grid.shape[1], dtype=torch.float64) ** 2)
        assert layer.grid._version == v
        layer.refresh_grid_cache()  # (what the docs ask after a .data write; the engine verifies anyway)
    elif edit == "load_state_dict":
        other = _layer(3, 2, 5, torch.float64, seed=8)
        other.update_grid(torch.randn(100, 3, dtype=torch.float64) ** 3)
        layer.load_state_dict(other.state_dict())
    elif edit == "update_grid":
        layer.update_grid(torch.randn(100, 3, dtype=torch.float64) ** 3)
    elif edit == "extend_grid":
        layer.extend_grid(9, torch.randn(100, 3, dtype=torch.float64) ** 3)
    else:  # new grid tensors (knots rounded through float32: no longer uniform to the test's tolerance)
        layer.to(torch.float32).to(torch.float64)
    assert not layer._uniform_flag()
    check()
    assert plain["declined"] == 0


def test_uniform_flag_data_write_without_refresh(plain, monkeypatch):
    """A .data write the cache cannot see (no version bump, no refresh): the dense engine verifies the
    flag's claim itself, so the result is still the reference's."""
    monkeypatch.setattr(sparse_backend, "ENABLED", False)
    layer = _layer(3, 2, 5, torch.float64, seed=9)
    x = torch.rand(40, 3, dtype=torch.float64) * 2.4 - 1.2
    with torch.no_grad():
        layer(x)
    layer.grid.data.copy_(layer.grid * 1.3 + 0.1 * torch.arange(layer.grid.shape[1], dtype=torch.float64) ** 2)
    assert layer._grid_uniform  # stale
    with torch.no_grad():
        y = layer(x)
        ref = kan_linear_reference(x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler, 3)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert plain["taken"] == 2


def test_model_loop_honours_module_dispatch(monkeypatch):
    """KAN.forward calls its layers' forward directly only when ``layer(x)`` would do just that:
    layer hooks (pre and post), global hooks and a forward set on the instance still run."""
    torch.manual_seed(0)
    model = KAN([3, 4, 2]).double()
    x = torch.rand(9, 3, dtype=torch.float64) * 2 - 1
    dispatched = []
    real = nn.Module._call_impl

    def spy(self, *a, **kw):
        dispatched.append(type(self).__name__)
        return real(self, *a, **kw)

    monkeypatch.setattr(FastKANLayer, "_call_impl", spy)
    with torch.no_grad():
        model(x)
    assert dispatched == []  # the direct loop: no hooks anywhere
    model.layers[1].register_forward_hook(lambda m, a, y: None)
    with torch.no_grad():
        model(x)
    assert dispatched == ["FastKANLayer", "FastKANLayer"]  # a hook: nn.Module's dispatch for every layer
    model = KAN([3, 4, 2]).double()

    def chain(t):
        for layer in model.layers:
            t = layer(t)
        return t

    with torch.no_grad():
        plain = model(x)
        torch.testing.assert_close(plain, chain(x), rtol=0, atol=0)
        seen = []
        h1 = model.layers[1].register_forward_pre_hook(lambda m, a: (a[0] * 2,))
        h2 = model.layers[0].register_forward_hook(lambda m, a, y: seen.append(y.shape))
        y = model(x)
        assert seen == [(9, 4)]
        torch.testing.assert_close(y, model.layers[1](model.layers[0](x)), rtol=0, atol=0)
        assert not torch.equal(y, plain)
        h1.remove(), h2.remove()
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
        g = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, y: y + 1 if m is model.layers[1] else None)
        try:
            y = model(x)
        finally:
            g.remove()
        torch.testing.assert_close(y, plain + 1, rtol=0, atol=0)
        model.layers[0].forward = lambda t: torch.zeros(t.shape[0], 4, dtype=t.dtype)
        torch.testing.assert_close(model(x), model.layers[1](torch.zeros(9, 4, dtype=torch.float64)), rtol=0, atol=0)
        del model.layers[0].forward
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
