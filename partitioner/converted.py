"""Models converted once into a folder that loads fast, kept in a cache between processes.

Reads: a source file (a GGUF checkpoint) and ``TEESPLIT_CACHE`` (default
``$XDG_CACHE_HOME/teesplit``, else ``~/.cache/teesplit``). Writes: one folder per source,
named for a key of the source's sha256, :data:`FORMAT` and the versions of the libraries
that convert it, made under a lock (two processes asking at once convert once) as
``NAME-KEY.partial`` and renamed into place only after the conversion checked itself; a
conversion that did not match leaves ``NAME-KEY.mismatch`` instead. Guarantees: a folder is
used only if it is complete and checked; a changed source, format or library version gets a
new folder; where the cache cannot be written, the conversion fails or does not match, or a
folder no longer loads (:func:`discard`), callers load from the source instead (slower,
never different).

The cache is the compiler's, on the compiler's machine, as trusted as the installed packages
beside it: nothing here is read by the enclave.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

_DONE = ".converted"  # written last: a folder without it is not used


def cache_root() -> Path:
    """Where converted models live: ``TEESPLIT_CACHE``, else the user's cache folder."""
    root = os.environ.get("TEESPLIT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "teesplit"


# Bumped whenever what a conversion writes or checks changes: the old folders are not used.
FORMAT = 1
# The libraries whose versions can change what a conversion produces (transformers and gguf
# dequantise, tokenizers builds the tokenizer, safetensors and torch write and read it).
_LIBRARIES = ("transformers", "gguf", "tokenizers", "safetensors", "torch")


@functools.cache
def _digest(source: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256, once per process for one (path, size, mtime)."""
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _key(source: Path) -> str:
    info = source.stat()
    versions = "".join(_version(lib) for lib in _LIBRARIES)
    what = f"{_digest(source, info.st_size, info.st_mtime_ns)}|{FORMAT}|{versions}"
    return hashlib.sha256(what.encode()).hexdigest()[:20]


def _version(library: str) -> str:
    try:
        return f"{library}={importlib.metadata.version(library)};"
    except importlib.metadata.PackageNotFoundError:
        return f"{library}=none;"


def folder(name: str, source: Path, convert: Callable[[Path], str | None]) -> Path | None:
    """The converted folder of ``source``, converting it first if no complete one exists.

    ``convert(out)`` writes the folder ``out`` and returns why it does not match the source
    (None if it does). None (with a warning) when the cache cannot be written, the
    conversion failed or did not match: the caller then loads ``source`` itself. A mismatch
    is remembered (``NAME-KEY.mismatch``), so later loads do not convert again."""
    final = cache_root() / f"{name}-{_key(source)}"
    refused = final.with_name(final.name + ".mismatch")
    if (final / _DONE).is_file():
        return final
    mismatch = f"{name}: {refused} says the conversion differs; loading {source} itself"
    if refused.is_file():
        _uncached(mismatch)
        return None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f"{name}.lock", "w")
    except OSError as exc:
        _uncached(f"{name}: no cache at {final.parent} ({exc}); loading {source} itself")
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / _DONE).is_file():  # another process converted it while this one waited
            return final
        if refused.is_file():  # another process found the mismatch while this one waited
            _uncached(mismatch)
            return None
        partial = final.with_name(final.name + ".partial")
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            why = convert(partial)
            if why is not None:
                shutil.rmtree(partial, ignore_errors=True)
                refused.write_text(f"{source}: {why}\n")
                _uncached(f"{name}: the converted folder is not {source}: {why}; not used")
                return None
            (partial / _DONE).write_text(f"{source}\n")
            shutil.rmtree(final, ignore_errors=True)  # an incomplete one, never used
            partial.rename(final)
        except Exception as exc:  # a full disk in safetensors is not an OSError
            shutil.rmtree(partial, ignore_errors=True)
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _uncached(
                f"{name}: converting {source} into {partial} failed ({why}); loading it itself"
            )
            return None
    return final


def discard(path: Path, why: str) -> None:
    """A completed folder that no longer loads (a file truncated or removed since): removed,
    so that the next load converts afresh."""
    shutil.rmtree(path, ignore_errors=True)
    _uncached(f"{path} does not load ({why}); removed, loading the source itself")


def _uncached(why: str) -> None:
    # a warning, not an error: the caller loads the source itself and gets the same model
    warnings.warn(why, RuntimeWarning, stacklevel=3)
