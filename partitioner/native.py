"""Building the enclave's native helper: the caching CPU allocator (``enclave_runtime/allocator``).

Reads ``enclave_runtime/native/cpu_allocator.cpp``; writes
``enclave_runtime/native/teesplit_cpu_allocator.so`` (ignored by git; ``make`` builds it at
install). Compile-time code: it needs a C++ compiler and torch's headers, as the stage
libraries' compile does (``partitioner.aot_compiler``); the enclave only loads the result.

    python -m partitioner.native      # build (again) and print where
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "enclave_runtime" / "native" / "cpu_allocator.cpp"
TARGET = ROOT / "enclave_runtime" / "native" / "teesplit_cpu_allocator.so"


def build_allocator(target: Path = TARGET) -> Path:
    """Compile :data:`SOURCE` against the installed torch into ``target``; returns it.
    Raises whatever torch's extension builder raises (no compiler, a compile error)."""
    from torch.utils.cpp_extension import load

    with tempfile.TemporaryDirectory(prefix="teesplit-native-") as work:
        load(
            name="teesplit_cpu_allocator",
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            build_directory=work,
            is_python_module=False,
            verbose=False,
        )
        built = Path(work) / "teesplit_cpu_allocator.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".so.partial")
        shutil.copyfile(built, partial)
        partial.replace(target)  # a process loading it never sees half a file
    return target


if __name__ == "__main__":
    try:
        print(build_allocator())
    except Exception as exc:  # the CLI's one line: the build's own message
        sys.exit(f"teesplit native: cannot build {SOURCE.name}: {str(exc).splitlines()[0]}")
