"""Host side of the CPU block kernels (``cpu_spline.c``): build once, load, launch.

What: :func:`load` returns the compiled kernels of ``cpu_spline.c`` (see its header:
the fused span / basis / dense-block fill, and the fused grad_x contraction, uniform
knots), or None, in which case the torch backend runs its pure-torch ops instead.

How: the C file is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``; flags :data:`CFLAGS` with :data:`OPENMP_CFLAGS` when torch runs on OpenMP, else
without, or :data:`PORTABLE_CFLAGS` where the compiler refuses ``-march=native``) into a shared library cached in
``$KANFAST_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kanfast`` or ``~/.cache/kanfast``;
a private ``kanfast-<uid>`` under the temp dir when that is not writable or may not be
used) under a name that hashes the source, the flags, the compiler (path, size, mtime) and this
CPU's model and feature flags, so a cache shared between different machines never
hands one a library built for another's instruction set. Each build records its
SHA-256 beside it; a cached library that does not match it, or does not load, is built
again (a damaged shared object would crash the process that maps it). The build
takes ~14 s of CPU once per machine (measured on a 2-core AMD EPYC VM, gcc 12, the sparse
kernels' unrolled loops most of it); later processes load the cached file in milliseconds.

Trust: the file name is computed from public inputs and the SHA-256 proves integrity, not
authorship, so a library is loaded or built only in a folder that is no symbolic link, is
owned by this process's effective user and is writable by no group or other user (checked by
``lstat``, then on its descriptor opened ``O_NOFOLLOW``), and only as a regular file with the
same checks on its own descriptor; the bytes hashed are read from that descriptor and the
library mapped is that descriptor's file (``/proc/self/fd/N`` on Linux), so no rename between
check and load can substitute another. Folders or files that fail are passed over with one
RuntimeWarning naming them and why; where neither cache folder may be used the library is built
in a fresh ``mkdtemp`` folder (mode 0700) for this process. The kernels are called through
:mod:`ctypes`, which releases the GIL for the duration of each call (the CPU
workers of :mod:`kanfast.cpu_workers` run them side by side).

When not: ``KANFAST_CPU_KERNEL=0`` in the environment; no compiler, or the build
or load fails (one :class:`RuntimeWarning` says why; the pure-torch path is exact
too, just slower); not Linux or macOS. :func:`load` tries once per process;
:func:`reset` forgets the result (tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["load", "reset", "CpuSplineKernels", "CFLAGS", "PORTABLE_CFLAGS", "OPENMP_CFLAGS", "MAX_ORDER"]

#: No fast-math: the spans must be the IEEE results the torch path's interior check
#: computes, and NaN must stay NaN. No contraction into FMA for the same reason.
#: -fno-trapping-math lets floor and the selects vectorise (no FP exception is ever
#: inspected; results are unchanged).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c99",
          "-shared", "-fPIC"]
#: The same without -march=native, tried when the compiler refuses that flag.
PORTABLE_CFLAGS = [f for f in CFLAGS if f != "-march=native"]
#: Added first when torch's own parallel backend is OpenMP (and its runtime is loaded): the
#: one-entry sparse calls then split themselves across the caller's OpenMP team. The library's
#: libgomp.so.1 is resolved by its soname to the copy torch already mapped (no other file is
#: loaded); without the flag (a compiler without OpenMP) the same calls run on one thread.
OPENMP_CFLAGS = ["-fopenmp"]
#: Largest spline order (and polynomial degree + 1) the launchers accept.
MAX_ORDER = 16
#: Columns x slots per input above which the kernels place the slots directly instead of
#: selecting them by compares over every column (see the C header).
SELECT_MAX = 64
#: Rows per tile of the sparse backward (``KS_BT`` in the C file).
BWD_ROWS = 1024
#: Features whose sorted tiles the sparse backward keeps at once (``KS_FG``).
BWD_GROUP = 4
_SOURCE = Path(__file__).with_name("cpu_spline.c")
_ABI = 6

_lock = threading.Lock()
_loaded = False
_kernels: Optional["CpuSplineKernels"] = None


def _cache_dir() -> Path:
    env = os.environ.get("KANFAST_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kanfast"


def _cpu_signature() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> Optional[List[str]]:
    """The C compiler's command words: ``$CC`` (split like a shell would: ``ccache gcc``),
    else the first of ``cc``, ``gcc``, ``clang`` on PATH; None if there is none. Raises
    RuntimeError when ``$CC`` is set but not found (not silently another compiler)."""
    env = os.environ.get("CC", "").strip()
    if env:
        words = shlex.split(env)
        found = shutil.which(words[0])
        if found is None:
            raise RuntimeError(f"$CC={env!r}: {words[0]!r} not found")
        return [found, *words[1:]]
    for cand in ("cc", "gcc", "clang"):
        found = shutil.which(cand)
        if found:
            return [found]
    return None


#: Where Linux shows this process's open descriptors as paths to the very files they hold.
_PROC_FD = "/proc/self/fd"
#: Descriptors of the loaded libraries, held open for the life of the process: the dynamic
#: loader knows each library by the name it was opened with (``/proc/self/fd/N``) and would hand
#: back the old library for that name if N were closed and then reused for another file.
_mapped_fds: List[int] = []


class _Untrusted(Exception):
    """A folder or file that may not hold code this process loads (see :func:`_open_checked`)."""


def _why_untrusted(st: os.stat_result, folder: bool) -> Optional[str]:
    """Why an entry with this ``lstat``/``fstat`` result may not hold code we load, or None: it
    must be a real folder (``folder``) or regular file, not a symbolic link, owned by this
    process's effective user and writable by nobody else (no group or other write bit), so
    that only this user (or root) can have put a library there or swap one in."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(st.st_mode):
        return "is not a folder" if folder else "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _open_checked(path, folder: bool, dir_fd: Optional[int] = None, shown: str = "") -> int:
    """A read-only descriptor of ``path`` (relative to the open folder ``dir_fd`` if given; named
    ``shown`` in messages), checked twice: ``lstat`` (no link followed), then the descriptor
    itself, opened with ``O_NOFOLLOW``, by ``fstat`` (the same inode, and it passes
    :func:`_why_untrusted`). Later reads and loads go through the descriptor, so no rename after
    the check changes what they see. Raises FileNotFoundError where there is nothing,
    :class:`_Untrusted` (why) where it may not be used."""
    shown = shown or str(path)
    before = os.lstat(path, dir_fd=dir_fd)
    why = _why_untrusted(before, folder)
    if why:
        raise _Untrusted(f"{shown} {why}")
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_DIRECTORY if folder else os.O_NONBLOCK
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _Untrusted(f"{shown} could not be opened without following a link ({e.strerror})") from None
    st = os.fstat(fd)
    why = _why_untrusted(st, folder)
    if why is None and (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        why = "was replaced while it was checked"
    if why:
        os.close(fd)
        raise _Untrusted(f"{shown} {why}")
    return fd


def _read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _dlopen_checked(fd: int, data: bytes, name: str) -> ctypes.CDLL:
    """Map the library held by the checked descriptor ``fd`` (whose bytes are ``data``). On Linux
    through ``/proc/self/fd/N``, which opens exactly the descriptor's inode: the file that was
    checked and hashed, whatever has been renamed since (no check-then-load race). Elsewhere the
    checked bytes are written into a fresh private folder (``mkdtemp``, mode 0700) and loaded from
    there. On success ``fd`` is kept open (see :data:`_mapped_fds`)."""
    if os.path.isdir(_PROC_FD):
        lib = ctypes.CDLL(f"{_PROC_FD}/{fd}")
        _mapped_fds.append(fd)
        return lib
    scratch = tempfile.mkdtemp(prefix="kanfast-load-")
    try:
        path = os.path.join(scratch, name)
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(out, "wb") as fh:
            fh.write(data)
        lib = ctypes.CDLL(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.close(fd)
    return lib


def _load_from(dir_fd: int, folder: Path, name: str, flags, distrust: List[str]) -> Optional["CpuSplineKernels"]:
    """The kernels of library ``name`` in the checked folder ``dir_fd`` (``folder``), or None
    where it is missing, may not be used (why appended to ``distrust``), does not match the
    SHA-256 recorded beside it when it was built (damaged: truncated by a full disk, a crash
    mid-copy; mapping it could crash the process), or does not load: the caller builds it again.
    The hash is of the bytes read from the checked descriptor, and that descriptor's file is the
    one mapped (:func:`_dlopen_checked`)."""
    try:
        fd = _open_checked(name, False, dir_fd, str(folder / name))
    except FileNotFoundError:
        return None
    except _Untrusted as e:
        distrust.append(str(e))
        return None
    mapped = False
    try:
        data = _read_fd(fd)
        sfd = _open_checked(name + ".sha256", False, dir_fd)
        try:
            recorded = _read_fd(sfd).decode("ascii", "replace").strip()
        finally:
            os.close(sfd)
        if recorded != hashlib.sha256(data).hexdigest():
            return None
        lib = _dlopen_checked(fd, data, name)
        mapped = True
        return CpuSplineKernels(lib, flags)
    except (OSError, RuntimeError, _Untrusted):  # missing/foreign record, stale, not a library: built again
        return None
    finally:
        if not mapped:
            os.close(fd)


def _build(cc: List[str], flags, folder: Path, name: str) -> None:
    """Compile into ``folder/name`` (atomically: a temporary file renamed; mode 0755, whatever
    the umask), then record its SHA-256 beside it (``<name>.sha256``), which every load checks."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc[0]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
        os.chmod(tmp, 0o755)  # the linker creates its output with the umask's bits (group-writable under 002)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
            digest = hashlib.sha256(fh.read()).hexdigest()
        os.replace(tmp, folder / name)  # atomic: a concurrent process sees the old name or the whole file
        fd, tmp = tempfile.mkstemp(suffix=".sha256", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(digest)
        os.replace(tmp, folder / (name + ".sha256"))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private_temp_dir() -> Path:
    """``kanfast-<uid>`` under the temp dir: the cache where the cache folder may not be used."""
    return Path(tempfile.gettempdir()) / f"kanfast-{os.getuid()}"


def _checked_dir(folder: Path, create: bool, distrust: List[str]) -> Optional[int]:
    """A checked descriptor of ``folder`` (:func:`_open_checked`; made with mode 0700 first when
    ``create``), or None where it is missing or may not be used (why appended to ``distrust``)."""
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            pass
    try:
        return _open_checked(folder, True)
    except FileNotFoundError:
        return None
    except _Untrusted as e:
        if str(e) not in distrust:
            distrust.append(str(e))
        return None
    except OSError:
        return None


def _library_name(cc: List[str], flags) -> str:
    """Hash of the source, the flags, the compiler (its resolved path, size and mtime: no
    subprocess) and this CPU."""
    real = os.path.realpath(cc[0])
    st = os.stat(real)
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(flags), f"{real}:{st.st_size}:{st.st_mtime_ns}", " ".join(cc[1:]),
                 _cpu_signature(), platform.machine()):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return f"cpu_spline_{key.hexdigest()[:24]}.so"


def _load_or_build(cc: List[str], flags, distrust: List[str]) -> "CpuSplineKernels":
    """Load the cached library, or build it, only in a folder this user alone can write
    (:func:`_why_untrusted`): the cache folder, else ``kanfast-<uid>`` under the temp dir, else a
    fresh ``mkdtemp`` folder (mode 0700) used by this process only. Each folder or file passed
    over for that reason is appended to ``distrust`` (why)."""
    name = _library_name(cc, flags)
    for folder in (_cache_dir(), _private_temp_dir()):  # a verified build in either
        dfd = _checked_dir(folder, False, distrust)
        if dfd is not None:
            try:
                kern = _load_from(dfd, folder, name, flags, distrust)
            finally:
                os.close(dfd)
            if kern is not None:
                return kern
    for folder in (_cache_dir(), _private_temp_dir(), None):
        scratch = folder is None
        if scratch:
            folder = Path(tempfile.mkdtemp(prefix="kanfast-build-"))
        dfd = _checked_dir(folder, not scratch, distrust)
        try:
            if dfd is None or not (scratch or os.access(folder, os.W_OK | os.X_OK)):
                continue
            _build(cc, flags, folder, name)
            kern = _load_from(dfd, folder, name, flags, distrust)
            if kern is None:
                raise RuntimeError(f"the library just built in {folder} could not be verified or loaded")
            return kern
        finally:
            if dfd is not None:
                os.close(dfd)
            if scratch:  # the library stays mapped; nothing is left behind
                shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError("found no folder that only this user can write to build in")


def _torch_openmp() -> bool:
    """Whether torch's intra-op backend is OpenMP (the test of ``kanfast.cpu_workers``, which the
    kernels' layer cannot import) and GNU libgomp, the runtime ``-fopenmp`` links, is mapped in this
    process (so the library's libgomp.so.1 is that copy)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:  # not Linux
        return False


def _flag_sets() -> List[List[str]]:
    """The flags tried in order (the first that builds and loads is kept): :data:`CFLAGS` with
    :data:`OPENMP_CFLAGS` where torch runs on OpenMP, :data:`CFLAGS`, :data:`PORTABLE_CFLAGS`."""
    return ([CFLAGS + OPENMP_CFLAGS] if _torch_openmp() else []) + [CFLAGS, PORTABLE_CFLAGS]


def _compile_and_load() -> "CpuSplineKernels":
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
    distrust: List[str] = []
    try:
        first_error = None
        for flags in _flag_sets():  # e.g. a compiler without OpenMP, or without -march=native: the next
            try:
                return _load_or_build(cc, flags, distrust)
            except RuntimeError as e:
                first_error = first_error or e
        raise first_error
    finally:
        if distrust:
            warnings.warn(
                "kanfast: the CPU block kernels are loaded or built only in a folder that this user alone can "
                f"write; passed over: {'; '.join(dict.fromkeys(distrust))}. Fix or remove those, or set "
                "KANFAST_CACHE_DIR to a folder only you can write.",
                RuntimeWarning,
                stacklevel=3,
            )


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock (building or loading) would leave the
    child's copy locked forever: the child starts with a fresh one."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def load() -> Optional["CpuSplineKernels"]:
    """The compiled kernels, or None (see the module docstring for when). Thread-safe;
    builds at most once per process (and once per machine, through the cache)."""
    global _loaded, _kernels
    if _loaded:
        return _kernels
    with _lock:
        if _loaded:
            return _kernels
        if os.environ.get("KANFAST_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
            _kernels = None
        elif not (sys.platform.startswith("linux") or sys.platform == "darwin"):
            _kernels = None
        else:
            try:
                _kernels = _compile_and_load()
            except Exception as e:  # any failure: the pure-torch path is exact too
                warnings.warn(
                    f"kanfast: the CPU block kernels could not be built or loaded ({type(e).__name__}: {e}); "
                    "the torch backend uses its pure-torch path (exact, slower). Set KANFAST_CPU_KERNEL=0 to "
                    "skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _kernels = None
        _loaded = True
        return _kernels


def reset() -> None:
    """Forget the result of :func:`load` (the next call tries again; tests)."""
    global _loaded, _kernels
    with _lock:
        _loaded, _kernels = False, None


_I = ctypes.c_int64
_P = ctypes.c_void_p


class CpuSplineKernels:
    """Launchers of the kernels in ``cpu_spline.c`` for float32 and float64 CPU tensors.

    Preconditions (the caller's, checked by :meth:`supports` and asserted cheaply here):
    knots uniform (each stored knot within a small multiple of eps * h of equal spacing and of
    the knot ``t_0 + m h`` the kernels compute, against which they take spans and local
    coordinates); ``x`` of the chunk (rows, fw) with unit stride along features; ``h`` (fw,)
    the spacings (``inv_h`` their reciprocals); the
    output block rows (rows, >= C * fw) with unit stride; t0, tn, inv_h contiguous (fw,);
    every tensor of x's dtype. Nothing is allocated here: the caller passes the work buffer
    (at least ``(R + 2) * fw`` elements of x's dtype, R the number of polynomials)."""

    def __init__(self, lib: ctypes.CDLL, flags=()):
        self.flags = list(flags)  # what the library was built with (CFLAGS or PORTABLE_CFLAGS)
        if lib.kf_abi_version() != _ABI:
            raise RuntimeError("stale cpu_spline library (ABI mismatch)")
        self._fill, self._grad_x = {}, {}
        for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64")):
            fill = getattr(lib, f"kf_fill_{sfx}")
            fill.argtypes = [_I, _I, _P, _I, _P, _P, _P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _P]
            fill.restype = None
            gx = getattr(lib, f"kf_grad_x_{sfx}")
            gx.argtypes = [_I, _I, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _P, _I, _I, _I, _I, _P, _I, _P]
            gx.restype = None
            self._fill[dtype], self._grad_x[dtype] = fill, gx
        self._lib = lib
        #: Whether the library was built with OpenMP: its one-entry calls can split themselves across
        #: the caller's OpenMP team (torch's runtime, already loaded: the same libgomp by its soname).
        self.openmp = bool(lib.kf_openmp())
        # the one-entry calls of the small path, looked up once (their signatures set here)
        self._fwd_call = {dt: self._sparse_fn("fwd_call", dt) for dt in (torch.float32, torch.float64)}
        self._bwd_call = {dt: self._sparse_fn("bwd_call", dt) for dt in (torch.float32, torch.float64)}

    @staticmethod
    def supports(x: torch.Tensor, k: int) -> bool:
        """Whether these kernels can run the chunk ``x`` at spline order ``k``."""
        return (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 2
            and (x.stride(1) == 1 or x.shape[1] <= 1)
            and 0 <= k < MAX_ORDER
            and type(x) in (torch.Tensor, torch.nn.Parameter)
        )

    @staticmethod
    def direct(k: int, C: int, off: int) -> int:
        """1 to place the slots directly, 0 to select them by compares over every column (see
        the C header): direct once the columns times the slots exceed :data:`SELECT_MAX`."""
        return int((C - off) * (k + 1) > SELECT_MAX)

    def fill(self, x, h, t0, tn, inv_h, n: int, k: int, poly, out, off: int, C: int, work) -> None:
        """Rows of ``out`` (rows, >= C * fw): ``[silu(x) if off | B_0 | ... | B_{C-off-1}]``,
        column block c of ``fw`` columns; ``poly`` (k+1, k+1) contiguous, row r the
        coefficients of f^0..f^k of local basis r."""
        rows, fw = x.shape
        assert out.stride(1) == 1 and poly.is_contiguous() and work.numel() >= (k + 3) * fw
        assert h.shape == (fw,) and h.is_contiguous() and h.dtype == x.dtype
        self._fill[x.dtype](
            rows, fw, x.data_ptr(), x.stride(0), h.data_ptr(), t0.data_ptr(), tn.data_ptr(), inv_h.data_ptr(), n, k,
            poly.data_ptr(), out.data_ptr(), out.stride(0), off, C, self.direct(k, C, off), work.data_ptr(),
        )

    def grad_x(self, x, h, t0, tn, inv_h, n: int, k: int, poly, g, off: int, C: int, gx, work) -> None:
        """``gx`` (rows, fw) = ``g[:, :fw] * silu'(x)`` (when off) + the sum over slots r
        of ``g[b, (off + m - k + r) * fw + i] * Q_r(f)`` for the columns ``< C``;
        ``poly`` (R, np) contiguous, row r the coefficients of f^0.. of Q_r."""
        rows, fw = x.shape
        R, np_ = poly.shape
        assert g.stride(1) == 1 and gx.stride(1) == 1 and poly.is_contiguous() and work.numel() >= (R + 2) * fw
        assert h.shape == (fw,) and h.is_contiguous() and h.dtype == x.dtype
        self._grad_x[x.dtype](
            rows, fw, x.data_ptr(), x.stride(0), h.data_ptr(), t0.data_ptr(), tn.data_ptr(), inv_h.data_ptr(), n, k,
            R, np_,
            poly.data_ptr(), g.data_ptr(), g.stride(0), off, C, self.direct(k, C, off), gx.data_ptr(), gx.stride(0),
            work.data_ptr(),
        )

    # ------------------------------------------------------------------ sparse contraction
    # (kf_sparse_* in cpu_spline.c: the sparse path of kanfast.sparse_backend)
    _SPARSE_SIGS = {
        "check": ([_I, _I, _P], _I),
        "pack": ([_I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P], None),
        "fwd": ([_I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _I, _I, _I, _P, _I], _I),
        "bad_rows": ([_I, _I, _P, _P], _I),
        "bwd": ([_I, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _I, _P, _I, _P, _I], _I),
        "fwd_call": ([_I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I], _I),
        "bwd_call": ([_I, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _P, _I, _I], _I),
    }

    def _sparse_fn(self, name: str, dtype: torch.dtype):
        """The ctypes function ``kf_sparse_<name>`` for ``dtype``, its signature set on first use."""
        fns = self.__dict__.setdefault("_sparse_fns", {})
        fn = fns.get((name, dtype))
        if fn is None:
            sfx = "f32" if dtype == torch.float32 else "f64"
            fn = getattr(self._lib, f"kf_sparse_{name}_{sfx}")
            fn.argtypes, fn.restype = self._SPARSE_SIGS[name]
            fns[(name, dtype)] = fn
        return fn

    @staticmethod
    def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
        return None if t is None else t.data_ptr()

    def sparse_check(self, grid) -> int:
        """0 when every knot row of ``grid`` (in, n) contiguous is finite and non-decreasing, else 1."""
        assert grid.is_contiguous()
        return self._sparse_fn("check", grid.dtype)(grid.shape[0], grid.shape[1], grid.data_ptr())

    def sparse_pack(self, f0: int, f1: int, k: int, sw, sc, bw, Wt, Bt) -> None:
        """Pack features ``[f0, f1)`` of ``sw`` (out, in, nb) (times ``sc`` (out, in) or None) into
        ``Wt`` from feature f0 on, layout (in, nb + 2k, out) with k zero rows either side of each
        feature's rows, and ``bw`` (out, in) into ``Bt`` (in, out) (both None: no base term). All
        contiguous, one dtype; ``Wt``/``Bt`` hold at least ``(f1 - f0) (nb + 2k) out`` / ``(f1 - f0) out``
        elements from their first."""
        nout, nin, nb = sw.shape
        assert sw.is_contiguous() and Wt.numel() >= (f1 - f0) * (nb + 2 * k) * nout
        p = self._ptr
        self._sparse_fn("pack", sw.dtype)(f0, f1, nin, nout, nb, k, sw.data_ptr(), p(sc), p(bw), Wt.data_ptr(), p(Bt))

    def sparse_fwd(self, x, grid, k: int, Wt, Bt, y, R: int, FB: int, NV: int, work) -> int:
        """``y`` (rows, out) of the rows of ``x`` (rows, in; unit feature stride) on knots ``grid``
        (in, n) contiguous, from the table packed by :meth:`sparse_pack` (every feature; ``Bt`` None:
        no base term). Tiles of ``R`` rows (a multiple of 64), each feature's rows sorted by span,
        chunks of ``NV`` (4, 2 or 1) vectors of 64 bytes of out; ``work`` at least
        :meth:`fwd_work` elements with ``FB`` from :meth:`fwd_units`. Returns 0 (2: bad sizes,
        3: work too short)."""
        rows, nin = x.shape
        nout = y.shape[1]
        assert y.is_contiguous() and grid.is_contiguous() and (x.stride(1) == 1 or nin <= 1)
        return self._sparse_fn("fwd", x.dtype)(
            rows, nin, nout, k, grid.shape[1], x.data_ptr(), x.stride(0), grid.data_ptr(), Wt.data_ptr(),
            self._ptr(Bt), y.data_ptr(), R, FB, NV, work.data_ptr(), work.numel(),
        )

    @staticmethod
    def fwd_work(R: int, FB: int, k: int, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` the forward's work buffer is given: ``R FB (k + 2)`` elements plus
        ``R FB`` int64, FB from :meth:`fwd_units` (the kernel checks them against a sorted tile's
        needs, :meth:`tile_bytes`)."""
        s = dtype.itemsize
        return R * FB * (k + 2 + 8 // s)

    @staticmethod
    def tile_bytes(R: int, k: int, n: int, nout: int, s: int, bwd: bool) -> int:
        """Bytes a sorted tile of ``R`` rows needs in the work buffer (``ks_tile_need`` in the C file:
        coefficients by row and by span, spans, order and counts, the padded y or grad_y tile and,
        backward, the grad_x partial sums); ``n`` knots per input, ``s`` bytes per element."""
        L = 64 // s
        op = -(-nout // L) * L
        cw = 2 * k + 4 if bwd else k + 2
        F = BWD_GROUP if bwd else 1
        return s * (F * R * cw + R * op + (F * R * (L + 1) if bwd else 0)) + 4 * ((2 * F + 1) * R + n) + 64

    @classmethod
    def fwd_units(cls, R: int, k: int, n: int, nout: int, dtype: torch.dtype) -> int:
        """The FB to pass to :meth:`fwd_work` and :meth:`sparse_fwd` for tiles of ``R`` rows: the
        smallest whose work covers :meth:`tile_bytes` (at least 1)."""
        s = dtype.itemsize
        per = R * ((k + 2) * s + 8)
        return max(1, -(-cls.tile_bytes(R, k, n, nout, s, False) // per))

    @classmethod
    def bwd_work(cls, FB: int, nb: int, k: int, nout: int, need_x: bool, need_w: bool, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` the backward's work buffer needs for blocks of ``FB`` features:
        their table rows and gradient, and a sorted tile of :data:`BWD_ROWS` rows."""
        s = dtype.itemsize
        blk = FB * (nb + 2 * k + 1) * nout + 2 * (1088 // s)  # (+ the arrays' skew, KS_SKEW bytes each)
        tile = -(-cls.tile_bytes(BWD_ROWS, k, nb + k + 1, nout, s, True) // s)
        return (blk if need_x else 0) + (blk if need_w else 0) + tile

    def sparse_fwd_call(self, x, grid, k: int, sw, sc, bw, y, R: int, FB: int, NV: int, buf, off_b: int,
                        off_w: int, wlen: int, P: int = 1) -> int:
        """One entry for a whole forward on the calling thread (``kf_sparse_fwd_call``: the knot
        check, :meth:`sparse_pack` of every feature and :meth:`sparse_fwd` of every row, the small
        calls' path): the table packed into ``buf`` (one contiguous buffer of x's dtype: Wt from
        element 0, Bt from ``off_b``, the work area of ``wlen`` elements from ``off_w``, a
        multiple of 8). ``x`` (rows, in; unit feature stride), ``grid`` (in, n), ``sw``
        (out, in, nb), ``sc``/``bw`` (out, in) or None, ``y`` (rows, out): contiguous, one dtype
        (the caller's checks: nothing is asserted here). ``P`` > 1 with :attr:`openmp`: split across
        P threads of the caller's OpenMP team (features for the pack, then rows), each with a work
        area of ``wlen // P`` elements rounded down to a multiple of 16 (``wlen`` the whole area
        then). Returns 1 when the knots are declined (nothing written), else :meth:`sparse_fwd`'s
        code."""
        p, s = buf.data_ptr(), buf.element_size()
        return self._fwd_call[x.dtype](
            x.shape[0], x.shape[1], y.shape[1], k, grid.shape[1], x.data_ptr(), x.stride(0), grid.data_ptr(),
            sw.data_ptr(), None if sc is None else sc.data_ptr(), None if bw is None else bw.data_ptr(), p,
            p + off_b * s, y.data_ptr(), R, FB, NV, p + off_w * s, wlen, P,
        )

    def sparse_bwd_call(self, x, grid, k: int, gy, sw, sc, bw, gx, gsw, gsc, gbw, bad, FB: int, work,
                        P: int = 1) -> int:
        """One entry for a whole backward on the calling thread (``kf_sparse_bwd_call``: the knot
        check, :meth:`sparse_bad_rows` into ``bad`` (int64, at least rows elements; None: grad_y
        is not scanned, no weight gradient nor grad_x wanted) and :meth:`sparse_bwd` of every
        feature). Arguments as :meth:`sparse_bwd`'s, contiguous (the caller's checks). ``P`` > 1 with
        :attr:`openmp`: the features split across P threads of the caller's OpenMP team, each with
        ``work.numel() // P`` elements rounded down to a multiple of 16. Returns 1 when the knots
        are declined (nothing written), else :meth:`sparse_bwd`'s code."""
        rows, nin = x.shape
        nout, _, nb = sw.shape
        return self._bwd_call[x.dtype](
            rows, nin, nout, k, grid.shape[1], 0, nin, x.data_ptr(), x.stride(0), grid.data_ptr(), gy.data_ptr(),
            sw.data_ptr(), None if sc is None else sc.data_ptr(), None if bw is None else bw.data_ptr(),
            None if gx is None else gx.data_ptr(), 0 if gx is None else gx.stride(0),
            None if gsw is None else gsw.data_ptr(), None if gsc is None else gsc.data_ptr(),
            None if gbw is None else gbw.data_ptr(), None if bad is None else bad.data_ptr(), FB, work.data_ptr(),
            work.numel(), P,
        )

    def sparse_bad_rows(self, gy, idx) -> int:
        """The rows of ``gy`` (rows, out) contiguous with a NaN or +-inf, written to ``idx`` (int64,
        at least rows elements); returns their count."""
        assert gy.is_contiguous() and idx.dtype == torch.int64 and idx.numel() >= gy.shape[0]
        return self._sparse_fn("bad_rows", gy.dtype)(gy.shape[0], gy.shape[1], gy.data_ptr(), idx.data_ptr())

    def sparse_bwd(self, x, grid, k: int, gy, sw, sc, bw, f0: int, f1: int, gx, gsw, gsc, gbw, nbad: int, bad,
                   FB: int, work) -> int:
        """Backward of the sparse forward for input features ``[f0, f1)`` over every row of ``x``:
        ``gx`` (rows, in) columns f0..f1 or None, and the parameter gradients of those features
        written directly into ``gsw`` (out, in, nb), ``gsc`` and ``gbw`` (out, in) (each None when not
        needed; gsw is grad W times sc). ``gy`` (rows, out) contiguous; ``bad`` the first ``nbad``
        indices of :meth:`sparse_bad_rows`; blocks of ``FB`` features, ``work`` at least
        :meth:`bwd_work` elements. Returns 0 (2: bad sizes, 3: work too short)."""
        rows, nin = x.shape
        nout, _, nb = sw.shape
        assert gy.is_contiguous() and grid.is_contiguous() and sw.is_contiguous() and (x.stride(1) == 1 or nin <= 1)
        assert gx is None or gx.stride(1) == 1 or nin <= 1
        p = self._ptr
        return self._sparse_fn("bwd", x.dtype)(
            rows, nin, nout, k, grid.shape[1], f0, f1, x.data_ptr(), x.stride(0), grid.data_ptr(), gy.data_ptr(),
            sw.data_ptr(), p(sc), p(bw), p(gx), 0 if gx is None else gx.stride(0), p(gsw), p(gsc), p(gbw), nbad,
            p(bad), FB, work.data_ptr(), work.numel(),
        )
