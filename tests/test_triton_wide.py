"""The Triton backend's wide-layer path (dense basis block + torch.mm) against the reference.

On CPU through Triton's interpreter (torch.mm on CPU stands in for cuBLAS), the path
forced with ``tb._WIDE_MODE = "wide"`` and tiny chunks (several per batch, the last one
short). Values and every gradient are compared with ``kanfast.reference`` in float64
on the same parameters (relative RMS error), float32 with IEEE products.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the backend copes either way)

import copy
import inspect
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from kanfast import FastKANLayer  # noqa: E402
from kanfast import triton_backend as tb  # noqa: E402
from kanfast.torch_backend import kan_linear_torch  # noqa: E402
from test_triton import assert_close, check_nonfinite_rows, reference_of, run  # noqa: E402  (same helpers)

pytestmark = [
    pytest.mark.skipif(not tb.AVAILABLE, reason="triton not importable"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


@pytest.fixture
def wide(monkeypatch):
    """Force the wide path with 5-row chunks; count its calls (they run through)."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = tb._wide_forward, tb._wide_backward

    def spy_fwd(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def spy_bwd(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(tb, "_WIDE_MODE", "wide")
    monkeypatch.setattr(tb, "_WIDE_CHUNK_ROWS_OVERRIDE", 5)
    monkeypatch.setattr(tb, "_wide_forward", spy_fwd)
    monkeypatch.setattr(tb, "_wide_backward", spy_bwd)
    return calls


def make_input(layer, n, seed=0):
    """Random rows, one on knots (interior and the last knot), one far outside on both sides."""
    g = torch.Generator().manual_seed(seed)
    nin = layer.in_features
    x = torch.randn(n, nin, generator=g) * 1.3
    t = layer.grid
    cols = torch.arange(nin)
    x[0] = t[cols, torch.randint(0, t.shape[1], (nin,), generator=g)]
    x[-1] = t[cols, torch.full((nin,), t.shape[1] - 1)]
    x[1, ::2] = 7.5
    x[1, 1::2] = -9.0
    return x


CASES = [
    # (n rows, in, out, k, G, knots): odd widths, every chunk count from 1 to 5 (chunks of 5 rows)
    (5, 7, 5, 1, 4, "uniform"),
    (11, 7, 5, 1, 3, "adapted"),
    (13, 9, 3, 2, 5, "uniform"),
    (16, 9, 3, 2, 4, "adapted"),
    (23, 5, 7, 3, 5, "uniform"),
    (17, 5, 7, 3, 6, "adapted"),
    (9, 3, 4, 5, 3, "uniform"),
    (12, 3, 4, 5, 5, "adapted"),
    (6, 1, 1, 3, 1, "uniform"),
    (7, 3, 2, 0, 3, "uniform"),  # k = 0: step functions
    (9, 4, 3, 3, 20, "adapted"),  # G + k = 23, 24 columns > BLOCK_J (16): several j slices per block
]


@pytest.mark.parametrize("n,nin,nout,k,G,kind", CASES)
def test_wide_matches_reference(wide, n, nin, nout, k, G, kind):
    torch.manual_seed(1)
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, backend="triton")
    with torch.no_grad():  # spline term of the same size as the base term, so errors in it show
        layer.spline_weight.normal_()
        layer.spline_scaler.normal_()
    if kind == "adapted":
        layer.update_grid(torch.randn(64, nin) * 0.8 + 0.3)
        assert not tb.grid_is_uniform(layer.grid)
    x = make_input(layer, n)
    gy = torch.randn(n, nout)
    y, gx, gp = run(layer, x, gy)
    assert wide == {"fwd": 1, "bwd": 1}, "the wide path did not run"
    yr, gxr, gpr = run(reference_of(layer), x.double(), gy.double())
    assert_close(y, yr, 1e-5, "y")
    assert_close(gx, gxr, 1e-5, "grad x")
    for name, a, b in zip(("base_weight", "spline_weight", "spline_scaler"), gp, gpr):
        assert_close(a, b, 1e-5, f"grad {name}")


def test_wide_nonfinite_rows(wide):
    """NaN/inf/huge entries: only their own rows change; same values and patterns as the reference."""
    check_nonfinite_rows()
    assert wide == {"fwd": 2, "bwd": 2}


def test_wide_matches_fused_path(wide, monkeypatch):
    """The two Triton paths agree (float32, IEEE) on the same layer."""
    torch.manual_seed(14)
    layer = FastKANLayer(6, 7, grid_size=5, spline_order=3, backend="triton")
    layer.update_grid(torch.rand(40, 6) * 3 - 1.5)
    x = make_input(layer, 14, seed=3)
    gy = torch.randn(14, 7)
    yw, gxw, gpw = run(layer, x, gy)
    monkeypatch.setattr(tb, "_WIDE_MODE", "fused")
    yf, gxf, gpf = run(layer, x, gy)
    assert wide == {"fwd": 1, "bwd": 1}
    assert_close(yw, yf, 1e-6, "y")
    assert_close(gxw, gxf, 1e-6, "grad x")
    for a, b in zip(gpw, gpf):
        assert_close(a, b, 1e-6, "param grads")


def test_wide_backward_is_bit_repeatable(wide):
    torch.manual_seed(4)
    layer = FastKANLayer(9, 6, grid_size=6, spline_order=3, backend="triton")
    x = torch.randn(21, 9)
    gy = torch.randn(21, 6)
    y0, gx0, gp0 = run(layer, x, gy)
    y1, gx1, gp1 = run(layer, x, gy)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for a, b in zip(gp0, gp1):
        assert torch.equal(a, b)


def test_wide_spline_only_and_partial_grads(wide):
    """No base branch; grad of coef only, then of x only."""
    torch.manual_seed(9)
    layer = FastKANLayer(5, 4, grid_size=4, spline_order=2)
    x = torch.randn(11, 5, requires_grad=True)
    coef = layer.scaled_spline_weight.detach().requires_grad_()
    gy = torch.randn(11, 4)
    xd = x.detach().double().requires_grad_()
    cd = coef.detach().double().requires_grad_()
    yr = kan_linear_torch(xd, layer.grid.double(), cd, None, 2)
    yr.backward(gy.double())
    y = tb.kan_linear_triton(x, layer.grid, coef, None, 2)
    y.backward(gy)
    assert_close(y, yr, 1e-5, "y")
    assert_close(x.grad, xd.grad, 1e-5, "grad x")
    assert_close(coef.grad, cd.grad, 1e-5, "grad coef")
    (gc,) = torch.autograd.grad(tb.kan_linear_triton(x.detach(), layer.grid, coef, None, 2), coef, gy)
    assert torch.equal(gc, coef.grad)
    (gx,) = torch.autograd.grad(tb.kan_linear_triton(x, layer.grid, coef.detach(), None, 2), x, gy)
    assert torch.equal(gx, x.grad)
    assert wide == {"fwd": 3, "bwd": 3}


def test_wide_strided_x_and_expanded_grad(wide):
    """A transposed x and the stride-0 grad_y of y.sum().backward()."""
    torch.manual_seed(16)
    layer = FastKANLayer(6, 5, grid_size=5, spline_order=3, backend="triton")
    base = torch.randn(6, 13)
    leaf = base.clone().requires_grad_()
    layer(leaf.t()).sum().backward()
    grads = [leaf.grad] + [p.grad.clone() for p in (layer.base_weight, layer.spline_weight, layer.spline_scaler)]
    ref = reference_of(layer)
    leaf_r = base.double().requires_grad_()
    ref(leaf_r.t()).sum().backward()
    grads_r = [leaf_r.grad] + [p.grad for p in (ref.base_weight, ref.spline_weight, ref.spline_scaler)]
    for a, b in zip(grads, grads_r):
        assert_close(a, b, 1e-5, "grads")
    assert wide == {"fwd": 1, "bwd": 1}


def test_wide_float16(wide):
    torch.manual_seed(7)
    layer = FastKANLayer(9, 7, grid_size=5, spline_order=3, backend="triton")
    half = copy.deepcopy(layer).half()
    x = torch.randn(12, 9)
    gy = torch.randn(12, 7)
    try:
        y, gx, gp = run(half, x.half(), gy)
    except Exception as e:  # pragma: no cover - depends on the interpreter
        pytest.skip(f"Triton's interpreter cannot run float16 here: {e!r}")
    assert y.dtype == torch.float16 and gx.dtype == torch.float16
    _, gxr, gpr = run(reference_of(half), x.half().double(), gy.double())
    yr = reference_of(half)(x.half().double())
    assert_close(y, yr, 3e-3, "float16 y")
    assert_close(gx, gxr, 3e-3, "float16 grad x")
    for a, b in zip(gp, gpr):
        assert_close(a, b, 3e-3, "float16 param grads")
    assert wide["fwd"] >= 1 and wide["bwd"] == 1


def test_wide_opcheck(wide):
    """The custom ops keep their contracts (no aliasing, fake tensors) on the wide path."""
    torch.manual_seed(10)
    layer = FastKANLayer(5, 4, grid_size=3, spline_order=3)
    x = torch.randn(7, 5)
    coef = layer.scaled_spline_weight.detach().requires_grad_()
    bw = layer.base_weight.detach().requires_grad_()
    torch.library.opcheck(torch.ops.kanfast.kan_linear_triton_fwd.default, (x, layer.grid, coef, bw, 3, True))
    gy = torch.randn(7, 4)
    torch.library.opcheck(
        torch.ops.kanfast.kan_linear_triton_bwd.default,
        (gy, x, layer.grid, coef.detach(), bw.detach(), 3, True, True, True, True),
    )
    assert wide["fwd"] > 0 and wide["bwd"] > 0


def test_rule_picks_what_it_documents():
    """use_wide_path: float16/bfloat16, out >= 128 and G >= 50."""
    for dt in (torch.float16, torch.bfloat16):
        assert not tb.use_wide_path(1024, 1024, 5, 3, dt)  # the target shape: fused v2 wins
        assert tb.use_wide_path(1024, 1024, 50, 3, dt)  # G = 50: the wide path's modelled win
        assert tb.use_wide_path(16, 128, 50, 2, dt)  # on both boundaries
        assert not tb.use_wide_path(16, 127, 50, 2, dt)  # out one short
        assert not tb.use_wide_path(1024, 1024, 49, 3, dt)  # G one short
    for dt in (torch.float32, torch.float64):
        assert not tb.use_wide_path(1024, 1024, 50, 3, dt)


def test_mode_selection(monkeypatch):
    monkeypatch.setattr(tb, "_WIDE_MODE", "auto")
    assert tb._wide_selected(1024, 1024, 50, 3, torch.bfloat16)
    assert not tb._wide_selected(1024, 1024, 50, 3, torch.float32)
    monkeypatch.setattr(tb, "_WIDE_MODE", "wide")
    assert tb._wide_selected(2, 2, 1, 1, torch.float32)
    monkeypatch.setattr(tb, "_WIDE_MODE", "fused")
    assert not tb._wide_selected(1024, 1024, 50, 3, torch.bfloat16)


def test_auto_mode_dispatches_by_rule(monkeypatch):
    """Under "auto" a float16 layer the rule calls wide runs the wide path, a float32 one does not."""
    calls = []
    fwd = tb._wide_forward
    monkeypatch.setattr(tb, "_WIDE_MODE", "auto")
    monkeypatch.setattr(tb, "_wide_forward", lambda *a, **kw: calls.append(a[0].dtype) or fwd(*a, **kw))
    torch.manual_seed(15)
    layer = FastKANLayer(16, 128, grid_size=50, spline_order=2, backend="triton")
    half = copy.deepcopy(layer).half()
    x = torch.randn(2, 16)
    try:
        y = half(x.half())
    except Exception as e:  # pragma: no cover - depends on the interpreter
        pytest.skip(f"Triton's interpreter cannot run float16 here: {e!r}")
    assert calls == [torch.float16]
    assert_close(y, reference_of(half)(x.half().double()), 3e-3, "auto float16 y")
    small = FastKANLayer(4, 3, backend="triton").half()
    small(torch.randn(3, 4).half())
    assert calls == [torch.float16]  # the small layer stayed on the fused kernels


def test_chunk_rows_flat_in_batch():
    """The basis block of a chunk is about half the assumed L2, whatever the batch."""
    for nin, G, k in ((1024, 5, 3), (256, 50, 3), (64, 5, 1)):
        cols = nin * (G + k + 1)
        rows = tb._wide_chunk_rows(cols, 2)
        assert rows % tb.WIDE_MIN_CHUNK_ROWS == 0
        assert rows * cols * 2 <= tb.WIDE_L2_BYTES // 2 or rows == tb.WIDE_MIN_CHUNK_ROWS
        assert (rows + tb.WIDE_MIN_CHUNK_ROWS) * cols * 2 > tb.WIDE_L2_BYTES // 2
    assert tb._wide_chunk_rows(10**8, 2) == tb.WIDE_MIN_CHUNK_ROWS


def test_bad_mode_env_is_refused():
    env = dict(os.environ, KANFAST_TRITON_WIDE="sometimes")
    out = subprocess.run([sys.executable, "-c", "import kanfast.triton_backend"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "KANFAST_TRITON_WIDE" in out.stderr


def test_wide_env_and_cpu_without_interpret_env():
    """KANFAST_TRITON_WIDE=wide forces the path; without TRITON_INTERPRET the CPU tensors run
    a private interpreted copy of the basis-block kernels."""
    code = (
        "import torch, kanfast.triton_backend as tb\n"
        "from kanfast import FastKANLayer\n"
        "assert tb._WIDE_MODE == 'wide'\n"
        "torch.manual_seed(0)\n"
        "l = FastKANLayer(3, 2, backend='triton'); x = torch.randn(5, 3, requires_grad=True)\n"
        "r = FastKANLayer(3, 2, backend='torch'); r.load_state_dict(l.state_dict())\n"
        "import os; assert os.environ.get('TRITON_INTERPRET') is None\n"
        "y, yr = l(x), r(x)\n"
        "assert tb._interp_bmod is not None and tb._interp_bmod.INTERPRETED\n"
        "assert os.environ.get('TRITON_INTERPRET') is None\n"
        "assert (y - yr).abs().max() < 1e-5, (y, yr)\n"
        "g, = torch.autograd.grad(y.sum(), x); gr, = torch.autograd.grad(yr.sum(), x)\n"
        "assert (g - gr).abs().max() < 1e-5, (g, gr)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["KANFAST_TRITON_WIDE"] = "wide"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_wide_kernels_compile_for_hopper(tmp_path):
    """Both basis-block kernels lower to sm_90 code (ahead of time, with ptxas, no GPU)."""
    pytest.importorskip("triton.backends.nvidia")
    import importlib.util

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm = tb._bmod
    if bm.INTERPRETED:  # imported under TRITON_INTERPRET=1: load a compiled copy
        with knobs.runtime.scope():
            knobs.runtime.interpret = False
            spec = importlib.util.spec_from_file_location("kanfast.kernels._basis_block_compiled", bm.__file__)
            bm = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bm)
    from triton.backends.nvidia.compiler import get_ptxas

    cfgs = tb._wide_cfg(bm, 53)  # G + k = 53: several BLOCK_J slices
    for kern, cfg in zip((bm.basis_block_kernel, bm.basis_grad_x_kernel), cfgs):
        for k in (1, 3, 7):
            cons = dict(K=k, HAS_BASE=True, **{n: v for n, v in cfg.items() if n != "num_warps"})
            sig = {}
            for n in inspect.signature(kern.fn).parameters:
                if n in cons:
                    sig[n] = "constexpr"
                elif n.startswith("p_"):
                    sig[n] = "*fp32" if n in ("p_t", "p_t0", "p_tn") else "*bf16"
                else:
                    sig[n] = "i32"
            try:
                compiled = triton.compile(
                    ASTSource(fn=kern, signature=sig, constexprs=cons),
                    target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=cfg["num_warps"]),
                )
            except Exception as e:  # only a missing ptxas is a reason to skip
                if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                    pytest.skip(f"ptxas missing: {e}")
                raise
            assert len(compiled.asm["cubin"]) > 0
            # the configs are chosen spill-free (ptxas -v on the same PTX)
            ptx = tmp_path / f"{kern.fn.__name__}_{k}.ptx"
            ptx.write_text(compiled.asm["ptx"])
            out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            assert "0 bytes spill stores" in out.stderr, out.stderr[-2000:]
