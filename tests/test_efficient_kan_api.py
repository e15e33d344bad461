"""efficient-kan's KANLinear.b_splines / curve2coeff on FastKANLayer (issue 19): same shapes and values.

The oracle is efficient-kan's own code, written out below (Cox-de Boor on the stored knots, then
``torch.linalg.lstsq`` per feature), and kanfast.reference.b_spline_basis.
"""

import pytest
import torch

from kanfast import FastKANLayer
from kanfast.reference import b_spline_basis


def ekan_b_splines(x, grid, k):
    """efficient-kan KANLinear.b_splines, verbatim in substance: (batch, in) -> (batch, in, G + k)."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for p in range(1, k + 1):
        bases = (x - grid[:, : -(p + 1)]) / (grid[:, p:-1] - grid[:, : -(p + 1)]) * bases[:, :, :-1] + (
            grid[:, p + 1 :] - x
        ) / (grid[:, p + 1 :] - grid[:, 1:(-p)]) * bases[:, :, 1:]
    return bases.contiguous()


def ekan_curve2coeff(x, y, grid, k):
    """efficient-kan KANLinear.curve2coeff: (batch, in), (batch, in, out) -> (out, in, G + k)."""
    A = ekan_b_splines(x, grid, k).transpose(0, 1)
    B = y.transpose(0, 1)
    return torch.linalg.lstsq(A, B).solution.permute(2, 0, 1).contiguous()


def _layer(k, adapted, dtype):
    torch.manual_seed(0)
    layer = FastKANLayer(4, 3, grid_size=6, spline_order=k, dtype=dtype)
    if adapted:  # non-uniform knots
        layer.update_grid(torch.randn(500, 4, dtype=dtype) * 0.7)
    return layer


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_b_splines_matches_efficient_kan(k, adapted, dtype, tol):
    layer = _layer(k, adapted, dtype)
    x = torch.rand(300, 4, dtype=dtype) * 3.4 - 1.7  # inside and outside the grid
    x[:4] = layer.grid[:, k + 2]  # on knots
    got = layer.b_splines(x)
    assert got.shape == (300, 4, layer.grid_size + k) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, ekan_b_splines(x, layer.grid, k), rtol=tol, atol=tol)
    torch.testing.assert_close(got, b_spline_basis(x, layer.grid, k), rtol=tol, atol=tol)


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_curve2coeff_matches_efficient_kan(k, adapted):
    layer = _layer(k, adapted, torch.float64)
    lo, hi = layer.grid[:, k].min(), layer.grid[:, -k - 1].max()
    x = (torch.rand(400, 4, dtype=torch.float64) * (hi - lo) + lo).contiguous()
    coef = torch.randn(3, 4, layer.grid_size + k, dtype=torch.float64)
    y = torch.einsum("nij,oij->nio", b_spline_basis(x, layer.grid, k), coef)  # curves in the span
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    got = layer.curve2coeff(x, y)
    assert got.shape == coef.shape and got.dtype == y.dtype
    torch.testing.assert_close(got, ekan_curve2coeff(x, y, layer.grid, k), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got, coef, rtol=1e-8, atol=1e-8)  # full rank: the coefficients come back
    for n, t in layer.state_dict().items():
        assert torch.equal(t, before[n]), n  # nothing written
    # noisy curves (not in the span): the least-squares solution, as efficient-kan's lstsq gives it
    y2 = y + 0.1 * torch.randn_like(y)
    torch.testing.assert_close(layer.curve2coeff(x, y2), ekan_curve2coeff(x, y2, layer.grid, k), rtol=1e-8, atol=1e-8)


def test_b_splines_and_curve2coeff_reject_bad_shapes():
    layer = FastKANLayer(4, 3)
    with pytest.raises(ValueError, match="in_features=4"):
        layer.b_splines(torch.rand(5, 3))
    with pytest.raises(ValueError, match=r"\(batch, in_features=4\)"):
        layer.b_splines(torch.rand(2, 5, 4))
    with pytest.raises(TypeError, match="dtype"):
        layer.b_splines(torch.rand(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(5, 4, 3\)"):
        layer.curve2coeff(torch.rand(5, 4), torch.rand(5, 4, 2))
    with pytest.raises(ValueError, match=r"\(5, 4, 3\)"):
        layer.curve2coeff(torch.rand(5, 4), None)


def test_fit_lbfgs_is_public():
    """The LBFGS trainer `kanfast fit toy` uses is part of the package's public face (pykan's model.fit)."""
    import kanfast
    import kanfast.workflow

    assert "fit_lbfgs" in kanfast.__all__
    assert kanfast.fit_lbfgs is kanfast.workflow.fit_lbfgs
    torch.manual_seed(0)
    model = kanfast.KAN([1, 1], grid_size=5, backend="torch")
    x = torch.rand(64, 1) * 2 - 1
    hist = kanfast.fit_lbfgs(model, x, torch.sin(2 * x), steps=3)
    assert len(hist) == 3 and hist[-1] < hist[0]
