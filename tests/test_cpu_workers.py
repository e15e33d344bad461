"""The CPU worker split (kanfast.cpu_workers) against the reference oracle.

Tiny shapes with the size rule turned off (``MIN_ELEMENTS = 1``) and 3 threads, so
that calls really are split (forward by rows, backward by features, uneven parts,
a staggered first chunk) and every gradient is compared in float64."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from conftest import backend_grads, compare_to_reference, spy_on_worker_runs
from kanfast import FastKANLayer, cpu_knots, cpu_workers, sparse_backend, torch_backend
from kanfast.reference import kan_linear_reference

pytestmark = pytest.mark.skipif(not cpu_workers._uses_openmp(), reason="workers need torch's OpenMP backend")


@pytest.fixture(autouse=True)
def _dense_engine(monkeypatch):
    """These tests exercise the dense-block engine: the small-call path (kanfast.sparse_backend) off."""
    monkeypatch.setattr(sparse_backend, "ENABLED", False)


@pytest.fixture
def workers(monkeypatch):
    """Force the worker path (3 parts) and record the parts of every split call."""
    monkeypatch.setattr(cpu_workers, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu_workers, "_usable_cpus", lambda: 64)  # 3 parts on a 2-core machine too
    monkeypatch.setattr(torch_backend, "ROW_ELEMENTS", 5 * 7)  # several chunks per part
    monkeypatch.setattr(torch_backend, "KERNEL_CHUNK_ELEMENTS", 5 * 7 * 9)  # (the compiled block kernels' path)
    n = torch.get_num_threads()
    torch.set_num_threads(3)
    yield spy_on_worker_runs(monkeypatch)
    torch.set_num_threads(n)


def _ref(layer, x):
    return kan_linear_reference(
        x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.spline_order
    ).detach()


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("grid", ["uniform", "updated"])
@pytest.mark.parametrize("inputs", ["interior", "wide"])
def test_split_call_matches_reference(workers, k, grid, inputs):
    torch.manual_seed(k)
    layer = FastKANLayer(7, 5, grid_size=4, spline_order=k, dtype=torch.float64)
    with torch.no_grad():  # scale and mask in play (the op's scale input and its gradient)
        layer.spline_scaler.uniform_(0.5, 1.5)
    if grid == "updated":
        layer.update_grid(torch.randn(100, 7, dtype=torch.float64))
    if inputs == "interior":  # every input on an interior span: the unmasked fast path
        lo, hi = layer.grid[:, k], layer.grid[:, -k - 1]
        x = lo + (hi - lo) * torch.rand(23, 7, dtype=torch.float64) * 0.999
    else:  # the extension region, outside the knots, on knots, NaN/inf
        x = torch.cat([torch.randn(20, 7, dtype=torch.float64) * 1.5, layer.grid.t()[:3]])
        x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    compare_to_reference(layer, x)
    assert workers and all(len(r) == 3 for r in workers), workers  # forward and backward split 3 ways


def test_interior_bounds_at_the_edges(workers):
    """The per-call "every span interior" claim (scatter without masks) at its edges."""
    layer = FastKANLayer(4, 3, grid_size=5, spline_order=3, dtype=torch.float64)
    lo, hi = layer.grid[:, 3], layer.grid[:, -4]  # t_k and t_{G+k}
    mid = (lo + hi) / 2 + torch.zeros(9, 4, dtype=torch.float64)
    g = cpu_knots.Knots(layer.grid.detach(), 3, True).part(0, 4)
    on_lo = torch.cat([lo.unsqueeze(0), mid])  # exactly on t_k: interior
    assert cpu_knots.column_check(on_lo, g) == (True, True)
    compare_to_reference(layer, on_lo)
    # one ulp below t_{G+k}: may round onto span G+k (not interior), either way exact
    compare_to_reference(layer, torch.cat([torch.nextafter(hi, torch.full_like(hi, -1e9)).unsqueeze(0), mid]))
    # half a span below t_k (span k - 1): its first slot is a basis that does not exist,
    # whose position is the previous feature's last basis (0 there for a mid-range input),
    # so claiming "interior" would write a non-zero value there
    below = lo - 0.5 * (hi - lo) / 5
    mixed = torch.cat([torch.where(torch.arange(4) % 2 == 1, below, (lo + hi) / 2).unsqueeze(0), mid])
    assert cpu_knots.column_check(mixed, g) == (True, False)
    compare_to_reference(layer, mixed)


def test_split_matches_inline_and_repeats_bitwise(workers, monkeypatch):
    layer = FastKANLayer(9, 6, grid_size=7, dtype=torch.float32)
    x = torch.rand(40, 9) * 2 - 1
    first = backend_grads(layer, x, "torch")
    again = backend_grads(layer, x, "torch")
    for a, b in zip(first, again):  # same split, same order of operations
        assert torch.equal(a, b)
    monkeypatch.setattr(cpu_workers, "MIN_ELEMENTS", 1 << 60)
    n_split = len(workers)
    inline = backend_grads(layer, x, "torch")
    assert len(workers) == n_split or all(len(r) == 1 for r in workers[n_split:])
    for a, b in zip(first, inline):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_thread_counts_untouched(workers):
    layer = FastKANLayer(5, 4, dtype=torch.float64)
    before = torch.get_num_threads()
    layer(torch.randn(30, 5, dtype=torch.float64)).sum().backward()
    assert torch.get_num_threads() == before == 3
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]  # the process-wide default new threads copy is the caller's again


def test_inference_mode_and_no_grad(workers):
    layer = FastKANLayer(6, 4, dtype=torch.float64)
    x = torch.randn(25, 6, dtype=torch.float64)
    ref = _ref(layer, x)
    with torch.inference_mode():
        y = layer(x)
    assert y.is_inference()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
    assert len(workers) == 2


def test_worker_error_propagates(workers, monkeypatch):
    layer = FastKANLayer(6, 4, dtype=torch.float64)
    x = torch.randn(25, 6, dtype=torch.float64)
    real = torch_backend._forward_rows

    def failing(y, x, *args):
        if x.shape[0] < 9:  # the last (smallest) part
            raise RuntimeError("boom in a worker")
        return real(y, x, *args)

    monkeypatch.setattr(torch_backend, "_forward_rows", failing)
    with pytest.raises(RuntimeError, match="boom in a worker"):
        layer(x)
    monkeypatch.setattr(torch_backend, "_forward_rows", real)
    ref = _ref(layer, x)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)  # the pool still works


def test_dispatch_mode_runs_inline(workers):
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    layer = FastKANLayer(6, 4, dtype=torch.float64)
    x = torch.randn(25, 6, dtype=torch.float64)
    with PassThrough():
        y = layer(x)
    assert all(len(r) == 1 for r in workers)  # the mode's state is thread-local: no split
    ref = _ref(layer, x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


_FORK_SCRIPT = r"""
import os, sys, torch
from kanfast import FastKANLayer, cpu_workers, sparse_backend
from kanfast.reference import kan_linear_reference
torch.set_num_threads(3)
cpu_workers.MIN_ELEMENTS = 1
sparse_backend.WORKER_NS = 1e-6  # (the sparse path's split rule: any call splits)
layer = FastKANLayer(6, 4, dtype=torch.float64)
x = torch.linspace(-0.9, 0.9, 25 * 6, dtype=torch.float64).view(25, 6)
layer(x)  # split: on the C call's OpenMP team where the kernels have OpenMP, else on the pool
assert cpu_workers._pool is not None or sparse_backend._kernels().openmp
ref = kan_linear_reference(x, layer.grid, layer.base_weight, layer.spline_weight, layer.spline_scaler, 3)
torch.randn(1 << 20).mul(2).sum()  # this thread's OpenMP team is alive at the fork
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # (a child's own parallel ops would wait for the parent's OpenMP team threads, which do
    # not exist here: libgomp is not fork-safe; the split call must not add to that)
    assert cpu_workers._pool is None  # the parent's threads are not here
    y = layer(x)
    os.write(w, repr(float((y - ref).abs().max())).encode() + (b" pool" if cpu_workers._pool else b""))
    os._exit(0)
os.close(w)
msg = os.read(r, 200).decode()
_, status = os.waitpid(pid, 0)
print(msg, status)
"""


def test_forked_child_gets_its_own_pool():
    """A child forked while the pool or the OpenMP team exists runs split calls on a pool of its own,
    never on the OpenMP team (libgomp is not fork-safe) (in a
    fresh interpreter: forking pytest, with whatever threads earlier tests left, is not)."""
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    err, pool, status = out.stdout.split()
    assert float(err) < 1e-12 and pool == "pool" and status == "0"


def test_inference_mode_then_ordinary_calls(workers, monkeypatch):
    """Work buffers are kept between calls: ones first made under inference mode must not
    turn into inference tensors (a later ordinary call writes into them)."""
    layer = FastKANLayer(8, 4, dtype=torch.float64)
    for split in (True, False):
        monkeypatch.setattr(cpu_workers, "MIN_ELEMENTS", 1 if split else 1 << 60)
        torch_backend.release_buffers()
        with torch.inference_mode():
            layer(torch.rand(64, 8, dtype=torch.float64))
        x = torch.rand(80, 8, dtype=torch.float64)  # larger: buffers grow outside inference mode too
        compare_to_reference(layer, x)


def test_jit_trace_and_profiler_run_inline(workers):
    """Both record the calling thread only: such calls are not split."""
    layer = FastKANLayer(7, 5)
    x = torch.rand(30, 7)
    traced = torch.jit.trace(layer, x, check_trace=False)
    torch.testing.assert_close(traced(x), layer(x))
    n = len(workers)
    with torch.profiler.profile() as prof:
        layer(x.requires_grad_()).sum().backward()
    assert all(len(r) == 1 for r in workers[n:])
    assert any("mm" in e.name for e in prof.events())


def test_bound_caller_runs_inline(workers, monkeypatch):
    """Workers inherit the caller's CPU affinity (OMP_PROC_BIND pins it to one core)."""
    monkeypatch.setattr(cpu_workers, "_usable_cpus", lambda: 1)
    layer = FastKANLayer(6, 4, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 6, dtype=torch.float64))
    assert all(len(r) == 1 for r in workers)


def test_concurrent_callers_with_different_thread_counts(workers):
    """Two user threads with 2 and 3 torch threads: correct results, no error, and the pool
    grows once instead of being replaced by each caller in turn."""
    layer = FastKANLayer(6, 4, dtype=torch.float64)
    x = torch.rand(40, 6, dtype=torch.float64)
    ref = _ref(layer, x)
    errors, pools = [], set()

    def caller(n):
        torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            for _ in range(15):
                torch.testing.assert_close(layer(x).detach(), ref, rtol=0, atol=1e-12)
                pools.add(id(cpu_workers._pool))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(3)
    assert not errors, errors
    assert len(pools) <= 3 and cpu_workers._pool_size >= 3
