"""Shared test helpers. Triton's interpreter must be chosen before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| (0 when both are empty or zero)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, name: str = "") -> None:
    """Assert relative RMS error below ``rtol``, reporting it (and the max abs error)."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_rms(a, b)
    mx = (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0
    assert err <= rtol, f"{name}: relative RMS error {err:.3e} > {rtol:.1e} (max abs {mx:.3e})"


def backend_grads(layer, x: torch.Tensor, backend: str, seed: int = 1, gy=None):
    """``[y, grad_x, *parameter grads]`` of ``layer`` (backend switched to ``backend``) on
    ``x`` for a fixed random ``grad_y`` (or ``gy``, cast to y's dtype: the same values
    across dtypes)."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    if gy is None:
        gy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    y.backward(gy.to(y.dtype))
    return [y.detach(), xx.grad] + [p.grad for p in layer.parameters()]


def compare_to_reference(layer, x: torch.Tensor, tol: float = 1e-12) -> None:
    """The torch backend's output and every gradient equal the reference backend's
    (NaN where it has NaN, absolute ``tol`` elsewhere)."""
    ref = backend_grads(layer, x, "reference")
    got = backend_grads(layer, x, "torch")
    for a, b in zip(ref, got):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        fin = torch.isfinite(a) & torch.isfinite(b)
        torch.testing.assert_close(b[fin], a[fin], rtol=0, atol=tol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test with torch on one thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: Knot layouts of the float32 accuracy tests: (grid_range, G, how the stored knots are made).
#: "layer": the layer's own (``uniform_grid``: exactly equal steps where the spacing allows);
#: "rounded": each knot rounded to float32 from ``lo + j h`` (older checkpoints, efficient-kan);
#: "jittered": the layer's knots moved by +-2 eps h (near-uniform, still the closed form).
GRID_CASES = {
    "far-1e3-G50": ((1e3, 1e3 + 1), 50, "layer"),
    "far-1e4-G50": ((1e4, 1e4 + 1), 50, "layer"),
    "far-1e6-G50": ((1e6, 1e6 + 1), 50, "layer"),  # some stored knots coincide
    "fine-G500": ((-1.0, 1.0), 500, "layer"),  # exactly equal steps: the closed form
    "fine-G1000-rounded": ((-1.0, 1.0), 1000, "rounded"),
    "default-G50-rounded": ((-1.0, 1.0), 50, "rounded"),
    "default-G20-jittered": ((-1.0, 1.0), 20, "jittered"),
    "default-G5": ((-1.0, 1.0), 5, "layer"),
}


def grid_case_layer(name: str, nin: int = 3, nout: int = 4, k: int = 3, seed: int = 0, **kw):
    """A float32 FastKANLayer on the knots of ``GRID_CASES[name]``, spline term only (base
    weight 0, so the spline's error is not hidden under silu(x) of inputs at 1e6), unit-normal
    spline weights."""
    from kanfast import FastKANLayer
    from kanfast.knots import uniform_grid

    (lo, hi), G, how = GRID_CASES[name]
    torch.manual_seed(seed)
    # (built on meta and filled here: the constructor's least-squares init costs O(in G^3))
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, grid_range=(lo, hi), device="meta", **kw)
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.grid.copy_(uniform_grid(nin, G, k, (lo, hi)))
        layer.spline_weight.normal_()
        layer.spline_scaler.uniform_(0.5, 1.5)
        layer.base_weight.zero_()
        if how == "rounded":
            h = (hi - lo) / G
            row = torch.arange(-k, G + k + 1, dtype=torch.float64) * h + lo
            layer.grid.copy_(row.float().expand(nin, -1))
        elif how == "jittered":
            t = layer.grid.double()
            h = float(t[0, 1] - t[0, 0])
            sign = torch.randint(0, 2, t.shape, generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
            sign[:, 0] = sign[:, -1] = 0
            layer.grid.copy_((t + sign * 2 * torch.finfo(torch.float32).eps * h).float())
    layer.refresh_grid_cache()
    return layer


def grid_case_inputs(layer, n: int, seed: int = 1) -> torch.Tensor:
    """n rows spread over each feature's knots [t_0, t_last), the first rows exactly on knots."""
    g = torch.Generator().manual_seed(seed)
    t = layer.grid.double()
    u = torch.rand(n, layer.in_features, generator=g, dtype=torch.float64)
    x = (t[:, 0] + u * (t[:, -1] - t[:, 0])).float()
    j = torch.randint(0, t.shape[1] - 1, (min(n, 4), layer.in_features), generator=g)
    x[: j.shape[0]] = layer.grid.gather(1, j.t()).t()
    return x


def float32_errors(layer, x: torch.Tensor, backend: str, seed: int = 2):
    """``{name: (err, err_ref)}`` for y and the gradients of x, base_weight, spline_weight and
    spline_scaler: the float32 ``backend``'s and the float32 reference backend's error,
    ``max|a - truth| / max|truth|``, truth = the reference in float64 on the same stored knots
    and parameters (an error below float32's eps counts as eps: the floor of the comparison)."""
    import copy

    exact = copy.deepcopy(layer).double()
    gy = torch.randn(x.shape[0], layer.out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    truth = backend_grads(exact, x.double(), "reference", gy=gy)
    ref = backend_grads(copy.deepcopy(layer), x, "reference", gy=gy)
    got = backend_grads(copy.deepcopy(layer), x, backend, gy=gy)
    eps = torch.finfo(torch.float32).eps
    out = {}
    for name, t, r, g in zip(["y", "grad_x", "base_weight", "spline_weight", "spline_scaler"], truth, ref, got):
        scale = t.abs().max()
        out[name] = (float((g.double() - t).abs().max() / scale), max(float((r.double() - t).abs().max() / scale), eps))
    return out


def spy_on_worker_runs(monkeypatch) -> list:
    """Record the ranges each ``kanfast.cpu_workers.run`` call splits its work into (one list per
    call); the real ``run`` still does the work."""
    from kanfast import cpu_workers

    calls = []
    real = cpu_workers.run

    def spy(fn, ranges):
        calls.append(list(ranges))
        return real(fn, ranges)

    monkeypatch.setattr(cpu_workers, "run", spy)
    return calls
