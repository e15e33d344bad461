"""The CPU block kernels' library is loaded as code, so it comes only from places the current
user alone can write (kanfast.kernels.cpu_spline): a planted library (here one whose
constructor writes a marker file) is never mapped, whatever folder, owner, mode or link it
hides behind, and the kernels are built privately instead, with a warning that says why.

"Another user" is simulated with os.chown to uid 12345 (needs root; skipped otherwise)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import compare_to_reference
from kanfast import FastKANLayer
from kanfast.kernels import cpu_spline

OTHER_UID = 12345

pytestmark = pytest.mark.skipif(cpu_spline.load() is None, reason="the CPU block kernels are not built here")

_PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("KANFAST_TEST_MARKER");
    FILE *f = p ? fopen(p, "w") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def planted_bytes(tmp_path_factory) -> bytes:
    """A shared library whose constructor writes ``$KANFAST_TEST_MARKER``."""
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(_PLANTED_C)
    cc = cpu_spline._compiler()
    subprocess.run([*cc, "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")], check=True)
    return (d / "planted.so").read_bytes()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A fresh load() with the cache at ``tmp_path/cache`` (not made), the temp dir at
    ``tmp_path/tmp`` (made, mode 0755: the private ``kanfast-<uid>`` and mkdtemp go there) and
    the marker at ``tmp_path/marker``; the process's kernels restored after."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o755)
    monkeypatch.setattr(cpu_spline.tempfile, "gettempdir", lambda: str(tmp))
    monkeypatch.setattr(cpu_spline.tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("KANFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KANFAST_TEST_MARKER", str(tmp_path / "marker"))
    monkeypatch.delenv("KANFAST_CPU_KERNEL", raising=False)
    saved = (cpu_spline._loaded, cpu_spline._kernels)
    cpu_spline.reset()
    yield {"cache": tmp_path / "cache", "tmp": tmp, "private": tmp / f"kanfast-{os.getuid()}",
           "marker": tmp_path / "marker", "root": tmp_path}
    cpu_spline._loaded, cpu_spline._kernels = saved


def _name() -> str:
    return cpu_spline._library_name(cpu_spline._compiler(), cpu_spline._flag_sets()[0])


def _plant(folder: Path, data: bytes, uid=None, mode=0o755) -> Path:
    """``data`` under the library's cache name in ``folder`` with a matching ``.sha256``."""
    lib = folder / _name()
    lib.write_bytes(data)
    Path(str(lib) + ".sha256").write_text(hashlib.sha256(data).hexdigest())
    lib.chmod(mode)
    if uid is not None:
        _chown(lib, uid)
        _chown(Path(str(lib) + ".sha256"), uid)
    return lib


def _chown(path: Path, uid: int) -> None:
    try:
        os.chown(path, uid, -1, follow_symlinks=False)
    except PermissionError:
        pytest.skip("simulating another user needs root")


def _folder(path: Path, uid=None, mode=0o700) -> Path:
    path.mkdir(parents=True)
    path.chmod(mode)
    if uid is not None:
        _chown(path, uid)
    return path


def _load_warns(match: str):
    with pytest.warns(RuntimeWarning, match=match) as rec:
        kern = cpu_spline.load()
    return kern, " ".join(str(w.message) for w in rec)


def _genuine(lib: Path) -> bool:
    """``lib`` is a regular file of ours, not group/other-writable, holding a real build."""
    st = os.lstat(lib)
    return (lib.is_file() and not lib.is_symlink() and st.st_uid == os.geteuid() and not st.st_mode & 0o022
            and cpu_spline.CpuSplineKernels(ctypes.CDLL(str(lib))) is not None)


@pytest.mark.parametrize("owner, mode", [("other", 0o1777), ("other", 0o755), ("me", 0o777), ("me", 0o1777),
                                         ("me", 0o775)], ids=lambda v: v if isinstance(v, str) else f"{v:o}")
def test_cache_folder_others_can_write_is_not_used(env, planted_bytes, owner, mode):
    """KANFAST_CACHE_DIR at a folder another user owns, or that group/others can write (sticky
    or not), with a planted library of the right name and hash: never mapped; the kernels are
    built in the private temp folder; the warning names the folder and why."""
    uid = OTHER_UID if owner == "other" else None
    cache = _folder(env["cache"], uid, mode)
    _plant(cache, planted_bytes, uid)
    why = f"belongs to uid {OTHER_UID}" if owner == "other" else "writable by group or others"
    with pytest.warns(RuntimeWarning, match=why) as rec:
        layer = FastKANLayer(4, 3, dtype=torch.float64)
        layer(torch.rand(8, 4, dtype=torch.float64))  # the reproduction: the first call loads
    assert str(cache) in str(rec[0].message)
    assert not env["marker"].exists(), "the planted library's constructor ran"
    assert cpu_spline.load() is not None
    assert _genuine(env["private"] / _name())
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def test_symlinked_cache_folder_is_not_used(env, planted_bytes):
    """KANFAST_CACHE_DIR is a symbolic link (to a folder of ours holding a planted library)."""
    real = _folder(env["root"] / "elsewhere")
    _plant(real, planted_bytes)
    env["cache"].symlink_to(real)
    kern, msg = _load_warns("is a symbolic link")
    assert kern is not None and str(env["cache"]) in msg
    assert not env["marker"].exists()
    assert _genuine(env["private"] / _name())


@pytest.mark.parametrize("how", ["other owner", "group-writable", "other-writable", "symlink"])
def test_planted_file_in_own_folder_is_rebuilt(env, planted_bytes, how):
    """In the user's own private cache folder, a library file that another user owns, that
    group/others can write, or that is a symbolic link (to a planted file of ours elsewhere):
    never mapped; the real library is built over it; the warning names the file."""
    cache = _folder(env["cache"])
    if how == "symlink":
        target = _plant(_folder(env["root"] / "elsewhere"), planted_bytes)
        (cache / _name()).symlink_to(target)
        Path(str(cache / _name()) + ".sha256").write_text(hashlib.sha256(planted_bytes).hexdigest())
    else:
        _plant(cache, planted_bytes, OTHER_UID if how == "other owner" else None,
               {"other owner": 0o755, "group-writable": 0o775, "other-writable": 0o757}[how])
    why = {"other owner": f"belongs to uid {OTHER_UID}", "group-writable": "writable by group or others",
           "other-writable": "writable by group or others", "symlink": "is a symbolic link"}[how]
    kern, msg = _load_warns(why)
    assert kern is not None and str(cache / _name()) in msg
    assert not env["marker"].exists()
    assert _genuine(cache / _name())


def test_symlinked_private_temp_folder_is_not_used(env, planted_bytes):
    """Another user planted ``$TMPDIR/kanfast-<uid>`` as a symbolic link to a folder of the
    victim's that others can write, holding a planted library (the old code followed the link
    with stat() and trusted it): never mapped; built in the cache folder instead."""
    _folder(env["cache"])
    target = _folder(env["root"] / "victims-open-folder", mode=0o777)
    _plant(target, planted_bytes, OTHER_UID)
    env["private"].symlink_to(target)
    _chown(env["private"], OTHER_UID)
    kern, msg = _load_warns("is a symbolic link")
    assert kern is not None and str(env["private"]) in msg
    assert not env["marker"].exists()
    assert _genuine(env["cache"] / _name())


def test_no_usable_folder_builds_in_a_fresh_private_folder(env, planted_bytes):
    """Neither the cache folder nor ``kanfast-<uid>`` may be used (both another user's, with
    planted libraries): built in a fresh mkdtemp folder, loaded, nothing left behind, both
    folders named in the warning."""
    for key in ("cache", "private"):
        _plant(_folder(env[key], OTHER_UID, 0o1777), planted_bytes, OTHER_UID)
    before = set(env["tmp"].iterdir())
    kern, msg = _load_warns(f"belongs to uid {OTHER_UID}")
    assert kern is not None
    assert str(env["cache"]) in msg and str(env["private"]) in msg
    assert not env["marker"].exists()
    assert set(env["tmp"].iterdir()) == before  # the fresh folder is gone (the library stays mapped)
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def test_swap_after_the_check_loads_the_checked_file(env, planted_bytes, monkeypatch, recwarn):
    """The library mapped is the one whose bytes were checked and hashed: a planted file
    renamed over the checked one right after hashing (the check-then-load race) is not loaded."""
    monkeypatch.setenv("KANFAST_CACHE_DIR", str(env["root"] / "first"))
    assert cpu_spline.load() is not None  # a genuine build, copied into a folder never loaded from
    built = env["root"] / "first" / _name()
    genuine = built.read_bytes()
    lib = _folder(env["cache"]) / _name()
    shutil.copyfile(built, lib)
    shutil.copyfile(str(built) + ".sha256", str(lib) + ".sha256")
    monkeypatch.setenv("KANFAST_CACHE_DIR", str(env["cache"]))
    decoy = env["cache"] / "decoy.so"
    decoy.write_bytes(planted_bytes)
    real_sha256 = hashlib.sha256
    swapped = []

    class RacingHashlib:
        @staticmethod
        def sha256(data=b"", *a, **kw):
            h = real_sha256(data, *a, **kw)
            if not swapped and bytes(data) == genuine:
                os.replace(decoy, lib)  # the other side of the race wins right after the hash
                swapped.append(True)
            return h

    monkeypatch.setattr(cpu_spline, "hashlib", RacingHashlib)
    cpu_spline.reset()
    assert cpu_spline.load() is not None
    assert swapped
    assert not env["marker"].exists(), "the file swapped in after the check was loaded"


def test_without_proc_the_checked_bytes_are_loaded_from_a_fresh_private_folder(env, monkeypatch):
    """Where /proc/self/fd does not exist (macOS), the checked bytes are loaded from a fresh
    mkdtemp folder that is removed again."""
    monkeypatch.setattr(cpu_spline, "_PROC_FD", str(env["root"] / "no-proc"))
    assert cpu_spline.load() is not None
    cpu_spline.reset()
    before = set(env["tmp"].iterdir())
    kern = cpu_spline.load()
    assert kern is not None and set(env["tmp"].iterdir()) == before
    layer = FastKANLayer(4, 3, dtype=torch.float64)
    compare_to_reference(layer, torch.rand(20, 4, dtype=torch.float64) * 2 - 1)


def test_own_private_cache_loads_without_warning_or_rebuild(env, monkeypatch, recwarn):
    """The ordinary case is unchanged: a build in the user's own folder (mode 0755 or 0700,
    made by an earlier process) is loaded without rebuilding and without a warning."""
    assert cpu_spline.load() is not None
    assert os.stat(env["cache"]).st_mode & 0o777 == 0o700
    env["cache"].chmod(0o755)
    cpu_spline.reset()
    monkeypatch.setattr(cpu_spline, "_build", lambda *a, **kw: pytest.fail("rebuilt although cached"))
    assert cpu_spline.load() is not None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
