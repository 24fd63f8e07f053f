"""Freivalds integrity checks (``integrity="freivalds"``): which GPU stages are checked.

Reads the protected stages, their corrections and which corrections are precomputed; returns
the enclave's own copy of each checked stage (for the bias term ``f(0)``) and its outputs.
Guarantees: every GPU stage is checked, or the split fails with a :class:`PartitionError`
saying why it cannot be (the runtime check itself is ``enclave_runtime/integrity.py``).
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from partitioner.errors import PartitionError
from partitioner.plan import GPU, Correction, Stage
from partitioner.policy import Policy


def freivalds_copies(
    policy: Policy, stages: list[Stage], corrections: dict[str, Correction], pooled: list[str]
) -> dict[str, tuple[torch.fx.GraphModule, list[str]]]:
    """GPU stage -> (the enclave's own copy of its module, its outputs), for every checked
    stage; a stage Freivalds cannot check is a :class:`PartitionError` naming it."""
    if policy.integrity != "freivalds":
        return {}
    checked: dict[str, tuple[torch.fx.GraphModule, list[str]]] = {}
    for stage in stages:
        if stage.side != GPU:
            continue
        corr = corrections.get(stage.name)
        why = None
        if corr is None:
            why = "none of its inputs is masked, so there is no linear map to check"
        elif stage.name not in pooled:
            why = f"it is not affine in its inputs (products {corr.products})"
        elif corr.delta_inputs != stage.inputs:
            unmasked = sorted(set(stage.inputs) - set(corr.delta_inputs))
            why = f"its inputs {unmasked} are not masked"
        elif corr.delta_outputs != stage.outputs:
            why = "some of its outputs do not depend on its inputs"
        if why is not None:
            raise PartitionError(
                f"integrity='freivalds' cannot check GPU stage {stage.name}: {why}; use "
                "integrity='none' or pin its ops to the enclave"
            )
        # The enclave computes the bias term f(0) with its own module object (weights are
        # shared: they multiply zeros), never by asking the GPU.
        own = torch.fx.GraphModule(stage.module, copy.deepcopy(stage.module.graph))
        checked[stage.name] = (own, list(stage.outputs))
    return checked
