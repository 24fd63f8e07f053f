"""Building the enclave's native helpers: the caching CPU allocator (``enclave_runtime/allocator``),
the fast accept path of the reply check (``enclave_runtime/replies``), the stage loop in C++
(``enclave_runtime/fastpath``) and the mask pool's int8 corrections (``enclave_runtime/ring_gemm``).

Reads ``enclave_runtime/native/*.cpp``; writes ``enclave_runtime/native/teesplit_*.so``
(ignored by git; ``make`` builds them at install). Compile-time code: it needs a C++ compiler
and torch's headers, as the stage libraries' compile does (``partitioner.aot_compiler``); the
enclave only loads the results.

    python -m partitioner.native      # build (again) and print where
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "enclave_runtime" / "native"
# name: (source, whether it is a Python module: the allocator is loaded with ctypes)
HELPERS = {
    "teesplit_cpu_allocator": ("cpu_allocator.cpp", False),
    "teesplit_reply_check": ("reply_check.cpp", True),
    "teesplit_step_loop": ("step_loop.cpp", True),
    "teesplit_ring_gemm": ("ring_gemm.cpp", True),
}


def build(name: str, folder: Path = NATIVE) -> Path:
    """Compile helper ``name`` (:data:`HELPERS`) against the installed torch into
    ``folder/name.so``; returns it. Raises whatever torch's extension builder raises (no
    compiler, a compile error)."""
    from torch.utils.cpp_extension import load

    source, module = HELPERS[name]
    target = folder / f"{name}.so"
    with tempfile.TemporaryDirectory(prefix="teesplit-native-") as work:
        load(
            name=name,
            sources=[str(NATIVE / source)],
            extra_cflags=["-O3"],
            build_directory=work,
            is_python_module=module,
            verbose=False,
        )
        built = Path(work) / f"{name}.so"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".so.partial")
        shutil.copyfile(built, partial)
        partial.replace(target)  # a process loading it never sees half a file
    return target


if __name__ == "__main__":
    for helper, (cpp, _) in HELPERS.items():
        try:
            print(build(helper))
        except Exception as exc:  # the CLI's one line: the build's own message
            sys.exit(f"teesplit native: cannot build {cpp}: {str(exc).splitlines()[0]}")
