"""The CPU engines' per-thread work buffers, kept from call to call.

Fresh allocations of a dense block's size cost page faults (~2 ms per call at batch 4096,
in = 256 on a 2-core VM), so every thread that runs a CPU engine (the caller, or the workers
of :mod:`kanfast.cpu_workers`) keeps its buffers in a dict of its own
(:func:`thread_buffers`): the dense-block engine's blocks and scratch buffers
(:class:`kanfast.cpu_plan.Block`) and the sparse engine's tables
(:mod:`kanfast.sparse_backend`). :func:`release_buffers` (also
``kanfast.torch_backend.release_buffers``) frees them all; a thread's go with the thread.
Imports nothing of kanfast.
"""

from __future__ import annotations

import os
import threading
import weakref

__all__ = ["thread_buffers", "release_buffers"]


class _Buffers(dict):
    """One thread's work buffers, kept from call to call (see :func:`release_buffers`)."""

    # identity, not contents, for the WeakSet of all threads' buffers
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


_local = threading.local()
_all_buffers: "weakref.WeakSet[_Buffers]" = weakref.WeakSet()  # every thread's (dropped with the thread)
_buffers_lock = threading.Lock()


def _reset_buffers_lock() -> None:
    """In a forked child: a fresh lock (a thread of the parent that held it does not exist
    here, so the child's copy would stay locked forever)."""
    global _buffers_lock
    _buffers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_buffers_lock)


def thread_buffers() -> _Buffers:
    """The calling thread's work buffers (created on first use), a dict the engines key by
    what they hold: :class:`kanfast.cpu_plan.Block`'s scratch buffers, the sparse engine's
    packed tables (:mod:`kanfast.sparse_backend`)."""
    bufs = getattr(_local, "buffers", None)
    if bufs is None:
        bufs = _local.buffers = _Buffers()
        with _buffers_lock:
            _all_buffers.add(bufs)
    return bufs


def release_buffers() -> None:
    """Free the work buffers the torch backend keeps between calls.

    Each thread that runs the engine (the caller, or the CPU workers of
    :mod:`kanfast.cpu_workers`) keeps its largest dense block, work buffers and
    weight-sized buffers (see the module's memory bound: at most about 16 MiB in float32
    at k = 3 and in = out = 256, per dtype) so that the next call does not pay for
    fresh pages again (page faults cost ~2 ms per call at batch 4096, in = 256 on
    a 2-core VM). A thread's buffers go when the thread ends. Safe to call at any
    time: a call in flight keeps the buffers it holds."""
    with _buffers_lock:
        for bufs in list(_all_buffers):
            bufs.clear()
