"""Taint: which secrets each value of a labelled program depends on, and the edge protection.

Reads the labelled :class:`ExportedProgram` (with ``state_of`` tags on KV-cache inputs) and the
policy; writes nothing. Guarantees: every value gets the set of secrets (``input``, ``model``,
``dp``) it depends on, computed to a fixpoint over state inputs, and :func:`protection_of`
turns a crossing value's taint into the protection the policy requires for it.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from partitioner.policy import Policy
from passes.base import is_public, model_weights
from passes.labels import user_input_names

INPUT_TAINT, MODEL_TAINT, DP_TAINT = "input", "model", "dp"


def taint_of(
    program: ExportedProgram, policy: Policy, sanitised_input: str | None = None
) -> dict[str, frozenset[str]]:
    """For every value: which secrets it depends on (``input``, ``model``, ``dp``).

    Sizes are public (shapes are not hidden by any scheme here), so non-tensor values carry no
    taint. A token input sanitised by RNM carries ``dp`` instead of ``input``. A state input
    (a KV cache: placeholder tagged ``state_of`` by capture) is what an earlier call returned
    for the output it names, so it carries that output's taint: the analysis is repeated until
    the taints of state inputs stop changing (once per chain of state, in practice twice).
    """
    params = set(model_weights(program))
    users = set(user_input_names(program))
    state = {
        n.name: n.meta["teesplit"]["state_of"]
        for n in program.graph.nodes
        if n.op == "placeholder" and "state_of" in n.meta.get("teesplit", {})
    }
    carried: dict[str, frozenset[str]] = dict.fromkeys(state, frozenset())
    while True:
        taint: dict[str, frozenset[str]] = {}
        for node in program.graph.nodes:
            tags: set[str] = set()
            if node.op == "placeholder":
                if node.name in state:
                    tags |= carried[node.name]
                elif node.name in users and "input" in policy.protects and not is_public(node):
                    tags.add(DP_TAINT if node.name == sanitised_input else INPUT_TAINT)
                elif node.name in params and "model" in policy.protects:
                    if not is_public(node):  # a public base's
                        tags.add(MODEL_TAINT)
            elif node.op == "call_function" and isinstance(
                node.meta.get("val"), (torch.Tensor, list, tuple)
            ):
                for inp in node.all_input_nodes:
                    tags |= taint.get(inp.name, frozenset())
            taint[node.name] = frozenset(tags)
        update = {name: taint[out] for name, out in state.items()}
        if update == carried:
            return taint
        carried = update


def protection_of(tags: frozenset[str], masking: str) -> str:
    """The protection an enclave -> GPU edge with these taints gets under ``masking``."""
    if not tags:
        return "public"
    if masking != "none":
        return masking
    if tags == {DP_TAINT}:
        return "dp"
    return "none"
