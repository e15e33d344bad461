"""Worker threads for the CPU engine: one call split into independent parts.

Why: on CPU the torch backend's non-GEMM work is a few dozen element-wise and
index ops per chunk of rows. Under torch's intra-op parallelism each of them
forks and joins the OpenMP team and scales poorly: at batch 4096, in = out =
256, G = 5 (a 2-core VM) the engine took ~1.3x the dense-GEMM floor on 2
threads against ~1.15x on one. Splitting the call instead into ``n``
independent parts (forward: blocks of rows; backward: blocks of input
features, whose gradients are disjoint columns), each run by its own thread
with single-threaded ops, brought it to ~1.13x (``benchmarks/results``).

How: a process-wide pool of threads, started at the first large call and grown
(never shrunk) to the most parts a call has asked for. Each worker sets its own
OpenMP and MKL thread counts to 1 (per-thread settings: ``omp_set_num_threads``
acts on the calling thread and torch calls ``mkl_set_num_threads_local``);
``torch.set_num_threads`` also writes a process-wide default that new threads
copy, which the pool restores right after its threads are set (a thread whose
first torch op falls in that window of microseconds would copy 1), so the
caller's thread count, and every other thread's, is unchanged. The caller waits for all parts (it runs none itself:
its ops would use every core on top of the workers) after releasing its own
OpenMP team (:func:`_release_caller_team`): libgomp's idle team threads
spin-wait for several milliseconds after a parallel op, on the very cores the
workers need.

When (the documented rule): a call is split into
``n = min(torch.get_num_threads(), work // MIN_ELEMENTS)`` parts, ``work`` its
dense elements (rows x in x (G + k + 1)), and runs on the workers only if
``n >= 2``, its tensors are plain CPU tensors (``Tensor`` or ``Parameter``),
torch's parallel backend is OpenMP (the native backend cannot give a thread its
own count), no ``TorchDispatchMode``/``TorchFunctionMode``, ``torch.jit.trace``
or profiler is active (their state is thread-local: they would not see the
workers' ops), it is not itself running on a worker, and ``n`` is capped by the
CPUs the caller may run on (the workers inherit its affinity: under
``OMP_PROC_BIND`` libgomp pins the caller to one core). Otherwise it
runs as before, on the calling thread with torch's intra-op threads. Grad mode
is off in the workers and inference mode follows the caller's.

Determinism: the split depends only on the shapes and the thread count, every
output element is written by exactly one part and no part reduces into
another's output, so results are bit-repeatable for a given thread count.

Fork safety: a child process forked while the pool exists starts its own pool
at its first large call (threads do not survive ``fork``), and never releases
its OpenMP team (libgomp would wait for the parent's team threads; the child's
own parallel torch ops hang on that too, which is libgomp's, not kanfast's).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["MIN_ELEMENTS", "worker_count", "split", "run"]

#: Dense work (rows x in x (G + k + 1) elements) each worker must get: a call is split
#: into ``min(torch.get_num_threads(), work // MIN_ELEMENTS)`` parts. Measured on a
#: 2-core VM, fwd+bwd, workers against torch's intra-op threads: 1.2M elements 0.94x,
#: 2.4M 1.00x in a tight loop but 0.7x inside ``kanfast bench`` (batch 2048, in = 128,
#: G = 5: other work between calls makes releasing the caller's OpenMP team cost up
#: to a few ms), 4.7M 1.26x, 9.4M ~1.3x. Small calls also serialise the workers'
#: Python on the GIL.
MIN_ELEMENTS = 1 << 22

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_local = threading.local()
_openmp: Optional[bool] = None
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not FakeTensor, FunctionalTensor, other subclasses


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads do not exist here, and neither do
    the caller's OpenMP team threads, which libgomp's bookkeeping still lists, so
    releasing that team would wait for them forever: never release it in a child."""
    global _pool, _pool_size, _lock, _omp_runtime
    _pool, _pool_size, _lock, _omp_runtime = None, 0, threading.Lock(), False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _uses_openmp() -> bool:
    global _openmp
    if _openmp is None:
        _openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _openmp


def worker_count(work: int, *tensors: Optional[torch.Tensor]) -> int:
    """Number of parts to split a call of ``work`` dense elements into (1: run inline)."""
    if torch._C._get_tracing_state() is not None or torch._C._autograd._profiler_enabled():
        return 1  # jit.trace and the profiler record the calling thread only
    if not isinstance(work, int) or work < 2 * MIN_ELEMENTS or getattr(_local, "worker", False):
        return 1
    n = min(torch.get_num_threads(), work // MIN_ELEMENTS, _usable_cpus())
    if n < 2 or not _uses_openmp():
        return 1
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type != "cpu"):
            return 1
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return 1
    return n


def _usable_cpus() -> int:
    """CPUs the calling thread may run on (the workers inherit its affinity: with
    ``OMP_PROC_BIND`` libgomp pins it to one core, and workers there would share it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def split(total: int, parts: int) -> List[Tuple[int, int]]:
    """``parts`` contiguous near-equal ranges ``[a, b)`` covering ``range(total)`` (fewer if total < parts)."""
    if parts <= 1:
        return [(0, total)]  # (total may be a traced size under torch.jit.trace)
    parts = max(1, min(parts, total))
    size, extra = divmod(total, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + size + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def _start_pool(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` started threads, each with one OpenMP and MKL thread of its own."""
    main_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="kanfast-cpu")
    started = threading.Barrier(n + 1)
    go = threading.Event()

    def init():
        _local.worker = True
        torch.get_num_threads()  # torch's lazy per-thread init (it copies the process-wide count) first
        started.wait()  # every task on its own thread: n threads started
        go.wait()
        torch.set_num_threads(1)  # this thread's OpenMP and MKL counts (and the process-wide default)

    tasks = [pool.submit(init) for _ in range(n)]
    started.wait()
    go.set()
    for f in tasks:
        f.result()
    # the process-wide default the workers overwrote, which threads starting torch copy: wrong
    # (1) only between the workers' last line above and this one
    torch.set_num_threads(main_threads)
    return pool


def _pool_of(n: int) -> ThreadPoolExecutor:
    """The pool, grown to at least ``n`` threads (never shrunk: callers with different
    thread counts would otherwise replace each other's pool). Call with ``_lock`` held."""
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        old = _pool
        _pool, _pool_size = _start_pool(n), n
        if old is not None:
            old.shutdown(wait=False)  # its queued tasks still run
    return _pool


_omp_runtime = None  # ctypes handle of the loaded OpenMP runtime, False when not found


def _release_caller_team() -> None:
    """Release the calling thread's OpenMP team (``omp_pause_resource_all(omp_pause_soft)``,
    OpenMP 5.0). After a parallel op, libgomp's idle team threads spin-wait for several
    milliseconds (GOMP_SPINCOUNT) on the very cores the workers are about to use: at
    batch 4096, in = out = 256, G = 5 the worker that shared its core with a spinning
    thread finished ~7 ms after the other (a 2-core VM). The next parallel op of the
    caller starts its team again. A no-op where the runtime is not found (non-Linux)."""
    global _omp_runtime
    if _omp_runtime is None:
        _omp_runtime = False
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if any(n in line for n in _OMP_NAMES)}
            for path in sorted(paths):
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # the copy torch loaded, never a new one
                if hasattr(lib, "omp_pause_resource_all"):
                    _omp_runtime = lib
                    break
        except (OSError, AttributeError):
            pass
    if _omp_runtime:
        _omp_runtime.omp_pause_resource_all(1)  # 1 = omp_pause_soft


_OMP_NAMES = ("libgomp", "libiomp5", "libomp.so")


def run(fn: Callable[[int, int], None], ranges: List[Tuple[int, int]]) -> None:
    """Call ``fn(a, b)`` for every range, on the workers when there is more than one
    range; returns when all are done and re-raises the first error."""
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    _release_caller_team()
    inference = torch.is_inference_mode_enabled()

    def task(a, b):
        with torch.inference_mode(inference), torch.no_grad():
            fn(a, b)

    with _lock:  # (no other caller can replace the pool between getting it and submitting)
        pool = _pool_of(len(ranges))
        futures = [pool.submit(task, a, b) for a, b in ranges]
    wait(futures)  # all finished before any error propagates: no part still writes afterwards
    for f in futures:
        f.result()
