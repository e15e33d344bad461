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
