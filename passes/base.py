"""Pass infrastructure on top of ``torch.fx.passes.infra.pass_base.PassBase``.

An :class:`AnalysisPass` may only write its own metadata namespace (``node.meta["teesplit"]``);
the framework fingerprints the graph before and after the pass and raises if the pass edited
it, the way ExecuTorch validates that a partitioner only tagged nodes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from partitioner.errors import LabelError

META_KEY = "teesplit"


def is_tensor_value(val: object) -> bool:
    """A tensor, or a list/tuple holding one (an op with several tensor results)."""
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)


def teesplit_meta(node: torch.fx.Node) -> dict[str, Any]:
    """The node's teesplit metadata dict, created on first use."""
    return node.meta.setdefault(META_KEY, {})


def is_public(node: torch.fx.Node) -> bool:
    """A placeholder tagged public: a parameter bit-identical to the policy's public base
    (``partitioner.public_base``), so not protected under ``protects: [model]``, or an input
    that carries sizes only (a decoder step's padding counts), so not under ``[input]``."""
    return bool(node.meta.get(META_KEY, {}).get("public"))


def model_weights(program: Any) -> dict[str, str]:
    """Placeholder name -> fqn of every tensor the model brings rather than the caller: its
    parameters, its buffers and the constants export lifted (a plain tensor attribute). Under
    ``protects: [model]`` all of them are the model's: a fine-tuned weight held as a buffer
    (as quantised checkpoints hold theirs) was once not protected at all."""
    sig = program.graph_signature
    return {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }


def weight_value(program: Any, fqn: str) -> torch.Tensor | None:
    """The value of weight ``fqn`` of ``program`` (state dict or lifted constants)."""
    value = program.state_dict.get(fqn)
    if value is None:
        value = program.constants.get(fqn)
    return value if isinstance(value, torch.Tensor) else None


def fake_like(
    val: torch.Tensor, dtype: torch.dtype, extra: tuple[int, ...] = (), wider: int = 0
) -> torch.Tensor:
    """A fake tensor with ``val``'s symbolic shape (plus ``extra`` dims, its last dim ``wider``
    by that much) and ``dtype``, for the ``meta["val"]`` of a node a pass creates."""
    from torch._guards import detect_fake_mode

    shape = list(val.shape)
    if wider:
        shape[-1] = shape[-1] + wider
    with detect_fake_mode([val]):
        return val.new_empty((*shape, *extra), dtype=dtype)


def graph_fingerprint(gm: torch.fx.GraphModule) -> tuple[tuple[str, str, str, str], ...]:
    return tuple((n.name, n.op, str(n.target), repr((n.args, n.kwargs))) for n in gm.graph.nodes)


class AnalysisPass(PassBase):
    """A pass that annotates ``node.meta`` and must leave the graph itself untouched."""

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult | None:
        before = graph_fingerprint(graph_module)
        result = super().__call__(graph_module)
        after = graph_fingerprint(graph_module)
        if before != after:
            changed = next(
                (b[0] for b, a in zip(before, after, strict=False) if b != a),
                "the node count",
            )
            raise LabelError(
                f"{type(self).__name__} edited the graph (first difference at {changed}); "
                "analysis passes may only write node.meta"
            )
        return result
