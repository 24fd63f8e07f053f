"""teesplit: split PyTorch models between an SGX enclave and an untrusted GPU.

Names are imported on first use (PEP 562) so that ``passes`` can import
``partitioner.errors`` without pulling in the whole pipeline and creating an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "partition": "partitioner.api",
    "load": "partitioner.artifacts",
    "Captured": "partitioner.capturing",
    "capture": "partitioner.capturing",
    "ArtifactError": "partitioner.errors",
    "AuditError": "partitioner.errors",
    "CaptureError": "partitioner.errors",
    "IntegrityError": "partitioner.errors",
    "LabelError": "partitioner.errors",
    "PartitionError": "partitioner.errors",
    "PolicyError": "partitioner.errors",
    "TeesplitError": "partitioner.errors",
    "PRESETS": "partitioner.policy",
    "Policy": "partitioner.policy",
    "RNMConfig": "partitioner.policy",
    "SplitProgram": "partitioner.program",
    "audit": "passes.audit",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
