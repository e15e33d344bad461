"""``kanfast bench``: throughput and memory of the KAN backends against baselines.

For every shape (batch, in, out, G, k) it times, interleaved repeat by repeat after
warm-up (median and min over ``--repeats``):

* kanfast backends: ``torch`` (the fast CPU path), ``reference`` (the oracle),
  ``triton`` (CUDA only);
* ``materialized``: efficient-kan's formulation (full Cox-de Boor table then
  ``F.linear``, :mod:`kanfast.benchmarks.baselines`), same parameters as ours,
  and, with ``--compile``, its ``torch.compile`` variant;
* ``mlp``: ``Linear(in, out) + SiLU``;
* peers from PyPI when installed (``pip install kanfast[peers]``): pykan, flashkan,
  inkan (eager; ``--compile-peers`` adds their compiled variants). A peer that is
  missing, unsupported for the shape or fails is listed with the reason;
* ``dense floor``: the three GEMMs every exact dense-basis KAN layer performs,
  ``(batch x in*(G+k+1)) @ (in*(G+k+1) x out)`` forward and the two backward
  products, as plain ``torch.matmul`` on random data, timed in the same run.

"forward" runs under ``torch.no_grad()`` (inference); "fwd+bwd" is
``y = f(x); y.backward(gy)`` with ``x`` and the parameters requiring grad.

Peak memory (``peak_extra_mb``, fwd+bwd): memory beyond the parameters, their
gradients, the input (and its gradient) and the output.
  * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
    minus the output and the gradients allocated in the step.
  * CPU (Linux): the process's resident-set high-water mark (``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``) minus the resident set just before
    the step, after ``gc.collect()``, glibc ``malloc_trim(0)`` and
    :func:`kanfast.torch_backend.release_buffers` (the work buffers the torch
    backend keeps between calls) so that memory freed or kept earlier is not
    silently reused; minus the output and gradient bytes.
    It counts every byte the step touches (library workspaces included), at page
    granularity. Elsewhere the column is empty.

FLOPs: the dense-equivalent count ``2 * batch * in * (G + k + 1) * out`` forward
and three times that for fwd+bwd (the MLP: ``2 * batch * in * out`` and
``6 * ...``), the same for every KAN implementation, so ``gflops`` (FLOPs / time)
compares useful work per second.

Writes a JSON file (``meta`` + ``results``) and a CSV of the results next to it,
optionally a PNG (``--plot``): fwd+bwd time, forward time and peak memory
against each swept axis (G, batch, ...), one line per implementation, the dense
floor dashed (one shape: bars). ``--replot RESULT.json --plot OUT.png`` re-draws
the figure of an earlier run from its JSON without timing anything
(:func:`plot_results`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .provenance import git_commit as _git_commit
from .provenance import machine as _machine
from .provenance import versions as _versions

from ..cli_checks import IMAGE_SUFFIXES, check_memory, check_outputs, float_range, int_list, int_range, name_list, open_output

__all__ = ["add_arguments", "check_arguments", "run", "dense_flops", "estimate_bytes", "plot_results", "run_small", "SWEEPS",
           "SMALL_MODELS"]

DEFAULT_OUT = "kanfast-bench.json"
#: The knot range of the layers built (FastKANLayer's default), also given to the peers.
DEFAULT_GRID_RANGE = (-1.0, 1.0)

#: Named sweeps. ``batch`` replaces the batch list of the run's shapes. ``grid`` (issue 18) is a
#: run of its own: every G of ``grid_size`` on each layer ``(batch, in, out)`` of ``layers``
#: (``--layers`` replaces them), the peers eager and compiled, under the budget of
#: :data:`SWEEP_BUDGETS` (cases that do not fit in memory or time are recorded as skipped).
SWEEPS = {
    "grid": {"grid_size": [3, 5, 10, 20, 50, 100, 200, 500],
             "layers": [(4096, 256, 256), (4096, 64, 64), (256, 1024, 1024)]},
    "batch": {"batch": [256, 1024, 4096, 16384]},
}
#: Defaults of the budget options for the sweeps that imply them (an explicit option wins):
#: ``time_budget`` seconds for the whole run, ``max_step_s`` (a baseline or peer whose
#: fwd+bwd step is predicted longer is skipped), ``case_seconds`` (timed seconds per case and
#: shape: fewer repeats when steps are long). See :func:`_budget`.
SWEEP_BUDGETS = {
    "grid": {"time_budget": 420.0, "max_step_s": 2.0, "case_seconds": 3.0},
    "small": {"time_budget": None, "max_step_s": None, "case_seconds": 1.0},
}


_int_list = int_list(1)
_name_list = name_list


def _layer_list(text: str) -> List[Tuple[int, int, int]]:
    """argparse type of ``--layers``: comma-separated ``BATCHxINxOUT``, each >= 1."""
    out = []
    for part in (v.strip() for v in str(text).split(",") if v.strip()):
        dims = part.lower().split("x")
        try:
            vals = tuple(int(d) for d in dims)
        except ValueError:
            vals = ()
        if len(vals) != 3 or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"expected BATCHxINxOUT with integers >= 1 (e.g. 4096x256x256), got {part!r}")
        out.append(vals)
    if not out:
        raise argparse.ArgumentTypeError(f"expected BATCHxINxOUT,..., got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kanfast bench`` (see the module docstring)."""
    g = parser.add_argument_group("shapes (comma-separated lists; every combination is run)")
    g.add_argument("--batch", type=_int_list, default=[2048], help="batch sizes (default 2048)")
    g.add_argument("--in-features", "--in", dest="in_features", type=_int_list, default=[128], help="default 128")
    g.add_argument("--out-features", dest="out_features", type=_int_list, default=None,
                   help="default: equal to --in-features")
    g.add_argument("--grid-size", "--grid", dest="grid_size", type=_int_list, default=[5, 20], help="G (default 5,20)")
    g.add_argument("--spline-order", "-k", dest="spline_order", type=_int_list, default=[3], help="k (default 3)")
    g.add_argument("--sweep", choices=sorted(SWEEPS), action="append", default=[],
                   help="batch: 256..16384 (replaces --batch); grid: G in 3,5,10,20,50,100,200,500 on the layers "
                        "4096x256x256, 4096x64x64, 256x1024x1024 (--layers), peers eager and compiled, under a "
                        "time budget (--time-budget 420 --max-step-s 2 --case-seconds 3 unless given)")
    g.add_argument("--layers", type=_layer_list, default=None, metavar="BxIxO,...",
                   help="the layers (batch x in x out) of --sweep grid")
    g.add_argument("--small", action="store_true",
                   help="the small-model sweep instead (SMALL_MODELS: whole KANs and two single layers, G = first "
                        "--grid-size, k = first --spline-order, peers eager and compiled; see run_small)")
    r = parser.add_argument_group("run")
    r.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    r.add_argument("--threads", type=int_range(1), default=None, help="torch.set_num_threads (CPU; default: torch's)")
    r.add_argument("--repeats", type=int_range(1), default=5, help="timed repeats per case (median reported)")
    r.add_argument("--warmup", type=int_range(0), default=2, help="untimed warm-up calls per case")
    r.add_argument("--backends", type=_name_list, default=None,
                   help="kanfast backends (default: torch,reference, plus triton on CUDA)")
    r.add_argument("--peers", type=_name_list, default=["pykan", "flashkan", "inkan"],
                   help="peer packages to try (default pykan,flashkan,inkan; 'none' for none)")
    r.add_argument("--compile", action="store_true", help="also time torch.compile of the materialized baseline "
                   "(implied by --sweep grid and --small)")
    r.add_argument("--compile-peers", action="store_true", help="also time the peers' torch.compile variants "
                   "(implied by --sweep grid and --small)")
    r.add_argument("--no-compile", action="store_true", help="no compiled variants, also with --sweep grid / --small")
    r.add_argument("--time-budget", type=float_range(0, min_inclusive=False), default=None, metavar="S",
                   help="seconds for the whole run: a case predicted to end past it is skipped ('time budget'), "
                        "repeats stop at it (default: none; --sweep grid: 420)")
    r.add_argument("--max-step-s", type=float_range(0, min_inclusive=False), default=None, metavar="S",
                   help="skip a baseline or peer whose repeat (forward + forward+backward) is predicted (from the "
                        "previous G of the same layer) to take longer; kanfast and the dense floor are always timed "
                        "(default: none; --sweep grid: 2)")
    r.add_argument("--case-seconds", type=float_range(0, min_inclusive=False), default=None, metavar="S",
                   help="timed seconds per case and shape: repeats stop once a case has spent them (at least one; "
                        "no warm-up for eager steps over S/2) (default: none; --sweep grid: 3, --small: 1)")
    r.add_argument("--max-elements", type=float_range(0, min_inclusive=False), default=2.0e8,
                   help="skip an implementation whose largest materialised tensor would exceed this many elements "
                        "(pykan builds (batch, in, out) tensors; default 2e8)")
    r.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    r.add_argument("--no-first-call", action="store_true",
                   help="skip timing the first call in a fresh process (a subprocess)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"JSON path (default {DEFAULT_OUT}); CSV next to it")
    o.add_argument("--plot", type=Path, default=None, help="PNG with time and memory against G and batch")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    o.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only re-draw the figure of an earlier run's JSON (to --plot, default: the JSON's name .png); "
                        "nothing is timed")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    o.add_argument("--quiet", action="store_true", help="no table on stdout")


# --------------------------------------------------------------------------- meta
def _cpu_kernels_info() -> Dict[str, Any]:
    """Whether the torch backend runs the compiled CPU block kernels here, and with what."""
    from kanfast.kernels import cpu_spline

    kern = cpu_spline.load()
    info: Dict[str, Any] = {"loaded": kern is not None, "cflags": " ".join(kern.flags) if kern is not None else None}
    try:
        cc = cpu_spline._compiler()
    except RuntimeError as e:
        cc, info["compiler"] = None, str(e)
    if cc:
        try:
            info["compiler"] = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                                              timeout=30).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["compiler"] = " ".join(cc)
    return info


# ------------------------------------------------------------------------ helpers
def dense_flops(batch: int, nin: int, nout: int, grid_size: int, k: int) -> int:
    """Dense-equivalent FLOPs of one KAN forward: ``2 * batch * in * (G + k + 1) * out``."""
    return 2 * batch * nin * (grid_size + k + 1) * nout


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Case:
    """One implementation on one shape: its callables and measurements."""

    def __init__(self, label: str, kind: str, module: Optional[nn.Module] = None, status: str = "ok", note: str = ""):
        self.label, self.kind, self.module, self.status, self.note = label, kind, module, status, note
        self.fwd: List[float] = []
        self.fb: List[float] = []
        self.peak_extra: Optional[float] = None
        self.memory_note = ""


def _status_text(s) -> Tuple[str, str]:
    return s.status, s.reason


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_extra_bytes(step: Callable[[], Tuple[torch.Tensor, int]], device: torch.device) -> Tuple[Optional[float], str]:
    """Run ``step`` once; return (peak bytes beyond its persistent results, note).
    ``step`` returns (output, bytes of the gradients it allocated)."""
    # kanfast's CPU engine keeps its work buffers between calls: free them, so that the
    # step allocates (and this counts) them again, as a first call would
    from kanfast.torch_backend import release_buffers

    release_buffers()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        y, grad_bytes = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return max(0.0, peak - y.numel() * y.element_size() - grad_bytes), "cuda max_memory_allocated"
    _malloc_trim()
    rss0 = _proc_status("VmRSS")
    if rss0 is None or not _reset_hwm():
        return None, "unavailable (needs Linux /proc/self/clear_refs)"
    y, grad_bytes = step()
    hwm = _proc_status("VmHWM")
    return max(0.0, hwm - rss0 - y.numel() * y.element_size() - grad_bytes), "RSS high-water mark"


def _first_call(shape, dtype_name: str, threads: Optional[int]) -> Dict[str, Any]:
    """Import + first forward+backward of FastKANLayer(backend='torch') in a fresh interpreter."""
    b, i, o, G, k = shape
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import torch\n"
        + (f"torch.set_num_threads({threads})\n" if threads else "")
        + "from kanfast import FastKANLayer\n"
        "t1 = time.perf_counter()\n"
        f"layer = FastKANLayer({i}, {o}, grid_size={G}, spline_order={k}, backend='torch', dtype=torch.{dtype_name})\n"
        f"x = (torch.rand({b}, {i}, dtype=torch.{dtype_name}) * 2 - 1).requires_grad_(True)\n"
        "t2 = time.perf_counter()\n"
        "layer(x).sum().backward()\n"
        "t3 = time.perf_counter()\n"
        "layer(x).sum().backward()\n"
        "t4 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)\n"
    )
    # twice, on an empty cache directory of the CPU block kernels: the first process builds
    # them (once per machine; "cold"), the second loads the cached library (every later process)
    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kanfast-first-call-") as cache:
        env = dict(os.environ, KANFAST_CACHE_DIR=cache)
        for run in ("cold", "warm"):
            try:
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
                if res.returncode != 0:
                    return {"status": "failed", "error": res.stderr.strip()[-500:]}
                imp, build, first, second = (float(v) for v in res.stdout.split()[-4:])
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if run == "cold":
                out["first_fwd_bwd_cold_cache_s"] = first
            else:
                out.update({"status": "ok", "shape": list(shape), "import_s": imp, "build_s": build,
                            "first_fwd_bwd_s": first, "second_fwd_bwd_s": second})
    return out


# -------------------------------------------------------------------------- core
def _case_labels(args, backends, peers) -> List[str]:
    """Labels of the cases of one shape, in build order (kanfast first)."""
    from .baselines import PEERS

    labels = [f"kanfast-{be}" for be in backends] + ["materialized"]
    labels += ["materialized+compile"] if args.compile else []
    labels += ["mlp"] + [p for p in peers if p in PEERS]
    labels += [p + "+compile" for p in peers if p in PEERS and p != "pykan"] if args.compile_peers else []
    return labels


def _case_bytes(label: str, shape, itemsize: int, threads: int = 1) -> Tuple[int, int]:
    """(persistent, transient) bytes of one case on ``shape``, estimated from what it allocates:
    persistent = parameters, their gradients and kept work buffers (alive while the shape's other
    cases run); transient = the step's own tensors (freed before the next case runs). ``floor``:
    the dense floor's basis matrix, weight and two backward products."""
    b, i, o, G, k = shape
    P = o * i * (G + k) + 2 * o * i
    io = 4 * b * (i + o)
    table = i * (G + k + 1) * o
    cdb = b * i * (G + 2 * k + 1) * (3 * k + 3)  # Cox-de Boor table, every order kept for backward
    feat = b * i * (G + k + 1)
    base = label.split("+")[0]
    if label == "floor":
        per = (0, (2 * b + 2 * o) * i * (G + k + 1))
    elif label == "mlp":
        per = (2 * (i * o + o), io)
    elif label == "kanfast-reference":
        per = (2 * P, cdb + io)
    elif base.startswith("kanfast-"):  # the engine's packed table and weight-gradient buffer per thread;
        # its construction: the parameters, the initial fit's noise and float64 solution, ~4 P (measured
        # ~3 P at 1024 x 1024, G = 100)
        per = (2 * P + 2 * table * max(1, threads), max(io + table, 4 * P))
    elif label.endswith("+compile"):  # fused basis; the feature matrix and its gradient
        per = (2 * P, 3 * feat + io)
    elif base == "pykan":  # its step's (batch, in, out) tensors, or its construction (the larger)
        per = (2 * P, max(cdb + 6 * b * i * o + io, 2 * _pykan_init_elements(shape)))
    elif base == "materialized":
        per = (2 * P, cdb + feat + io)
    elif base == "flashkan":  # eager: measured ~20 feature matrices (4096 x 256 -> 256, G = 20: 2.0 GiB)
        per = (2 * P, 24 * feat + io)
    else:  # eager peers: the basis built in (k + 1) steps, the features and their gradient
        per = (2 * P, (k + 4) * feat + io)
    return per[0] * itemsize, per[1] * itemsize


#: Share of MemAvailable the cases of one shape may plan to use (the estimates and extrapolations are
#: not bounds: a full --sweep grid run with 0.8, 1 thread, loaded host, reached 19 GB resident of 24 GB).
MEMORY_FRACTION = 0.6


def _pykan_init_elements(shape) -> int:
    """Elements of the matrix pykan's ``KANLayer.__init__`` materialises: its ``curve2coef`` fits the
    initial coefficients by ``torch.linalg.lstsq`` on ``in * out`` expanded (G + 1) x (G + k) B-spline
    matrices (measured, 1 thread: peak ~1.4x this matrix; 1024 x 1024 at G = 10: 0.87 GiB, 12 s)."""
    b, i, o, G, k = shape
    return i * o * (G + 1) * (G + k)


#: Most least-squares work (in*out*(G+1)*(G+k)^2) of a pykan construction a run will wait for: measured
#: (1 thread, loaded host) 12 s at 1024 x 1024, G = 10 (2e9) and 5 s at 64 x 64, G = 100 (4.4e9).
PYKAN_INIT_MAX_WORK = 1.0e10


def _pykan_too_big(shape, max_elements: float) -> Optional[str]:
    """Why pykan is not built on ``shape`` (None: it is): the (batch, in, out) tensors of its step or
    the least-squares matrix of its construction over ``max_elements``. Checked before building,
    since the construction alone can exhaust memory (G = 50 on 1024 x 1024: ~15 GiB)."""
    b, i, o, G, k = shape
    if b * i * o > max_elements:
        return f"pykan materialises (batch, in, out) = {b * i * o:.2e}-element tensors, over --max-elements"
    n = _pykan_init_elements(shape)
    if n > max_elements:
        return (f"pykan's construction materialises in*out*(G+1)*(G+k) = {n:.2e} elements (lstsq of its initial "
                f"coefficients), over --max-elements")
    work = n * (G + k)
    if work > PYKAN_INIT_MAX_WORK:
        return (f"pykan's construction solves in*out least-squares problems of (G+1) x (G+k): ~{work:.2e} "
                f"multiply-adds, over {PYKAN_INIT_MAX_WORK:.0e} (tens of seconds or more)")
    return None


def _extrapolate_peak(prev: Optional[Tuple[int, float]], G: int, k: int, label: str = "") -> Optional[float]:
    """Transient bytes of a case at ``G`` predicted from its measured peak ``prev = (G0, bytes)`` at an
    earlier G of the same layer: materialised bases grow linearly in the basis count, so scaled by
    (G + k + 1) / (G0 + k + 1) when G > G0 (never scaled down; ``mlp`` does not depend on G).
    None without a measurement."""
    if prev is None or prev[1] is None:
        return None
    g0, peak = prev
    if label == "mlp" or G <= g0:
        return float(peak)
    return float(peak) * (G + k + 1) / (g0 + k + 1)


class _Plan:
    """What a budgeted run measures on one shape: the cases skipped (label -> note: ``memory: ...``,
    ``time: ...`` or ``time budget: ...``) and the predicted fwd+bwd step of the others (from the
    previous G of the same layer, scaled by (G + k + 1); None when unknown)."""

    def __init__(self, skip: Dict[str, str], predicted: Dict[str, Optional[float]]):
        self.skip, self.predicted = skip, predicted


def _plan_shape(shape, labels: Sequence[str], args, history: Dict, deadline: Optional[float],
                peaks: Optional[Dict] = None) -> _Plan:
    """Skip, before building anything, the cases of ``shape`` that would not fit: memory (the
    estimates of :func:`_case_bytes`, each transient max'd with the case's measured peak at the
    previous G of the same layer extrapolated by :func:`_extrapolate_peak` (``peaks``: (label, batch,
    in, out, k) -> (G, bytes)), against MEMORY_FRACTION of the memory available now -- MemAvailable, after gc and
    malloc_trim, so memory this process still holds counts as used --, kanfast and the floor first), time (a baseline or peer predicted over ``--max-step-s``) or the run's time
    budget (its warm-up and one repeat predicted to end past ``--time-budget``)."""
    from ..cli_checks import available_memory, format_bytes

    b, i, o, G, k = shape
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    threads = torch.get_num_threads()
    skip: Dict[str, str] = {}
    predicted: Dict[str, Optional[float]] = {}
    compile_s: Dict[str, float] = {}
    for label in ["floor", *labels]:
        prev = history.get((label, b, i, o, k))
        if prev is None:
            predicted[label] = None
        else:
            g0, fwd_s, fb_s = prev[:3]
            scale = 1.0 if label == "mlp" else (G + k + 1) / (g0 + k + 1)
            predicted[label] = (fwd_s + fb_s) * scale
            if label.endswith("+compile") and len(prev) > 3:  # its compile (warm-up) at the previous G
                compile_s[label] = prev[3] or 0.0
    gc.collect()
    _malloc_trim()
    avail = available_memory()
    order = [lb for lb in labels if lb.startswith("kanfast-")] + ["floor"] + [lb for lb in labels if not lb.startswith("kanfast-")]
    persistent = transient = 0
    planned = 0.0  # predicted seconds of the cases kept so far (steps, warm-ups, compiles)
    now = time.monotonic()
    for label in order:
        why = _pykan_too_big(shape, args.max_elements) if label == "pykan" else None
        if why is not None:  # never built (see _build_cases): neither its memory nor its time counts
            skip[label] = why
            continue
        p, t = _case_bytes(label, shape, itemsize, threads)
        t_meas = _extrapolate_peak((peaks or {}).get((label, b, i, o, k)), G, k, label)
        how = "estimate"
        if t_meas is not None and t_meas > t:
            t, how = int(t_meas), "measured at the previous G, extrapolated"
        pred = predicted[label]
        if avail is not None and persistent + p + max(transient, t) > MEMORY_FRACTION * avail:
            skip[label] = (f"memory: needs ~{format_bytes(p + t)} ({how}) besides the cases kept, "
                           f"{format_bytes(avail)} available")
            continue
        measured_always = label == "floor" or label.startswith("kanfast-")
        if not measured_always and pred is not None and args.max_step_s is not None and pred > args.max_step_s:
            skip[label] = f"time: predicted ~{pred:.3g} s per fwd + fwd+bwd step (from the previous G), over --max-step-s {args.max_step_s:g}"
            continue
        # the shape's cases run one after another (interleaved): what the cases kept before take counts
        cost = (pred or 0.0) * (1 + (args.warmup if not measured_always else 0)) + compile_s.get(label, 0.0)
        if (deadline is not None and history  # (the run's first shape is always measured)
                and now + planned + cost > deadline):
            skip[label] = "time budget: --time-budget {:g} s spent before this case".format(args.time_budget)
            continue
        planned += cost
        persistent += p
        transient = max(transient, t)
    return _Plan(skip, predicted)


def _build_cases(shape, args, device, dtype, backends, peers, skip: Optional[Dict[str, str]] = None
                 ) -> Tuple[List[_Case], nn.Module]:
    from kanfast import FastKANLayer

    from .baselines import MaterializedKAN, PeerStatus, compile_module, make_peers, mlp

    skip = skip or {}
    b, nin, nout, G, k = shape
    torch.manual_seed(0)
    # the layer only when a case uses it (kanfast's, the materialized baseline's parameters): its
    # construction alone is several times its parameters, so a shape whose cases are all skipped
    # builds nothing (None)
    uses = [f"kanfast-{be}" for be in backends] + ["materialized"] + (["materialized+compile"] if args.compile else [])
    layer = (FastKANLayer(nin, nout, grid_size=G, spline_order=k, device=device, dtype=dtype)
             if any(lb not in skip for lb in uses) else None)
    grid_range = layer.grid_range if layer is not None else DEFAULT_GRID_RANGE
    cases: List[_Case] = []
    layer_used = False
    for be in backends:
        label = f"kanfast-{be}"
        if label in skip:
            cases.append(_Case(label, "kan", status="skipped", note=skip[label]))
            continue
        if be == "triton" and device.type != "cuda":
            cases.append(_Case("kanfast-triton", "kan", status="skipped",
                               note="CPU run (the Triton backend needs CUDA; its CPU interpreter is for validation)"))
            continue
        if be == "triton":
            try:
                from kanfast import triton_backend

                if not getattr(triton_backend, "AVAILABLE", False):
                    cases.append(_Case("kanfast-triton", "kan", status="skipped", note="triton backend not available"))
                    continue
            except Exception as e:
                cases.append(_Case("kanfast-triton", "kan", status="failed", note=f"import: {e}"))
                continue
        if be == "reference" and b * nin * (G + k) * (k + 3) > args.max_elements:
            cases.append(_Case("kanfast-reference", "kan", status="skipped",
                               note=f"Cox-de Boor table of ~{b * nin * (G + 2 * k):.2e} elements per order exceeds --max-elements"))
            continue
        if not layer_used:  # the first kanfast case is the layer itself (one copy less of the parameters)
            m, layer_used = layer, True
        else:
            m = FastKANLayer(nin, nout, grid_size=G, spline_order=k, device=device, dtype=dtype)
            m.load_state_dict(layer.state_dict())
        m.backend = be
        cases.append(_Case(label, "kan", m))

    def add(label, kind, make):
        if label in skip:
            cases.append(_Case(label, kind, status="skipped", note=skip[label]))
        else:
            cases.append(_Case(label, kind, make()))

    add("materialized", "baseline", lambda: MaterializedKAN.from_layer(layer))
    if args.compile:
        add("materialized+compile", "baseline", lambda: compile_module(MaterializedKAN.from_layer(layer)))
    add("mlp", "mlp", lambda: mlp(nin, nout, device=device, dtype=dtype))
    built = []
    for compiled in ([False, True] if args.compile_peers else [False]):
        for name in peers:
            label = name + ("+compile" if compiled else "")
            if label in skip:
                built.append((label, PeerStatus(label, "skipped", skip[label])))
            elif name == "pykan" and _pykan_too_big(shape, args.max_elements):
                built.append((label, PeerStatus(label, "skipped", _pykan_too_big(shape, args.max_elements))))
            else:
                built += make_peers([name], nin, nout, G, k, grid_range, device=device, dtype=dtype,
                                    compiled=compiled)
    for label, mod in built:
        if isinstance(mod, PeerStatus):
            cases.append(_Case(label, "peer", status=mod.status, note=mod.reason))
        else:
            cases.append(_Case(label, "peer", mod))
    return cases, layer


def _timers(case: _Case, x: torch.Tensor, gy: torch.Tensor, device):
    mod = case.module
    params = [p for p in mod.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return mod(x)

    def step():
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_(True)
        y = mod(xg)
        y.backward(gy)
        return y, xg

    def fb():
        return step()[0]

    def fb_mem():
        y, xg = step()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        grad_bytes += xg.grad.numel() * xg.grad.element_size() if xg.grad is not None else 0
        return y, grad_bytes

    return fwd, fb, fb_mem


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@contextlib.contextmanager
def _path_spy():
    """Which engine kanfast's torch backend ran inside the block: yields a list that gets one entry
    per call of the sparse kernel (True: it ran; False: it declined and the dense engine ran)."""
    from kanfast import sparse_backend

    seen: List[bool] = []
    real = sparse_backend.forward

    def spy(*a, **kw):
        y = real(*a, **kw)
        seen.append(y is not None)
        return y

    sparse_backend.forward = spy
    try:
        yield seen
    finally:
        sparse_backend.forward = real


def _path_name(backend: str, seen: List[bool], layers: int = 1) -> str:
    """The engine name of a row from the spy's record (``layers``: layer calls per model call)."""
    if backend != "torch":
        return backend
    ran = sum(1 for v in seen if v)
    if ran == 0:
        return "dense-block" if not seen else "dense-block (sparse kernel declined)"
    if ran >= layers and all(seen):
        return "sparse"
    return f"sparse on {ran} of {layers} layers, dense-block on the others"


class _Timer:
    """The repeat schedule of one case (or the floor) on one shape: ``warm`` untimed calls (fewer when
    a call is long), then timed repeats until ``--repeats`` or, with ``--case-seconds``, until that
    much was spent (at least one), or the run's deadline (at least one)."""

    def __init__(self, fwd, fb, warm: int, args, deadline, long_s: Optional[float], first=None, compiled=False):
        self.fwd, self.fb, self.warm, self.args, self.deadline, self.long_s = fwd, fb, warm, args, deadline, long_s
        self.compiled = compiled
        self.first = first  # the first untimed call (kanfast: under the path spy), else fb
        self.f: List[float] = []
        self.b: List[float] = []
        self.warmup_s = 0.0
        self.error: Optional[str] = None

    def active(self) -> bool:
        if self.error is not None:
            return False
        if self.deadline is not None and self.warm > 0 and time.monotonic() > self.deadline:
            self.warm = 1 if self.compiled else 0  # past the budget: only the compile is still warmed up
        if self.warm > 0 or not self.b:
            return True
        spent = sum(self.f) + sum(self.b)
        cs = self.args.case_seconds
        return (len(self.b) < self.args.repeats and (cs is None or spent < cs)
                and (self.deadline is None or time.monotonic() < self.deadline))

    def step(self, device) -> None:
        try:
            if self.warm > 0:
                first, self.first = self.first, None
                t = _timed(self.fwd, device) + _timed(first or self.fb, device)
                self.warmup_s += t
                self.warm -= 1
                if self.long_s is not None and t > self.long_s:
                    self.warm = 0
                return
            if self.first is not None:  # no warm-up asked: the first call still runs once, untimed
                first, self.first = self.first, None
                self.warmup_s += _timed(first, device)
            self.f.append(_timed(self.fwd, device))
            self.b.append(_timed(self.fb, device))
        except Exception as e:  # a peer (or compile) failing at run time
            self.error = f"run: {type(e).__name__}: {str(e)[:300]}"


def _run_shape(shape, args, device, dtype, backends, peers, progress, plan: Optional[_Plan] = None,
               deadline: Optional[float] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    b, nin, nout, G, k = shape
    plan = plan or _Plan({}, {})
    cases, layer = _build_cases(shape, args, device, dtype, backends, peers, plan.skip)
    gen = torch.Generator(device="cpu").manual_seed(1)
    lo, hi = layer.grid_range if layer is not None else DEFAULT_GRID_RANGE
    x = (torch.rand(b, nin, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(device=device, dtype=dtype)
    gy = torch.randn(b, nout, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    width = nin * (G + k + 1)
    floor_ok = "floor" not in plan.skip
    if floor_ok:
        Dm = torch.randn(b, width, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        Wm = torch.randn(nout, width, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def floor_f():
        torch.matmul(Dm, Wm.t())

    def floor_b():
        torch.matmul(Dm, Wm.t())
        torch.matmul(gy.t(), Dm)
        torch.matmul(gy, Wm)

    # cross-check: our backends and the materialized baseline share parameters (the reference
    # backend on the same layer when the baseline was skipped)
    check, checked_against = {}, "materialized"
    with torch.no_grad():
        mat = next((c for c in cases if c.label == "materialized" and c.status == "ok"), None)
        if mat is not None:
            ref = mat.module(x[:256])
        elif layer is None:  # (no kanfast case was built: nothing to check)
            ref = None
        else:
            saved, layer.backend, checked_against = layer.backend, "reference", "kanfast-reference"
            try:
                ref = layer(x[:256])
            finally:
                layer.backend = saved
        for c in cases:
            if c.kind == "kan" and c.status == "ok":
                try:
                    check[c.label] = float((c.module(x[:256]) - ref).abs().max())
                except Exception as e:
                    c.status, c.note = "failed", f"{type(e).__name__}: {e}"
    cs = args.case_seconds
    timers: Dict[str, _Timer] = {}
    paths: Dict[str, List[bool]] = {}
    for c in cases:
        if c.status != "ok":
            continue
        fwd, fb, _ = _timers(c, x, gy, device)
        pred = plan.predicted.get(c.label)
        compiled = c.label.endswith("+compile")
        warm = args.warmup
        if cs is not None and pred is not None and pred > cs / 2 and not compiled:
            warm = 0  # a long eager step: its first call is as good as a later one
        if compiled:
            warm = max(1, warm)  # the compile happens in the warm-up
        first = None
        if c.label.startswith("kanfast-"):
            seen = paths[c.label] = []

            def first(fb=fb, seen=seen):
                with _path_spy() as s:
                    fb()
                seen.extend(s)
        timers[c.label] = _Timer(fwd, fb, warm, args, deadline, cs / 2 if (cs and not compiled) else None, first,
                                 compiled)
    if floor_ok:
        fpred = plan.predicted.get("floor")
        timers["floor"] = _Timer(floor_f, floor_b, 0 if (cs and fpred and fpred > cs / 2) else args.warmup, args, deadline,
                                 cs / 2 if cs else None)
    while True:
        live = [t for t in timers.values() if t.active()]
        if not live:
            break
        for t in live:
            t.step(device)
        progress(0)
    progress(1)
    if floor_ok:
        del Dm, Wm
    for c in cases:
        t = timers.get(c.label)
        if t is not None:
            if t.error is not None:
                c.status, c.note = "failed", t.error
            elif t.b:
                c.fwd, c.fb = t.f, t.b
    if not args.no_memory:
        for c in cases:
            if c.status != "ok":
                continue
            if deadline is not None and time.monotonic() > deadline and not c.label.startswith("kanfast-"):
                c.memory_note = "skipped: --time-budget spent"
                continue
            try:
                c.peak_extra, c.memory_note = _peak_extra_bytes(_timers(c, x, gy, device)[2], device)
            except Exception as e:
                c.memory_note = f"failed: {type(e).__name__}: {e}"
    fl = dense_flops(b, nin, nout, G, k)
    mlp_fl = 2 * b * nin * nout
    med = lambda v: statistics.median(v) * 1e3 if v else None  # noqa: E731
    fmin = lambda v: min(v) * 1e3 if v else None  # noqa: E731
    ref_times = {c.label: (med(c.fwd), med(c.fb)) for c in cases if c.fb}
    mlp_t = ref_times.get("mlp", (None, None))
    base_t = ref_times.get("materialized", (None, None))
    ft = timers.get("floor")
    floor = {"fwd_ms": med(ft.f) if ft else None, "fwd_bwd_ms": med(ft.b) if ft else None,
             "fwd_ms_min": fmin(ft.f) if ft else None, "fwd_bwd_ms_min": fmin(ft.b) if ft else None,
             "flops_fwd": fl, "flops_fwd_bwd": 3 * fl, "repeats": len(ft.b) if ft else 0,
             "status": "ok" if ft and ft.b else "skipped" if not floor_ok else "failed",
             "note": plan.skip.get("floor", "") if not floor_ok else (ft.error or "")}
    peers_t = {lb: t for lb, t in ref_times.items() if lb != "mlp" and not lb.startswith("kanfast-")}
    best = {j: min(peers_t.items(), key=lambda kv: kv[1][j]) if peers_t else None for j in (0, 1)}
    rows = []
    for c in cases:
        r: Dict[str, Any] = {"batch": b, "in": nin, "out": nout, "G": G, "k": k, "impl": c.label, "kind": c.kind,
                             "status": c.status, "note": c.note}
        if c.label in paths and c.fb:
            r["path"] = _path_name(c.label[len("kanfast-"):], paths[c.label])
        if c.fb:
            f_ms, fb_ms = med(c.fwd), med(c.fb)
            flops = mlp_fl if c.kind == "mlp" else fl
            ratio = lambda a, ref: a / ref if (ref and c.kind != "mlp") else None  # noqa: E731
            r.update({
                "fwd_ms": f_ms, "fwd_ms_min": fmin(c.fwd), "fwd_bwd_ms": fb_ms, "fwd_bwd_ms_min": fmin(c.fb),
                "repeats": len(c.fb), "warmup_s": timers[c.label].warmup_s,
                "fwd_samples_per_s": b / (f_ms / 1e3), "fwd_bwd_samples_per_s": b / (fb_ms / 1e3),
                "fwd_gflops": flops / (f_ms / 1e3) / 1e9, "fwd_bwd_gflops": 3 * flops / (fb_ms / 1e3) / 1e9,
                "fwd_vs_mlp": f_ms / mlp_t[0] if mlp_t[0] else None,
                "fwd_bwd_vs_mlp": fb_ms / mlp_t[1] if mlp_t[1] else None,
                "fwd_vs_materialized": f_ms / base_t[0] if base_t[0] else None,
                "fwd_bwd_vs_materialized": fb_ms / base_t[1] if base_t[1] else None,
                "fwd_vs_floor": ratio(f_ms, floor["fwd_ms"]),
                "fwd_bwd_vs_floor": ratio(fb_ms, floor["fwd_bwd_ms"]),
                "fwd_bwd_min_vs_floor_min": ratio(fmin(c.fb), floor["fwd_bwd_ms_min"]),
                "peak_extra_mb": c.peak_extra / 2**20 if c.peak_extra is not None else None,
                "memory_method": c.memory_note,
                "max_abs_diff_vs_materialized": check.get(c.label),
            })
            if c.kind == "kan":
                r["checked_against"] = checked_against
                for j, key in ((0, "fwd"), (1, "fwd_bwd")):
                    if best[j] is not None:
                        r[f"best_peer_{key}"] = best[j][0]
                        r[f"{key}_vs_best_peer"] = (f_ms, fb_ms)[j] / best[j][1][j]
        rows.append(r)
    floor.update({"batch": b, "in": nin, "out": nout, "G": G, "k": k})
    return rows, floor


def _release_shape(compiled: bool) -> None:
    """Between shapes: collect the shape's modules and autograd graphs, drop Dynamo's compiled code
    (its caches would keep every shape's graphs alive), free kanfast's kept work buffers and hand
    freed heap back to the OS, so that the next shape's memory check sees what is really free."""
    from kanfast.torch_backend import release_buffers

    release_buffers()
    gc.collect()
    if compiled:
        torch._dynamo.reset()
        gc.collect()
    _malloc_trim()


@contextlib.contextmanager
def _compile_limits():
    """torch.compile settings of a run with compiled variants: Dynamo's recompile limit (8 per
    function) is reached when a sweep builds a new module per shape, and past it Dynamo runs the
    function eagerly without a word, so a '+compile' row would time eager code. Raised to 256, and
    made an error (the row then fails with the reason) instead of a silent fallback."""
    import torch._dynamo.config as dcfg

    with dcfg.patch(recompile_limit=256, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True):
        yield


def _sweep_kind(args) -> Optional[str]:
    return "small" if getattr(args, "small", False) else "grid" if "grid" in (getattr(args, "sweep", None) or []) else None


def _apply_sweep_defaults(args: argparse.Namespace) -> None:
    """Fill the options a named sweep implies (idempotent; explicit options win): ``--sweep grid`` and
    ``--small`` time the compiled variants (unless ``--no-compile``) and take the budget defaults of
    :data:`SWEEP_BUDGETS`; ``--sweep grid`` times kanfast's ``torch`` backend only unless ``--backends``
    (its automatic path, recorded per row; the reference's Cox-de Boor tables are out of reach at G = 500)."""
    kind = _sweep_kind(args)
    defaults = SWEEP_BUDGETS.get(kind, {})
    for key in ("time_budget", "max_step_s", "case_seconds"):
        if getattr(args, key, None) is None:
            setattr(args, key, defaults.get(key))
    if kind is not None:
        args.compile = args.compile_peers = True
    if getattr(args, "no_compile", False):
        args.compile = args.compile_peers = False
    if kind == "grid" and args.backends is None:
        args.backends = ["torch"]


def _shapes(args) -> List[Tuple[int, int, int, int, int]]:
    if "grid" in args.sweep:  # G-major: a time budget that runs out cuts the largest G of every layer
        layers = args.layers or SWEEPS["grid"]["layers"]
        return [(b, i, o, G, k) for G in SWEEPS["grid"]["grid_size"] for k in args.spline_order for b, i, o in layers]
    lists = {"batch": args.batch, "grid_size": args.grid_size}
    for s in args.sweep:
        lists.update(SWEEPS[s])
    outs = args.out_features
    shapes = []
    for i, nin in enumerate(args.in_features):
        for nout in (outs if outs else [nin]):
            for G in lists["grid_size"]:
                for k in args.spline_order:
                    for b in lists["batch"]:
                        shapes.append((b, nin, nout, G, k))
    return shapes


def _print_table(rows: List[Dict[str, Any]], floors: List[Dict[str, Any]]) -> None:
    header = ["impl", "fwd ms", "f+b ms", "f+b samp/s", "vs mlp", "vs mat.", "vs floor", "vs best peer", "GFLOP/s",
              "peak MB", "reps", "status"]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["in"], r["out"], r["G"], r["k"]), []).append(r)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        Console = None
    for key, rs in groups.items():
        fl = next(f for f in floors if (f["batch"], f["in"], f["out"], f["G"], f["k"]) == key)
        title = (f"batch={key[0]} in={key[1]} out={key[2]} G={key[3]} k={key[4]}  |  dense floor: "
                 + (f"fwd {fmt(fl['fwd_ms'], '.2f')} ms, fwd+bwd {fmt(fl['fwd_bwd_ms'], '.2f')} ms"
                    if fl.get("fwd_bwd_ms") is not None else f"{fl.get('status')}: {fl.get('note')}"))
        body = []
        for r in rs:
            st = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
            if r.get("path"):
                st += f" ({r['path']} path)"
            body.append([r["impl"], fmt(r.get("fwd_ms"), ".2f"), fmt(r.get("fwd_bwd_ms"), ".2f"),
                         fmt(r.get("fwd_bwd_samples_per_s"), ".3g"), fmt(r.get("fwd_bwd_vs_mlp"), ".2f"),
                         fmt(r.get("fwd_bwd_vs_materialized"), ".2f"), fmt(r.get("fwd_bwd_vs_floor"), ".2f"),
                         fmt(r.get("fwd_bwd_vs_best_peer"), ".2f"), fmt(r.get("fwd_bwd_gflops"), ".1f"),
                         fmt(r.get("peak_extra_mb"), ".1f"), fmt(r.get("repeats"), "d"), st])
        if Console is not None:
            t = Table(title=title, title_justify="left")
            for h in header:
                t.add_column(h, justify="left" if h in ("impl", "status") else "right", overflow="fold")
            for row in body:
                t.add_row(*row)
            Console(width=max(120, min(200, os.get_terminal_size().columns if sys.stdout.isatty() else 160))).print(t)
        else:
            print(title)
            widths = [max(len(h), *(len(b[j]) for b in body)) for j, h in enumerate(header)]
            print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            for row in body:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
            print()


#: Sweep axes a figure can be drawn against, in panel-row order, with their axis labels (units).
_PLOT_AXES = (("G", "grid size G (intervals per feature)"), ("batch", "batch (samples)"),
              ("in", "in features"), ("out", "out features"), ("k", "spline order k"))
#: (key in a result row, key in a floor row, axis label, panel title); the floor has no memory entry.
_PLOT_METRICS = (("fwd_bwd_ms", "fwd_bwd_ms", "time per step (ms)", "forward+backward time"),
                 ("fwd_ms", "fwd_ms", "time per call (ms)", "forward time (no_grad)"),
                 ("peak_extra_mb", None, "peak extra memory (MiB)", "fwd+bwd peak extra memory"))
FLOOR_LABEL = "dense GEMM floor (3 matmuls)"
#: One look per implementation, the same in every figure: kanfast bold and warm, the floor black dashed,
#: baselines grey, peers thin and cool; a ``+compile`` variant is its eager twin dash-dotted with hollow markers.
_PLOT_STYLES = {
    "kanfast-torch": dict(color="#d62728", marker="o", lw=3.0, ms=8, zorder=6),
    "kanfast-reference": dict(color="#e6820e", marker="D", lw=2.6, ms=7, zorder=5),
    "kanfast-triton": dict(color="#7b3294", marker="s", lw=3.0, ms=8, zorder=6),
    "materialized": dict(color="#5a5a5a", marker="^", lw=1.6, ms=6, zorder=3),
    "mlp": dict(color="#9a9a9a", marker="x", lw=1.3, ms=6, ls=":", zorder=2),
    "pykan": dict(color="#1f77b4", marker="v", lw=1.3, ms=6, zorder=3),
    "flashkan": dict(color="#2ca02c", marker="s", lw=1.3, ms=6, zorder=3),
    "inkan": dict(color="#17becf", marker="P", lw=1.3, ms=7, zorder=3),
}
_FLOOR_STYLE = dict(color="black", ls="--", lw=1.7, zorder=7)


def _impl_style(impl: str) -> Dict[str, Any]:
    """Line style of an implementation (stable across figures; unknown names get a colour from their name)."""
    import zlib

    base, compiled = (impl[: -len("+compile")], True) if impl.endswith("+compile") else (impl, False)
    style = dict(_PLOT_STYLES.get(base) or dict(
        color=("#8c564b", "#bcbd22", "#9467bd", "#7f7f7f", "#e377c2")[zlib.crc32(base.encode()) % 5],
        marker="h", lw=1.3, ms=6, zorder=3))
    style.setdefault("ls", "-")
    if compiled:
        style.update(ls="-.", mfc="none", mew=1.6)
    return style


def _impl_order(impl: str) -> Tuple[int, int, str]:
    known = list(_PLOT_STYLES)
    base = impl.split("+")[0]
    rank = 0 if impl.startswith("kanfast-") else 2 if base in ("materialized", "mlp") else 3
    return rank, known.index(base) if base in known else len(known), impl


def _short_reason(r: Dict[str, Any]) -> str:
    note = r.get("note") or ""
    if r.get("status") == "missing":
        return "not installed"
    if "--max-elements" in note:
        return "skipped, tensors over --max-elements"
    if r.get("status") == "skipped" and note.startswith(("memory:", "time:", "time budget:")):
        return "skipped: " + note.split(":")[0]
    return f"{r.get('status')}: {note[:60]}" if note else str(r.get("status"))


def _plot_title(meta: Dict[str, Any], fixed: Dict[str, Any]) -> str:
    m = meta.get("machine") or {}
    where = m.get("gpu") or f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} " \
                            f"thread{'s' if m.get('torch_threads') != 1 else ''})"
    shape = " ".join(f"{k}={v}" for k, v in fixed.items())
    date = str(meta.get("date_utc", ""))[:10]
    head = f"kanfast bench: {shape}, {meta.get('dtype', '?')}, {meta.get('device', '?')}: {where}"
    reps = meta.get("repeats")
    tail = (f"median of {reps} repeats" if reps else "median") + (f", {date}" if date else "") + \
        "; lower is better; dashed black: the dense GEMM floor (the three matmuls of an exact dense-basis layer)"
    return head + "\n" + tail


def _log_if_wide(vals: Sequence[float], ratio: float = 10.0) -> bool:
    pos = [v for v in vals if v is not None and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) >= ratio


def _set_value_scale(ax, vals: Sequence[float], axis: str) -> None:
    """Log where the data spans a decade or more; symlog (linear below the smallest positive value's decade)
    when a value is 0."""
    import math

    vals = [v for v in vals if v is not None]
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if _log_if_wide(vals):
        if any(v <= 0 for v in vals):
            setter("symlog", linthresh=10.0 ** math.floor(math.log10(min(v for v in vals if v > 0))))
        else:
            setter("log")
    elif axis == "x":
        ax.set_xlim(left=0, right=max(vals) * 1.18 if vals else 1)
    else:
        ax.set_ylim(bottom=0, top=max(vals) * 1.12 if vals else 1)


def _plot(rows: List[Dict[str, Any]], path: Path, floors: Optional[List[Dict[str, Any]]] = None,
          meta: Optional[Dict[str, Any]] = None, force: bool = False):
    """Draw the figure of a run (rows/floors/meta as written to the JSON) to ``path`` (PNG).

    One row of panels per swept axis (G, batch, in, out, k: those with more than one value; the other axes fixed at
    their most common value): fwd+bwd time, forward time and peak memory against it, one line per implementation,
    the dense floor as a dashed reference line. A run of one shape gives horizontal bars instead. Panels without data
    are not drawn; implementations with no measurement are listed with their reason under the figure.
    An existing ``path`` is kept unless ``force``. Returns the (closed) ``matplotlib.figure.Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    floors = floors or []
    meta = meta or {}
    keys = [k for k, _ in _PLOT_AXES]
    shape_of = lambda r: tuple(r[k] for k in keys)  # noqa: E731
    ok = [r for r in rows if r.get("fwd_bwd_ms") is not None]
    shapes = [shape_of(r) for r in rows]
    if not ok:
        raise ValueError("no implementation has a measurement in these results: nothing to plot")
    common = max(dict.fromkeys(shapes), key=shapes.count)  # ties: the first shape of the run
    sweep = [k for k in keys if len({r[k] for r in rows}) > 1]
    metrics = [m for m in _PLOT_METRICS if any(r.get(m[0]) is not None for r in ok)]
    # a G sweep over several layers (--sweep grid): one row of panels per layer, time against G
    layer_keys = ("batch", "in", "out", "k")
    layers = list(dict.fromkeys(tuple(r[k] for k in layer_keys) for r in rows))
    if "G" in sweep and len(layers) > 1 and all(len({r["G"] for r in rows if tuple(r[k] for k in layer_keys) == lay}) > 1
                                                for lay in layers):
        panels = [("G", dict(zip(layer_keys, lay))) for lay in layers]
    else:
        panels = [(xkey, {k: common[i] for i, k in enumerate(keys) if k != xkey}) for xkey in sweep]
    nrows = max(1, len(panels))
    fig, axes = plt.subplots(nrows, len(metrics), figsize=(5.4 * len(metrics), 4.4 * nrows + 1.5), squeeze=False,
                             layout="constrained")
    drawn = set()
    floor_drawn = False
    if sweep:
        for row, (xkey, fixed) in enumerate(panels):
            sel = [r for r in ok if all(r[k] == v for k, v in fixed.items())]
            fsel = [f for f in floors if all(f[k] == v for k, v in fixed.items())]
            xvals = sorted({r[xkey] for r in rows if all(r[k] == v for k, v in fixed.items())})
            for col, (ykey, fkey, ylabel, what) in enumerate(metrics):
                ax = axes[row][col]
                yall = []
                for impl in sorted({r["impl"] for r in sel}, key=_impl_order):
                    pts = sorted((r[xkey], r[ykey]) for r in sel if r["impl"] == impl and r.get(ykey) is not None)
                    if pts:
                        st = _impl_style(impl)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **st)
                        yall += [p[1] for p in pts]
                        drawn.add(impl)
                if fkey:
                    fpts = sorted((f[xkey], f[fkey]) for f in fsel if f.get(fkey) is not None)
                    if fpts:
                        ax.plot([p[0] for p in fpts], [p[1] for p in fpts], label=FLOOR_LABEL, **_FLOOR_STYLE)
                        yall += [p[1] for p in fpts]
                        floor_drawn = True
                ax.set_xlabel(dict(_PLOT_AXES)[xkey])
                ax.set_ylabel(ylabel)
                _set_value_scale(ax, yall, "y")
                if xkey == "G" and len(panels) > 1 and fkey and yall and min(yall) > 0:
                    ax.set_yscale("log")  # time against G per layer: log-log
                if _log_if_wide(xvals, 8.0):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_locator(NullLocator())
                else:
                    ax.set_xlim(min(xvals) - 0.08 * (max(xvals) - min(xvals)),
                                max(xvals) + 0.08 * (max(xvals) - min(xvals)))
                ax.xaxis.set_major_locator(FixedLocator(xvals))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                other = ", ".join(f"{k}={v}" for k, v in fixed.items() if k in sweep)
                ax.set_title(f"{what} vs {xkey}" + (f" ({other})" if other else ""), fontsize=11)
                ax.grid(True, which="major", alpha=0.35)
                ax.grid(True, which="minor", alpha=0.12)
        title_fixed = {k: common[i] for i, k in enumerate(keys) if k not in sweep}
        if len(panels) > 1 and all(x == "G" for x, _ in panels):
            title_fixed = {k: v for k, v in panels[0][1].items() if all(f.get(k) == v for _, f in panels)}
    else:  # one shape: horizontal bars, kanfast on top
        impls = sorted({r["impl"] for r in ok}, key=_impl_order)
        floor = floors[0] if floors else {}
        for col, (ykey, fkey, ylabel, what) in enumerate(metrics):
            ax = axes[0][col]
            bars = [(i, next(r[ykey] for r in ok if r["impl"] == i)) for i in impls
                    if next(r for r in ok if r["impl"] == i).get(ykey) is not None]
            ypos = list(range(len(bars)))[::-1]
            for y, (impl, v) in zip(ypos, bars):
                st = _impl_style(impl)
                ax.barh(y, v, color=st["color"], alpha=0.9 if impl.startswith("kanfast-") else 0.55,
                        edgecolor="black" if impl.startswith("kanfast-") else "none", lw=1.5,
                        hatch="//" if impl.endswith("+compile") else None, label=impl)
                ax.annotate(f" {v:.3g}", (v, y), va="center", fontsize=8)
                drawn.add(impl)
            ax.set_yticks(ypos, [b[0] for b in bars])
            for t in ax.get_yticklabels():
                if t.get_text().startswith("kanfast-"):
                    t.set_fontweight("bold")
            vals = [b[1] for b in bars]
            if fkey and floor.get(fkey) is not None:
                ax.axvline(floor[fkey], label=FLOOR_LABEL, **_FLOOR_STYLE)
                vals.append(floor[fkey])
                floor_drawn = True
            _set_value_scale(ax, vals, "x")
            ax.set_xlabel(ylabel)
            ax.set_title(what, fontsize=11)
            ax.grid(True, axis="x", which="both", alpha=0.3)
        title_fixed = dict(zip(keys, common))
    fig.suptitle(_plot_title(meta, title_fixed), fontsize=11)
    # bars carry their names on the axis; lines need a legend entry each
    handles = [Line2D([], [], label=i, **_impl_style(i)) for i in sorted(drawn, key=_impl_order)] if sweep else []
    if floor_drawn:
        handles.insert(sum(1 for i in drawn if i.startswith("kanfast-")),
                       Line2D([], [], label=FLOOR_LABEL, **_FLOOR_STYLE))
    # what is not drawn, and why (the JSON has the full notes)
    missing: Dict[Tuple[str, str], List[Any]] = {}
    for r in rows:
        if r.get("fwd_bwd_ms") is None:
            if panels and all(x == "G" for x, _ in panels) and len(panels) > 1:  # per layer: its G values
                where = f"{r['in']}->{r['out']} b{r['batch']}: G={r['G']}"
            else:
                where = ", ".join(f"{k}={r[k]}" for k in sweep) or "this shape"
            missing.setdefault((r["impl"], _short_reason(r)), []).append(where)
    note = ""
    if missing:
        parts = []
        for (impl, why), where in sorted(missing.items(), key=lambda kv: _impl_order(kv[0][0])):
            merged: Dict[str, List[str]] = {}
            for w in where:  # "layer: G=a" entries -> "layer: G=a,b,c"
                head, _, g = w.rpartition(": G=")
                merged.setdefault(head if head else w, []).append(g) if head else merged.setdefault(w, [])
            where = [f"{h}: G={','.join(gs)}" if gs else h for h, gs in merged.items()]
            at = "" if len(where) == len({shape_of(r) for r in rows}) else " at " + "; ".join(where)
            parts.append(f"{impl}{at} ({why})")
        note = "not drawn: " + ", ".join(parts)
    zeros = sorted({r["impl"] for r in ok if r.get("peak_extra_mb") is not None and r["peak_extra_mb"] <= 0
                    and "RSS" in str(r.get("memory_method"))}, key=_impl_order)
    if zeros:  # the RSS high-water method reads 0 when the step reused pages the process already held
        note += ("; " if note else "") + (f"peak extra memory 0 ({', '.join(zeros)}): the step stayed within pages "
                                          "the process already held (RSS high-water mark, page granularity)")
    if note:
        import textwrap

        note = textwrap.fill(note, 200)
    # bottom strip (inches): the note's lines, then the legend's rows above it; the panels fill the rest
    ncol = max(1, min(5, len(handles)))
    note_h = (0.3 + 0.16 * note.count("\n")) if note else 0.08
    legend_h = (0.12 + 0.24 * -(-len(handles) // ncol)) if handles else 0.0
    H = fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, (note_h + legend_h) / H, 1, 1 - (note_h + legend_h) / H))
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, note_h / H), ncol=ncol, fontsize=9.5,
                   frameon=False, columnspacing=2.2, borderaxespad=0.1)
    if note:
        fig.text(0.5, 0.06 / H, note, ha="center", va="bottom", fontsize=8.5, color="#444444")
    path = Path(path)
    with open_output(path, force, "wb") as fh:
        fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return fig


def plot_results(json_path, png_path=None, force: bool = False):
    """Re-draw the figure of a ``kanfast bench`` JSON without rerunning anything.

    Args:
        json_path: a JSON written by ``kanfast bench`` (``meta``, ``floors``, ``results``).
        png_path: the PNG to write (default: ``json_path`` with the suffix ``.png``).
        force: overwrite an existing PNG (else FileExistsError).

    Returns:
        the ``matplotlib.figure.Figure`` (closed; its axes and artists can still be inspected).

    Raises:
        ValueError: the file is not a bench result or has no measurement. OSError: unreadable file.
    """
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{json_path} is not a kanfast bench result (no 'results' list)")
    png = Path(png_path) if png_path else json_path.with_suffix(".png")
    if "models" in (data.get("meta") or {}):  # a --small run
        return _plot_small(data["results"], png, data["meta"], force)
    return _plot(data["results"], png, data.get("floors") or [], data.get("meta") or {}, force)


def _csv_path(out: Path) -> Path:
    return out.with_suffix(".csv")


def estimate_bytes(shape: Tuple[int, int, int, int, int], itemsize: int) -> int:
    """Bytes one shape ``(batch, in, out, G, k)`` of the run holds at its peak, estimated from what it
    allocates: the dense floor's basis matrix ``batch x in*(G+k+1)`` and weight, the materialized
    baseline's Cox-de Boor table (``batch x in x (G+2k+1)`` per order, ``3k+3`` tables kept for
    backward), inputs, outputs and their gradients, and the parameters and gradients of every case."""
    b, nin, nout, G, k = shape
    width = nin * (G + k + 1)
    elements = (b * width + nout * width + b * nin * (G + 2 * k + 1) * (3 * k + 3)
                + 8 * b * (nin + nout) + 8 * nout * width)
    return elements * itemsize


def check_arguments(args: argparse.Namespace) -> None:
    """Everything ``run`` needs, checked before any work: the device, backends, peers, the shapes,
    the output files (see :func:`kanfast.cli_checks.check_outputs`; ``--force`` to overwrite) and
    the memory the largest shape needs (:func:`estimate_bytes`); with ``--replot``, only that the
    JSON can be read and the figure written. Raises ValueError (one line)."""
    if getattr(args, "replot", None) is not None:
        if not Path(args.replot).is_file():
            raise ValueError(f"--replot {str(args.replot)!r}: no such file")
        png = Path(args.plot) if args.plot else Path(args.replot).with_suffix(".png")
        check_outputs([("--plot", png)], force=getattr(args, "force", False), suffixes={"--plot": IMAGE_SUFFIXES})
        return
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    _apply_sweep_defaults(args)
    if "grid" in args.sweep and len(set(args.sweep)) > 1:
        raise ValueError("--sweep grid runs its own layers (--layers); run --sweep batch separately")
    if getattr(args, "small", False) and args.sweep:
        raise ValueError("--small and --sweep are separate runs; give one of them")
    if args.layers is not None and "grid" not in args.sweep:
        raise ValueError("--layers sets the layers of --sweep grid; for other runs use --batch/--in-features/--out-features")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    backends = args.backends or ["torch", "reference"]
    bad = [b for b in backends if b not in ("torch", "reference", "triton")]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; choose from torch, reference, triton")
    peers = [] if args.peers in (["none"], []) else args.peers
    from .baselines import PEERS

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {sorted(PEERS)}")
    shapes = _shapes(args)
    if any(b < 1 or i < 1 or o < 1 or G < 1 or k < 0 for b, i, o, G, k in shapes):
        raise ValueError("batch, in, out and G must be >= 1, k >= 0")
    out = Path(args.out)
    if str(args.out).isdigit():
        raise ValueError(f"--out is the JSON output path, got {str(args.out)!r}; for the layer width use --out-features")
    if _csv_path(out) == out:
        raise ValueError(f"--out {str(out)!r} is the JSON path; the CSV is written next to it as <name>.csv, "
                         f"so give a JSON name such as {str(out.with_suffix('.json'))!r}")
    check_outputs([("--out", out), ("the CSV next to --out", _csv_path(out)), ("--plot", args.plot)],
                  force=getattr(args, "force", False), suffixes={"--plot": IMAGE_SUFFIXES})
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    if args.max_step_s is not None or args.time_budget is not None:
        # a budgeted run skips, at run time, the cases that do not fit (recorded as 'skipped: memory');
        # here only the smallest shape's kanfast case and dense floor must fit
        need, biggest = min((sum(_case_bytes("kanfast-torch", s, itemsize)) + sum(_case_bytes("floor", s, itemsize)), s)
                            for s in shapes)
    else:
        need, biggest = max((estimate_bytes(s, itemsize), s) for s in shapes)
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    check_memory(need, "the shape batch={} in={} out={} G={} k={}".format(*biggest), available,
                 hint="choose smaller --batch/--in-features/--out-features/--grid-size")


def _partial_path(out: Path) -> Path:
    return out.with_name(out.stem + ".partial.json")


def _write_partial(out: Path, meta: Dict[str, Any], floors: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> None:
    """The shapes measured so far, as ``OUT.partial.json`` (``meta.partial`` true), rewritten after each
    shape and removed once the run's own outputs are written: a run stopped part-way (memory watch,
    time limit, Ctrl-C) still leaves its data. Written to a temporary file, then renamed."""
    path = _partial_path(out)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"meta": {**meta, "partial": True}, "floors": floors, "results": rows}, fh, indent=1)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_arguments`). Returns the exit code
    (0 on success, 2 on bad arguments, checked by :func:`check_arguments` before any work).
    With ``--replot JSON`` only the figure of that earlier run is drawn (nothing is timed)."""
    try:
        check_arguments(args)
    except ValueError as e:
        print(f"kanfast bench: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "replot", None) is not None:
        try:
            plot_results(args.replot, args.plot, getattr(args, "force", False))
        except (OSError, ValueError, KeyError) as e:
            print(f"kanfast bench: --replot {args.replot}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"wrote {args.plot or Path(args.replot).with_suffix('.png')}")
        return 0
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "small", False):
        return run_small(args, device, dtype)
    backends = args.backends or (["torch", "reference"] + (["triton"] if device.type == "cuda" else []))
    peers = [] if args.peers in (["none"], []) else args.peers
    shapes = _shapes(args)
    started = _dt.datetime.now(_dt.timezone.utc)
    meta: Dict[str, Any] = {
        "date_utc": started.isoformat(timespec="seconds"),
        "command": ("kanfast bench " + " ".join(args._argv)) if getattr(args, "_argv", None) is not None
        else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "argv": sys.argv,
        "machine": _machine(device),
        "versions": _versions(),
        "cpu_block_kernels": _cpu_kernels_info(),
        "git": _git_commit(),
        "device": str(device),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "shapes": [dict(zip(("batch", "in", "out", "G", "k"), s)) for s in shapes],
        "timing": "median (and min) wall-clock over repeats after warm-up, implementations interleaved per repeat; "
                  "forward under torch.no_grad(); fwd_bwd = forward + backward(gy) with input and parameters requiring grad",
        "memory": "peak_extra_mb: fwd+bwd peak beyond parameters, gradients, input and output. CPU: resident-set "
                  "high-water mark (VmHWM reset via /proc/self/clear_refs) over the resident set before the step, after "
                  "gc + malloc_trim + kanfast.torch_backend.release_buffers() (so kept work buffers are counted); "
                  "CUDA: max_memory_allocated",
        "flops": "dense-equivalent: 2*batch*in*(G+k+1)*out forward, 3x for fwd+bwd (MLP: 2*batch*in*out, 3x)",
        "floor": "three torch.matmul: (batch x in*(G+k+1)) @ (.. x out) forward; gy^T @ D and gy @ W backward",
    }
    budgeted = args.time_budget is not None or args.max_step_s is not None or args.case_seconds is not None
    if budgeted:
        meta["budget"] = {
            "time_budget_s": args.time_budget, "max_step_s": args.max_step_s, "case_seconds": args.case_seconds,
            "rule": "per shape, before building: a case whose estimated memory does not fit in MEMORY_FRACTION (0.6) of MemAvailable "
                    "(kanfast and the floor first; each transient the larger of the estimate and the case's "
                    "peak measured at the previous G, scaled by (G+k+1)) is skipped ('memory: ...'); a baseline or peer whose fwd + "
                    "fwd+bwd step, predicted from the previous G of the same layer scaled by (G+k+1), exceeds "
                    "max_step_s is skipped ('time: ...'); a case predicted to end past the time budget, counting the "
                    "shape's cases kept before it and a compiled case's compile time at the previous G, is skipped "
                    "('time budget: ...'). Timed repeats per case: up to --repeats, stopping once case_seconds are "
                    "spent or the budget is (at least one); no warm-up for an eager step predicted over "
                    "case_seconds/2; compiled cases always get one warm-up (the compile; its time is warmup_s)",
        }
    rows: List[Dict[str, Any]] = []
    floors: List[Dict[str, Any]] = []
    deadline = time.monotonic() + args.time_budget if args.time_budget is not None else None
    history: Dict[Tuple, Tuple] = {}  # (G, fwd s, fwd+bwd s[, warm-up s]) at the last G
    peaks: Dict[Tuple, Tuple[int, float]] = {}  # measured transient bytes per case and layer, at the last G
    labels = _case_labels(args, backends, peers)
    itemsize = torch.empty((), dtype=dtype).element_size()
    with contextlib.ExitStack() as stack, \
            tqdm(total=len(shapes), disable=args.no_progress, desc="kanfast bench", unit="shape", file=sys.stderr) as bar:
        if args.compile or args.compile_peers:
            stack.enter_context(_compile_limits())
        for shape in shapes:
            bar.set_postfix_str("batch={} in={} out={} G={} k={}".format(*shape))
            plan = _plan_shape(shape, labels, args, history, deadline, peaks) if budgeted else None
            r, f = _run_shape(shape, args, device, dtype, backends, peers, bar.update, plan, deadline)
            _release_shape(args.compile or args.compile_peers)
            rows += r
            floors.append(f)
            b, i, o, G, k = shape
            for row in r:
                if row.get("fwd_bwd_ms") is not None:
                    history[(row["impl"], b, i, o, k)] = (G, row["fwd_ms"] / 1e3, row["fwd_bwd_ms"] / 1e3,
                                                          row.get("warmup_s"))
                if row.get("peak_extra_mb") is not None:  # + the output and input gradient it excludes
                    peaks[(row["impl"], b, i, o, k)] = (G, row["peak_extra_mb"] * 2**20 + b * (i + o) * itemsize)
            if f.get("fwd_bwd_ms") is not None:
                history[("floor", b, i, o, k)] = (G, f["fwd_ms"] / 1e3, f["fwd_bwd_ms"] / 1e3)
            _write_partial(Path(args.out), meta, floors, rows)
    if not args.no_first_call and device.type == "cpu":
        meta["first_call"] = _first_call(shapes[0], args.dtype, args.threads)
    meta["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["elapsed_s"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    out = Path(args.out)
    with open_output(out, getattr(args, "force", False)) as fh:
        json.dump({"meta": meta, "floors": floors, "results": rows}, fh, indent=1)
    _partial_path(out).unlink(missing_ok=True)
    fields = ["batch", "in", "out", "G", "k", "impl", "kind", "status", "note", "fwd_ms", "fwd_ms_min", "fwd_bwd_ms",
              "fwd_bwd_ms_min", "fwd_samples_per_s", "fwd_bwd_samples_per_s", "fwd_gflops", "fwd_bwd_gflops",
              "fwd_vs_mlp", "fwd_bwd_vs_mlp", "fwd_vs_materialized", "fwd_bwd_vs_materialized", "fwd_vs_floor",
              "fwd_bwd_vs_floor", "fwd_bwd_min_vs_floor_min", "fwd_vs_best_peer", "fwd_bwd_vs_best_peer",
              "best_peer_fwd", "best_peer_fwd_bwd", "path", "repeats", "warmup_s", "peak_extra_mb", "memory_method",
              "max_abs_diff_vs_materialized", "checked_against"]
    with open_output(_csv_path(out), getattr(args, "force", False), newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        for f in floors:
            w.writerow({"batch": f["batch"], "in": f["in"], "out": f["out"], "G": f["G"], "k": f["k"],
                        "impl": "dense-floor", "kind": "floor", "status": f.get("status", "ok"),
                        "note": f.get("note", ""), "fwd_ms": f["fwd_ms"], "fwd_ms_min": f["fwd_ms_min"],
                        "fwd_bwd_ms": f["fwd_bwd_ms"], "fwd_bwd_ms_min": f["fwd_bwd_ms_min"],
                        "repeats": f.get("repeats")})
    if args.plot:
        _plot(rows, Path(args.plot), floors, meta, getattr(args, "force", False))
    if not args.quiet:
        _print_table(rows, floors)
        fc = meta.get("first_call")
        if fc and fc.get("status") == "ok":
            print(f"first call in a fresh process (torch backend, shape {fc['shape']}): import {fc['import_s']:.2f} s, "
                  f"first fwd+bwd {fc['first_fwd_bwd_s']:.3f} s, second {fc['second_fwd_bwd_s']:.3f} s; "
                  f"first fwd+bwd on this machine (CPU block kernels built) {fc['first_fwd_bwd_cold_cache_s']:.3f} s")
        print(f"wrote {out} and {_csv_path(out)}" + (f" and {args.plot}" if args.plot else ""))
    return 0


#: ``kanfast bench --small``: (label, layer widths, batch): the KAN paper's tiny networks
#: (Liu et al. 2024, sec. 3: [2,5,1], [4,16,16,1]), the digits model and an MNIST-sized one,
#: and two single layers.
SMALL_MODELS = [("KAN[2,5,1]", [2, 5, 1], 1000), ("KAN[4,16,16,1]", [4, 16, 16, 1], 64),
                ("KAN[64,32,10]", [64, 32, 10], 256), ("KAN[784,64,10]", [784, 64, 10], 128),
                ("layer 64->64", [64, 64], 1024), ("layer 256->256", [256, 256], 4096)]


def run_small(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    """``kanfast bench --small``: each model of :data:`SMALL_MODELS` as a stack of layers of every
    implementation (kanfast's torch backend and reference, efficient-kan's formulation
    (``materialized``) eager and ``torch.compile``d, the peers when installed (pykan eager,
    flashkan and inkan eager and compiled; ``--no-compile``: eager only), an MLP of the same widths
    (Linear+SiLU per layer)), all with the same parameters and knots (MLP and peers excepted),
    timed in one process, implementations interleaved per repeat. Each compiled variant is
    compiled once per model (in its warm-up, whose time is the row's ``warmup_s``) and reused by
    every repeat. Each sample times as many calls as take >= 5 ms (at most 200; per-call time
    reported): forward under ``torch.no_grad()`` (inference), and forward+backward; wall clock and
    the process's CPU time. Repeats: ``--repeats``, fewer for an implementation that has spent
    ``--case-seconds`` (default 1 s here) after 3 of them. Ratios per row: to the MLP, to the
    materialized baseline, and for kanfast's rows to the fastest peer of the same model
    (``*_vs_best_peer``, ``best_peer_*``: every non-kanfast KAN, eager or compiled); kanfast-torch's
    row records the engine that ran (``path``). Writes the JSON/CSV (+ ``--plot`` PNG: per model,
    fwd+bwd and forward time of each implementation, the styles of :func:`_plot`) like :func:`run`;
    ``floors`` is empty (models, not one GEMM)."""
    from tqdm import tqdm

    from .baselines import PEERS

    G, k = args.grid_size[0], args.spline_order[0]
    peers = [] if args.peers in (["none"], []) else [p for p in args.peers if p in PEERS]
    started = _dt.datetime.now(_dt.timezone.utc)
    machine = _machine(device)
    load = machine.get("loadavg_start")
    meta: Dict[str, Any] = {
        "date_utc": started.isoformat(timespec="seconds"),
        "command": "kanfast bench " + " ".join(getattr(args, "_argv", None) or sys.argv[1:]),
        "machine": machine, "versions": _versions(), "cpu_block_kernels": _cpu_kernels_info(), "git": _git_commit(),
        "device": str(device), "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "G": G, "k": k,
        "case_seconds": args.case_seconds, "compiled_variants": bool(args.compile or args.compile_peers),
        "models": [{"label": m[0], "widths": m[1], "batch": m[2]} for m in SMALL_MODELS],
        "timing": "median over repeats of the per-call time of a sample of n calls (n: >= 5 ms per sample, <= 200), "
                  "implementations interleaved per repeat; forward under torch.no_grad(); fwd_bwd = forward + "
                  "backward(gy) with input and parameters requiring grad. *_ms: wall clock; *_cpu_ms: the process's "
                  "CPU time (all its threads) per call, less affected by other processes on a loaded host. "
                  "Repeats stop for an implementation that has spent case_seconds after 3 of them. warmup_s: the "
                  "warm-up calls (for +compile rows: the compile)",
        "host_load": (f"load average {load[0]:.1f} on {machine['cpu_count']} CPUs at the start: the host was loaded "
                      "(other processes); times are upper bounds" if load and load[0] > 0.5 * (machine["cpu_count"] or 1)
                      else "quiet host"),
    }
    rows: List[Dict[str, Any]] = []
    limits = _compile_limits() if (args.compile or args.compile_peers) else contextlib.nullcontext()
    with limits:
        for label, widths, b in tqdm(SMALL_MODELS, disable=args.no_progress, desc="kanfast bench --small", file=sys.stderr):
            rows += _small_model(label, widths, b, G, k, args, device, dtype, peers)
    meta["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["elapsed_s"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    out = Path(args.out)
    force = getattr(args, "force", False)
    with open_output(out, force) as fh:  # (checked before any work by check_arguments)
        json.dump({"meta": meta, "floors": [], "results": rows}, fh, indent=1)
    fields = ["model", "widths", "batch", "in", "out", "G", "k", "impl", "kind", "status", "note", "fwd_ms",
              "fwd_ms_min", "fwd_bwd_ms", "fwd_bwd_ms_min", "fwd_samples_per_s", "fwd_bwd_samples_per_s", "fwd_vs_mlp",
              "fwd_bwd_vs_mlp", "fwd_vs_materialized", "fwd_bwd_vs_materialized", "fwd_vs_best_peer",
              "fwd_bwd_vs_best_peer", "best_peer_fwd", "best_peer_fwd_bwd", "path", "repeats", "warmup_s",
              "fwd_cpu_ms", "fwd_bwd_cpu_ms", "max_abs_diff_vs_materialized"]
    with open_output(_csv_path(out), force, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if args.plot:
        _plot_small(rows, Path(args.plot), meta, force)
    if not args.quiet:
        fmt = lambda v, s: "" if v is None else format(v, s)  # noqa: E731
        print(f"{'model':16s} {'impl':22s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd/mlp':>8s} {'f+b/mlp':>8s} "
              f"{'fwd/best':>8s} {'f+b/best':>8s} {'reps':>4s}  status")
        for r in rows:
            st = r["status"] + (": " + r["note"] if r["status"] != "ok" else "") + (f" ({r['path']} path)" if r.get("path") else "")
            print(f"{r['model']:16s} {r['impl']:22s} {fmt(r.get('fwd_ms'), '9.3f'):>9s} {fmt(r.get('fwd_bwd_ms'), '9.3f'):>9s} "
                  f"{fmt(r.get('fwd_vs_mlp'), '8.2f'):>8s} {fmt(r.get('fwd_bwd_vs_mlp'), '8.2f'):>8s} "
                  f"{fmt(r.get('fwd_vs_best_peer'), '8.2f'):>8s} {fmt(r.get('fwd_bwd_vs_best_peer'), '8.2f'):>8s} "
                  f"{fmt(r.get('repeats'), '4d'):>4s}  {st}")
        print(f"{meta['host_load']}; elapsed {meta['elapsed_s']:.0f} s; wrote {out} and {_csv_path(out)}"
              + (f" and {args.plot}" if args.plot else ""))
    return 0


def _small_model(label, widths, b, G, k, args, device, dtype, peers) -> List[Dict[str, Any]]:
    """The rows of one model of :func:`run_small`."""
    from kanfast import KAN

    from .baselines import MaterializedKAN, PeerStatus, compile_module, make_peers, mlp

    torch.manual_seed(0)
    kan = KAN(widths, grid_size=G, spline_order=k).to(device=device, dtype=dtype)
    pairs = list(zip(widths[:-1], widths[1:]))
    impls: List[Tuple[str, str, Any]] = []
    for be in ("torch", "reference"):
        m = KAN(widths, grid_size=G, spline_order=k).to(device=device, dtype=dtype)
        m.load_state_dict(kan.state_dict())
        m.backend = be
        impls.append((f"kanfast-{be}", "kan", m))
    mat = nn.Sequential(*[MaterializedKAN.from_layer(layer) for layer in kan.layers])
    impls.append(("materialized", "baseline", mat))
    if args.compile:
        impls.append(("materialized+compile", "baseline",
                      compile_module(nn.Sequential(*[MaterializedKAN.from_layer(layer) for layer in kan.layers]))))
    impls.append(("mlp", "mlp", nn.Sequential(*[mlp(i, o, device=device, dtype=dtype) for i, o in pairs])))
    for compiled in ([False, True] if args.compile_peers else [False]):
        per_layer = [make_peers(peers, i, o, G, k, (-1.0, 1.0), device=device, dtype=dtype, compiled=compiled)
                     for i, o in pairs]
        for j, (plabel, first) in enumerate(per_layer[0] if per_layer else []):
            mods = [pl[j][1] for pl in per_layer]
            bad = next((m for m in mods if isinstance(m, PeerStatus)), None)
            impls.append((plabel, "peer", bad if bad is not None else nn.Sequential(*mods)))
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(b, widths[0], generator=gen, dtype=dtype) * 2 - 1).to(device)
    gy = torch.randn(b, widths[-1], generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        y_mat = mat(x)
    calls, samples, notes, warm_s, paths = {}, {}, {}, {}, {}
    for name, kind, mod in impls:
        if isinstance(mod, PeerStatus):
            notes[name] = (mod.status, mod.reason)
            continue
        params = [p for p in mod.parameters() if p.requires_grad]

        def fwd(mod=mod):
            with torch.no_grad():
                return mod(x)

        def fb(mod=mod, params=params):
            for p in params:
                p.grad = None
            mod(x.detach().requires_grad_(True)).backward(gy)

        try:
            t0 = time.perf_counter()
            diff = (fwd() - y_mat).abs().max().item() if kind != "mlp" and not name.startswith(
                ("pykan", "flashkan", "inkan")) else None
            n = {}
            for tag, fn in (("fwd", fwd), ("fb", fb)):
                for w in range(max(1, args.warmup)):
                    if name == "kanfast-torch" and tag == "fb" and w == 0:
                        with _path_spy() as seen:
                            fn()
                        paths[name] = list(seen)
                    else:
                        fn()
                t = _timed(fn, device)
                n[tag] = int(min(200, max(1, 0.005 // max(t, 1e-7))))
            warm_s[name] = time.perf_counter() - t0
        except Exception as e:
            notes[name] = ("failed", f"{type(e).__name__}: {str(e)[:300]}")
            continue
        calls[name] = (fwd, fb, n, kind, diff)
        samples[name] = {"fwd": [], "fb": [], "fwd_cpu": [], "fb_cpu": []}
    cs = args.case_seconds
    for rep in range(args.repeats):
        for name, (fwd, fb, n, _, _) in calls.items():
            s = samples[name]
            if rep >= 3 and (s["fb"][0] > 0.5 or (cs is not None and sum(s["fwd"]) * n["fwd"] + sum(s["fb"]) * n["fb"] > cs)):
                continue  # calls over 0.5 s (the reference on wide layers), or --case-seconds spent: 3 repeats
            for tag, fn in (("fwd", fwd), ("fb", fb)):
                try:
                    c0 = time.process_time()
                    s[tag].append(_timed(lambda fn=fn, m=n[tag]: [fn() for _ in range(m)], device) / n[tag])
                    s[tag + "_cpu"].append((time.process_time() - c0) / n[tag])
                except Exception as e:
                    notes[name] = ("failed", f"run: {type(e).__name__}: {str(e)[:300]}")
    med = {nm: (statistics.median(s["fwd"]) * 1e3, statistics.median(s["fb"]) * 1e3) for nm, s in samples.items()
           if nm not in notes and s["fb"]}
    mlp_t, mat_t = med.get("mlp"), med.get("materialized")
    peers_t = {nm: t for nm, t in med.items() if nm != "mlp" and not nm.startswith("kanfast-")}
    best = {j: min(peers_t.items(), key=lambda kv: kv[1][j]) if peers_t else None for j in (0, 1)}
    rows = []
    for name, kind, _ in impls:
        r: Dict[str, Any] = {"model": label, "widths": "-".join(map(str, widths)), "batch": b, "in": widths[0],
                             "out": widths[-1], "G": G, "k": k, "impl": name,
                             "kind": calls[name][3] if name in calls else kind}
        if name not in med:
            r["status"], r["note"] = notes.get(name, ("failed", ""))
            rows.append(r)
            continue
        f_ms, fb_ms = med[name]
        r.update({"status": "ok", "note": f"{calls[name][2]['fwd']}/{calls[name][2]['fb']} calls per sample",
                  "fwd_ms": f_ms, "fwd_ms_min": min(samples[name]["fwd"]) * 1e3, "fwd_bwd_ms": fb_ms,
                  "fwd_bwd_ms_min": min(samples[name]["fb"]) * 1e3, "fwd_samples_per_s": b / (f_ms / 1e3),
                  "fwd_bwd_samples_per_s": b / (fb_ms / 1e3), "repeats": len(samples[name]["fb"]),
                  "warmup_s": warm_s[name],
                  "fwd_vs_mlp": f_ms / mlp_t[0] if mlp_t else None, "fwd_bwd_vs_mlp": fb_ms / mlp_t[1] if mlp_t else None,
                  "fwd_vs_materialized": f_ms / mat_t[0] if mat_t else None,
                  "fwd_bwd_vs_materialized": fb_ms / mat_t[1] if mat_t else None,
                  "fwd_cpu_ms": statistics.median(samples[name]["fwd_cpu"]) * 1e3,
                  "fwd_bwd_cpu_ms": statistics.median(samples[name]["fb_cpu"]) * 1e3,
                  "max_abs_diff_vs_materialized": calls[name][4]})
        if name in paths:
            r["path"] = _path_name("torch", paths[name], len(pairs))
        if kind == "kan":
            for j, key in ((0, "fwd"), (1, "fwd_bwd")):
                if best[j] is not None:
                    r[f"best_peer_{key}"] = best[j][0]
                    r[f"{key}_vs_best_peer"] = (f_ms, fb_ms)[j] / best[j][1][j]
        rows.append(r)
    return rows


def _plot_small(rows: List[Dict[str, Any]], path: Path, meta: Dict[str, Any], force: bool = False):
    """The figure of a ``--small`` run: per model (x), fwd+bwd and forward time of each
    implementation as grouped bars in the colours of :func:`_impl_style` (kanfast outlined,
    ``+compile`` hatched), log scale; what has no measurement is listed under the figure."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("fwd_bwd_ms") is not None]
    if not ok:
        raise ValueError("no implementation has a measurement in these results: nothing to plot")
    models = list(dict.fromkeys(r["model"] for r in rows))
    batch = {r["model"]: r["batch"] for r in rows}
    names = sorted({r["impl"] for r in ok}, key=_impl_order)
    fig, axes = plt.subplots(2, 1, figsize=(max(12, 2.2 * len(models)), 10), layout="constrained")
    width = 0.84 / max(1, len(names))
    m = meta.get("machine") or {}
    for ax, key, what in ((axes[0], "fwd_bwd_ms", "forward+backward"), (axes[1], "fwd_ms", "forward (no_grad, inference)")):
        for j, nm in enumerate(names):
            st = _impl_style(nm)
            vals = [next((r[key] for r in ok if r["model"] == md and r["impl"] == nm), float("nan")) for md in models]
            kan = nm.startswith("kanfast-")
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(models))], vals, width, label=nm,
                   color=st["color"], alpha=0.95 if kan else 0.6, edgecolor="black" if kan else st["color"],
                   lw=1.4 if kan else 0.6, hatch="//" if nm.endswith("+compile") else None)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{md}\nbatch {batch[md]}" for md in models], fontsize=9)
        ax.set_yscale("log")
        ax.set_ylabel("time per call (ms, median)")
        ax.set_title(f"{what} time per call", fontsize=11)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    threads = m.get("torch_threads")
    fig.suptitle(f"kanfast bench --small: G={meta.get('G')} k={meta.get('k')}, {meta.get('dtype', '?')}, "
                 f"{meta.get('device', '?')}: {m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} CPUs, {threads} "
                 f"thread{'s' if threads != 1 else ''}), {str(meta.get('date_utc', ''))[:10]}\n"
                 f"{meta.get('host_load', '')}; lower is better; +compile: torch.compile (hatched)", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, ncol=min(6, len(names)), loc="outside lower center", frameon=False)
    missing: Dict[Tuple[str, str], List[str]] = {}
    for r in rows:
        if r.get("fwd_bwd_ms") is None:
            missing.setdefault((r["impl"], _short_reason(r)), []).append(r["model"])
    if missing:
        parts = [f"{impl}{'' if len(w) == len(models) else ' at ' + ', '.join(w)} ({why})"
                 for (impl, why), w in sorted(missing.items(), key=lambda kv: _impl_order(kv[0][0]))]
        axes[1].set_xlabel(textwrap.fill("not drawn: " + "; ".join(parts), 180), fontsize=8.5, color="#444444")
    path = Path(path)
    with open_output(path, force, "wb") as fh:
        fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m kanfast.benchmarks.bench``: the same as ``kanfast bench``."""
    parser = argparse.ArgumentParser(prog="kanfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args._argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        check_arguments(args)
    except ValueError as e:
        parser.error(str(e))
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
