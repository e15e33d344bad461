"""Static speed model of the fused Triton KAN kernels: ahead-of-time compile, SASS, floors.

    python3 benchmarks/gpu_model.py --batch 65536 --in 1024 --out 1024 --grid 5 --order 3 --dtype bf16 --json PATH
    python3 benchmarks/gpu_model.py --sweep [--jobs 8]   # compile every launcher config: sm_90/sm_80 x dtypes x k x knots

The command line models the fused kernels whatever the wide-layer rule would pick
(``triton_backend`` forced to its fused path; ``benchmarks/wide_model.py`` models the
wide path). No GPU is needed (triton's wheel ships ptxas and nvdisasm). This is a MODEL, not a
measurement: it gives each kernel's floor at a shape from its compiled code.

How
---
1. **Capture.** The launchers of :mod:`kanfast.triton_backend` (``_forward``,
   ``_backward``) run on ``meta`` tensors of the requested shape (the knots are real
   CPU tensors: uniformity and the knot tables are computed as on the GPU), with
   ``Autotuner.run`` / ``JITFunction.run`` replaced by a recorder. So the model sees
   exactly the arguments, grid function and autotune configs a CUDA launch at that
   shape gets (the GPU's SM count, 132, stands in for ``torch.cuda``). Torch ops the
   launchers run besides the kernels (``part.sum(0)``, permuted copies, a GEMM)
   are recorded by a dispatch mode and modelled as HBM/tensor-core time.
2. **Compile.** Each captured launch is bound through the kernel's own JIT binder
   (``create_function_from_signature`` + ``native_specialize_impl``, the code a
   launch runs), with tensors replaced by objects whose ``data_ptr()`` is 256-byte
   aligned plus the storage offset, so the stride-1 and divisible-by-16
   specialisations are the ones a launch produces, and compiled with
   ``triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))`` for every
   autotune config. ptxas' ``-v`` log gives registers and spills, the compiled
   metadata the shared memory.
3. **SASS.** ``nvdisasm -g`` on the cubin; loops are found from back-edges (a
   ``BRA`` to an earlier address) and mapped through the line info to the source
   ``for`` line, whose ``range(...)`` is evaluated with the launch's arguments and
   the data assumptions below (trip counts). Dynamic instructions per warp = sum over
   instructions of the product of the trip counts of the loops around them.
4. **Floors** (per kernel, the max of): issue slots (instructions x warps /
   (132 SMs x 4 schedulers x 1.98 GHz), one instruction per scheduler per clock),
   the MUFU pipe (16 lanes/clock/SM) and the load/store pipe (32 lanes/clock/SM),
   tensor-core time at 790 TFLOP/s (bf16/fp16; tf32 at half; the HGMMA/HMMA shapes
   in the SASS give the FLOPs issued, padding included), HBM at 4.3 TB/s (every
   tensor argument moved once) and L2 (the bytes the SASS loads and stores, at an
   assumed L2 bandwidth). Issue and tensor floors are divided by the last wave's
   fill (wave quantisation over ``132 x CTAs/SM``). The autotuner's pick is
   modelled as the config with the lowest modelled time; every config is listed.

The model cannot see latency (dependent loads, MUFU and HGMMA latency, barriers),
how well software pipelining hides loads, L2 hit rates (it assumes each tensor
comes from HBM once), bank conflicts, or issue contention beyond the pipes above;
it is a floor, not a prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import datetime
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a plain checkout: the script imports the kanfast next to it
    sys.path.insert(0, str(REPO))

from kanfast import triton_backend as tb  # noqa: E402
from kanfast.benchmarks.bench import _git_commit, _versions  # noqa: E402  (the harness's provenance helpers)
from kanfast.knots import uniform_grid  # noqa: E402

# ----------------------------------------------------------------- machine
#: NVIDIA H200 (SXM) figures the model uses. Tensor rate: an 8192^3 bf16 torch.matmul measured 769-798
#: TFLOP/s on the H200 lent to this project; the rest are the H100/H200 architecture figures.
H200 = {
    "name": "NVIDIA H200 (sm_90)",
    "sms": 132,
    "schedulers_per_sm": 4,
    "clock_ghz": 1.98,
    "tensor_tflops_16bit": 790.0,  # bf16/fp16 dense, measured cuBLAS rate (8192^3) on the lent H200 kind
    "tensor_tflops_tf32": 395.0,  # half the 16-bit rate (architecture ratio), assumed
    "fp32_simt_tflops": 2 * 128 * 132 * 1.98e9 / 1e12,  # FFMA, 128 lanes/SM/clock
    "hbm_tb_s": 4.3,  # H200 HBM3e, ~90% of the 4.8 TB/s datasheet figure
    "l2_tb_s": 8.0,  # ASSUMED L2->SM bandwidth (not measured here; H100 microbenchmarks report ~6-10 TB/s)
    "mufu_lanes_per_sm_clock": 16,
    "lsu_lanes_per_sm_clock": 32,
    "regs_per_sm": 65536,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_cta": 1024,
    "max_warps_per_sm": 64,
    "max_ctas_per_sm": 32,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Values of the kernels' data-dependent loop bounds. Random inputs spread over the grid: every
#: (row tile, input tile) touches every interval, so the j-range of a tile is the full [0, G + k).
DATA_ASSUMPTIONS = {
    "j_lo": 0,
    "j_hi": "NB",
    "n_start": 0,
    "n_end": "min(rows_per_split, N)",
}


# ----------------------------------------------------------------- tools
def tool_paths() -> Dict[str, Optional[str]]:
    """ptxas / nvdisasm shipped in triton's wheel (None when missing)."""
    out = {}
    for name in ("ptxas", "nvdisasm"):
        try:
            path = getattr(knobs.nvidia, name).path
        except Exception:  # noqa: BLE001 - triton raises RuntimeError("Cannot find ...") when it is absent
            path = None
        out[name] = path if path and os.path.exists(path) else None
    return out


@functools.lru_cache(maxsize=None)
def compile_module():
    """A private copy of kanfast/kernels/kan_spline.py decorated for compilation (never the
    interpreter), whatever TRITON_INTERPRET says (the tests' conftest sets it)."""
    path = Path(tb.__file__).resolve().parent / "kernels" / "kan_spline.py"
    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        spec = importlib.util.spec_from_file_location("kanfast.kernels._kan_spline_aot", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    if getattr(mod, "INTERPRETED", False):  # pragma: no cover
        raise RuntimeError("kan_spline loaded under the interpreter; cannot compile ahead of time")
    return mod


# ----------------------------------------------------------------- capture
@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher issued it."""

    name: str
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: Any
    configs: List[Any]  # triton.Config list (one pseudo-config for a plain JIT launch)


class _OpRecorder(TorchDispatchMode):
    """Torch ops the launchers run besides the kernels: GEMM FLOPs and bytes moved."""

    #: GEMM ops -> positions of their two matrix operands among the positional arguments (an
    #: ``out=`` tensor or the added input is never an operand).
    GEMMS = {"mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "addmm_": (1, 2),
             "baddbmm": (1, 2), "baddbmm_": (1, 2)}
    FREE = {"empty", "empty_like", "new_empty", "permute", "t", "transpose", "view", "detach", "alias",
            "expand", "select", "slice", "unsqueeze", "squeeze", "as_strided", "_unsafe_view", "empty_strided",
            "new_empty_strided", "lift_fresh", "_to_copy_noop"}

    def __init__(self):
        super().__init__()
        self.ops: List[Dict[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in self.FREE:
            return out
        tens = [a for a in _flat(args) + _flat(kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(t.device.type == "meta" for t in tens):
            return out  # knot tables on CPU: not GPU work at the modelled shape
        outs = [o for o in _flat([out]) if isinstance(o, torch.Tensor)]
        uniq = list({id(t): t for t in tens + outs}.values())  # an out= tensor is also the result
        nbytes = sum(t.numel() * t.element_size() for t in uniq)
        flops = 0
        if name in self.GEMMS:
            ia, ib = self.GEMMS[name]
            a, b = args[ia], args[ib]
            flops = 2 * a.numel() * b.shape[-1]  # (.., m, k) @ (.., k, n)
        self.ops.append({"op": name, "bytes": nbytes, "flops": flops,
                         "shapes": [list(t.shape) for t in tens]})
        return out


def _flat(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def make_grid(nin: int, G: int, k: int, uniform: bool) -> torch.Tensor:
    """Knots (nin, G + 2k + 1) on [-1, 1]: uniform, or uniform with interior knots jittered."""
    g = uniform_grid(nin, G, k, (-1.0, 1.0), dtype=torch.float32)
    if not uniform:
        h = 2.0 / G
        jit = torch.linspace(-0.2, 0.2, g.shape[1]) * h
        jit[0] = jit[-1] = 0.0
        g = g + jit  # still increasing: |jitter| < h / 2
    return g


def capture(batch: int, nin: int, nout: int, G: int, k: int, dtype: torch.dtype, *, uniform: bool = True,
            base: bool = True, ieee: bool = False, sms: int = H200["sms"], kmod=None) -> Dict[str, Dict[str, list]]:
    """The kernel launches and other torch ops of the forward, grad_x and grad_W passes at a shape.

    Runs ``triton_backend._forward`` and ``_backward`` (once for grad_x, once for grad_W and
    grad_base_weight) on meta tensors with every triton launch recorded instead of run;
    ``kmod`` (default :func:`compile_module`) provides the kernels. Returns
    ``{phase: {"launches": [Launch], "ops": [dict]}}``.
    """
    kmod = kmod or compile_module()
    launches: List[Launch] = []

    def record_autotuner(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        launches.append(Launch(self.fn.fn.__name__, self.fn, args, kwargs, grid, list(self.configs)))

    def record_jit(self, *args, grid, warmup, **kwargs):
        cfg = triton.Config({}, num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))
        launches.append(Launch(self.fn.__name__, self, args, kwargs, grid, [cfg]))

    x = torch.empty(batch, nin, dtype=dtype, device="meta")
    gy = torch.empty(batch, nout, dtype=dtype, device="meta")
    coef = torch.empty(nout, nin, G + k, dtype=dtype, device="meta")
    bw = torch.empty(nout, nin, dtype=dtype, device="meta") if base else None
    grid = make_grid(nin, G, k, uniform)
    props = SimpleNamespace(multi_processor_count=sms, name="modelled")
    orig_kernels = tb._kernels
    orig_split = getattr(tb, "_split_rows", None)
    phases = {
        "forward": lambda: tb._forward(x, grid, coef, bw, k, ieee),
        "grad_x": lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, True, False, False),
        "grad_W": lambda: tb._backward(gy, x, grid, coef, bw, k, ieee, False, True, base),
    }
    out: Dict[str, Dict[str, list]] = {}
    with contextlib.ExitStack() as st:
        st.callback(setattr, Autotuner, "run", Autotuner.run)
        st.callback(setattr, JITFunction, "run", JITFunction.run)
        st.callback(setattr, tb, "_kernels", orig_kernels)
        Autotuner.run = record_autotuner
        JITFunction.run = record_jit
        tb._kernels = lambda device: kmod
        if orig_split is not None:  # the launcher asks torch.cuda for the SM count
            st.callback(setattr, tb, "_split_rows", orig_split)
            st.callback(setattr, torch.cuda, "get_device_properties", torch.cuda.get_device_properties)
            torch.cuda.get_device_properties = lambda *a, **kw: props
            tb._split_rows = lambda N, n, device: orig_split(N, n, torch.device("cuda"))
        for phase, call in phases.items():
            rec = _OpRecorder()
            launches.clear()
            with rec:
                call()
            out[phase] = {"launches": list(launches), "ops": rec.ops}
    return out


# ----------------------------------------------------------------- bind + compile
class _Ptr:
    """Stands in for a tensor argument: dtype and a data_ptr() with the tensor's alignment
    (allocations 256-byte aligned, plus the storage offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 32) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def _meta_nbytes(t: torch.Tensor) -> int:
    """Bytes a (possibly strided) tensor spans."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return span * t.element_size()


@dataclasses.dataclass
class Compiled:
    name: str
    arch: int
    config: Dict[str, Any]
    bound: Dict[str, Any]
    signature: Dict[str, str]
    attrs: Dict[str, Any]
    regs: int
    spill_stores: int
    spill_loads: int
    smem: int
    num_warps: int
    num_stages: int
    ptxas_log: str
    disasm: "Disassembly"
    grid: Tuple[int, int, int]
    kernel: Any = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def sass(self) -> str:
        """nvdisasm -g text (waits for the disassembler, started at compile time)."""
        return self.disasm.text()


def bind(fn: JITFunction, args: tuple, kwargs: dict, arch: int):
    """(bound args, specialization, options, signature, constexprs, attrs) as a launch on ``arch`` gets them."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    a = tuple(_Ptr(v) if isinstance(v, torch.Tensor) else v for v in args)
    kw = {n: (_Ptr(v) if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    bound, spec, options = binder(*a, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    return target, backend, bound, options, signature, constexprs, attrs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def compile_launch(launch: Launch, config, arch: int = 90, options: Optional[Dict[str, Any]] = None) -> Compiled:
    """Compile ``launch`` with autotune ``config`` for sm_``arch`` (no GPU); registers and spills
    from ptxas -v, shared memory from the compiled metadata, SASS from nvdisasm. ``options``:
    extra triton compile options (e.g. ``{"maxnreg": 64}``)."""
    kwargs = {**launch.kwargs, **config.all_kwargs(), **(options or {})}
    target, backend, bound, options, signature, constexprs, attrs = bind(launch.fn, launch.args, kwargs, arch)
    src = ASTSource(launch.fn, signature, constexprs, attrs)
    buf = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # the ptxas log exists only when ptxas runs
        kernel = triton.compile(src, target=target, options=options.__dict__)
    log = buf.getvalue()
    regs = max((int(m) for m in _PTXAS_RE["regs"].findall(log)), default=-1)
    st = ld = 0
    for s, l in _PTXAS_RE["spill"].findall(log):
        st, ld = st + int(s), ld + int(l)
    sass = Disassembly(kernel.asm["cubin"])  # runs beside the caller's next compile
    meta = {k: (v.value if hasattr(v, "value") else v) for k, v in bound.items()}
    g = launch.grid(meta) if callable(launch.grid) else launch.grid
    g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
    cfg = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return Compiled(launch.name, arch, cfg, meta, {k: str(v) for k, v in signature.items()},
                    {str(k): v for k, v in attrs.items()}, regs, st, ld, int(kernel.metadata.shared),
                    options.num_warps, options.num_stages, log, sass, g, kernel)


class Disassembly:
    """``nvdisasm -c -g`` (code with line info) of a cubin, started at once in a subprocess; ``text()``
    waits for it."""

    def __init__(self, cubin: bytes):
        nvdisasm = tool_paths()["nvdisasm"]
        if nvdisasm is None:
            raise RuntimeError("nvdisasm not found in the triton wheel")
        self._dir = tempfile.mkdtemp(prefix="kanfast_gpu_model_")
        path = os.path.join(self._dir, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        self._proc = subprocess.Popen([nvdisasm, "-c", "-g", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        self._text: Optional[str] = None

    def text(self) -> str:
        if self._text is None:
            out, err = self._proc.communicate()
            shutil.rmtree(self._dir, ignore_errors=True)
            if self._proc.returncode != 0:
                raise RuntimeError(f"nvdisasm failed ({self._proc.returncode}): {err.strip()[:2000]}")
            self._text = out
        return self._text


def check_compiled(c: Compiled, dtype: str) -> List[str]:
    """What the AOT-compile test rejects in a compiled config: register spills in a bf16/fp16
    kernel, and a sm_90 bf16/fp16 kernel without HGMMA (wgmma). Empty when it passes."""
    bad = []
    if dtype in ("bf16", "fp16") and c.spills:
        bad.append(f"{c.name} {c.config}: spills {c.spill_stores} B stores / {c.spill_loads} B loads "
                   f"({c.regs} registers)")
    if c.arch == 90 and dtype in ("bf16", "fp16") and not re.search(r"^\s+/\*[0-9a-f]+\*/\s+(@!?P\w+\s+)?HGMMA",
                                                                     c.sass, re.M):
        bad.append(f"{c.name} {c.config}: no HGMMA (wgmma) in the sm_90 SASS")
    return bad


# ----------------------------------------------------------------- SASS
_INS = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$")
_FILE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FOR = re.compile(r"^\s*for\s+\w+\s+in\s+(?:tl\.)?range\((.*)\)\s*:")
_WIDTH = re.compile(r"\.(128|64|U16|S16|U8|S8)\b")

#: Instruction classes reported per loop (first match wins).
CLASSES = [
    ("tma", ("UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP")),
    ("hgmma", ("HGMMA",)),
    ("hmma", ("HMMA",)),
    ("mufu", ("MUFU",)),
    ("spill", ("LDL", "STL")),
    ("ldgsts", ("LDGSTS",)),
    ("ldg", ("LDG",)),
    ("stg", ("STG",)),
    ("lds", ("LDS", "LDSM")),
    ("sts", ("STS",)),
    ("fp32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FCHK")),
    ("select", ("FSEL", "SEL", "P2R", "R2P", "PLOP3")),
    ("convert", ("F2F", "F2FP", "I2F", "F2I", "PRMT")),
    ("sync", ("BAR", "DEPBAR", "WARPGROUP", "LDGDEPBAR", "MEMBAR", "FENCE", "WARPSYNC", "SYNCS")),
    ("branch", ("BRA", "EXIT", "CALL", "RET", "BSSY", "BSYNC")),
    ("int", ("IMAD", "IADD", "LEA", "LOP", "SHF", "ISETP", "VIADD", "VIMNMX", "IMNMX", "IABS", "SHL", "SHR", "MOV",
             "CS2R", "S2R", "S2UR", "U", "POPC", "FLO", "BREV", "SGXT", "BMSK", "ISCADD", "IMUL")),
]
LSU_CLASSES = ("spill", "ldgsts", "ldg", "stg", "lds", "sts")  # TMA copies bypass the LSU: not counted


def _klass(op: str) -> str:
    for name, prefixes in CLASSES:
        if any(op == p or op.startswith(p + ".") or (p == "U" and op.startswith("U")) for p in prefixes):
            return name
    return "other"


@dataclasses.dataclass
class Ins:
    addr: int
    op: str  # mnemonic with modifiers, no predicate
    text: str
    file: Optional[str]
    line: Optional[int]


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    file: Optional[str]
    line: Optional[int]
    source: str = ""
    trips: Optional[float] = None
    trips_expr: str = ""
    depth: int = 0


def parse_sass(sass: str) -> Tuple[List[Ins], List[Loop], Dict[str, Any]]:
    """Instructions of the kernel's main body (subroutines after the final trap excluded)
    and its loops (back-edges), innermost last."""
    ins: List[Ins] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    cur = (None, None)
    for raw in sass.splitlines():
        m = _FILE_LINE.search(raw)
        if m:
            cur = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        text = m.group(2).strip()
        body = _PRED.sub("", text)
        op = body.split()[0].rstrip(";") if body else ""
        for lab in pending:
            labels[lab] = addr
        pending = []
        ins.append(Ins(addr, op, text, cur[0], cur[1]))
    # main body: up to the self-branch trap after the last EXIT (subroutines follow it)
    end = len(ins)
    for n, it in enumerate(ins):
        t = _TARGET.search(it.text)
        if it.op.startswith("BRA") and t and labels.get(t.group(1)) == it.addr:
            end = n
            break
    info = {"static_instructions": end, "subroutine_instructions": len(ins) - end}
    ins = ins[:end]
    loops = []
    for it in ins:
        t = _TARGET.search(it.text)
        if it.op.startswith("BRA") and t and t.group(1) in labels and labels[t.group(1)] < it.addr:
            loops.append(Loop(labels[t.group(1)], it.addr, it.file, it.line))
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end)
    loops.sort(key=lambda lp: lp.depth)
    return ins, loops, info


_SRC_CACHE: Dict[str, List[str]] = {}


def _source_line(path: Optional[str], line: Optional[int]) -> str:
    if not path or not line:
        return ""
    if path not in _SRC_CACHE:
        try:
            _SRC_CACHE[path] = Path(path).read_text().splitlines()
        except OSError:
            _SRC_CACHE[path] = []
    lines = _SRC_CACHE[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def resolve_trips(loops: List[Loop], ins: List[Ins], env: Dict[str, Any]) -> List[str]:
    """Trip count of each loop from its source ``for ... in range(...)`` line evaluated in ``env``
    (launch arguments, config, DATA_ASSUMPTIONS). Returns the problems met (unresolved loops count once)."""
    problems = []
    ns: Dict[str, Any] = {"min": min, "max": max, "cdiv": triton.cdiv}
    ns.update(env)
    for name, val in DATA_ASSUMPTIONS.items():
        try:  # an assumption naming an argument this kernel does not have does not apply to it
            ns[name] = eval(val, {"__builtins__": {}}, ns) if isinstance(val, str) else val
        except NameError:
            pass
    for lp in loops:
        cands = [(lp.file, lp.line)]
        inner = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        body = [it for it in ins if lp.start <= it.addr <= lp.end
                and not any(o.start <= it.addr <= o.end for o in inner)]
        for it in reversed(body):
            cands.append((it.file, it.line))
        for f, ln in cands:
            m = _FOR.match(_source_line(f, ln))
            if m:
                lp.file, lp.line, lp.source = f, ln, _source_line(f, ln).strip()
                lp.trips_expr = m.group(1)
                try:
                    lp.trips = float(len(eval(f"range({m.group(1)})", {"__builtins__": {}}, {**ns, "range": range})))
                except Exception as e:  # noqa: BLE001
                    problems.append(f"line {ln}: cannot evaluate range({m.group(1)}): {e}")
                break
        if lp.trips is None:
            lp.trips = 1.0
            problems.append(f"loop at {lp.start:#x}..{lp.end:#x} (line {lp.line}): no evaluable for-line, counted once")
    return problems


_MMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}


def mma_flops(op: str) -> int:
    """FLOPs of one HGMMA (per warpgroup) or HMMA (per warp) instruction."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c
    m = re.match(r"HMMA\.(\d+)", op)
    if m and m.group(1) in _MMA_SHAPES:
        a, b, c = _MMA_SHAPES[m.group(1)]
        return 2 * a * b * c
    return 0


def _bytes_per_lane(op: str) -> int:
    m = _WIDTH.search(op)
    if not m:
        return 4
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[m.group(1)]


def dynamic_counts(ins: List[Ins], loops: List[Loop]) -> Dict[str, Any]:
    """Per-warp dynamic instruction counts by class, HGMMA/HMMA FLOPs, global bytes (per lane x 32)."""
    by_class: Dict[str, float] = {}
    flops = 0.0
    flops_tf32 = 0.0
    mma_kind = None
    gbytes = 0.0
    total = 0.0
    for it in ins:
        mult = 1.0
        for lp in loops:
            if lp.start <= it.addr <= lp.end:
                mult *= lp.trips
        c = _klass(it.op)
        by_class[c] = by_class.get(c, 0.0) + mult
        total += mult
        f = mma_flops(it.op)
        if f:
            flops += mult * f
            if "TF32" in it.op:
                flops_tf32 += mult * f
            mma_kind = "hgmma" if it.op.startswith("HGMMA") else "hmma"
        if c in ("ldg", "ldgsts", "stg"):
            gbytes += mult * _bytes_per_lane(it.op) * 32
    return {"total": total, "by_class": by_class, "mma_flops": flops, "mma_flops_tf32": flops_tf32, "mma_kind": mma_kind, "global_bytes": gbytes}


def loop_table(ins: List[Ins], loops: List[Loop]) -> Dict[str, Any]:
    """Static instruction counts by class per loop body (inner loops excluded), with trip counts."""
    out = {}
    for lp in loops:
        inner = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        body = [it for it in ins if lp.start <= it.addr <= lp.end
                and not any(o.start <= it.addr <= o.end for o in inner)]
        counts: Dict[str, int] = {}
        for it in body:
            c = _klass(it.op)
            counts[c] = counts.get(c, 0) + 1
        mma = sorted({it.op.split(" ")[0] for it in body if mma_flops(it.op)})
        key = f"line {lp.line}: {lp.source or '?'}"
        if key in out:
            key += f" @{lp.start:#x}"
        out[key] = {"depth": lp.depth, "trips": lp.trips, "trips_expr": lp.trips_expr,
                    "instructions": len(body), "by_class": dict(sorted(counts.items())), "mma": mma}
    return out


# ----------------------------------------------------------------- model
def occupancy(regs: int, smem: int, warps: int, m: Dict[str, Any] = H200) -> Dict[str, Any]:
    """CTAs per SM from registers (allocated per warp in 256-register units), shared memory and warps."""
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (m["regs_per_sm"] // per_warp) // warps
    by_smem = m["smem_per_sm"] // (smem + m["smem_reserved_per_cta"]) if smem else m["max_ctas_per_sm"]
    by_warps = m["max_warps_per_sm"] // warps
    ctas = max(0, min(by_regs, by_smem, by_warps, m["max_ctas_per_sm"]))
    limit = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                 ("CTA slots", m["max_ctas_per_sm"])), key=lambda t: t[1])[0]
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "limited_by": limit}


def model_compiled(c: Compiled, hbm_bytes: int, m: Dict[str, Any] = H200) -> Dict[str, Any]:
    """Floors of one compiled launch (ms) and the bound that binds; ``hbm_bytes``: the bytes the
    launch must move to or from HBM (its tensor arguments, once)."""
    ins, loops, info = parse_sass(c.sass)
    env = {**c.bound, **c.config}
    problems = resolve_trips(loops, ins, env)
    dyn = dynamic_counts(ins, loops)
    occ = occupancy(c.regs, c.smem, c.num_warps, m)
    ctas = c.grid[0] * c.grid[1] * c.grid[2]
    slots = m["sms"] * max(occ["ctas_per_sm"], 1)
    waves = ctas / slots
    tail = waves / math.ceil(waves) if waves > 0 else 1.0
    clk = m["clock_ghz"] * 1e9
    warps_total = c.num_warps * ctas
    issue_s = dyn["total"] * warps_total / (m["sms"] * m["schedulers_per_sm"] * clk) / tail
    mufu_s = dyn["by_class"].get("mufu", 0.0) * warps_total * 32 / (m["mufu_lanes_per_sm_clock"] * m["sms"] * clk) / tail
    lsu = sum(dyn["by_class"].get(k, 0.0) for k in LSU_CLASSES)
    lsu_s = lsu * warps_total * 32 / (m["lsu_lanes_per_sm_clock"] * m["sms"] * clk) / tail
    groups = c.num_warps / 4 if dyn["mma_kind"] == "hgmma" else c.num_warps
    tc_flops = dyn["mma_flops"] * groups * ctas
    tf32 = dyn["mma_flops_tf32"] * groups * ctas
    tensor_s = ((tc_flops - tf32) / m["tensor_tflops_16bit"] + tf32 / m["tensor_tflops_tf32"]) / 1e12 / tail
    hbm_s = hbm_bytes / (m["hbm_tb_s"] * 1e12)
    l2_bytes = dyn["global_bytes"] * warps_total
    l2_s = l2_bytes / (m["l2_tb_s"] * 1e12)
    bounds = {"issue": issue_s, "mufu": mufu_s, "lsu": lsu_s, "tensor": tensor_s, "hbm": hbm_s, "l2": l2_s}
    bound = max(bounds, key=bounds.get)
    return {
        "kernel": c.name,
        "config": c.config,
        "modelled_ms": bounds[bound] * 1e3,
        "bound": bound,
        "bounds_ms": {k: round(v * 1e3, 4) for k, v in bounds.items()},
        "regs": c.regs,
        "spills": c.spills,
        "spill_bytes": {"stores": c.spill_stores, "loads": c.spill_loads},
        "smem": c.smem,
        **occ,
        "grid": list(c.grid),
        "ctas": ctas,
        "waves": round(waves, 3),
        "tail_efficiency": round(tail, 3),
        "instructions_per_warp": dyn["total"],
        "instructions_by_class_per_warp": {k: v for k, v in sorted(dyn["by_class"].items())},
        "tensor_flops": tc_flops,
        "mma": dyn["mma_kind"],
        "hbm_bytes": hbm_bytes,
        "l2_bytes": l2_bytes,
        "static_instructions": info["static_instructions"],
        "subroutine_instructions_not_counted": info["subroutine_instructions"],
        "loop_instructions": loop_table(ins, loops),
        "specialisation": {k: v for k, v in c.signature.items() if v != "constexpr"},
        "attrs": {k: str(v) for k, v in c.attrs.items()},
        "problems": problems,
    }


def hbm_bytes_of(launch: Launch) -> int:
    """Bytes of every tensor argument of a launch (each read or written at least once)."""
    seen = set()
    total = 0
    for v in list(launch.args) + list(launch.kwargs.values()):
        if isinstance(v, torch.Tensor):
            key = (v.device.type, id(v.untyped_storage()) if v.device.type != "meta" else id(v))
            if key in seen:
                continue
            seen.add(key)
            total += _meta_nbytes(v)
    return total


def model_ops(ops: List[Dict[str, Any]], m: Dict[str, Any] = H200) -> Dict[str, Any]:
    """Torch ops besides the kernels: GEMMs at the tensor rate, the rest at HBM bandwidth."""
    ms = 0.0
    rows = []
    for o in ops:
        t = max(o["flops"] / (m["tensor_tflops_16bit"] * 1e12), o["bytes"] / (m["hbm_tb_s"] * 1e12)) * 1e3
        ms += t
        rows.append({**o, "modelled_ms": round(t, 4)})
    return {"modelled_ms": ms, "ops": rows}


# ----------------------------------------------------------------- driver
def model_launch(launch: Launch, arch: int = 90, configs: Optional[List[int]] = None,
                 m: Dict[str, Any] = H200) -> Dict[str, Any]:
    """Compile and model every autotune config of a launch (or those indexed by ``configs``);
    the pick is the one with the lowest modelled time (the autotuner times them and keeps the fastest)."""
    hbm = hbm_bytes_of(launch)
    rows = []
    idx = range(len(launch.configs)) if configs is None else configs
    for i in idx:
        c = compile_launch(launch, launch.configs[i], arch)
        r = model_compiled(c, hbm, m)
        r["config_index"] = i
        rows.append(r)
    best = min(rows, key=lambda r: r["modelled_ms"])
    return {"chosen": best, "all_configs": [
        {k: r[k] for k in ("kernel", "config_index", "config", "modelled_ms", "bound", "bounds_ms", "regs", "spills", "smem",
                           "ctas_per_sm", "limited_by", "instructions_per_warp", "tensor_flops")} for r in rows]}


ASSUMPTIONS = {
    "machine": H200,
    "issue": "one warp instruction per scheduler per clock (4 per SM), every SASS instruction of the main body "
             "counted (uniform-datapath ones too); instructions after the kernel's trap (the IEEE division "
             "slow path) not counted",
    "pipes": "MUFU 16 lanes/clock/SM, load/store unit 32 lanes/clock/SM (a warp LDG/LDS/STS/LDGSTS/LDSM = one "
             "32-lane op)",
    "tensor": "FLOPs from the HGMMA (per warpgroup) / HMMA (per warp) shapes in the SASS times their dynamic "
              "count (padding and masked tiles included); 790 TFLOP/s bf16/fp16, 395 TF32",
    "hbm": "every tensor argument of a launch moved once (perfect reuse through L2): a lower bound",
    "l2": "every global load/store the SASS issues, 32 lanes x its width, at the assumed L2 bandwidth "
          "(machine.l2_tb_s, not measured); masked lanes counted as full",
    "trip_counts": "each SASS loop (back-edge) mapped through the line info to its source for-line, range() "
                   "evaluated with the launch's arguments and config; data-dependent bounds: "
                   + json.dumps(DATA_ASSUMPTIONS) + " (random inputs spread over the grid); forward branches "
                   "(if/else, empty-loop guards) counted as taken; pipelined prologue/epilogue counted once",
    "tail": "issue, pipe and tensor floors divided by the last wave's fill: ctas / (132 x CTAs per SM), "
            "rounded up",
    "autotune": "each config compiled and modelled; the chosen one is the lowest modelled time",
    "torch_ops": "ops the launchers run besides the kernels (weight permutes, partial sums) at HBM bandwidth "
                 "(bytes of inputs and outputs) or the tensor rate for GEMMs",
}

BLIND_SPOTS = [
    "latency: dependent global/shared loads, MUFU and HGMMA latency, barriers, warpgroup waits "
    "(with one or two CTAs of 8 warps per SM, 2-4 warps per scheduler hide little of it)",
    "software pipelining: whether cp.async/TMA prefetch really overlaps the math",
    "L2 hit rates and HBM re-reads: the HBM floor assumes each tensor comes from HBM once",
    "shared-memory bandwidth and bank conflicts (wgmma operands from shared memory, ldmatrix)",
    "dual issue, register-bank and operand-collector stalls, instruction-cache misses",
    "data-dependent branches: forward branches counted as taken, the per-tile j-range taken as the full range",
    "launch overhead (a few us per kernel) and the clock (1.98 GHz boost assumed sustained)",
    "TMA copies (UTMALDG/UTMASTG, counted as instructions under 'tma'): their bytes are not in the L2 figure",
]

UNITS = {
    "modelled_ms": "milliseconds, the largest floor of the pass (kernels + torch ops)",
    "bounds_ms": "each floor in milliseconds (issue, mufu, lsu, tensor, hbm, l2)",
    "regs": "registers per thread (ptxas -v)",
    "spills": "bytes of spill stores + spill loads (ptxas -v)",
    "smem": "bytes of shared memory per CTA (compiled metadata)",
    "ctas_per_sm": "resident CTAs per SM from registers, shared memory and warps",
    "loop_instructions": "per SASS loop: static instruction counts by class in its body (inner loops excluded), "
                         "trip count at the shape",
    "instructions_per_warp": "dynamic SASS instructions one warp issues",
}


def run_model(batch: int, nin: int, nout: int, G: int, k: int, dtype: torch.dtype, *, uniform: bool = True,
              base: bool = True, ieee: bool = False, arch: int = 90, m: Dict[str, Any] = H200,
              progress=None) -> Dict[str, Any]:
    """The model's report at one shape (see the module docstring)."""
    phases = capture(batch, nin, nout, G, k, dtype, uniform=uniform, base=base, ieee=ieee, sms=m["sms"])
    kernels: Dict[str, Any] = {}
    total = 0.0
    for phase, got in phases.items():
        launches = []
        ms = 0.0
        for lau in got["launches"]:
            if progress:
                progress(f"{phase}: {lau.name}, {len(lau.configs)} configs")
            r = model_launch(lau, arch, m=m)
            launches.append(r)
            ms += r["chosen"]["modelled_ms"]
        ops = model_ops(got["ops"], m)
        ms += ops["modelled_ms"]
        total += ms
        if len(launches) == 1:
            main = dict(launches[0]["chosen"])
        else:  # several kernels in this pass: the slowest one's figures, all listed
            main = dict(max((r["chosen"] for r in launches), key=lambda r: r["modelled_ms"])) if launches else {}
            main["launches"] = [r["chosen"] for r in launches]
        main["kernel_ms"] = main.get("modelled_ms", 0.0)
        main["modelled_ms"] = ms
        # torch.use_deterministic_algorithms(True) pins each kernel to its first config
        main["first_config_ms"] = sum(r["all_configs"][0]["modelled_ms"] for r in launches) + ops["modelled_ms"]
        main["torch_ops"] = ops
        main["all_configs"] = [c for r in launches for c in r["all_configs"]]
        kernels[phase] = main
    lo, hi = L2_RANGE_TB_S
    sens = {f"l2_{bw:g}_tb_s": {ph: _rescore_l2(kernels[ph], bw, m) for ph in kernels} for bw in (lo, hi)}
    for v in sens.values():
        v["fwd+bwd"] = sum(v.values())
    kernels["fwd+bwd"] = {"modelled_ms": total, "bound": "sum of the three passes",
                          "by_pass_ms": {ph: kernels[ph]["modelled_ms"] for ph in kernels},
                          "first_config_ms": sum(kernels[ph]["first_config_ms"] for ph in kernels)}
    dense_flops = 2 * batch * nin * (G + k + 1) * nout
    dense_ms = 3 * dense_flops / (m["tensor_tflops_16bit"] * 1e12) * 1e3
    return {
        "model": "static (ahead-of-time compile + SASS); a MODEL, not a measurement",
        "shape": {"batch": batch, "in": nin, "out": nout, "G": G, "k": k, "dtype": str(dtype).replace("torch.", ""),
                  "uniform_knots": uniform, "base": base, "fp32_precision": "ieee" if ieee else "tf32",
                  "arch": f"sm_{arch}"},
        "kernels": kernels,
        "dense_gemm_ms": dense_ms,
        "dense_gemm_definition": "three GEMMs batch x in*(G+k+1) x out (forward, grad_x, grad_W) at "
                                 f"{m['tensor_tflops_16bit']} TFLOP/s",
        "fraction_of_dense_rate": dense_ms / total if total else None,
        "l2_sensitivity_ms": sens,
        "assumptions": ASSUMPTIONS,
        "units": UNITS,
        "cannot_see": BLIND_SPOTS,
    }


#: Other L2 bandwidths the report is re-scored at (the L2 figure is an assumption).
L2_RANGE_TB_S = (5.5, 11.0)


def _rescore_l2(pass_report: Dict[str, Any], l2_tb_s: float, m: Dict[str, Any]) -> float:
    """A pass's modelled ms with the L2 floor at another bandwidth (best config re-picked)."""
    best: Dict[str, float] = {}  # per kernel of the pass
    for cfg in pass_report["all_configs"]:
        b = dict(cfg["bounds_ms"])
        b["l2"] = b["l2"] * m["l2_tb_s"] / l2_tb_s
        best[cfg["kernel"]] = min(best.get(cfg["kernel"], math.inf), max(b.values()))
    return sum(best.values()) + pass_report["torch_ops"]["modelled_ms"]


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return n


SWEEP = {"arch": (90, 80), "dtype": ("bf16", "fp16", "fp32"), "k": (1, 3, 5), "uniform": (True, False)}


SWEEP_SHAPE = (512, 64, 64, 5)  # (batch, in, out, G): widths divisible by 16 like the target


def sweep_combo(arch: int, dt: str, k: int, uni: bool, shape=SWEEP_SHAPE) -> List[Dict[str, Any]]:
    """Rows of one (arch, dtype, k, knots) combination: every config of every launch, with regs,
    spills, smem, HGMMA/HMMA count and the problems :func:`check_compiled` finds (or the compile error)."""
    batch, nin, nout, G = shape
    rows = []
    for phase, got in capture(batch, nin, nout, G, k, DTYPES[dt], uniform=uni).items():
        for lau in got["launches"]:
            for i, cfg in enumerate(lau.configs):
                row = {"arch": arch, "dtype": dt, "k": k, "uniform": uni, "phase": phase, "kernel": lau.name,
                       "config_index": i,
                       "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}
                try:
                    c = compile_launch(lau, cfg, arch)
                    ins, _, _ = parse_sass(c.sass)
                except Exception as e:  # noqa: BLE001 - a compile error is a result here
                    rows.append({**row, "problems": [f"compile error: {type(e).__name__}: {e}"[:2000]]})
                    continue
                rows.append({**row, "regs": c.regs, "spills": c.spills, "smem": c.smem,
                             "hgmma": sum(1 for it in ins if it.op.startswith("HGMMA")),
                             "hmma": sum(1 for it in ins if it.op.startswith("HMMA")),
                             "problems": check_compiled(c, dt)})
    return rows


def _sweep_combo_star(args):
    return sweep_combo(*args)


def sweep(archs=SWEEP["arch"], dtypes=SWEEP["dtype"], orders=SWEEP["k"], jobs: int = 1,
          progress=print) -> List[Dict[str, Any]]:
    """Compile every config the launcher can pick over arch x dtype x k x {uniform, non-uniform} knots (the
    AOT-compile test's full matrix), ``jobs`` combinations at a time in worker processes."""
    combos = [(a, d, k, u) for a in archs for d in dtypes for k in orders for u in SWEEP["uniform"]]
    rows: List[Dict[str, Any]] = []
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            results = ex.map(_sweep_combo_star, combos)
            for combo, got in zip(combos, results):
                rows += got
                if progress:
                    progress(f"{combo}: {len(got)} compiles, {sum(bool(r['problems']) for r in got)} failing")
    else:
        for combo in combos:
            got = sweep_combo(*combo)
            rows += got
            if progress:
                progress(f"{combo}: {len(got)} compiles, {sum(bool(r['problems']) for r in got)} failing")
    return rows


def _int_list(v: str) -> Tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None


def _dtype_list(v: str) -> Tuple[str, ...]:
    out = tuple(v.split(","))
    for d in out:
        _dtype(d)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=_positive, default=65536)
    ap.add_argument("--in", dest="nin", type=_positive, default=1024)
    ap.add_argument("--out", dest="nout", type=_positive, default=1024)
    ap.add_argument("--grid", type=_positive, default=5, help="G, intervals per feature")
    ap.add_argument("--order", type=int, default=3, help="spline order k")
    ap.add_argument("--dtype", type=_dtype, default=torch.bfloat16, help="bf16, fp16 or fp32")
    ap.add_argument("--non-uniform", action="store_true", help="non-uniform knots (binary-search path)")
    ap.add_argument("--no-base", action="store_true", help="no SiLU base branch")
    ap.add_argument("--ieee", action="store_true", help="fp32 IEEE products instead of TF32")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--sweep", action="store_true",
                    help="compile every launcher config for sm_90/sm_80 x bf16/fp16/fp32 x k 1,3,5 x knots; "
                         "print the failing ones (with --json: write every row); exit 1 if any fails")
    ap.add_argument("--sweep-arch", type=_int_list, default=SWEEP["arch"], help="restrict the sweep, e.g. 90")
    ap.add_argument("--sweep-dtype", type=_dtype_list, default=SWEEP["dtype"], help="e.g. bf16,fp16")
    ap.add_argument("--sweep-k", type=_int_list, default=SWEEP["k"], help="e.g. 3,5")
    ap.add_argument("--jobs", type=_positive, default=1, help="sweep worker processes")
    a = ap.parse_args(argv)
    if not 0 <= a.order <= tb.MAX_SPLINE_ORDER:
        ap.error(f"--order must be in 0..{tb.MAX_SPLINE_ORDER}")
    tools = tool_paths()
    missing = [k for k, v in tools.items() if v is None]
    if missing:
        print(f"gpu_model: {', '.join(missing)} missing from the triton wheel; cannot compile", file=sys.stderr)
        return 2
    def log(msg):
        print(f"[gpu_model] {msg}", file=sys.stderr, flush=True)

    meta = {"versions": {**_versions(), "ptxas": _tool_version(tools["ptxas"])},
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
            "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if a.sweep:
        rows = sweep(a.sweep_arch, a.sweep_dtype, a.sweep_k, jobs=a.jobs, progress=log)
        bad = [r for r in rows if r["problems"]]
        report = {"sweep": rows, "failures": bad, **meta}
        if a.json:
            a.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{len(rows)} compiles, {len(bad)} failing (spills in bf16/fp16, or no HGMMA in sm_90 bf16/fp16)")
        for r in bad:
            print(f"  sm_{r['arch']} {r['dtype']} k={r['k']} uniform={r['uniform']}: {'; '.join(r['problems'])}")
        return 1 if bad else 0
    tb._WIDE_MODE = "fused"  # the fused kernels are what this script models
    report = run_model(a.batch, a.nin, a.nout, a.grid, a.order, a.dtype, uniform=not a.non_uniform,
                       base=not a.no_base, ieee=a.ieee, arch=a.arch, progress=log)
    report.update(meta)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 0


def _tool_version(path: str) -> Optional[str]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def summary(report: Dict[str, Any]) -> str:
    """One line per pass: modelled ms, bound, regs/spills/smem, CTAs per SM."""
    s = report["shape"]
    lines = [f"MODEL (not a measurement), {s['arch']}, batch {s['batch']}, in {s['in']}, out {s['out']}, "
             f"G {s['G']}, k {s['k']}, {s['dtype']}:"]
    for name, r in report["kernels"].items():
        if name == "fwd+bwd":
            continue
        lines.append(f"  {name:8s} {r['modelled_ms']:8.3f} ms  bound {r.get('bound', '?'):6s} regs {r.get('regs')} "
                     f"spills {r.get('spills')} smem {r.get('smem')} CTAs/SM {r.get('ctas_per_sm')} "
                     f"config {r.get('config')}")
    tot = report["kernels"]["fwd+bwd"]["modelled_ms"]
    lines.append(f"  fwd+bwd  {tot:8.3f} ms  vs dense GEMMs {report['dense_gemm_ms']:.3f} ms: "
                 f"{100 * report['fraction_of_dense_rate']:.1f}% of the dense rate")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
