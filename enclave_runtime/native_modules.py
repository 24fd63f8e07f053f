"""Loading the enclave's native Python modules (``enclave_runtime/native/*.so``).

Built by ``python -m partitioner.native`` (``make`` does it at install). Reads one file;
writes nothing. Guarantees: a module that is missing, or that does not load (built against
another torch), gives ``None``, and its caller then runs the Python code that does the same
work; so a native module is a speed-up, never what makes a check hold.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

NATIVE = Path(__file__).resolve().parent / "native"


def load(name: str) -> ModuleType | None:
    """``native/<name>.so`` as a module, or ``None`` (module docstring)."""
    path = NATIVE / f"{name}.so"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module
