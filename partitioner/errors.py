"""Typed errors. Every message names the node, edge, key or file at fault."""

from __future__ import annotations


class TeesplitError(Exception):
    """Base class of every error teesplit raises on purpose."""


class PolicyError(TeesplitError, ValueError):
    """A policy is malformed: unknown key, unknown label, or contradictory settings."""


class CaptureError(TeesplitError):
    """torch.export could not capture the model; carries torch's reason."""


class LabelError(TeesplitError):
    """The labelling pass broke its contract (a node left unlabelled, a graph edited)."""


class PartitionError(TeesplitError):
    """Placement or splitting produced, or would produce, an invalid split program."""


class AuditError(TeesplitError):
    """A protected value would reach the GPU in the clear."""


class ArtifactError(TeesplitError):
    """A saved split program is missing, malformed or tampered with."""


class InputError(TeesplitError, ValueError):
    """A request is not what the program takes: token ids outside the vocabulary, an empty
    prompt, a prompt longer than the model's context, a size outside its range."""


class IntegrityError(TeesplitError):
    """A GPU stage returned results that fail the enclave's Freivalds check."""
