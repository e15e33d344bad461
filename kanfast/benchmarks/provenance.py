"""Where a result came from: machine, versions, git commit. Recorded in every result file that
``kanfast bench`` and ``kanfast fit toy --scaling`` write (imports nothing of kanfast)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["cpu_model", "git_commit", "versions", "machine"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[Dict[str, Any]]:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        # result files (this run's own output among them, truncated by a shell redirect) do not
        # change what ran: listed apart
        paths = [ln[3:] for ln in dirty.stdout.splitlines() if ln.strip()]
        code = [p for p in paths if not p.startswith("benchmarks/results/")]
        return {"sha": sha.stdout.strip(), "dirty": bool(code), "dirty_paths": code,
                "modified_results": len(paths) - len(code)}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "numpy", "kanfast", "kan", "flashkan", "inkan"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:
            out[mod] = None
    if out.get("kan") is not None:
        try:
            from importlib.metadata import version

            out["kan"] = version("pykan")
        except Exception:
            pass
    return out


def machine(device: torch.device) -> Dict[str, Any]:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
