"""torch.compile and torch.library registration (issue 5, item 2).

Compiling is slow on a 2-core CPU: tiny models, few compiles; the recompile
counting runs on the aot_eager backend (Dynamo + AOTAutograd, no codegen), one
test goes through inductor.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import kanfast
from kanfast import KAN
from kanfast.ops import kan_bwd, kan_fwd


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model, y, x):
    return torch.autograd.grad(y.square().sum(), [x, *model.parameters()])


def _check_against_eager(model, compiled, sizes, in_f=16):
    for b in sizes:
        x = torch.randn(b, in_f) * 1.3
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        yc = compiled(x1)
        ye = model(x2)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        for gc, ge in zip(_grads(model, yc, x1), _grads(model, ye, x2)):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def _sample_args():
    torch.manual_seed(0)
    out = []
    # (1, 1): gradients of size-1 dims must still come back in separate storage (no aliasing)
    for (nin, nout), uniform_grid, has_base in (((3, 2), True, True), ((3, 2), False, False), ((1, 1), False, True)):
        layer = kanfast.FastKANLayer(nin, nout, grid_size=4)
        if not uniform_grid:
            layer.update_grid(torch.randn(40, nin))
        x = torch.randn(5, nin, requires_grad=True)
        coef = layer.scaled_spline_weight.detach().clone().requires_grad_()
        base = layer.base_weight.detach().clone().requires_grad_() if has_base else None
        out.append((x, layer.grid.detach().clone(), coef, base, 3, layer._uniform_flag()))
    return out


def test_opcheck_registered_ops():
    for x, grid, coef, base, k, uniform in _sample_args():
        torch.library.opcheck(kan_fwd, (x, grid, coef, base, k, uniform))
        scale = (torch.rand(coef.shape[:2]) + 0.5).requires_grad_()  # coef * scale[..., None] inside the op
        torch.library.opcheck(kan_fwd, (x, grid, coef, base, k, uniform, scale))
        gy = torch.randn(x.shape[0], coef.shape[0])
        b = None if base is None else base.detach()
        for need_x, need_c, need_b in ((True, True, True), (False, True, False), (True, False, True)):
            torch.library.opcheck(kan_bwd, (gy, x.detach(), grid, coef.detach(), b, k, uniform, need_x, need_c, need_b))
            for need_s in (True, False):
                args = (gy, x.detach(), grid, coef.detach(), b, k, uniform, need_x, need_c, need_b, scale.detach(), need_s)
                torch.library.opcheck(kan_bwd, args)


def test_compile_fullgraph_dynamic_no_recompile_per_batch_size():
    torch.manual_seed(1)
    model = KAN([16, 32, 4], backend="torch")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    # batch size 1 is specialised by PyTorch's 0/1 rule unless sizes are treated obliviously
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        _check_against_eager(model, compiled, (1, 7, 64))
    assert cnt.frame_count == 1


def test_compile_fullgraph_default_dynamic_recompiles_once():
    torch.manual_seed(2)
    model = KAN([16, 32, 4], backend="torch")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    _check_against_eager(model, compiled, (7, 64, 33))
    assert cnt.frame_count <= 2  # static first, then one automatic-dynamic graph for all sizes


def test_compile_sees_grid_updates():
    """The uniform-knot flag is a guarded Python constant: after update_grid the graph is rebuilt."""
    torch.manual_seed(3)
    model = KAN([16, 32, 4], backend="torch")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    _check_against_eager(model, compiled, (9,))
    model.update_grid(torch.randn(100, 16))
    assert not model.layers[0]._grid_uniform
    _check_against_eager(model, compiled, (9, 20))
    model.backend = "reference"
    x = torch.randn(6, 16)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_inductor_fullgraph_dynamic():
    torch.manual_seed(4)
    model = KAN([16, 32, 4], backend="torch")
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    _check_against_eager(model, compiled, (7, 64))
    assert cnt.frame_count == 1


def test_triton_op_opcheck_and_compile_cpu_interpreter():
    """kanfast::kan_triton_fwd (the Triton kernels under kanfast's autograd formula):
    opcheck and a fullgraph compile, through Triton's interpreter on tiny shapes."""
    from kanfast import ops

    if not ops.triton_ops_available():
        pytest.skip("triton not importable")
    tfwd = ops._register_triton_ops()[0]
    torch.manual_seed(5)
    layer = kanfast.FastKANLayer(3, 2, grid_size=3, backend="triton")
    x = torch.randn(4, 3, requires_grad=True)
    coef = layer.scaled_spline_weight.detach().clone().requires_grad_()
    base = layer.base_weight.detach().clone().requires_grad_()
    torch.library.opcheck(tfwd, (x, layer.grid, coef, base, 3, True), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=cnt, fullgraph=True, dynamic=True)
    for b in (5, 9):  # not 3: duck sizing would tie a batch of 3 to in_features
        xb = torch.randn(b, 3, requires_grad=True)
        yc = compiled(xb)
        ye = layer(xb)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        for gc, ge in zip(_grads(layer, yc, xb), _grads(layer, ye, xb)):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1


def test_compile_under_autocast_matches_eager():
    torch.manual_seed(6)
    model = KAN([16, 32, 4], backend="torch")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc = compiled(x)
        ye = model(x)
    assert yc.dtype == ye.dtype == torch.bfloat16
    torch.testing.assert_close(yc, ye, rtol=1e-2, atol=1e-2)
    assert cnt.frame_count == 1


def test_compiled_layer_after_grid_edit_matches_reference():
    """The compiled graph bakes the 'uniform knots' flag in; the op verifies it, so a grid
    edited outside the compiled region (no refresh_grid_cache) still gives the right values."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=torch.float64)
    layer = kanfast.FastKANLayer(3, 2, grid_size=5, dtype=torch.float64, backend="torch")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x)
    with torch.no_grad():
        layer.grid[:, 5] += 0.15
    y = compiled(x)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x), rtol=1e-10, atol=1e-12)
