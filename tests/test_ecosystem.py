"""kanify, mixed precision, higher-order derivatives and ONNX export (issue 5, items 1, 3, 6, 7)."""


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kanfast
from kanfast import FastKANLayer, KAN
from kanfast.ecosystem import FastKANLayerWithBias
from kanfast.ops import kan_linear_op
from kanfast.reference import kan_linear_reference


def ref_layer(layer, x):
    """Reference output of one FastKANLayer (plus its bias when kanified), in float64."""
    sc = layer.spline_scaler.double() if layer.enable_standalone_scale_spline else None
    y = kan_linear_reference(
        x.double(), layer.grid.double(), layer.base_weight.double(), layer.spline_weight.double(), sc, layer.spline_order
    )
    if isinstance(layer, FastKANLayerWithBias):
        y = y + layer.bias.double()
    return y


# ------------------------------------------------------------------ kanify
class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, d=8, heads=2, hidden=12):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def test_kanify_transformer_block():
    torch.manual_seed(0)
    block = Block().double()
    old = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in block.named_modules() if type(m) is nn.Linear}
    assert set(old) == {"mlp.0", "mlp.2"}
    out = kanfast.kanify(block, grid_size=4)
    assert out is block
    for name in ("mlp.0", "mlp.2"):
        layer = block.get_submodule(name)
        assert isinstance(layer, FastKANLayerWithBias) and layer.grid_size == 4
        assert layer.base_weight.dtype == torch.float64 and layer.grid.dtype == torch.float64
        assert torch.equal(layer.base_weight, old[name][0]) and torch.equal(layer.bias, old[name][1])
    # nn.MultiheadAttention reads out_proj.weight itself: never replaced
    assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear

    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = block(x)
    # independent recomputation of the MLP branch with the reference layer
    h = block.ln1(x)
    r = x + block.attn(h, h, h, need_weights=False)[0]
    mid = F.gelu(ref_layer(block.mlp[0], block.ln2(r)))
    expect = r + ref_layer(block.mlp[2], mid)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert block.mlp[0].spline_weight.grad.abs().sum() > 0 and block.mlp[2].bias.grad.abs().sum() > 0


def test_kanify_cnn_head_and_filter():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, bias=False),
    )
    w_last = net[6].weight.detach().clone()
    kanfast.kanify(net, filter=lambda name, mod: mod.out_features == 3, spline_order=2)
    assert type(net[4]) is nn.Linear  # not selected
    assert type(net[6]) is FastKANLayer and net[6].spline_order == 2  # no bias -> plain layer
    assert torch.equal(net[6].base_weight, w_last)
    x = torch.randn(2, 3, 7, 7)
    feats = net[:6](x)
    torch.testing.assert_close(net(x).double(), ref_layer(net[6], feats), rtol=1e-5, atol=1e-6)
    net(x).sum().backward()
    assert net[0].weight.grad is not None and net[6].spline_weight.grad.abs().sum() > 0


def test_kanify_root_linear_and_errors():
    lin = nn.Linear(3, 2)
    new = kanfast.kanify(lin)
    assert isinstance(new, FastKANLayerWithBias) and (new.in_features, new.out_features) == (3, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        kanfast.kanify(torch.zeros(3))
    with pytest.raises(TypeError, match="device and dtype"):
        kanfast.kanify(nn.Linear(3, 2), dtype=torch.float64)


# ---------------------------------------------------------- mixed precision
def test_autocast_cpu_bf16_single_layer_is_fp32_compute():
    torch.manual_seed(2)
    layer = FastKANLayer(5, 4, backend="torch")
    x = torch.randn(9, 5)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_low_in = layer(x.bfloat16())  # input from a previous autocast op
    assert y.dtype == torch.bfloat16 and layer.grid.dtype == torch.float32
    assert torch.equal(y, y32.to(torch.bfloat16))  # fp32 bases + fp32 accumulation, one final rounding
    expect = ref_layer(layer, x.bfloat16().float()).to(torch.bfloat16)
    torch.testing.assert_close(y_low_in.float(), expect.float(), rtol=1e-2, atol=1e-2)


def test_autocast_cpu_bf16_in_a_model_trains():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), KAN([6, 5, 2], backend="torch"))
    x = torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    kan = model[1]
    for p in kan.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    assert kan.layers[0].spline_weight.grad.abs().sum() > 0
    # same as the fp32 chain on the bf16-rounded activations
    with torch.no_grad():
        a = model[0](x).bfloat16().float()
        h = ref_layer(kan.layers[0], a).to(torch.bfloat16).float()
        expect = ref_layer(kan.layers[1], h)
    torch.testing.assert_close(y.float(), expect.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_keeps_fp32_knots(dtype):
    torch.manual_seed(4)
    # 64 intervals on [100, 101]: spacing 1/64 is below fp16/bf16 resolution at 100
    layer = FastKANLayer(3, 2, grid_size=64, grid_range=(100.0, 101.0), backend="torch")
    knots = layer.grid.clone()
    assert not bool((knots.to(dtype)[:, 1:] > knots.to(dtype)[:, :-1]).all())  # would collapse
    layer = layer.to(dtype)
    assert layer.base_weight.dtype == dtype and layer.grid.dtype == torch.float32
    assert torch.equal(layer.grid, knots)
    x = (100 + torch.rand(11, 3)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expect = ref_layer(layer, x.float())
    torch.testing.assert_close(y.double(), expect, rtol=1e-2, atol=1e-2 * float(expect.detach().abs().max()))
    # back to fp32 keeps the exact knots
    assert torch.equal(layer.float().grid, knots)


# ------------------------------------------------------ higher derivatives
def test_gradgradcheck_torch_op_float64():
    torch.manual_seed(5)
    x = (torch.rand(6, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    layer = FastKANLayer(3, 2, grid_size=4, dtype=torch.float64)
    for uniform_grid in (True, False):
        if not uniform_grid:
            layer.update_grid(torch.randn(50, 3, dtype=torch.float64))
        grid = layer.grid
        coef = layer.scaled_spline_weight.detach().clone().requires_grad_()
        base = layer.base_weight.detach().clone().requires_grad_()
        f = lambda x, c, b: kan_linear_op(x, grid, c, b, 3, layer._uniform_flag(), "torch")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, coef, base))
        assert torch.autograd.gradgradcheck(f, (x, coef, base))
        # coefficients scaled inside the op (spline_weight * spline_scaler): gradients of both
        scale = (torch.rand(2, 3, dtype=torch.float64) + 0.5).requires_grad_()
        fs = lambda x, c, b, s: kan_linear_op(x, grid, c, b, 3, layer._uniform_flag(), "torch", s)  # noqa: E731
        assert torch.autograd.gradcheck(fs, (x, coef, base, scale))
        assert torch.autograd.gradgradcheck(fs, (x, coef, base, scale))


def test_pinn_derivatives_match_scipy_and_backprop():
    """y(x) of a 1->1 layer; dy/dx, d2y/dx2 by autograd vs scipy's BSpline derivatives,
    and a loss on them backpropagates to the parameters like the pure-autograd reference."""
    interpolate = pytest.importorskip("scipy.interpolate")
    torch.manual_seed(6)
    layer = FastKANLayer(1, 1, grid_size=6, dtype=torch.float64, backend="torch")
    with torch.no_grad():
        layer.spline_weight.normal_()
    xs = torch.linspace(-0.95, 0.93, 37, dtype=torch.float64).unsqueeze(1)

    def derivs(backend):
        layer.backend = backend
        layer.zero_grad()
        x = xs.clone().requires_grad_()
        y = layer(x)
        (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (d2y,) = torch.autograd.grad(dy.sum(), x, create_graph=True)
        loss = (dy - 1).square().mean() + 0.1 * d2y.square().mean()
        loss.backward()
        return dy.detach(), d2y.detach(), [p.grad.clone() for p in layer.parameters()]

    dy, d2y, grads = derivs("torch")
    t = layer.grid[0].numpy()
    c = layer.scaled_spline_weight[0, 0].detach().numpy()
    spl = interpolate.BSpline(t, c, 3, extrapolate=False)
    xn = xs[:, 0].numpy()
    s = 1 / (1 + np.exp(-xn))
    wb = float(layer.base_weight[0, 0])
    dsilu = s * (1 + xn * (1 - s))
    d2silu = s * (1 - s) * (2 + xn * (1 - 2 * s))
    np.testing.assert_allclose(dy[:, 0].numpy(), wb * dsilu + spl.derivative(1)(xn), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d2y[:, 0].numpy(), wb * d2silu + spl.derivative(2)(xn), rtol=1e-8, atol=1e-8)
    for g in grads:
        assert g is not None and g.abs().sum() > 0
    _, _, grads_ref = derivs("reference")
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_first_order_backward_unchanged_by_double_backward_path():
    """create_graph=False takes the fast kernel; create_graph=True the differentiable path: same values."""
    torch.manual_seed(7)
    m = KAN([3, 4, 2], dtype=torch.float64, backend="torch")
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(m(x).sum(), [x, *m.parameters()])
    g2 = torch.autograd.grad(m(x).sum(), [x, *m.parameters()], create_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert all(b.requires_grad for b in g2)


# -------------------------------------------------------------------- ONNX
def test_export_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(8)
    model = KAN([4, 7, 3], backend="torch").eval()
    model.update_grid(torch.randn(64, 4))  # non-uniform knots
    path = tmp_path / "kan.onnx"
    kanfast.export_onnx(model, torch.randn(5, 4), path)
    assert model.backend == "torch"  # restored
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(13, 4) * 2  # other batch size, some inputs outside the knots
    x[0, 0] = float(model.layers[0].grid[0, 5])  # exactly on a knot
    got = sess.run(None, {"x": x.numpy()})[0]
    expect = model(x).detach().numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_triton_backend_second_derivatives_routed_to_differentiable_path():
    """The Triton kernels' own backward is first-order only; through the layer, a
    create_graph=True backward must still give exact second derivatives (CPU: the
    kernels run in Triton's interpreter, tiny shapes)."""
    from kanfast import ops

    if not ops.triton_ops_available():
        pytest.skip("triton not importable")
    torch.manual_seed(9)
    layer = FastKANLayer(2, 3, grid_size=4, backend="triton")
    with torch.no_grad():
        layer.spline_weight.normal_()
    x = (torch.rand(5, 2) * 1.8 - 0.9).requires_grad_()
    y = layer(x)
    g = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()], create_graph=True)
    h = torch.autograd.grad(g[0].square().sum(), [x, *layer.parameters()])
    g1 = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()])  # first order: the kernels
    layer.backend = "reference"
    yr = layer(x)
    gr = torch.autograd.grad(yr.square().sum(), [x, *layer.parameters()], create_graph=True)
    hr = torch.autograd.grad(gr[0].square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(g, g1, gr):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    for a, b in zip(h, hr):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grid_update_and_extension_of_a_half_model():
    """Offset inputs (~100) and 32 intervals: fp16 cannot hold these knots apart, the fit must run in fp32."""
    torch.manual_seed(10)
    kw = dict(grid_size=32, grid_range=(99.7, 101.3), backend="torch")
    ref = FastKANLayer(3, 2, **kw)
    with torch.no_grad():
        ref.spline_weight.normal_()  # curves of size ~30, so a bad refit shows
    half = FastKANLayer(3, 2, **kw)
    half.load_state_dict(ref.state_dict())
    half = half.half()
    with torch.no_grad():  # same (fp16-representable) starting weights in both
        for p_ref, p_half in zip(ref.parameters(), half.parameters()):
            p_ref.copy_(p_half.float())
    x = (100 + torch.rand(400, 3)).half().float()
    ref.update_grid(x)
    half.update_grid(x.half())
    torch.testing.assert_close(half.grid, ref.grid, rtol=1e-6, atol=1e-5)
    assert half.grid.dtype == torch.float32 and half.spline_weight.dtype == torch.float16
    assert bool((half.grid[:, 1:] > half.grid[:, :-1]).all())
    xt = (100 + torch.rand(50, 3)).half()
    torch.testing.assert_close(half(xt).float(), ref(xt.float()), rtol=1e-2, atol=0.05)
    half.extend_grid(40)
    ref.extend_grid(40)
    assert half.spline_weight.dtype == torch.float16 and half.grid.shape == (3, 40 + 2 * 3 + 1)
    torch.testing.assert_close(half(xt).float(), ref(xt.float()), rtol=1e-2, atol=0.05)


def test_autocast_fp16_through_triton_kernels_cpu_interpreter():
    """Under autocast the Triton kernels get 16-bit operands with float32 knots and return
    the autocast dtype (CPU: fp16 through the interpreter; bf16 is refused there)."""
    from kanfast import ops

    if not ops.triton_ops_available():
        pytest.skip("triton not importable")
    torch.manual_seed(11)
    layer = FastKANLayer(3, 2, grid_size=4, backend="triton")
    x = torch.rand(6, 3) * 1.8 - 0.9
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16 and layer.grid.dtype == torch.float32
    expect = ref_layer(layer, x.half().float())
    torch.testing.assert_close(y.double(), expect.detach(), rtol=1e-2, atol=1e-2)


def test_export_onnx_refuses_symbolic_edges(tmp_path):
    import kanfast

    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = KAN([2, 2, 1])
    x = torch.rand(64, 2) * 2 - 1
    kanfast.fix_symbolic(model, 0, 0, 0, "sin", x)
    with pytest.raises(NotImplementedError, match="symbolic"):
        kanfast.export_onnx(model.eval(), x[:2], tmp_path / "k.onnx")


# ------------------------------------------- kanify and torch's transformer modules (issue 14, item 9)
def _train_eval_outputs(model, *args, **kwargs):
    """The model's output in train mode (dropout must be 0: deterministic) with gradients, then in
    eval mode with and without no_grad (torch's inference fast paths are taken only there)."""
    model.train()
    y_train = model(*args, **kwargs)
    y_train.double().square().sum().backward()  # training works
    model.eval()
    y_eval = model(*args, **kwargs)
    with torch.no_grad():
        y_eval_ng = model(*args, **kwargs)
    model.train()
    with torch.no_grad():
        y_train_ng = model(*args, **kwargs)
    return y_train.detach(), y_eval.detach(), y_eval_ng, y_train_ng


def test_kanify_transformer_encoder_layer_eval_mode():
    """torch's fused encoder-layer fast path reads linear1.weight as a plain MLP: kanify must send
    the layer down the ordinary forward, which calls the KAN layers (eval == train, dropout 0)."""
    torch.manual_seed(20)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, dtype=torch.float64)
    kanfast.kanify(layer, grid_size=4)
    assert isinstance(layer.linear1, FastKANLayerWithBias) and isinstance(layer.linear2, FastKANLayerWithBias)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # left alone
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    outs = _train_eval_outputs(layer, x)
    # independent recomputation of the post-norm layer with the reference KAN layers
    with torch.no_grad():
        h = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
        ff = ref_layer(layer.linear2, F.relu(ref_layer(layer.linear1, h)))
        expect = layer.norm2(h + ff)
    for y in outs:
        torch.testing.assert_close(y, expect, rtol=1e-10, atol=1e-10)
    assert layer.linear1.spline_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm_first", [False, True])
def test_kanify_transformer_encoder_eval_mode_with_padding_mask(norm_first):
    """nn.TransformerEncoder: its nested-tensor fast path (eval, no_grad, a key padding mask) would
    hand nested tensors to the KAN layers; the kanified encoder takes the ordinary path."""
    torch.manual_seed(21)
    enc_layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(enc_layer, num_layers=2, enable_nested_tensor=not norm_first)
    kanfast.kanify(enc, grid_size=3)
    assert all(isinstance(l.linear1, FastKANLayerWithBias) for l in enc.layers)
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True  # left-aligned padding: what the nested path accepts
    pad[2, 5:] = True
    for kwargs in ({}, {"src_key_padding_mask": pad}):
        y_train, y_eval, y_eval_ng, y_train_ng = _train_eval_outputs(enc, x, **kwargs)
        keep = ~pad if kwargs else torch.ones_like(pad)  # padded positions: unspecified (zeros in nested form)
        for y in (y_eval, y_eval_ng, y_train_ng):
            torch.testing.assert_close(y[keep], y_train[keep], rtol=1e-5, atol=1e-5)


def test_kanify_only_one_ffn_linear_still_takes_ordinary_path():
    torch.manual_seed(22)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
    kanfast.kanify(layer, filter=lambda name, mod: name == "linear2")
    assert type(layer.linear1) is nn.Linear and isinstance(layer.linear2, FastKANLayerWithBias)
    x = torch.randn(2, 4, 8)
    y_train, *others = _train_eval_outputs(layer, x)
    for y in others:
        torch.testing.assert_close(y, y_train, rtol=1e-5, atol=1e-5)


def test_kanify_transformer_decoder_and_full_transformer():
    torch.manual_seed(23)
    dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    kanfast.kanify(dec, grid_size=3)
    assert isinstance(dec.linear1, FastKANLayerWithBias)
    assert type(dec.self_attn.out_proj) is not FastKANLayerWithBias
    assert type(dec.multihead_attn.out_proj) is not FastKANLayerWithBias
    tgt, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    y_train, *others = _train_eval_outputs(dec, tgt, mem)
    for y in others:
        torch.testing.assert_close(y, y_train, rtol=1e-5, atol=1e-5)

    tr = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=24, dropout=0.0,
                        batch_first=True)
    kanfast.kanify(tr, grid_size=3)
    kan_names = {n for n, m in tr.named_modules() if isinstance(m, FastKANLayer)}
    assert "encoder.layers.0.linear1" in kan_names and "decoder.layers.0.linear2" in kan_names
    assert not any("out_proj" in n for n in kan_names)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    y_train, *others = _train_eval_outputs(tr, mem, tgt, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    for y in others:
        torch.testing.assert_close(y, y_train, rtol=1e-5, atol=1e-5)


def test_kanify_leaves_linears_read_by_their_parent_alone():
    """MultiheadAttention reads out_proj.weight/bias in F.multi_head_attention_forward (fast and
    slow path), LinearCrossEntropyLoss reads linear.weight: those linears are never replaced, even
    when a filter selects them, and the modules keep working in train and eval modes."""
    torch.manual_seed(24)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    kanfast.kanify(mha, filter=lambda name, mod: True)
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 3, 8)
    y_train, *others = _train_eval_outputs(nn.Sequential(_FirstOutput(mha)), x)
    for y in others:
        torch.testing.assert_close(y, y_train, rtol=1e-5, atol=1e-5)
    if hasattr(nn, "LinearCrossEntropyLoss"):
        loss = nn.LinearCrossEntropyLoss(8, 5)
        net = nn.ModuleDict({"proj": nn.Linear(8, 8), "loss": loss})
        kanfast.kanify(net)
        assert isinstance(net["proj"], FastKANLayerWithBias) and type(net["loss"].linear) is nn.Linear
        target = torch.randint(0, 5, (4,))
        assert torch.isfinite(net["loss"](net["proj"](torch.randn(4, 8)), target))


class _FirstOutput(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]
