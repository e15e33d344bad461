"""from_pykan against models made by pykan 0.2.8 itself (issue 14, items 14 and 15): its real
state_dict layout (node_scale_0, subnode_bias_0, ...), node affines folded exactly or refused,
the base function and input_id checked, models trained with affines, pruned and refined.
pykan writes checkpoint folders (./model) as it goes: every test runs in its own tmp dir."""

import math

import pytest
import torch

import kanfast

kan = pytest.importorskip("kan", reason="pykan (the test extra) is not installed")
MultKAN = kan.MultKAN

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pykan's ckpt_path='./model' and history files land here


def _pykan(width, dtype=DT, **kw):
    kw.setdefault("auto_save", False)
    m = MultKAN(width=width, grid=kw.pop("grid", 3), k=3, seed=kw.pop("seed", 0), **kw)
    return m.double() if dtype == DT else m  # (pykan's own .to() takes a device only)


def _x(n, d, seed=1, lo=-1.0, hi=1.0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, d, generator=g, dtype=dtype)


def _assert_same(model, pk, x, tol=1e-12):
    with torch.no_grad():
        want = pk(x)
    got = model(x).detach()
    assert got.shape == want.shape
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, (err, scale)


def test_real_layout_keys():
    """The layout this converter reads is pykan's: underscore-numbered node affines."""
    sd = _pykan([2, 3, 1]).state_dict()
    for l in range(2):
        for n in ("node_scale", "node_bias", "subnode_scale", "subnode_bias"):
            assert f"{n}_{l}" in sd
    assert "node_scale.0" not in sd and "input_id" not in sd  # input_id is a plain attribute


def test_node_scales_are_folded_exactly():
    torch.manual_seed(0)
    pk = _pykan([2, 5, 1])
    with torch.no_grad():
        pk.node_scale_0.fill_(2.0)  # the case: the old converter ignored it (0.061 off)
        pk.subnode_scale_0.uniform_(0.5, 1.5)
        pk.node_scale_1.fill_(-0.7)
        pk.subnode_scale_1.fill_(1.3)
    x = _x(200, 2, lo=-1.3, hi=1.3)  # some inputs outside the knots too
    _assert_same(kanfast.from_pykan(pk, backend="torch"), pk, x)
    _assert_same(kanfast.from_pykan(pk.state_dict(), backend="torch"), pk, x)
    # float32, as pykan makes it
    pk32 = _pykan([2, 5, 1], dtype=None)
    with torch.no_grad():
        pk32.node_scale_0.fill_(2.0)
    _assert_same(kanfast.from_pykan(pk32), pk32, _x(100, 2, dtype=torch.float32), tol=1e-6)


def test_node_biases_refused_where_not_representable():
    pk = _pykan([2, 5, 1])
    with torch.no_grad():
        pk.node_bias_0.fill_(0.5)  # read by layer 1's SiLU base terms: no place for it
    with pytest.raises(ValueError, match=r"node_bias_0.*base term.*not representable"):
        kanfast.from_pykan(pk)
    with pytest.raises(ValueError, match=r"node_bias_0"):
        kanfast.from_pykan(pk.state_dict())
    pk = _pykan([2, 5, 1])
    with torch.no_grad():
        pk.subnode_bias_1.fill_(0.25)  # on the model's output: kanfast has no output bias
    with pytest.raises(ValueError, match=r"subnode_bias_1 non-zero.*outputs.*not representable"):
        kanfast.from_pykan(pk)


def test_hidden_offsets_fold_into_knots_where_exact():
    """An offset c on a hidden node is read by the next layer's splines alone when its base terms
    there are zero (base_fun='zero', or masked/zero scale_base): B(x + c) on t is B(x) on t - c."""
    pk = _pykan([2, 4, 3, 1], base_fun="zero")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for l in range(2):
            for n in ("node_bias", "subnode_bias"):
                getattr(pk, f"{n}_{l}").copy_(torch.randn(getattr(pk, f"{n}_{l}").shape, generator=g, dtype=DT) * 0.3)
            for n in ("node_scale", "subnode_scale"):
                getattr(pk, f"{n}_{l}").uniform_(0.5, 1.5, generator=g)
    _assert_same(kanfast.from_pykan(pk, backend="torch"), pk, _x(300, 2, lo=-1.5, hi=1.5))
    # SiLU model: node 1's outgoing edges masked in layer 1 (pruned), so its bias has no effect
    pk = _pykan([2, 3, 2])
    with torch.no_grad():
        pk.act_fun[1].mask[1].zero_()
        pk.node_bias_0[1] = 0.8
    _assert_same(kanfast.from_pykan(pk), pk, _x(100, 2))
    with torch.no_grad():
        pk.node_bias_0[0] = 0.1  # node 0 is read through SiLU base terms
    with pytest.raises(ValueError, match="node 0 has a non-zero offset"):
        kanfast.from_pykan(pk)


def _dataset(n=200, seed=0, dtype=DT):
    f = lambda t: torch.sin(math.pi * t[:, :1]) + t[:, 1:2] ** 2  # noqa: E731
    x, xt = _x(n, 2, seed, dtype=dtype), _x(n, 2, seed + 1, dtype=dtype)
    return {"train_input": x, "train_label": f(x), "test_input": xt, "test_label": f(xt)}


@pytest.mark.parametrize("base_fun", ["silu", "zero"])
def test_trained_with_affines_pruned_refined(base_fun):
    """pykan's own workflow: fit with trainable affines (grid updates), prune, refine (float32:
    pykan's prune/refine rebuild the model in its default dtype)."""
    ds = _dataset(dtype=torch.float32)
    pk = _pykan([2, 5, 1], dtype=None, base_fun=base_fun, affine_trainable=True, auto_save=True, seed=2)
    pk.fit(ds, opt="Adam", steps=8, lr=0.02, lamb=1e-3, update_grid=True, grid_update_num=2, log=100)
    assert float(pk.node_scale_0.detach().sub(1).abs().max()) > 1e-4  # the affines did train
    assert float(pk.node_bias_1.detach().abs().max()) > 0
    pk(ds["train_input"])
    pk = pk.prune(node_th=1e-3, edge_th=1e-3)
    pk(ds["train_input"])
    pk = pk.refine(6)
    x = _x(150, 2, seed=7, lo=-1.2, hi=1.2, dtype=torch.float32)
    # the output layer's offset has no place in kanfast
    with pytest.raises(ValueError, match="not representable"):
        kanfast.from_pykan(pk)
    with torch.no_grad():
        pk.node_bias_1.zero_()
        pk.subnode_bias_1.zero_()
    if base_fun == "silu":  # the hidden offsets are read by SiLU base terms
        with pytest.raises(ValueError, match="node_bias_0"):
            kanfast.from_pykan(pk)
        with torch.no_grad():
            pk.node_bias_0.zero_()
            pk.subnode_bias_0.zero_()
    model = kanfast.from_pykan(pk, backend="torch")
    assert model.grid_size == 6
    _assert_same(model, pk, x, tol=2e-6)
    # what pykan's saveckpt writes: <path>_state (+ <path>_config.yml)
    pk.saveckpt("./ckpt")
    _assert_same(kanfast.from_pykan("./ckpt_state"), pk, x, tol=2e-6)


def test_base_function_read_or_refused():
    x = _x(100, 2, lo=-2, hi=2)
    pk = _pykan([2, 3, 1], base_fun="identity")
    _assert_same(kanfast.from_pykan(pk), pk, x)  # was silently SiLU (0.22 off)
    model = kanfast.from_pykan(pk.state_dict(), base_fun="identity")
    _assert_same(model, pk, x)
    with pytest.raises(ValueError, match="base_fun='silu' but the pykan model's base function is 'identity'"):
        kanfast.from_pykan(pk, base_fun="silu")
    # saved with saveckpt: the config beside the state file names the base function
    pk.saveckpt("./idm")
    _assert_same(kanfast.from_pykan("./idm_state"), pk, x)
    with pytest.raises(ValueError, match="base_fun='silu' but"):
        kanfast.from_pykan("./idm_state", base_fun="silu")
    # any other base function: refused
    pk = _pykan([2, 3, 1], base_fun=torch.tanh)
    with pytest.raises(ValueError, match="not silu, identity or zero"):
        kanfast.from_pykan(pk)
    with pytest.raises(ValueError, match="base_fun must be one of"):
        kanfast.from_pykan(_pykan([2, 3, 1]).state_dict(), base_fun="gelu")


@pytest.mark.parametrize("keep", [[0, 1], [0, 2], [2, 0]])
def test_prune_input_needs_n_inputs(keep):
    """pykan's forward reads x[:, input_id]: after prune_input the converted model must take the
    same x (n_inputs columns), or the conversion is refused."""
    pk = _pykan([3, 4, 1], dtype=None, auto_save=True)  # float32: prune_input rebuilds in pykan's default
    x3 = _x(120, 3, dtype=torch.float32)
    pk(x3)  # cache_data: the 3-column samples (prune_input keeps it)
    pruned = pk.prune_input(active_inputs=keep)
    with pytest.raises(ValueError, match="n_inputs"):
        kanfast.from_pykan(pruned)
    model = kanfast.from_pykan(pruned, n_inputs=3, backend="torch")
    assert model.layers[0].in_features == 3
    _assert_same(model, pruned, x3, tol=2e-6)
    with pytest.raises(ValueError, match="n_inputs"):
        kanfast.from_pykan(pruned, n_inputs=max(keep))
    # a state_dict has no input_id: the model takes the kept inputs, in input_id order
    model = kanfast.from_pykan(pruned.state_dict())
    assert model.layers[0].in_features == 2
    with torch.no_grad():
        want = pruned(x3)
    torch.testing.assert_close(model(x3[:, keep]), want, rtol=2e-6, atol=2e-6)
    # pykan's saveckpt of a prune_input model writes the base function as a pickled module into
    # its config: not plain YAML, so the converter asks instead of guessing
    pruned.saveckpt("./pruned")
    with pytest.raises(ValueError, match="pass base_fun="):
        kanfast.from_pykan("./pruned_state")
    model = kanfast.from_pykan("./pruned_state", base_fun="silu")
    torch.testing.assert_close(model(x3[:, keep]), want, rtol=2e-6, atol=2e-6)


def test_refuses_symbolic_and_multiplication_nodes_and_other_layouts():
    pk = _pykan([2, 3, 1])
    x = _x(64, 2)
    pk(x)
    pk.fix_symbolic(0, 1, 2, "sin", fit_params_bool=False, verbose=False)
    with pytest.raises(ValueError, match="symbolic"):
        kanfast.from_pykan(pk)
    pk.symbolic_enabled = False  # pykan then ignores the symbolic branch, and so does the converter
    _assert_same(kanfast.from_pykan(pk), pk, x)
    with pytest.raises(ValueError, match="multiplication nodes"):
        kanfast.from_pykan(_pykan([2, [2, 1], 1]))
    with pytest.raises(ValueError, match="multiplication nodes"):
        kanfast.from_pykan(_pykan([2, [2, 1], 1]).state_dict())
    sd = dict(_pykan([2, 3, 1]).state_dict())
    sd["biases.0.weight"] = torch.zeros(1, 3)  # pykan 0.0.x's layout
    with pytest.raises(ValueError, match="unexpected keys"):
        kanfast.from_pykan(sd)
