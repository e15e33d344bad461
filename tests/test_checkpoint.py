"""Checkpoints and converters from efficient-kan / pykan layouts (issue 5, item 4)."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import kanfast
from kanfast import KAN


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _model_after_update():
    torch.manual_seed(0)
    m = KAN([3, 5, 2], grid_size=4, backend="torch")
    m.update_grid(torch.randn(200, 3) * 1.7)  # non-uniform knots
    return m


def test_whole_model_and_state_dict_roundtrip_bitwise():
    torch.manual_seed(1)
    fresh = KAN([3, 5, 2], grid_size=4, backend="torch")
    updated = _model_after_update()
    x = torch.randn(17, 3) * 2
    for m in (fresh, updated):
        y = m(x)
        assert torch.equal(_roundtrip(m)(x), y)
        clone = KAN([3, 5, 2], grid_size=4, backend="torch")
        sd = _roundtrip(m.state_dict())
        clone.load_state_dict(sd)
        assert torch.equal(clone(x), y)
        # weights-only load (the torch>=2.6 default) of the state_dict works too
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        clone.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(clone(x), y)
        assert torch.equal(copy.deepcopy(m)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(m))(x), y)


def test_loading_non_uniform_grid_refreshes_uniform_flag():
    """A fresh model caches 'uniform knots'; loading adapted knots must switch it off."""
    src = _model_after_update()
    dst = KAN([3, 5, 2], grid_size=4, backend="torch")
    assert all(layer._grid_uniform for layer in dst.layers)
    dst.load_state_dict(src.state_dict())
    assert not any(layer._grid_uniform for layer in dst.layers)
    x = torch.randn(9, 3)
    ref = dst(x)
    dst.backend = "reference"
    torch.testing.assert_close(ref, dst(x), rtol=1e-5, atol=1e-6)


def _snapshot(module):
    """Every tensor of the module (parameters, buffers) and the layers' knot caches, by value."""
    tensors = {n: t.detach().clone() if torch.is_tensor(t) else copy.deepcopy(t) for n, t in module.state_dict(keep_vars=True).items()}
    caches = [(m._grid_uniform, m._grid_key) for m in module.modules() if isinstance(m, kanfast.FastKANLayer)]
    return tensors, caches


def _assert_unchanged(module, snap):
    tensors, caches = snap
    now, now_caches = _snapshot(module)
    assert now.keys() == tensors.keys()
    for n, t in tensors.items():
        assert torch.equal(now[n], t) if torch.is_tensor(t) else now[n] == t, n  # bitwise
    assert now_caches == caches


def test_wrong_grid_size_is_a_clear_error():
    sd = KAN([3, 5, 2], grid_size=4).state_dict()
    dst = KAN([3, 5, 2], grid_size=7)
    snap = _snapshot(dst)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0 .*grid_size 4 vs 7.*spline_weight \(5, 3, 7\)"):
        dst.load_state_dict(sd)
    _assert_unchanged(dst, snap)


@pytest.mark.parametrize(
    "src,dst,want",
    [
        # issue 14.12: a k=3 checkpoint into a k=2 layer was reported as "grid_size G = 7 at spline_order 2"
        (dict(grid_size=5, spline_order=3), dict(grid_size=5, spline_order=2), r"spline_order 3 vs 2 \("),
        # same knot count (G + 2k + 1 = 12), other G and k: the knots alone would load
        (dict(grid_size=5, spline_order=3), dict(grid_size=7, spline_order=2), r"spline_order 3 vs 2; grid_size 5 vs 7 \("),
        (dict(grid_size=5, spline_order=3), dict(grid_size=4, spline_order=3), r"grid_size 5 vs 4 \("),
        (dict(in_features=4), dict(in_features=6), r"in_features 4 vs 6 \("),
        (dict(out_features=3), dict(out_features=2), r"out_features 3 vs 2 \("),
    ],
)
def test_size_mismatch_names_what_differs_and_loads_nothing(src, dst, want):
    base = dict(in_features=4, out_features=3)
    sd = kanfast.FastKANLayer(**{**base, **src}).state_dict()
    layer = kanfast.FastKANLayer(**{**base, **dst})
    snap = _snapshot(layer)
    with pytest.raises(RuntimeError, match=r"size mismatch for the layer \(checkpoint vs this layer\): " + want) as err:
        layer.load_state_dict(sd)
    assert "G = " not in str(err.value)
    _assert_unchanged(layer, snap)


def _bad_knots(sd, key, how):
    sd = dict(sd)
    g = sd[key].clone()
    if how == "nan":
        g[2, 5] = float("nan")
    elif how == "inf":
        g[2, 0] = -float("inf")
    elif how == "swapped":
        g[2, [4, 5]] = g[2, [5, 4]]
    elif how == "float32-overflow":  # finite in the checkpoint's float64, inf in the layer's float32
        g = g.double()
        g[2, -1] = 1e39
    sd[key] = g
    return sd


@pytest.mark.parametrize(
    "how,want",
    [
        ("nan", r"row 2 \(input feature 2\) has a non-finite knot: nan at position 5"),
        ("inf", r"row 2 \(input feature 2\) has a non-finite knot: -inf at position 0"),
        ("swapped", r"row 2 \(input feature 2\) is not increasing: knot 5 = .* < knot 4 = "),
        ("float32-overflow", r"row 2 \(input feature 2\) has a non-finite knot \(as torch.float32\): inf"),
    ],
)
def test_invalid_knots_are_rejected_and_the_model_is_unchanged(how, want):
    """Issue 14.4: a grid with NaN, inf or two knots swapped was accepted (NaN outputs on
    the torch backend, backends disagreeing by 0.012 on outputs of size 0.63)."""
    torch.manual_seed(0)
    src = _model_after_update()
    with torch.no_grad():  # the symbolic branch and the edge mask must not load either
        src.layers[1].edge_mask = torch.ones(2, 5)
    dst = KAN([3, 5, 2], grid_size=4, backend="torch")
    dst.update_grid(torch.rand(50, 3))  # non-uniform knots: a cached "not uniform" flag
    x = torch.randn(20, 3)
    y = dst(x)
    snap = _snapshot(dst)
    bad = _bad_knots(src.state_dict(), "layers.1.grid", how)
    with pytest.raises(RuntimeError, match=r"invalid knots in layers\.1\.grid: " + want):
        dst.load_state_dict(bad)
    _assert_unchanged(dst, snap)
    assert dst.layers[1].edge_mask is None
    assert torch.equal(dst(x), y)
    # the same on a lone layer (no prefix), with strict=False too
    layer = kanfast.FastKANLayer(5, 2, grid_size=4)
    snap = _snapshot(layer)
    lone = {k[len("layers.1."):]: v for k, v in bad.items() if k.startswith("layers.1.")}
    with pytest.raises(RuntimeError, match=r"invalid knots in grid: " + want):
        layer.load_state_dict(lone, strict=False)
    _assert_unchanged(layer, snap)


def test_invalid_knots_leave_the_symbolic_branch_as_it_was():
    from kanfast.symbolic import SymbolicBranch

    src = kanfast.FastKANLayer(3, 2, grid_size=4)
    src.symbolic = SymbolicBranch(3, 2)
    with torch.no_grad():
        src.symbolic.affine.add_(1.5)
        src.symbolic.mask[1, 2] = 1
    src.symbolic.names[1][2] = "sin"
    dst = kanfast.FastKANLayer(3, 2, grid_size=4)
    dst.symbolic = SymbolicBranch(3, 2)
    snap = _snapshot(dst)
    with pytest.raises(RuntimeError, match="invalid knots in grid"):
        dst.load_state_dict(_bad_knots(src.state_dict(), "grid", "swapped"))
    _assert_unchanged(dst, snap)


def test_repeated_knots_still_load():
    """Repeated knots are valid B-spline knots (Cox-de Boor's 0/0 := 0), only decreasing ones are refused."""
    src = kanfast.FastKANLayer(3, 2, grid_size=4, backend="torch")
    with torch.no_grad():
        src.grid[1, 6] = src.grid[1, 5]
    dst = kanfast.FastKANLayer(3, 2, grid_size=4, backend="torch")
    dst.load_state_dict(src.state_dict())
    x = torch.randn(30, 3)
    assert torch.equal(dst(x), src(x))


def test_deepcopy_and_pickle_with_kept_inputs():
    """Issue 14.6: after a forward with keep_inputs=True, deepcopy raised "Only Tensors created
    explicitly by the user (graph leaves) support the deepcopy protocol"."""
    torch.manual_seed(0)
    m = KAN([3, 4, 2], grid_size=4, backend="torch")
    m.keep_inputs = True
    x = torch.randn(16, 3, requires_grad=True)
    y = m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), _roundtrip(m)):
        for a, b in zip(clone.layers, m.layers):
            assert torch.equal(a.last_input, b.last_input.detach())
            assert not a.last_input.requires_grad
        assert torch.equal(clone(x.detach()), y.detach())
    # the original keeps its graph: the activation regulariser still reaches the first layer
    assert m.layers[1].last_input.grad_fn is not None
    m.regularization_loss(mode="activation").backward()
    assert m.layers[0].spline_weight.grad.abs().sum() > 0


# --------------------------------------------------------------- efficient-kan
def _sorted_knots(in_f, n, gen):
    return torch.sort(torch.randn(in_f, n, generator=gen, dtype=torch.float64) * 1.5, dim=1).values


def efficient_kan_forward(sd, x, k):
    """efficient-kan's KANLinear.forward, written out (Cox-de Boor on the stored grid)."""
    l = 0
    while f"layers.{l}.grid" in sd:
        p = f"layers.{l}."
        grid = sd[p + "grid"]
        xx = x.unsqueeze(-1)
        bases = ((xx >= grid[:, :-1]) & (xx < grid[:, 1:])).to(x.dtype)
        for j in range(1, k + 1):
            bases = (xx - grid[:, : -(j + 1)]) / (grid[:, j:-1] - grid[:, : -(j + 1)]) * bases[:, :, :-1] + (
                grid[:, j + 1 :] - xx
            ) / (grid[:, j + 1 :] - grid[:, 1:(-j)]) * bases[:, :, 1:]
        w = sd[p + "spline_weight"] * sd[p + "spline_scaler"].unsqueeze(-1)
        x = F.linear(F.silu(x), sd[p + "base_weight"]) + F.linear(bases.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1))
        l += 1
    return x


def test_from_efficient_kan():
    gen = torch.Generator().manual_seed(2)
    widths, G, k = [3, 4, 2], 5, 3
    sd = {}
    for l, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        sd[f"layers.{l}.grid"] = _sorted_knots(i, G + 2 * k + 1, gen)
        sd[f"layers.{l}.base_weight"] = torch.randn(o, i, generator=gen, dtype=torch.float64)
        sd[f"layers.{l}.spline_weight"] = torch.randn(o, i, G + k, generator=gen, dtype=torch.float64)
        sd[f"layers.{l}.spline_scaler"] = torch.randn(o, i, generator=gen, dtype=torch.float64)
    model = kanfast.from_efficient_kan(sd, backend="torch")
    assert [layer.in_features for layer in model.layers] == [3, 4] and model.layers[0].grid_size == G
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64) * 1.2
    torch.testing.assert_close(model(x), efficient_kan_forward(sd, x, k), rtol=1e-10, atol=1e-10)
    # without standalone scalers (efficient-kan enable_standalone_scale_spline=False): scaler 1
    sd_ns = {key: v for key, v in sd.items() if not key.endswith("spline_scaler")}
    ones = {key: torch.ones_like(v) if key.endswith("spline_scaler") else v for key, v in sd.items()}
    torch.testing.assert_close(kanfast.from_efficient_kan(sd_ns)(x), efficient_kan_forward(ones, x, k), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="efficient-kan"):
        kanfast.from_efficient_kan({"foo": torch.zeros(1)})


# ---------------------------------------------------------------------- pykan
def pykan_B_batch(x, grid, k):
    """pykan's spline.B_batch: x (batch, in), grid (in, G+2k+1) -> (batch, in, G+k)."""
    x = x.unsqueeze(2)
    grid = grid.unsqueeze(0)
    if k == 0:
        value = (x >= grid[:, :, :-1]) * (x < grid[:, :, 1:])
    else:
        b = pykan_B_batch(x[:, :, 0], grid[0], k - 1)
        value = (x - grid[:, :, : -(k + 1)]) / (grid[:, :, k:-1] - grid[:, :, : -(k + 1)]) * b[:, :, :-1] + (
            grid[:, :, k + 1 :] - x
        ) / (grid[:, :, k + 1 :] - grid[:, :, 1:(-k)]) * b[:, :, 1:]
    return torch.nan_to_num(value)


def pykan_forward(sd, x, k):
    """MultKAN.forward without multiplication nodes / symbolic branch, from the state_dict."""
    l = 0
    while f"act_fun.{l}.coef" in sd:
        p = f"act_fun.{l}."
        spline = torch.einsum("ijk,jlk->ijl", pykan_B_batch(x, sd[p + "grid"], k), sd[p + "coef"])  # (b, in, out)
        y = sd[p + "scale_base"][None] * F.silu(x)[:, :, None] + sd[p + "scale_sp"][None] * spline
        y = (sd[p + "mask"][None] * y).sum(1)
        y = sd[f"subnode_scale_{l}"] * y + sd[f"subnode_bias_{l}"]
        x = sd[f"node_scale_{l}"] * y + sd[f"node_bias_{l}"]
        l += 1
    return x


def _pykan_sd(gen, widths=(2, 5, 1), G=3, k=3):
    sd = {}
    for l, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        p = f"act_fun.{l}."
        # pykan layout: linspace(range, G+1) extended by k steps of h each side, then (after
        # update_grid_from_samples) any increasing knots: use random sorted knots
        sd[p + "grid"] = _sorted_knots(i, G + 2 * k + 1, gen)
        sd[p + "coef"] = torch.randn(i, o, G + k, generator=gen, dtype=torch.float64)
        sd[p + "scale_base"] = torch.randn(i, o, generator=gen, dtype=torch.float64)
        sd[p + "scale_sp"] = torch.randn(i, o, generator=gen, dtype=torch.float64)
        mask = torch.ones(i, o, dtype=torch.float64)
        mask[0, 0] = 0.0  # a pruned edge
        sd[p + "mask"] = mask
        sd[f"symbolic_fun.{l}.mask"] = torch.zeros(o, i, dtype=torch.float64)
        # pykan 0.2.8's names (tests/test_pykan.py checks them on pykan's own models)
        sd[f"node_bias_{l}"] = torch.zeros(o, dtype=torch.float64)
        sd[f"subnode_bias_{l}"] = torch.zeros(o, dtype=torch.float64)
        sd[f"node_scale_{l}"] = 0.5 + torch.rand(o, generator=gen, dtype=torch.float64)
        sd[f"subnode_scale_{l}"] = 0.5 + torch.rand(o, generator=gen, dtype=torch.float64)
    return sd


def test_from_pykan(tmp_path):
    gen = torch.Generator().manual_seed(3)
    sd = _pykan_sd(gen)
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 1.3
    expect = pykan_forward(sd, x, 3)
    model = kanfast.from_pykan(sd, backend="torch")
    assert [layer.out_features for layer in model.layers] == [5, 1]
    torch.testing.assert_close(model(x), expect, rtol=1e-10, atol=1e-10)
    # from a file as pykan's saveckpt writes it (torch.save of the state_dict)
    path = tmp_path / "model_state"
    torch.save(sd, path)
    torch.testing.assert_close(kanfast.from_pykan(str(path))(x), expect, rtol=1e-10, atol=1e-10)


def test_from_pykan_rejects_what_it_cannot_represent():
    gen = torch.Generator().manual_seed(4)
    sd = _pykan_sd(gen)
    bad = dict(sd)
    bad["node_bias_0"] = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="node_bias_0.*not representable"):
        kanfast.from_pykan(bad)
    bad = dict(sd)
    bad["symbolic_fun.1.mask"] = torch.ones(1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="symbolic"):
        kanfast.from_pykan(bad)
    mult = _pykan_sd(gen, widths=(2, 5, 1))
    mult["act_fun.1.coef"] = torch.randn(4, 1, 6, dtype=torch.float64)  # 5 outputs feed 4 inputs: mult nodes
    mult["act_fun.1.grid"] = _sorted_knots(4, 10, gen)
    for key in ("scale_base", "scale_sp", "mask"):
        mult[f"act_fun.1.{key}"] = torch.ones(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiplication nodes"):
        kanfast.from_pykan(mult)
    with pytest.raises(ValueError, match="pykan"):
        kanfast.from_pykan({"layers.0.grid": torch.zeros(1)})
