"""The sparse small-call path (kanfast.sparse_backend, kf_sparse_* in cpu_spline.c) against
the reference oracle: values and every gradient in float64 and float32, k = 0..5, uniform and
non-uniform knots, odd shapes, NaN/inf rows, inputs outside the grid, gradcheck; the size
rule; inference without an autograd node; and the knot edits that must never leave anything
stale (``.data`` write, ``load_state_dict``, ``update_grid``, ``extend_grid``, ``.to()``)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import rel_rms, spy_on_worker_runs
from kanfast import KAN, FastKANLayer, cpu_buffers, ops, sparse_backend
from kanfast.kernels import cpu_spline
from kanfast.reference import b_spline_basis, kan_linear_reference

pytestmark = pytest.mark.skipif(cpu_spline.load() is None, reason="the CPU kernels are not built here (no C compiler?)")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the sparse engine's forward and backward calls (the path taken)."""
    n = {"fwd": 0, "bwd": 0}
    fwd, bwd = sparse_backend.forward, sparse_backend.backward

    def f(*a, **kw):
        n["fwd"] += 1
        return fwd(*a, **kw)

    def b(*a, **kw):
        n["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(sparse_backend, "forward", f)
    monkeypatch.setattr(sparse_backend, "backward", b)
    return n


def _grads(layer, x, gy, reference: bool):
    """[y, grad_x, grad base_weight, grad spline_weight, grad spline_scaler] of the layer
    (or of the reference formula on its parameters)."""
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    if reference:
        y = kan_linear_reference(xx, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler,
                                 layer.spline_order)
    else:
        y = layer(xx)
    y.backward(gy)
    return [y.detach(), xx.grad, layer.base_weight.grad, layer.spline_weight.grad, layer.spline_scaler.grad]


def _inputs(layer, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nin = layer.in_features
    inner = torch.rand(n, nin, generator=g, dtype=torch.float64) * 1.8 - 0.9
    wide = torch.randn(n, nin, generator=g, dtype=torch.float64) * 1.6  # extension spans and outside
    knots = layer.grid.t().to(torch.float64)  # every knot exactly (the first and last included)
    odd = torch.zeros(3, nin, dtype=torch.float64)
    odd[0, 0], odd[1, -1], odd[2, nin // 2] = float("nan"), float("inf"), -float("inf")
    return torch.cat([inner, wide, knots, odd]).to(dtype)


def _layer(nin, nout, G, k, dtype, uniform, seed):
    torch.manual_seed(seed)
    layer = FastKANLayer(nin, nout, grid_size=G, spline_order=k, dtype=torch.float64)
    with torch.no_grad():
        layer.spline_weight.normal_()
        layer.spline_scaler.normal_()
    if not uniform:
        layer.update_grid(torch.randn(300, nin, dtype=torch.float64) ** 3)  # uneven quantile knots
    return layer.to(dtype)


def _check(got, want, dtype, scale_ref=None):
    """float64: 1e-12 relative; float32: within 4x the float32 reference's own error against float64
    (``scale_ref``: those errors, per tensor). NaN exactly where the reference has NaN."""
    names = ["y", "grad_x", "grad_base_weight", "grad_spline_weight", "grad_spline_scaler"]
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), names[i]
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), names[i]
        tol = 1e-12 if dtype == torch.float64 else 4 * scale_ref[i] + 1e-7
        err = rel_rms(a[fin], b[fin])
        assert err <= tol, f"{names[i]}: relative error {err:.3e} > {tol:.3e}"


CASES = list(itertools.product([0, 1, 2, 3, 4, 5], [True, False]))


@pytest.mark.parametrize("k,uniform", CASES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 4), (13, 17, 2)], ids=["1x1", "7-3", "13-17"])
def test_float64_matches_reference(k, uniform, shape, calls):
    nin, nout, G = shape
    layer = _layer(nin, nout, G, k, torch.float64, uniform, seed=k * 10 + nin)
    x = _inputs(layer, 23, torch.float64, seed=k)
    gy = torch.randn(x.shape[0], nout, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = _grads(layer, x, gy, reference=True)
    got = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 1, "bwd": 1}  # the sparse path, forward and backward
    _check(got, want, torch.float64)


@pytest.mark.parametrize("k,uniform", CASES)
def test_float32_within_reference_error(k, uniform, calls):
    layer64 = _layer(9, 5, 6, k, torch.float64, uniform, seed=k)
    layer32 = copy.deepcopy(layer64).to(torch.float32)
    x64 = _inputs(layer64, 40, torch.float64, seed=k)
    # float32 inputs and knots: the truth is the float64 reference on the same (rounded) values
    x32 = x64.to(torch.float32)
    with torch.no_grad():
        layer64.grid.copy_(layer32.grid.to(torch.float64))
    gy = torch.randn(x64.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    truth = _grads(layer64, x32.to(torch.float64), gy, reference=True)
    ref32 = _grads(layer32, x32, gy.float(), reference=True)
    got = _grads(layer32, x32, gy.float(), reference=False)
    assert calls == {"fwd": 1, "bwd": 1}
    ref_err = []
    for a, b in zip(ref32, truth):
        fin = torch.isfinite(b)
        ref_err.append(rel_rms(a[fin], b[fin]))
    _check([g.double() for g in got], truth, torch.float32, ref_err)


def test_gradcheck_float64(calls):
    torch.manual_seed(0)
    layer = _layer(3, 2, 4, 3, torch.float64, False, seed=3)
    x = (torch.rand(6, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x,) + tuple(layer.parameters()))
    assert calls["bwd"] > 0


def test_second_derivative_matches_reference(calls):
    """create_graph=True (physics-informed losses) takes the differentiable route, as the dense engine."""
    layer = _layer(4, 3, 5, 3, torch.float64, True, seed=5)
    x = (torch.rand(10, 4, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)

    def d2(fn):
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    got = d2(layer)
    want = d2(lambda z: kan_linear_reference(z, layer.grid, layer.base_weight, layer.spline_weight,
                                             layer.spline_scaler, 3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert calls["fwd"] >= 1


def test_zero_gradient_where_bases_vanish(calls):
    """Coefficients whose bases are 0 on every row get a gradient of exactly 0 (inputs in a narrow
    band, outside the grid, NaN), also when grad_y is huge."""
    layer = _layer(3, 2, 8, 3, torch.float64, True, seed=1)
    x = torch.full((5, 3), 0.05, dtype=torch.float64)
    x[:, 1] = 3.0  # outside: no basis
    x[0, 2] = float("nan")
    layer.zero_grad()
    layer(x).backward(torch.full((5, 2), 1e300, dtype=torch.float64))
    used = (b_spline_basis(x, layer.grid, 3) != 0).any(0)  # (in, G + k)
    g = layer.spline_weight.grad
    assert calls["bwd"] == 1
    assert (g[:, ~used] == 0).all()
    assert (g[:, used] != 0).all()


def test_deterministic(calls):
    layer = _layer(16, 16, 5, 3, torch.float32, True, seed=0)
    x = torch.rand(64, 16) * 2 - 1
    runs = [_grads(layer, x, torch.ones(64, 16), reference=False) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_size_rule(monkeypatch):
    """The documented rule: small calls sparse; larger ones sparse while the coefficient table
    fits TABLE_BYTES or the rows amortise its passes (ROWS_PER_TABLE_ROW), dense otherwise;
    unsupported dtypes never."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    def case(N, nin, nout, G, k=3, dtype=torch.float32):
        x = torch.empty(N, nin, dtype=dtype)
        return sparse_backend.chooses(x, torch.empty(nin, G + 2 * k + 1, dtype=dtype),
                                      torch.empty(nout, nin, G + k, dtype=dtype), None, k, None)

    assert case(1000, 2, 5, 5) and case(64, 4, 16, 5) and case(128, 784, 64, 5)
    assert case(4096, 256, 256, 5) and case(4096, 256, 256, 50)  # tables of 2.4 and 14 MB
    assert case(256, 1024, 1024, 5)  # 37 MB, 256 rows: 256 x 12 >= 32 x 14
    assert not case(32, 1024, 1024, 5)  # 32 rows: 32 x 12 < 32 x 14, the table passes dominate
    assert case(4096, 256, 256, 200) and case(4096, 256, 256, 500)  # 53 and 130 MB, amortised by the rows
    assert not case(4096, 1024, 1024, 1)  # 21 MB at G = 1: the sparse path saves nothing per row
    assert case(1, 1024, 1024, 5)  # one row: small work
    assert not case(64, 4, 16, 5, dtype=torch.float16)
    assert case(64, 4, 16, 5, dtype=torch.float64)
    monkeypatch.setattr(sparse_backend, "ENABLED", False)
    assert not case(64, 4, 16, 5)


def test_inference_saves_nothing(calls):
    model = KAN([4, 16, 16, 1])
    x = torch.rand(64, 4) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.grad_fn is None and calls["fwd"] == 3
    with torch.inference_mode():
        y2 = model(x)
    assert y2.grad_fn is None and calls["fwd"] == 6
    assert torch.equal(y, y2)
    y3 = model(x)  # training mode: the autograd node
    assert y3.grad_fn is not None and torch.equal(y3.detach(), y)


def _ref_out(layer, x):
    with torch.no_grad():
        return kan_linear_reference(x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler,
                                    layer.spline_order)


def _assert_ref(layer, x, calls):
    before = calls["fwd"]
    with torch.no_grad():
        y = layer(x)
    assert calls["fwd"] == before + 1  # still the sparse path
    torch.testing.assert_close(y, _ref_out(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("edit", ["data", "load_state_dict", "update_grid", "extend_grid", "to"])
def test_grid_edits_never_stale(edit, calls):
    """After each way of changing the knots the small path gives the reference's result on the
    new knots (nothing derived from the knots is kept between calls)."""
    layer = _layer(3, 2, 5, 3, torch.float64, True, seed=7)
    x = torch.rand(50, 3, dtype=torch.float64) * 2.4 - 1.2
    _assert_ref(layer, x, calls)  # first call on the uniform knots
    if edit == "data":  # no version bump
        v = layer.grid._version
        layer.grid.data.copy_(layer.grid * 1.3 + 0.1 * torch.arange(layer.grid.shape[1], dtype=torch.float64) ** 2)
        assert layer.grid._version == v
    elif edit == "load_state_dict":
        other = _layer(3, 2, 5, 3, torch.float64, False, seed=8)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer.grid, other.grid)
    elif edit == "update_grid":
        layer.update_grid(torch.randn(100, 3, dtype=torch.float64) * 0.5)
    elif edit == "extend_grid":
        layer.extend_grid(9)
    else:
        layer.to(torch.float32).to(torch.float64)  # new grid tensors
    _assert_ref(layer, x, calls)


@pytest.mark.parametrize("edit", ["data", "load_state_dict", "update_grid", "extend_grid", "to"])
def test_grid_edits_never_stale_in_training_and_model(edit, calls):
    """The same edits on the training path (values and every gradient) and through a KAN's layer
    loop: the reference's on the new knots, before and after (float64, 1e-12)."""
    model = KAN([3, 4, 2], grid_size=5)
    model.double()
    with torch.no_grad():
        for layer in model.layers:
            layer.spline_weight.normal_()
    first = model.layers[0]
    x = torch.rand(60, 3, dtype=torch.float64) * 2.4 - 1.2
    gy = torch.randn(60, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def check():
        before = dict(calls)
        _check(_grads(first, x, gy, reference=False), _grads(first, x, gy, reference=True), torch.float64)
        with torch.no_grad():
            y = model(x)
            h = kan_linear_reference(x, first.grid, first.base_weight, first.spline_weight, first.spline_scaler, 3)
            second = model.layers[1]
            want = kan_linear_reference(h, second.grid, second.base_weight, second.spline_weight,
                                        second.spline_scaler, 3)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        assert calls == {"fwd": before["fwd"] + 3, "bwd": before["bwd"] + 1}  # all on the sparse path

    check()
    if edit == "data":  # no version bump
        v = first.grid._version
        first.grid.data.copy_(first.grid * 1.3 + 0.1 * torch.arange(first.grid.shape[1], dtype=torch.float64) ** 2)
        assert first.grid._version == v
    elif edit == "load_state_dict":
        other = KAN([3, 4, 2], grid_size=5).double()
        other.update_grid(torch.randn(200, 3, dtype=torch.float64) ** 3)
        model.load_state_dict(other.state_dict())
        assert torch.equal(first.grid, other.layers[0].grid)
    elif edit == "update_grid":
        model.update_grid(torch.randn(100, 3, dtype=torch.float64) * 0.5)
    elif edit == "extend_grid":
        model.extend_grid(9, torch.randn(100, 3, dtype=torch.float64) * 0.7)
    else:
        model.to(torch.float32).to(torch.float64)  # new grid tensors
    check()


def test_unsorted_knots_fall_back_in_training(calls, monkeypatch):
    """Declined knots on the training path: the forward and the backward fall back to the dense
    engine (its flag of the knots computed from them), bit for bit its own result; and knots
    made decreasing between the forward and the backward: the dense engine's backward."""
    layer = _layer(3, 2, 5, 3, torch.float64, True, seed=9)
    x = torch.rand(20, 3, dtype=torch.float64) * 1.8 - 0.9
    gy = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    good = _grads(layer, x, gy, reference=False)
    layer.grid.data[1, 4] = 5.0  # decreasing afterwards
    bad = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 2, "bwd": 2}
    with monkeypatch.context() as m:
        m.setattr(sparse_backend, "chooses", lambda *a: False)
        dense = _grads(layer, x, gy, reference=False)
    for a, b in zip(bad, dense):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan())
    # the edit between forward and backward: the same gradients as the dense engine's on those knots
    layer.grid.data[1, 4] = layer.grid[1, 3] + (layer.grid[1, 5] - layer.grid[1, 3]) / 2  # sorted again
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    torch.testing.assert_close(y.detach(), good[0], rtol=0, atol=1e-12)
    layer.grid.data[1, 4] = 5.0
    y.backward(gy)
    assert calls == {"fwd": 3, "bwd": 3}
    for a, b in zip([xx.grad, layer.base_weight.grad, layer.spline_weight.grad, layer.spline_scaler.grad],
                    dense[1:]):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan())


def test_unsorted_knots_fall_back(calls, monkeypatch):
    """Knots that are not non-decreasing (written through .data) make the kernel decline; the
    layer then gives the dense engine's result, as it did before the small path existed."""
    layer = _layer(3, 2, 5, 3, torch.float64, True, seed=9)
    x = torch.rand(20, 3, dtype=torch.float64) * 1.8 - 0.9
    layer.grid.data[1, 4] = 5.0  # decreasing afterwards
    with torch.no_grad():
        y = layer(x)
    assert calls["fwd"] == 1
    monkeypatch.setattr(sparse_backend, "chooses", lambda *a: False)
    with torch.no_grad():
        y_dense = layer(x)
    torch.testing.assert_close(y, y_dense, rtol=0, atol=0)
    assert sparse_backend.forward(x, layer.grid, layer.spline_weight, layer.base_weight, 3,
                                  layer.spline_scaler) is None


def test_kan_linear_op_functional(calls):
    """The op with 2-D input and no scale (kan_linear_torch's path): values and gradients."""
    torch.manual_seed(0)
    layer = _layer(5, 3, 4, 2, torch.float64, False, seed=2)
    x = torch.randn(30, 5, dtype=torch.float64).requires_grad_(True)
    coef = layer.scaled_spline_weight.detach().clone().requires_grad_(True)
    bw = layer.base_weight.detach().clone().requires_grad_(True)
    y = ops.kan_linear_op(x, layer.grid, coef, bw, 2, False)
    y.sum().backward()
    xr, cr, br = (t.detach().clone().requires_grad_(True) for t in (x, coef, bw))
    yr = kan_linear_reference(xr, layer.grid, br, cr, None, 2)
    yr.sum().backward()
    assert calls == {"fwd": 1, "bwd": 1}
    for a, b in ((y, yr), (x.grad, xr.grad), (coef.grad, cr.grad), (bw.grad, br.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _force_workers(monkeypatch, n):
    """Every call split into ``n`` parts across the CPU workers (n = 1: inline)."""
    from kanfast import cpu_workers

    monkeypatch.setattr(cpu_workers, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(sparse_backend, "WORKER_NS", 1e-6)  # (any estimate asks for every thread)
    monkeypatch.setattr(sparse_backend, "OMP_WORKER_NS", 1e-6)
    monkeypatch.setattr(cpu_workers, "_usable_cpus", lambda: 64)
    torch.set_num_threads(n)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _split_by(monkeypatch, how: str) -> list:
    """Split calls run by ``how``: "openmp" (the one-entry C calls across the caller's OpenMP team;
    skipped where the library was built without OpenMP) or "pool" (kanfast.cpu_workers' threads).
    Returns the list the P of every one-entry call is appended to."""
    kern = sparse_backend._kernels()
    if how == "openmp" and not kern.openmp:
        pytest.skip("the CPU kernels were built without OpenMP")
    monkeypatch.setattr(kern, "openmp", how == "openmp")
    seen = []
    for name in ("sparse_fwd_call", "sparse_bwd_call"):
        real = getattr(kern, name)

        def spy(*a, _real=real, **kw):
            seen.append(a[14] if len(a) > 14 else kw.get("P", 1))  # (P: the 15th argument of both)
            return _real(*a, **kw)

        monkeypatch.setattr(kern, name, spy)
    return seen


@pytest.fixture(params=["openmp", "pool"])
def three_workers(request, monkeypatch, restore_threads):
    """Force 3 parts for any call, split by the OpenMP team or the worker pool (request.param);
    returns (how, the ranges of every pool split, the P of every one-entry C call)."""
    from kanfast import cpu_workers

    if not cpu_workers._uses_openmp():
        pytest.skip("workers need torch's OpenMP backend")
    _force_workers(monkeypatch, 3)
    seen = _split_by(monkeypatch, request.param)
    return request.param, spy_on_worker_runs(monkeypatch), seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_across_workers(dtype, three_workers, calls):
    """Forward: the table packed by feature ranges, then rows split across 3 workers; backward:
    features split across them (each weight gradient one sum over all rows): the reference's
    values and gradients."""
    layer = _layer(6, 5, 5, 3, torch.float64, False, seed=4).to(dtype)
    x = _inputs(layer, 40, dtype, seed=4)
    gy = torch.randn(x.shape[0], 5, dtype=dtype, generator=torch.Generator().manual_seed(3))
    got = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 1, "bwd": 1}
    n = x.shape[0]
    how, runs, ps = three_workers
    if how == "pool":
        assert runs == [[(0, 2), (2, 4), (4, 6)], [(0, 32), (32, 64), (64, n)], [(0, 2), (2, 4), (4, 6)]]
    else:  # one C call per direction, split inside it
        assert runs == [] and ps == [3, 3]
    want = _grads(layer, x, gy, reference=True)
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        fin = torch.isfinite(b)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert rel_rms(a[fin], b[fin]) <= tol


@pytest.mark.parametrize("how", ["openmp", "pool"])
def test_worker_rule_follows_the_estimated_time(how, monkeypatch, restore_threads):
    """The split rule of the sparse path (sparse_backend._workers): the call's estimated time on one
    thread, pairs x (PAIR_NS + VECTOR_NS x vectors of out) + table x TABLE_NS, over the unit per
    worker (OMP_WORKER_NS where the C calls split on the OpenMP team, WORKER_NS for the pool); calls
    under two units inline; wider outputs and float64 split earlier."""
    from kanfast import cpu_workers

    if not cpu_workers._uses_openmp():
        pytest.skip("workers need torch's OpenMP backend")
    _split_by(monkeypatch, how)
    monkeypatch.setattr(cpu_workers, "_usable_cpus", lambda: 64)
    torch.set_num_threads(4)
    sb = sparse_backend
    unit = sb.OMP_WORKER_NS if how == "openmp" else sb.WORKER_NS

    def workers(N, nin, nout, G=5, k=3, dtype=torch.float32):
        x = torch.empty(N, nin, dtype=dtype)
        grid = torch.empty(nin, G + 2 * k + 1, dtype=dtype)
        return sb._workers(x, grid, torch.empty(nout, nin, G + k, dtype=dtype), None, None,
                           sb._on_team(sb._kernels()))

    def estimate(N, nin, nout, G=5, k=3, s=4):
        return N * nin * (sb.PAIR_NS[s] + sb.VECTOR_NS[s] * -(-nout * s // 64)) + nin * (G + 3 * k) * nout * sb.TABLE_NS

    assert workers(64, 16, 16) == 1  # tens of microseconds: inline
    if how == "pool":
        assert workers(1024, 64, 64) == 1  # about 1 ms: inline on the pool's rule
    shapes = [(128, 784, 64), (1024, 64, 64), (4096, 256, 256), (256, 256, 256), (20000, 8, 1), (128, 784, 10),
              (256, 64, 32), (256, 32, 10), (64, 4, 16)]
    for shape in shapes:
        for dtype, s in ((torch.float32, 4), (torch.float64, 8)):
            want = int(estimate(*shape, s=s) // unit)
            want = 1 if want < 2 else min(4, want)
            assert workers(*shape, dtype=dtype) == want, (shape, dtype)
    assert workers(1024, 64, 64, dtype=torch.float64) >= workers(1024, 64, 64)
    torch.set_num_threads(1)
    assert workers(4096, 256, 256) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,uniform", [(3, True), (2, False), (5, True)])
@pytest.mark.parametrize("how", ["openmp", "pool"])
def test_bit_identical_across_thread_counts(dtype, k, uniform, how, monkeypatch, restore_threads, calls):
    """Values and every gradient the same bits on 1, 2 and 3 workers, and run to run (a layer wide
    enough for several feature blocks in the backward, a tail of out that is not a whole vector,
    NaN/inf and outside inputs, a non-finite grad_y row)."""
    from kanfast import cpu_workers

    if not cpu_workers._uses_openmp():
        pytest.skip("workers need torch's OpenMP backend")
    layer = _layer(37, 21, 40, k, torch.float64, uniform, seed=11).to(dtype)
    x = _inputs(layer, 300, dtype, seed=5)
    gy = torch.randn(x.shape[0], 21, dtype=dtype, generator=torch.Generator().manual_seed(6))
    gy[7, 3] = float("inf")
    runs = []
    for n in (1, 2, 3, 2, 1):
        _force_workers(monkeypatch, n)
        spy = spy_on_worker_runs(monkeypatch)
        ps = _split_by(monkeypatch, how)
        runs.append(_grads(layer, x, gy, reference=False))
        if how == "pool":
            assert all(len(r) == n for r in spy) and (n == 1 or len(spy) == 3)
        else:
            assert spy == [] and ps == [n, n]
    assert calls == {"fwd": 5, "bwd": 5}
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(-1).view(torch.int64 if dtype == torch.float64 else torch.int32),
                               b.view(-1).view(torch.int64 if dtype == torch.float64 else torch.int32))


def test_bench_small_writes_json_csv_png(tmp_path, monkeypatch):
    """``kanfast bench --small`` on two tiny models: every implementation per model, the kanfast
    ones agreeing with efficient-kan's formulation, the usual output files (no timing asserted)."""
    import argparse
    import json

    from kanfast.benchmarks import bench

    monkeypatch.setattr(bench, "SMALL_MODELS", [("KAN[2,3,1]", [2, 3, 1], 20), ("layer 4->2", [4, 2], 8)])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--small", "--no-compile", "--repeats", "1", "--warmup", "0", "--peers", "none", "--no-progress",
                              "--quiet", "--device", "cpu", "--out", str(tmp_path / "s.json"),
                              "--plot", str(tmp_path / "s.png")])
    assert bench.run(args) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["floors"] == [] and "host_load" in data["meta"] and data["meta"]["G"] == 5
    rows = data["results"]
    assert {(r["model"], r["impl"]) for r in rows} == {
        (m, i) for m in ("KAN[2,3,1]", "layer 4->2") for i in ("kanfast-torch", "kanfast-reference", "materialized", "mlp")
    }
    for r in rows:
        assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_bwd_cpu_ms"] >= 0
        if r["impl"].startswith("kanfast"):
            assert r["max_abs_diff_vs_materialized"] < 1e-5
    assert (tmp_path / "s.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "s.png").stat().st_size > 0


def test_empty_batch(calls):
    """No rows: an empty output, and zero weight gradients (as the reference's)."""
    layer = _layer(3, 2, 5, 3, torch.float64, True, seed=1)
    x = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert calls == {"fwd": 1, "bwd": 1}
    assert x.grad.shape == (0, 3)
    for p in (layer.base_weight, layer.spline_weight, layer.spline_scaler):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_non_finite_grad_y_as_reference(dtype, k, calls, monkeypatch):
    """A NaN or +-inf in grad_y[b, o]: the reference's weight gradient sum_b grad_y[b, o] B_j(x_bi)
    has 0 * inf = NaN for every weight (i, j, o) whose basis is 0 at row b (the sparse path used to
    leave those at 0), inf where it is not; grad_x and the base weight's gradient follow. The same
    NaN/inf pattern as the reference (and for the weights as the dense path), finite values to
    rounding."""
    layer = _layer(5, 4, 12, k, torch.float64, True, seed=2).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)
    x[:, 3] = x[:, 3] * 0.1  # feature 3: a narrow band (most of its weights reached by no row)
    x[2, 1], x[4, 0] = 5.0, float("nan")  # outside, NaN
    gy = torch.randn(30, 4, generator=g, dtype=torch.float64).to(dtype)
    gy[3, 1], gy[9, 2], gy[4, 0] = float("nan"), float("inf"), -float("inf")
    want = _grads(layer, x, gy, reference=True)
    got = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 1, "bwd": 1}
    monkeypatch.setattr(sparse_backend, "chooses", lambda *a: False)
    dense = _grads(layer, x, gy, reference=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    names = ["y", "grad_x", "grad_base_weight", "grad_spline_weight", "grad_spline_scaler"]
    for name, a, b, d in zip(names, got, want, dense):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]), name
        if name != "grad_x":  # the dense path: the same rule for the weights
            assert torch.equal(torch.isnan(d), torch.isnan(b)), name
        fin = torch.isfinite(b)
        assert rel_rms(a[fin], b[fin]) <= tol, name
    gw = got[3]
    assert torch.isnan(gw[1]).all() and torch.isnan(gw[2]).any() and torch.isfinite(gw[3]).all()


@pytest.mark.usefixtures("one_thread")
def test_buffers_flat_in_batch_and_bounded(calls):
    """The sparse path's kept buffers: the packed table (in x (G + 3k + 1) x out, one per calling
    thread) and per thread a forward tile (a sorted tile of R rows: its coefficients, order and
    padded y rows) and a backward block of at most max(BWD_BLOCK_BYTES, one feature's
    2 (G + 3k + 1) out elements) plus a sorted tile of BWD_ROWS rows: none grows with the batch.
    (One thread: every call inline, its buffers the calling thread's.)"""
    layer = _layer(24, 40, 30, 3, torch.float32, True, seed=3)
    sizes = []
    for N in (100, 3000):
        cpu_buffers.release_buffers()
        x = (torch.rand(N, 24) * 2 - 1).requires_grad_(True)
        layer(x).sum().backward()
        bufs = cpu_buffers.thread_buffers()
        sizes.append({key[1]: bufs[key].numel() for key in list(bufs.keys()) if key[0] == "sparse"})
    assert calls == {"fwd": 2, "bwd": 2}
    # one buffer on one thread: the table, then (64-byte aligned) the forward's tile
    assert sizes[0] == sizes[1] and set(sizes[0]) == {"W", "bwork"}
    nbp = 30 + 3 + 2 * 3
    table = 24 * nbp * 40 + 24 * 40
    R, FB, _ = sparse_backend._fwd_blocks(33, 3, 40, torch.float32)
    tile = cpu_spline.CpuSplineKernels.tile_bytes  # a sorted tile: coefficients, order, padded rows
    fwork = cpu_spline.load().fwd_work(R, FB, 3, torch.float32)
    assert table <= sizes[0]["W"] - fwork <= table + 15
    assert fwork * 4 <= max(R * FB * (3 + 2) * 4 + R * FB * 8, tile(R, 3, 37, 40, 4, False) + R * 28)
    assert sizes[0]["bwork"] * 4 <= (max(sparse_backend.BWD_BLOCK_BYTES, 2 * (nbp + 1) * 40 * 4) + 4 * 1088
                                     + tile(cpu_spline.BWD_ROWS, 3, 37, 40, 4, True) + 4)


@pytest.mark.parametrize("k,uniform", [(1, False), (3, True), (4, False)])
def test_float64_tiles_blocks_and_tails(k, uniform, calls, monkeypatch):
    """Shapes that cross every tiling boundary of the kernels: more rows than a forward and a
    backward tile (256) and a basis tile (64), several feature blocks backward (a small budget),
    outputs that are not whole vectors (chunks of 4 and 2 vectors, single vectors, the partial
    vector), G large enough for the binary-search spans; against the reference, float64 to 1e-12."""
    monkeypatch.setattr(sparse_backend, "BWD_BLOCK_BYTES", 1 << 16)
    layer = _layer(13, 43, 40, k, torch.float64, uniform, seed=k + 20)
    x = _inputs(layer, 1100, torch.float64, seed=k + 1)
    gy = torch.randn(x.shape[0], 43, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = _grads(layer, x, gy, reference=True)
    got = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 1, "bwd": 1}
    assert sparse_backend._bwd_features(40 + k, k, 43, torch.float64) < 13
    _check(got, want, torch.float64)


@pytest.mark.parametrize("nout", [1, 5, 10, 17])
@pytest.mark.parametrize("G", [3, 200])
def test_narrow_outputs_and_span_windows(nout, G, calls):
    """Outputs narrower than a vector or not a whole number of vectors (the padded y / grad_y
    tiles and the lane-by-lane loads and stores of table and gradient rows), with the rows of a
    tile sorted by span: G = 3 (long runs of one span, windows that slide by one) and G = 200
    with non-uniform knots (short runs, windows that jump past k + 1 rows); float64 against the
    reference to 1e-12, and float32 the same bits on a second call."""
    layer = _layer(9, nout, G, 3, torch.float64, G == 3, seed=G + nout)
    x = _inputs(layer, 1100, torch.float64, seed=nout)
    gy = torch.randn(x.shape[0], nout, dtype=torch.float64, generator=torch.Generator().manual_seed(G))
    want = _grads(layer, x, gy, reference=True)
    got = _grads(layer, x, gy, reference=False)
    assert calls == {"fwd": 1, "bwd": 1}
    _check(got, want, torch.float64)
    l32, x32, g32 = copy.deepcopy(layer).to(torch.float32), x.to(torch.float32), gy.to(torch.float32)
    a, b = _grads(l32, x32, g32, reference=False), _grads(l32, x32, g32, reference=False)
    for u, v in zip(a, b):
        assert torch.equal(u.view(torch.int32), v.view(torch.int32))
