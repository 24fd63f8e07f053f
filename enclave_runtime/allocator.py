"""The enclave process's CPU allocator: torch's, or the caching one built beside this module.

Reads ``enclave_runtime/native/teesplit_cpu_allocator.so`` (built at install by
``python -m partitioner.native``, from ``native/cpu_allocator.cpp``); writes torch's CPU
allocator for the rest of the process. Why: a compiled enclave stage allocates and frees a
buffer per kernel, and glibc's aligned allocation path, which torch's allocator calls, took
~15 % of a replayed SmolLM2 ``slalom`` decode step (``benchmarks/README.md``). Guarantees:
:func:`install` is idempotent and says, when it cannot install, why (the library not built,
or not loadable); tensors allocated before keep their own deleter, so installing at any point
is safe. The library is the enclave process's own machine code, package data of this package
(``setup.py``) like its Python modules, where the stage libraries are the bundle's.

glibc's own settings for the process (:data:`TUNABLES`) must be in its environment when it
starts: :func:`environment` gives the environment to start an enclave process with (the
launcher, the local deployment and the Gramine manifest use it), and :func:`prepare` says when
the running process was started without them.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent / "native" / "teesplit_cpu_allocator.so"

# glibc keeps at most 7 freed blocks of each small size (up to 1032 bytes) in a per-thread
# cache by default. A compiled stage creates and frees more tensor objects of one size per
# call than that (TensorImpl, StorageImpl, handles: C++ objects, not tensor data, so the
# caching allocator above never sees them); the rest went to glibc's bins and came back
# through ``_int_malloc``, ~12 % of a replayed SmolLM2 ``slalom`` decode step's samples
# (perf, stop 52), and the step ran ~1.2x faster with 1024 a size. That caps the cache at 1024
# blocks of each of glibc's 64 sizes: at most ~35 MB per thread that frees them (a thread's
# cache keeps what it frees, wherever it was allocated), so ~35 MB times the threads at worst.
TCACHE_COUNT = "glibc.malloc.tcache_count"
TUNABLES = f"{TCACHE_COUNT}=1024"

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _loaded
    if _loaded is None:
        import torch  # noqa: F401  (the library links against libc10, loaded with torch)

        lib = ctypes.CDLL(str(LIBRARY))
        lib.teesplit_cpu_allocator_active.restype = ctypes.c_int
        lib.teesplit_cpu_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)] * 3
        _loaded = lib
    return _loaded


def install() -> str | None:
    """Make the caching allocator torch's CPU allocator. Returns ``None`` when it is (now or
    already), else why not, in one line (the caller says it and runs on torch's own)."""
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (python -m partitioner.native builds it)"
    with _lock:
        try:
            lib = _library()
        except OSError as exc:
            return f"cannot load {LIBRARY}: {exc}"
        if not lib.teesplit_cpu_allocator_active():
            lib.teesplit_cpu_allocator_install()
    return None


def active() -> bool:
    """Whether torch's CPU allocator is the caching one."""
    return _loaded is not None and bool(_loaded.teesplit_cpu_allocator_active())


def stats() -> dict[str, int]:
    """Allocations served from its free lists (``hits``), those that called glibc
    (``misses``), and the bytes on its free lists (``cached``); zeros before :func:`install`."""
    if _loaded is None:
        return {"hits": 0, "misses": 0, "cached": 0}
    values = [ctypes.c_uint64() for _ in range(3)]
    _loaded.teesplit_cpu_allocator_stats(*(ctypes.byref(v) for v in values))
    return dict(zip(("hits", "misses", "cached"), (int(v.value) for v in values), strict=True))


def tuned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (this process's: glibc read it when the process started) sets
    glibc's per-thread cache size, to :data:`TUNABLES`' value or one of the user's own."""
    environ = os.environ if environ is None else environ
    settings = environ.get("GLIBC_TUNABLES", "").split(":")
    return any(s.removeprefix(f"{TCACHE_COUNT}=").isdigit() for s in settings if "=" in s)


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start an enclave process with: ``environ`` (default this process's)
    with :data:`TUNABLES` added to ``GLIBC_TUNABLES``, unless it sets the cache size itself
    (a user's own setting is kept)."""
    env = dict(os.environ if environ is None else environ)
    if not tuned(env):
        env["GLIBC_TUNABLES"] = ":".join(s for s in (env.get("GLIBC_TUNABLES"), TUNABLES) if s)
    return env


def prepare() -> list[str]:
    """What an enclave process's ``main`` does first: :func:`install`; what is not as it
    should be, one line each (the caller prints them; the process runs either way)."""
    why = install()
    notes = [f"torch's own CPU allocator ({why})"] if why is not None else []
    if not tuned():
        notes.append(
            f"glibc's per-thread cache at its default (start with GLIBC_TUNABLES={TUNABLES}: "
            "compiled stages run ~1.2x faster)"
        )
    return notes
