"""Argument checks of the ``kanfast`` command, run before any work (standard library only, so
that the command's help needs no torch).

* argparse ``type=`` validators: :func:`int_range`, :func:`int_list`, :func:`float_range`,
  :func:`name_list` (a bad value: argparse's one-line error, exit status 2);
* :func:`check_outputs`: output files are checked before a run starts (folder exists and is
  writable, the path is not a folder, no two outputs share a path, an existing file is kept
  unless ``force``); :func:`open_output` then opens them without clobbering a file that
  appeared meanwhile;
* :func:`available_memory` / :func:`check_memory`: the bytes a run would allocate against the
  memory the machine has free (``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf``).

Each ``check_*`` raises ``ValueError`` with a one-line message; the command turns it into
``parser.error`` (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

__all__ = ["int_range", "int_list", "float_range", "name_list", "check_outputs", "open_output",
           "available_memory", "check_memory", "format_bytes", "IMAGE_SUFFIXES"]

#: file types matplotlib writes (``savefig`` picks the format from the suffix)
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def _parse_int(text: str) -> int:
    """An integer, also written as ``1e6`` or ``100_000`` (exact integers only)."""
    s = str(text).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not (math.isfinite(v) and v == int(v)):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(v)


def int_range(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]`` (either bound optional)."""

    def parse(text: str) -> int:
        v = _parse_int(text)
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            if maximum is None:
                raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
            if minimum is None:
                raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {v}")
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum}], got {v}")
        return v

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def int_list(minimum: int = 1) -> Callable[[str], List[int]]:
    """argparse type: comma-separated integers, each ``>= minimum``, at least one."""

    def parse(text: str) -> List[int]:
        parts = [v for v in str(text).split(",") if v.strip()]
        try:
            vals = [_parse_int(v) for v in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not vals or any(v < minimum for v in vals):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return vals

    parse.__name__ = "integer list"
    return parse


def float_range(minimum: Optional[float] = None, maximum: Optional[float] = None,
                min_inclusive: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float in the range (``minimum`` exclusive when ``min_inclusive`` is False)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = minimum is None or (v >= minimum if min_inclusive else v > minimum)
        if not math.isfinite(v) or not low_ok or (maximum is not None and v > maximum):
            lo = "" if minimum is None else f"{'>=' if min_inclusive else '>'} {minimum:g}"
            hi = "" if maximum is None else f"<= {maximum:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            raise argparse.ArgumentTypeError(f"expected a finite number{' ' + bounds if bounds else ''}, got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


def name_list(text: str) -> List[str]:
    """argparse type: comma-separated names (blanks dropped)."""
    return [v.strip() for v in str(text).split(",") if v.strip()]


# --------------------------------------------------------------------------- outputs
def check_outputs(outputs: Iterable[Tuple[str, Optional[Path]]], force: bool = False,
                  suffixes: Optional[Dict[str, Iterable[str]]] = None) -> None:
    """Check the files a run will write, before it starts.

    Args:
        outputs: ``(option, path)`` pairs, e.g. ``("--out", Path("r.json"))``; ``None`` paths are skipped.
        force: an existing file may be overwritten.
        suffixes: ``{option: allowed suffixes}`` (lower case, with the dot).

    Raises:
        ValueError: a path is a folder, its folder is missing or not writable, two outputs share
        a path, a suffix is not allowed, or the file exists and ``force`` is False.
    """
    seen: Dict[Path, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        path = Path(path)
        if str(path) == "" or path.name in ("", ".", ".."):
            raise ValueError(f"{option} {str(path)!r} is not a file name")
        if path.is_dir():
            raise ValueError(f"{option} {str(path)!r} is a folder; give a file name")
        allowed = (suffixes or {}).get(option)
        if allowed is not None and path.suffix.lower() not in allowed:
            raise ValueError(f"{option} {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
                             f"use one of {', '.join(allowed)}")
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{option} {str(path)!r} is also the path of {seen[key]}; give distinct file names")
        seen[key] = option
        parent = path.parent
        if not parent.is_dir():
            raise ValueError(f"{option} {str(path)!r}: folder {str(parent)!r} does not exist")
        if (path.exists() or path.is_symlink()) and not force:
            raise ValueError(f"{option} {str(path)!r} exists; pass --force to overwrite it, or choose another name")
        try:  # real opens: os.access says yes to root, also on a read-only mount
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".kanfast-write-check-"):
                pass
            if path.exists():
                with open(path, "ab"):  # opened, not written: contents and mtime unchanged
                    pass
        except OSError as e:
            raise ValueError(f"{option} {str(path)!r}: cannot write in {str(parent)!r} ({e.strerror or e})") from None


def open_output(path: Path, force: bool, mode: str = "w", **kw):
    """Open an output checked by :func:`check_outputs`: mode ``"x"`` (fails if the file appeared since) unless ``force``."""
    if not force:
        mode = mode.replace("w", "x")
    return open(path, mode, **kw)


# ---------------------------------------------------------------------------- memory
def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation: ``MemAvailable`` (Linux), else free
    physical pages (``os.sysconf``); ``None`` when neither is known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def check_memory(needed: float, what: str, available: Optional[int] = None, fraction: float = 0.9,
                 hint: str = "") -> None:
    """Raise ValueError when ``needed`` bytes exceed ``fraction`` of the available memory.

    ``available`` defaults to :func:`available_memory`; when that is unknown nothing is checked.
    """
    if available is None:
        available = available_memory()
    if available is None:
        return
    if needed > fraction * available:
        raise ValueError(f"{what} needs about {format_bytes(needed)} of memory, {format_bytes(available)} is available"
                         + (f"; {hint}" if hint else ""))
