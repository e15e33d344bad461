"""The oracle itself against an independent one: scipy.interpolate.BSpline."""

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from kanfast.reference import b_spline_basis, kan_linear_reference


def _scipy_basis(x: np.ndarray, knots: np.ndarray, k: int) -> np.ndarray:
    """(n, G+k) basis by scipy, zero outside [t0, t_last) like the reference."""
    nb = len(knots) - k - 1
    out = np.zeros((len(x), nb))
    for j in range(nb):
        b = BSpline.basis_element(knots[j : j + k + 2], extrapolate=False)
        v = b(x)
        out[:, j] = np.nan_to_num(v, nan=0.0)
        # basis_element is closed on the right; B-splines are half-open [t_j, t_{j+k+1})
        out[x == knots[j + k + 1], j] = 0.0
    return out


def _knots(kind: str, G: int, k: int) -> np.ndarray:
    if kind == "uniform":
        h = 2.0 / G
        return np.arange(-k, G + k + 1) * h - 1.0
    rng = np.random.default_rng(G * 10 + k)
    return np.sort(rng.uniform(-2, 2, G + 2 * k + 1)) + np.arange(G + 2 * k + 1) * 1e-3


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["uniform", "nonuniform"])
@pytest.mark.parametrize("G", [1, 5, 12])
def test_basis_matches_scipy(k, kind, G):
    t = _knots(kind, G, k)
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.uniform(t[0] - 1, t[-1] + 1, 200),  # inside and outside
            t,  # exactly at every knot
            [t[0] - 1e-9, t[-1] + 1e-9, 1e4, -1e4],
        ]
    )
    grid = torch.tensor(t).unsqueeze(0)
    got = b_spline_basis(torch.tensor(x).unsqueeze(-1), grid, k)[:, 0, :].numpy()
    want = _scipy_basis(x, t, k)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_partition_of_unity_inside_and_zero_outside():
    G, k = 5, 3
    t = torch.tensor(_knots("uniform", G, k)).unsqueeze(0)
    x = torch.linspace(-1, 0.999, 101, dtype=torch.float64).unsqueeze(-1)
    s = b_spline_basis(x, t, k).sum(-1)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-12)
    far = torch.tensor([[-3.0], [2.2], [5.0], [float("nan")], [float("inf")], [-float("inf")]], dtype=torch.float64)
    assert (b_spline_basis(far, t, k) == 0).all()


def test_repeated_knot_no_nan():
    t = torch.tensor([[-2.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    x = torch.linspace(-2.5, 3.5, 61, dtype=torch.float64).unsqueeze(-1)
    for k in (1, 2, 3):
        b = b_spline_basis(x, t, k)
        assert torch.isfinite(b).all()
        want = _scipy_basis(x[:, 0].numpy(), t[0].numpy(), k)
        np.testing.assert_allclose(b[:, 0].numpy(), want, rtol=1e-10, atol=1e-12)


def test_reference_layer_is_the_formula():
    """Layer function = base + sum over bases, checked with an explicit double loop."""
    G, k, nin, nout = 4, 2, 3, 2
    grid = torch.tensor(_knots("uniform", G, k)).expand(nin, -1)
    bw = torch.randn(nout, nin, dtype=torch.float64)
    sw = torch.randn(nout, nin, G + k, dtype=torch.float64)
    sc = torch.randn(nout, nin, dtype=torch.float64)
    x = torch.rand(5, nin, dtype=torch.float64) * 2 - 1
    y = kan_linear_reference(x, grid, bw, sw, sc, k)
    for n in range(5):
        for o in range(nout):
            acc = 0.0
            for i in range(nin):
                xi = x[n, i].item()
                acc += bw[o, i].item() * xi / (1 + np.exp(-xi))
                basis = _scipy_basis(np.array([xi]), grid[i].numpy(), k)[0]
                acc += sc[o, i].item() * float(np.dot(sw[o, i].numpy(), basis))
            assert abs(acc - y[n, o].item()) < 1e-12
