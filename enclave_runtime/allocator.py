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
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent / "native" / "teesplit_cpu_allocator.so"

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


def prepare() -> list[str]:
    """What an enclave process's ``main`` does first: :func:`install`; what is not as it
    should be, one line each (the caller prints them; the process runs either way)."""
    why = install()
    return [f"torch's own CPU allocator ({why})"] if why is not None else []
