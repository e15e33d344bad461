"""The compiled CPU block kernels (kanfast.kernels.cpu_spline): where they run, their values
and gradients against the reference oracle and against the pure-torch ops they replace,
and their build: cache, fallbacks, errors."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close, backend_grads, compare_to_reference, grid_case_inputs, grid_case_layer
from kanfast import FastKANLayer, cpu_plan, sparse_backend, torch_backend
from kanfast.kernels import cpu_spline

needs_kernels = pytest.mark.skipif(cpu_spline.load() is None, reason="the CPU block kernels are not built here")


@pytest.fixture(autouse=True)
def _dense_engine(monkeypatch):
    """These tests exercise the dense-block engine: the small-call path (kanfast.sparse_backend) off."""
    monkeypatch.setattr(sparse_backend, "ENABLED", False)


@pytest.fixture
def spy(monkeypatch):
    """Count the kernels' launches: ``{"fill": n, "grad_x": n}``."""
    kern = cpu_spline.load()
    counts = {"fill": 0, "grad_x": 0}
    for name in counts:
        real = getattr(kern, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(kern, name, wrapped)
    monkeypatch.setattr(cpu_plan, "KERNEL_CHUNK_ELEMENTS", 5 * 6 * 9)  # several chunks
    return counts


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """load() from scratch with an empty cache directory; the process's result restored after."""
    monkeypatch.setenv("KANFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KANFAST_CPU_KERNEL", raising=False)
    saved = (cpu_spline._loaded, cpu_spline._kernels)
    cpu_spline.reset()
    yield tmp_path / "cache"
    cpu_spline._loaded, cpu_spline._kernels = saved


def _inputs(layer, n, dtype, special=True):
    k = layer.spline_order
    lo, hi = layer.grid[:, k], layer.grid[:, -k - 1]
    inner = lo + torch.rand(n, layer.in_features, dtype=dtype) * (hi - lo)
    wide = torch.randn(n, layer.in_features, dtype=dtype) * 1.6  # extension region and outside
    parts = [inner, wide, layer.grid.t().to(dtype)]  # every knot exactly
    if special:
        odd = torch.zeros(4, layer.in_features, dtype=dtype)
        odd[0, 0], odd[1, 1], odd[2, 2], odd[3, 3 % layer.in_features] = float("nan"), float("inf"), -float("inf"), -100
        parts.append(odd)
    return inner, torch.cat(parts)


@pytest.fixture(params=["select", "direct"])
def placement(request, monkeypatch):
    """Both ways the kernels place the slots (compare-and-select over every column, or direct
    stores/loads at the slots' columns), whatever the shape's automatic choice."""
    monkeypatch.setattr(cpu_spline, "SELECT_MAX", 10**9 if request.param == "select" else 0)
    return request.param


@needs_kernels
@pytest.mark.parametrize("k,G,act", list(itertools.product([2, 3, 4, 5], [1, 5, 12], ["silu", "tanh"])))
def test_kernels_match_reference_float64(k, G, act, spy, placement):
    """float64 at 1e-12: interior inputs (reduced groups: derivative-spline grad_x), and
    inputs in the extension region, outside, on every knot, NaN and +-inf (all bases,
    the bases' derivatives), with the SiLU base fused and without (spline term only)."""
    torch.manual_seed(k * 31 + G)
    layer = FastKANLayer(6, 4, grid_size=G, spline_order=k, dtype=torch.float64,
                         base_activation=torch.nn.SiLU if act == "silu" else torch.nn.Tanh)
    inner, mixed = _inputs(layer, 40, torch.float64)
    compare_to_reference(layer, inner)
    compare_to_reference(layer, mixed)
    assert spy["fill"] > 2 and spy["grad_x"] > 2


@needs_kernels
@pytest.mark.parametrize("k", [2, 3, 5])
def test_kernels_match_reference_float32(k, spy, placement):
    """float32 against the float64 reference: relative RMS error of the output and of every
    gradient, and NaN exactly where the reference has NaN (silu(-inf) included)."""
    torch.manual_seed(k)
    lay32 = FastKANLayer(9, 5, grid_size=7, spline_order=k)
    layer = FastKANLayer(9, 5, grid_size=7, spline_order=k, dtype=torch.float64)
    layer.load_state_dict({n: t.double() for n, t in lay32.state_dict().items()})  # the same values
    inner, mixed = _inputs(layer, 300, torch.float64)

    for x in (inner.float().double(), mixed.float().double()):
        gy = torch.randn(x.shape[0], 5, dtype=torch.float64)
        ref = backend_grads(layer, x, "reference", gy=gy)
        got = backend_grads(lay32, x.float(), "torch", gy=gy)
        for name, a, b in zip(["y", "grad_x", "base_weight", "spline_weight", "spline_scaler"], ref, got):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), name
            fin = torch.isfinite(a) & torch.isfinite(b)
            assert_close(b[fin].double(), a[fin], rtol=2e-6, name=name)
    assert spy["fill"] > 0 and spy["grad_x"] > 0


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_kernels_equal_the_torch_ops(dtype, tol, monkeypatch, placement):
    """The kernels and the pure-torch ops they replace give the same output and gradients
    (feature groups and several chunks, so several launches per call)."""
    monkeypatch.setattr(cpu_plan, "BLOCK_WIDTH", 4 * 9)  # groups of 4 features
    monkeypatch.setattr(cpu_plan, "KERNEL_BLOCK_WIDTH", 4 * 9)  # (the kernels' path)
    monkeypatch.setattr(cpu_plan, "KERNEL_CHUNK_ELEMENTS", 7 * 4 * 9)
    monkeypatch.setattr(cpu_plan, "ROW_ELEMENTS", 7 * 13)
    torch.manual_seed(3)
    layer = FastKANLayer(10, 6, grid_size=5, spline_order=3, dtype=dtype)
    _, x = _inputs(layer, 80, dtype, special=False)
    with_kernels = backend_grads(layer, x, "torch")
    monkeypatch.setattr(cpu_spline, "_kernels", None)
    torch_ops = backend_grads(layer, x, "torch")
    for a, b in zip(with_kernels, torch_ops):
        assert_close(a, b, rtol=tol)


@needs_kernels
def test_where_the_kernels_run(spy):
    """Uniform knots with k >= 2 only: k <= 1 (spans corrected against the stored knots) and
    non-uniform knots (de Boor) keep the torch ops, and still match the reference."""
    x = torch.rand(30, 5, dtype=torch.float64) * 1.8 - 0.9
    for k, update, used in [(3, False, True), (2, False, True), (1, False, False), (0, False, False), (3, True, False)]:
        layer = FastKANLayer(5, 3, grid_size=5, spline_order=k, dtype=torch.float64)
        if update:
            layer.update_grid(torch.randn(100, 5, dtype=torch.float64))
        spy["fill"] = spy["grad_x"] = 0
        compare_to_reference(layer, x)
        assert (spy["fill"] > 0) == used and (spy["grad_x"] > 0) == used, (k, update, spy)


@needs_kernels
@pytest.mark.parametrize("G", [5, 10, 20, 50])
def test_default_layers_take_the_kernels(G, spy):
    """The default layer (grid_range (-1, 1), float32) keeps the compiled closed form at every
    usual G: its knots are exactly equally spaced as stored. Knots far from 0 against their
    spacing, or rounded one by one from a G = 50 grid, are searched (the torch ops) instead."""
    x = (torch.rand(40, 5) * 2 - 1).requires_grad_()
    layer = FastKANLayer(5, 3, grid_size=G)
    layer(x).sum().backward()
    assert spy["fill"] > 0 and spy["grad_x"] > 0
    for case in ("far-1e3-G50", "default-G50-rounded"):
        layer = grid_case_layer(case, nin=5)
        spy["fill"] = spy["grad_x"] = 0
        layer(grid_case_inputs(layer, 40).requires_grad_()).sum().backward()
        assert spy["fill"] == 0 and spy["grad_x"] == 0, case


def test_disabled_by_environment(fresh_load, monkeypatch):
    """KANFAST_CPU_KERNEL=0: nothing is built, the torch ops run, results unchanged."""
    monkeypatch.setenv("KANFAST_CPU_KERNEL", "0")
    assert cpu_spline.load() is None
    assert not fresh_load.exists()
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def test_no_compiler_warns_and_falls_back(fresh_load, monkeypatch):
    monkeypatch.setattr(cpu_spline, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert cpu_spline.load() is None
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def test_failing_compiler_warns_and_falls_back(fresh_load, monkeypatch, tmp_path):
    """A compiler that fails: the warning carries its exit status and stderr; no library is
    left in the cache."""
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'cc: fatal error: out of toner' >&2\nexit 3\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with pytest.warns(RuntimeWarning, match="out of toner"):
        assert cpu_spline.load() is None
    assert not list(fresh_load.glob("*.so"))


@needs_kernels
def test_build_is_cached(fresh_load, monkeypatch):
    """The first load builds into the cache directory; a later process (here: after reset)
    loads that file without compiling again."""
    kern = cpu_spline.load()
    assert kern is not None
    built = list(fresh_load.glob("cpu_spline_*.so"))
    assert len(built) == 1
    cpu_spline.reset()

    def no_build(*a, **kw):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(cpu_spline, "_build", no_build)
    assert cpu_spline.load() is not None


@needs_kernels
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_unwritable_cache_dir_uses_a_private_temp_dir(fresh_load, monkeypatch, tmp_path):
    fresh_load.mkdir(parents=True)
    fresh_load.chmod(0o500)
    monkeypatch.setattr(cpu_spline.tempfile, "gettempdir", lambda: str(tmp_path))
    try:
        assert cpu_spline.load() is not None
        assert list((tmp_path / f"kanfast-{os.getuid()}").glob("cpu_spline_*.so"))
    finally:
        fresh_load.chmod(0o700)


@needs_kernels
def test_kan_linear_torch_without_base(spy):
    """The functional entry with ``base_weight=None`` (no SiLU block: off = 0)."""
    torch.manual_seed(0)
    layer = FastKANLayer(5, 4, grid_size=6, spline_order=3, dtype=torch.float64)
    coef = (layer.spline_weight * layer.spline_scaler[..., None]).detach().requires_grad_(True)
    x = (torch.rand(25, 5, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    y = torch_backend.kan_linear_torch(x, layer.grid, coef, None, 3)
    from kanfast.reference import b_spline_basis

    ref = torch.einsum("bij,oij->bo", b_spline_basis(x, layer.grid, 3), coef)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    gx, gc = torch.autograd.grad(y.sum(), (x, coef))
    rx, rc = torch.autograd.grad(ref.sum(), (x, coef))
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gc, rc, rtol=0, atol=1e-12)
    assert spy["fill"] > 0 and spy["grad_x"] > 0


@needs_kernels
@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 4), (torch.float64, 4)])
def test_silu_and_its_derivative_in_the_kernels(dtype, ulps):
    """The kernels' own silu (fill) and silu' (grad_x, via exp: Cephes' polynomial for
    float32) against float64 torch over [-80, 80] (where the results are normal numbers),
    within a few ulps of x's dtype; silu(-inf) and silu'(-inf) are NaN as in torch."""
    kern = cpu_spline.load()
    x = torch.linspace(-80, 80, 160001, dtype=torch.float64)
    x = torch.cat([x, torch.tensor([0.0, 1e-30, -1e-30, -1.2784645, float("inf"), -float("inf")], dtype=torch.float64)])
    x = x.to(dtype).view(-1, 1)
    knots = dict(h=torch.tensor([1.0], dtype=dtype), t0=torch.tensor([-1.0], dtype=dtype), tn=torch.tensor([1.0], dtype=dtype),
                 inv_h=torch.tensor([1.0], dtype=dtype), n=3, k=2)
    work = torch.empty(8, dtype=dtype)
    out = torch.empty_like(x)
    kern.fill(x, **knots, poly=torch.zeros(3, 3, dtype=dtype), out=out, off=1, C=1, work=work)
    gx = torch.empty_like(x)
    kern.grad_x(x, **knots, poly=torch.zeros(2, 2, dtype=dtype), g=torch.ones_like(x), off=1, C=1, gx=gx, work=work)
    xd = x.double()
    s = torch.sigmoid(xd)
    # silu' = s + x s (1 - s): its rounding error scales with its terms (it crosses 0 at
    # x ~ -1.278, and 1 - s loses digits for large x); torch's own float32 silu_backward
    # reaches 8.2 eps of that scale here, the kernel the same
    ds = s * (1 + xd * (1 - s))
    for name, got, ref, scale, n_eps in (("silu", out, xd * s, (xd * s).abs(), ulps),
                                         ("silu'", gx, ds, ds.abs() + (xd * s * (1 - s)).abs(), 10)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), name
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[~fin], ref[~fin], rtol=0, atol=0, equal_nan=True, msg=name)
        big = fin & (ref.abs() > 1e-30)
        tol = n_eps * torch.finfo(dtype).eps * scale[big]
        err = (got[big] - ref[big]).abs()
        assert (err <= tol).all(), f"{name}: max error {float((err / tol).max()):.2f} x the bound"


@pytest.mark.parametrize("nin,nb,width", [(256, 9, 2048), (256, 54, 2048), (256, 24, 2048), (40, 54, 2048),
                                          (100, 9, 1000), (7, 9, 27), (300, 54, 4096)])
def test_aligned_feature_groups(nin, nb, width):
    """The kernels' feature groups cover every feature once, in order, each within the width;
    when there are several and the width allows 16 features, all but the last hold a
    multiple of 16."""
    groups = cpu_plan.feature_groups(nin, nb, width, align=True)
    assert groups[0][0] == 0 and groups[-1][1] == nin
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert all((f1 - f0) * nb <= width or f1 - f0 == 1 for f0, f1 in groups)
    if len(groups) > 1 and width // nb >= 16:
        assert all((f1 - f0) % 16 == 0 for f0, f1 in groups[:-1]), groups


@needs_kernels
def test_kernels_with_aligned_groups_match_reference(spy, monkeypatch):
    """G = 50 at in = 40: groups of 32 and 8 features on the kernels' path."""
    monkeypatch.setattr(cpu_plan, "KERNEL_BLOCK_WIDTH", 2048)
    assert cpu_plan.feature_groups(40, 54, 2048, align=True) == [(0, 32), (32, 40)]
    torch.manual_seed(5)
    layer = FastKANLayer(40, 3, grid_size=50, spline_order=3, dtype=torch.float64)
    inner, mixed = _inputs(layer, 20, torch.float64)
    compare_to_reference(layer, inner)
    compare_to_reference(layer, mixed)
    assert spy["fill"] > 0 and spy["grad_x"] > 0


@needs_kernels
def test_damaged_cached_library_is_rebuilt(fresh_load):
    """A cached library that does not match its recorded SHA-256 (here: the real library cut
    short, which would crash the process mapping it with SIGBUS, and garbage) is built again,
    not loaded. (Not by loading it first: a process must never see a library it maps change.)"""
    assert cpu_spline.load() is not None
    (built,) = fresh_load.glob("cpu_spline_*.so")
    good = built.read_bytes()
    for damaged in (good[: len(good) // 2], b"not a shared object"):
        cache = fresh_load.parent / f"cache{len(damaged)}"
        cache.mkdir()
        lib = cache / built.name
        lib.write_bytes(damaged)
        Path(str(lib) + ".sha256").write_text(Path(str(built) + ".sha256").read_text())
        os.environ["KANFAST_CACHE_DIR"] = str(cache)
        cpu_spline.reset()
        assert cpu_spline.load() is not None
        assert lib.read_bytes() == good
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def _compiler_refusing(flag: str, folder: Path, monkeypatch) -> Path:
    """$CC set to a wrapper of the real compiler that fails on ``flag``."""
    real = cpu_spline._compiler()[0]
    cc = folder / "cc-without"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = {flag} ] && {{ echo "unknown: $a" >&2; exit 1; }}; done\n'
                  f'exec "{real}" "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    return cc


@needs_kernels
def test_compiler_without_march_native_builds_portable_code(fresh_load, monkeypatch, tmp_path):
    cc = _compiler_refusing("-march=native", tmp_path, monkeypatch)
    kern = cpu_spline.load()
    assert kern is not None and kern.flags == cpu_spline.PORTABLE_CFLAGS
    (lib,) = fresh_load.glob("cpu_spline_*.so")
    assert lib.name == cpu_spline._library_name([str(cc)], cpu_spline.PORTABLE_CFLAGS)


def test_cc_not_found_is_an_error_not_another_compiler(fresh_load, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="nonexistent"):
        assert cpu_spline.load() is None


@needs_kernels
def test_fork_while_loading_does_not_deadlock_the_child(fresh_load):
    """A fork while another thread holds the loader's lock: the child gets a fresh lock."""
    code = f"""
import os, threading, time, torch
os.environ["KANFAST_CACHE_DIR"] = {str(fresh_load)!r}
torch.set_num_threads(1)
from kanfast.kernels import cpu_spline
cpu_spline._lock.acquire()  # as a thread building the kernels would hold it
pid = os.fork()
if pid == 0:
    ok = cpu_spline.load() is not None
    os._exit(0 if ok else 3)
cpu_spline._lock.release()
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "child 0", out.stdout + out.stderr


@needs_kernels
def test_compiler_without_openmp_builds_without_it(fresh_load, monkeypatch, tmp_path):
    """Where torch runs on OpenMP the kernels are first built with OPENMP_CFLAGS; a compiler that
    refuses them gives the build without (the one-entry calls then never split themselves), and the
    layer is still the reference's."""
    if cpu_spline.OPENMP_CFLAGS[0] not in cpu_spline._flag_sets()[0]:
        pytest.skip("torch here does not run on OpenMP: no OpenMP build is tried")
    _compiler_refusing(cpu_spline.OPENMP_CFLAGS[0], tmp_path, monkeypatch)
    kern = cpu_spline.load()
    assert kern is not None and kern.flags == cpu_spline.CFLAGS and not kern.openmp
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)
