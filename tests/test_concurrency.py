"""Threads and forks: a child forked while another thread holds the torch backend's buffer
lock runs normally; the Triton backend's first calls from several threads at once, and its
interpreted launches from several threads, give the results of sequential runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the backend copes either way)

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kanfast import FastKANLayer  # noqa: E402


def _run(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_holds_the_buffers_lock():
    """A thread holds ``cpu_buffers._buffers_lock`` (as one registering its work buffers
    would) while the main thread forks: the child's first layer call (which registers its own
    buffers under that lock) completes and the child exits 0. The parent waits for the child
    at most 60 s, then kills it and reports a hang."""
    code = r"""
import os, signal, threading, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # fork of a multi-threaded process: the point of the test
import torch
torch.set_num_threads(1)
from kanfast import FastKANLayer, cpu_buffers, torch_backend
layer = FastKANLayer(4, 3, backend="torch")
x = torch.rand(8, 4)
held, done = threading.Event(), threading.Event()
def holder():
    with cpu_buffers._buffers_lock:
        held.set()
        done.wait()
t = threading.Thread(target=holder)
t.start()
held.wait()
pid = os.fork()
if pid == 0:
    layer(x).sum().backward()
    torch_backend.release_buffers()
    os._exit(0)
done.set()
t.join()
for _ in range(600):
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print("child", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.1)
else:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("child hung")
"""
    out = _run(code)
    assert out.stdout.strip() == "child 0", out.stdout + out.stderr


# ------------------------------------------------------------------ triton, several threads
triton = pytest.importorskip("triton")

from kanfast import triton_backend as tb  # noqa: E402

needs_triton = pytest.mark.skipif(not tb.AVAILABLE, reason="triton not importable")


@needs_triton
@pytest.mark.parametrize("interpret", ["TRITON_INTERPRET=1", "private interpreted copy"])
def test_concurrent_first_triton_calls_register_once(interpret):
    """Four threads make their first ``backend="triton"`` call at the same moment, in a fresh
    process (so the registration of ``kanfast::kan_triton_fwd`` really is first; the window is
    widened by making ``torch.library.custom_op`` slow): no thread fails, and each result
    equals that of the same call made alone afterwards. Without TRITON_INTERPRET the threads
    also race to make the backend's private interpreted copy of the kernels."""
    code = r"""
import os
assert (os.environ.get("TRITON_INTERPRET") == "1") == WANT_ENV
import sys, threading, time
import torch
torch.set_num_threads(1)
from kanfast import FastKANLayer, ops, triton_backend  # every import-time op registered
assert ops._TRITON_OPS is None
real = torch.library.custom_op
def slow_custom_op(*a, **kw):
    time.sleep(0.2)  # a thread descheduled here: the others arrive while it registers
    return real(*a, **kw)
torch.library.custom_op = slow_custom_op
torch.manual_seed(0)
layers = [FastKANLayer(3, 2, grid_size=3, backend="triton") for _ in range(4)]
xs = [torch.rand(5, 3) for _ in layers]
start = threading.Barrier(len(layers))
results, errors = {}, []
def first_call(i):
    start.wait()
    try:
        results[i] = layers[i](xs[i]).detach()
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")
threads = [threading.Thread(target=first_call, args=(i,)) for i in range(len(layers))]
for t in threads: t.start()
for t in threads: t.join()
torch.library.custom_op = real
alone = [layer(x).detach() for layer, x in zip(layers, xs)]
assert not errors, errors
assert all(torch.equal(results[i], alone[i]) for i in range(len(layers)))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret == "TRITON_INTERPRET=1":
        env["TRITON_INTERPRET"] = "1"
    code = code.replace("WANT_ENV", str("TRITON_INTERPRET" in env))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr[-3000:]


def _train(layer: FastKANLayer, x: torch.Tensor, y: torch.Tensor, steps: int):
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (layer(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in layer.parameters()]


@needs_triton
def test_two_threads_training_on_triton_match_sequential_runs():
    """Two threads train two layers on backend "triton" (CPU tensors: Triton's interpreter,
    which is not thread-safe) with the thread switch interval shortened so that their
    launches interleave: the losses and final parameters equal, bit for bit, those of the
    same trainings run one after the other."""
    torch.manual_seed(0)
    base = [FastKANLayer(3, 2, grid_size=3, backend="triton"), FastKANLayer(2, 3, grid_size=4, backend="triton")]
    data = [(torch.rand(6, 3) * 2 - 1, torch.rand(6, 2)), (torch.rand(7, 2) * 2 - 1, torch.rand(7, 3))]
    steps = 3
    sequential = [_train(copy.deepcopy(layer), x, y, steps) for layer, (x, y) in zip(base, data)]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        try:
            results[i] = _train(copy.deepcopy(base[i]), *data[i], steps)
        except BaseException as e:  # reported below, with the thread's error
            errors.append(f"{type(e).__name__}: {e}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for (l_seq, p_seq), (l_thr, p_thr) in zip(sequential, results):
        assert torch.equal(l_seq, l_thr)
        assert all(torch.equal(a, b) for a, b in zip(p_seq, p_thr))
