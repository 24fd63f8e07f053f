"""teesplit: split PyTorch models between an SGX enclave and an untrusted GPU."""

from partitioner.api import partition
from partitioner.capture import Captured, capture
from partitioner.errors import (
    ArtifactError,
    AuditError,
    CaptureError,
    LabelError,
    PartitionError,
    PolicyError,
    TeesplitError,
)
from partitioner.policy import PRESETS, Policy, RNMConfig
from partitioner.program import SplitProgram

__all__ = [
    "PRESETS",
    "ArtifactError",
    "AuditError",
    "CaptureError",
    "Captured",
    "LabelError",
    "PartitionError",
    "Policy",
    "PolicyError",
    "RNMConfig",
    "SplitProgram",
    "TeesplitError",
    "capture",
    "partition",
]
