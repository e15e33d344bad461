"""Every bad or odd input gets the reference's value or a clear error, on every backend.

Default layer of the cases: in=4, out=3, G=5, k=3, grid_range (-1, 1): knots -2.2 .. 2.2
in steps of 0.4. The triton backend runs through Triton's interpreter on CPU (conftest
sets TRITON_INTERPRET=1 before triton is imported) and on the GPU when one is present.
"""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kanfast import KAN, FastKANLayer
from kanfast.reference import kan_linear_reference


def _triton_ok() -> bool:
    try:
        from kanfast import triton_backend

        return bool(triton_backend.AVAILABLE)
    except Exception:
        return False


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [
    pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.skipif(b == "triton" and not _triton_ok(), reason="kanfast.triton_backend not available")])
    for d in DEVICES
    for b in ("reference", "torch", "triton")
]


def make_layer(backend, device, in_features=4, out_features=3, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layer = FastKANLayer(in_features, out_features, grid_size=5, spline_order=3, backend=backend, **kw)
    with torch.no_grad():
        layer.spline_weight.normal_()
    return layer.to(device=device, dtype=dtype)


def basis_sum_layer(layer):
    """A copy computing sum_j B_j(x_0) of feature 0 only: W = 1 on feature 0, no base term."""
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.base_weight.zero_()
        other.spline_weight.zero_()
        other.spline_weight[:, 0, :] = 1.0
        other.spline_scaler.fill_(1.0)
    return other


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_outside_grid_is_pure_base(backend, device):
    layer = make_layer(backend, device)
    x = torch.tensor([5.0, -5.0, 1e4, -1e4], device=device).unsqueeze(1).repeat(1, 4)
    x = x.requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all()
    base_only = copy.deepcopy(layer)
    with torch.no_grad():
        base_only.spline_weight.zero_()
    assert torch.equal(y, base_only(x)), "spline term of out-of-grid inputs is not exactly 0"
    want = F.linear(F.silu(x.detach()), layer.base_weight.detach())
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert torch.equal(layer.spline_weight.grad, torch.zeros_like(layer.spline_weight))
    # at 1.4 (inside the knots, outside grid_range) the bases sum to 5/6: no renormalisation
    s = basis_sum_layer(layer)(torch.full((1, 4), 1.4, device=device))
    torch.testing.assert_close(s, torch.full_like(s, 5 / 6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_knots_and_ends(backend, device):
    layer = basis_sum_layer(make_layer(backend, device))
    on_knots = torch.tensor([-1.0, 0.2, 1.0], device=device).unsqueeze(1).repeat(1, 4)
    s = layer(on_knots)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=1e-6, atol=1e-6)
    ends = torch.tensor([-2.2, 2.2], device=device).unsqueeze(1).repeat(1, 4)
    e = layer(ends)
    assert (e.abs() <= 1e-6).all(), e  # B_0(t_0) = 0 analytically; nothing at or past t_last


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_repeated_interior_knot(backend, device):
    layer = make_layer(backend, device, dtype=torch.float32)
    with torch.no_grad():
        g = layer.grid.clone()
        g[:, 6] = g[:, 5]  # knot 0.2 repeated: -0.2, -0.2 ... (a double knot)
        layer.grid.copy_(g)
    x = torch.linspace(-2.5, 2.5, 101, device=device).unsqueeze(1).repeat(1, 4)
    y = layer(x)
    assert torch.isfinite(y).all()
    want = kan_linear_reference(x.double().cpu(), layer.grid.double().cpu(), layer.base_weight.double().cpu(), layer.spline_weight.double().cpu(), layer.spline_scaler.double().cpu(), 3)
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)


DEGENERATE = {
    "constant": lambda: torch.full((64, 4), 0.3),
    "two-valued": lambda: (torch.rand(64, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float(),
    "3-samples": lambda: torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1,
    "1-sample": lambda: torch.rand(1, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1,
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("data", list(DEGENERATE))
def test_update_grid_degenerate(backend, device, data):
    layer = make_layer(backend, device, dtype=torch.float64)
    x = DEGENERATE[data]().double().to(device)
    y0 = layer(x)
    layer.update_grid(x)
    assert (layer.grid[:, 1:] > layer.grid[:, :-1]).all()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    y1 = layer(x)
    assert torch.isfinite(y1).all()
    assert (y1 - y0).norm() <= 1e-4 * y0.norm()
    if device == "cuda":
        cpu = make_layer("torch", "cpu", dtype=torch.float64)
        cpu.update_grid(x.cpu())
        torch.testing.assert_close(cpu.grid, layer.grid.cpu(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        layer.update_grid(x[:0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_inf_rows_do_not_leak(backend, device):
    layer = make_layer(backend, device, in_features=4, out_features=3)
    g = torch.Generator().manual_seed(3)
    clean = (torch.randn(256, 4, generator=g) * 1.5).to(device)
    dirty = clean.clone()
    dirty[17] = float("nan")
    dirty[200] = float("inf")
    y_clean = layer(clean)
    y_dirty = layer(dirty)
    assert not torch.isfinite(y_dirty[17]).any()
    assert not torch.isfinite(y_dirty[200]).all()
    keep = torch.ones(256, dtype=torch.bool, device=device)
    keep[[17, 200]] = False
    assert torch.equal(y_dirty[keep], y_clean[keep])
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    y_ref = ref(dirty)
    assert torch.equal(torch.isfinite(y_ref), torch.isfinite(y_dirty))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dtypes(backend, device):
    layer = make_layer(backend, device)
    with pytest.raises(TypeError, match=r"torch\.float64.*torch\.float32"):
        layer(torch.randn(2, 4, dtype=torch.float64, device=device))
    dlayer = copy.deepcopy(layer).double()
    assert all(t.dtype == torch.float64 for t in list(dlayer.parameters()) + list(dlayer.buffers()))
    x = (torch.randn(33, 4, dtype=torch.float64) * 1.5).to(device)
    y = dlayer(x)
    assert y.dtype == torch.float64
    want = kan_linear_reference(x.cpu(), dlayer.grid.cpu(), dlayer.base_weight.cpu(), dlayer.spline_weight.cpu(), dlayer.spline_scaler.cpu(), 3)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-12, atol=1e-12)


def test_import_leaves_default_dtype():
    code = "import torch; d = torch.get_default_dtype(); import kanfast; assert torch.get_default_dtype() == d; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_shapes(backend, device):
    layer = make_layer(backend, device, in_features=16, out_features=3)
    x = torch.randn(2, 7, 16, device=device)
    y = layer(x)
    assert y.shape == (2, 7, 3)
    assert torch.equal(y, layer(x.reshape(14, 16)).reshape(2, 7, 3))
    assert layer(x[0, 0]).shape == (3,)
    with pytest.raises(ValueError, match=r"in_features=16.*\(2, 7, 15\)"):
        layer(torch.randn(2, 7, 15, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("width", [1, 17, 33])
def test_widths_match_reference(backend, device, width):
    layer = make_layer(backend, device, in_features=width, out_features=width, dtype=torch.float64 if backend != "triton" else torch.float32)
    x = (torch.randn(5, width, dtype=torch.float64) * 1.5).to(device=device, dtype=layer.base_weight.dtype)
    want = kan_linear_reference(x.double().cpu(), layer.grid.double().cpu(), layer.base_weight.double().cpu(), layer.spline_weight.double().cpu(), layer.spline_scaler.double().cpu(), 3)
    tol = 1e-12 if layer.base_weight.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(layer(x).double().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    layer = make_layer(backend, device, in_features=16, out_features=3)
    x = torch.randn(0, 16, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 16)
    for p in layer.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"grid_size": 0}, "grid_size"),
        ({"spline_order": -1}, "spline_order"),
        ({"grid_range": (1.0, 1.0)}, "grid_range"),
        ({"grid_range": (1.0, -1.0)}, "grid_range"),
        ({"in_features": 0}, "in_features"),
    ],
)
def test_constructor_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FastKANLayer(**{"in_features": 4, "out_features": 3, **kwargs})
    with pytest.raises(ValueError, match=name):
        KAN([kwargs.get("in_features", 4), 3], **{k: v for k, v in kwargs.items() if k != "in_features"})


def test_bad_arguments_are_named():
    import numpy as np

    assert KAN(list(np.array([3, 4, 2]))).layers[0].in_features == 3  # numpy integers are integers
    layer = FastKANLayer(3, 2)
    x = torch.rand(16, 3) * 2 - 1
    for margin in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match="margin"):
            layer.update_grid(x, margin=margin)
        with pytest.raises(ValueError, match="margin"):
            layer.extend_grid(4, x, margin=margin)
    with pytest.raises(ValueError, match="scale_noise"):
        FastKANLayer(3, 2, scale_noise=float("nan"))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        KAN([3, 4, 2]).prune(bad)


def test_torch_func_transforms_refuse_rather_than_guess():
    """torch.func transforms are not supported by the fast backends' autograd Function: they must
    raise (never return wrong values); backend="reference" supports them."""
    layer = make_layer("torch", "cpu", dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    calls = [
        lambda: torch.func.jacrev(layer)(x),
        lambda: torch.func.grad(lambda z: layer(z).sum())(x),
        lambda: torch.func.vmap(layer)(x.repeat(2, 1)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="torch.func transforms .* backend='reference'"):
            call()
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    J = torch.func.jacrev(ref)(x)
    assert J.shape == (3, 4) and torch.isfinite(J).all()


def test_meta_device_deferred_init():
    """FSDP-style deferred init: build on meta, to_empty, reset_parameters -> a working layer."""
    with torch.device("meta"):
        model = KAN([4, 3, 2])
    assert model.layers[0].grid.is_meta
    model.to_empty(device="cpu")
    for layer in model.layers:
        layer.reset_parameters()
    fresh = KAN([4, 3, 2])
    for a, b in zip(model.layers, fresh.layers):
        assert torch.equal(a.grid, b.grid)
    x = torch.rand(7, 4) * 2 - 1
    ref = copy.deepcopy(model)
    ref.backend = "reference"
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------ grid changes: all checked before anything is written
def _state(module):
    """Every tensor (values, and the objects themselves), grid_size and the knot caches."""
    layers = [m for m in module.modules() if isinstance(m, FastKANLayer)]
    return (
        {n: (t, t.detach().clone()) for n, t in module.state_dict(keep_vars=True).items()},
        [(m.grid_size, m._grid_uniform, m._grid_key[1:]) for m in layers],
        getattr(module, "grid_size", None),
    )


def _assert_same_state(module, before):
    tensors, layers, grid_size = before
    now, now_layers, now_grid_size = _state(module)
    assert now.keys() == tensors.keys()
    for n, (obj, value) in tensors.items():
        assert now[n][0] is obj, n
        assert torch.equal(now[n][1], value), n
    # (the version counter of a restored tensor moves on; the cached flag must not)
    assert [(g, u, key[1:]) for g, u, key in now_layers] == [(g, u, key[1:]) for g, u, key in layers]
    assert now_grid_size == grid_size


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_update_grid_refuses_knots_float32_cannot_hold(backend):
    """Issue 14.5: finite float32 samples at +-3e38 gave knots beyond float32 (inf), MKL's
    'Parameter 4 was incorrect on entry to DGELSD', then an INTERNAL ASSERT, with the
    non-finite grid already written (outputs changed)."""
    layer = make_layer(backend, "cpu")
    layer.update_grid(torch.randn(64, 4))  # a non-uniform grid
    x = torch.rand(32, 4) * 2 - 1
    x[0, 1], x[1, 1] = -3e38, 3e38
    y = layer(x[2:])
    before = _state(layer)
    with pytest.raises(ValueError, match=r"update_grid: the new knots of row 1 \(input feature 1\).* are not finite in torch.float32"):
        layer.update_grid(x)
    _assert_same_state(layer, before)
    assert torch.equal(layer(x[2:]), y)
    with pytest.raises(ValueError, match=r"extend_grid: the new knots of row 1 .* are not finite in torch.float32"):
        layer.extend_grid(8, x)
    _assert_same_state(layer, before)
    assert torch.equal(layer(x[2:]), y)


@pytest.mark.parametrize("value", [1e6, -3e7, 1e30])
def test_update_grid_constant_column_far_from_zero(value):
    """Issue 14.5: a constant float32 column at 1e6 gave knots that are not strictly
    increasing (the 1e-3-step minimum spacing is below float32's resolution there)."""
    layer = make_layer("torch", "cpu")
    # three distinct values per other column: fewer than G + k, so the refit keeps the curves exactly
    x = torch.tensor([-0.5, 0.1, 0.7])[torch.randint(0, 3, (50, 4), generator=torch.Generator().manual_seed(0))]
    x[:, 2] = value
    with torch.no_grad():
        y0 = layer(x)
        layer.update_grid(x)
        assert (layer.grid[:, 1:] > layer.grid[:, :-1]).all()
        assert all(torch.isfinite(p).all() for p in layer.parameters())
        y1 = layer(x)
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4 * float(y0.abs().max()))


def test_extend_grid_refuses_intervals_below_the_knot_resolution():
    """grid_range (1e6, 1e6 + 1) in float32 (spacing 1/16 there) cannot hold 100 intervals."""
    layer = FastKANLayer(3, 2, grid_size=5, grid_range=(1e6, 1e6 + 1), backend="torch")
    x = 1e6 + torch.rand(20, 3)
    y = layer(x)
    before = _state(layer)
    with pytest.raises(ValueError, match=r"extend_grid: the new knots of row 0 \(input feature 0\) are not strictly increasing in torch.float32"):
        layer.extend_grid(100)
    _assert_same_state(layer, before)
    assert torch.equal(layer(x), y)
    layer.extend_grid(8)  # what float32 holds still works
    assert layer.grid_size == 8 and (layer.grid[:, 1:] > layer.grid[:, :-1]).all()


def _kan_whose_second_layer_sees_huge_values(backend):
    """KAN([2, 3, 2]) float32: layer 0 maps x in [-1, 1] to activations spanning ~3e38, whose
    grid overflows float32; layer 0's own update is fine."""
    torch.manual_seed(0)
    model = KAN([2, 3, 2], grid_size=5, backend=backend)
    model.keep_inputs = True
    with torch.no_grad():
        model.layers[0].base_weight.fill_(0.0)
        model.layers[0].base_weight[:, 0] = 3e38
        model.layers[0].spline_weight.mul_(0.01)
    x = torch.rand(40, 2) * 2 - 1
    x[0, 0], x[1, 0] = -1.0, 1.0
    return model, x


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("call", ["update_grid", "extend_grid", "forward"])
def test_kan_grid_changes_are_all_layers_or_none(backend, call):
    """Issue 14.5: KAN.update_grid / extend_grid updated layer 0, then failed on layer 1,
    leaving a half-updated model; now the model is left exactly as it was."""
    model, x = _kan_whose_second_layer_sees_huge_values(backend)
    model(x)  # kept inputs exist: they must come back too
    kept = [layer.last_input for layer in model.layers]
    before = _state(model)
    with pytest.raises(ValueError, match=r"the new knots of row 0 \(input feature 0\).* are not finite in torch.float32"):
        if call == "update_grid":
            model.update_grid(x)
        elif call == "extend_grid":
            model.extend_grid(4, x)  # coarser: k steps of span / 4 beyond +-1e38 overflow
        else:
            model(x, update_grid=True)
    _assert_same_state(model, before)
    assert all(layer.last_input is t for layer, t in zip(model.layers, kept))
    assert model.grid_size == 5 and all(layer.grid_size == 5 for layer in model.layers)
