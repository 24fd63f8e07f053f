"""Labelling pass: one sensitivity label per compute node.

Reads an ExportedProgram's graph and signature; writes ``node.meta["teesplit"]["label"]`` (a
:class:`Label`) and ``["label_rule"]`` (why) on every ``call_function`` node; guarantees the
graph is unchanged and no compute node is left unlabelled. Placeholders and the output node are
not labelled: they are the program's signature (parameters, buffers, user inputs, results).

Labels come from the op and from ``nn_module_stack`` (module class and qualified name), never
from a list of model names, so an architecture nobody tried still gets labelled. Scopes are
recognised by class-name patterns (``*Attention*``, ``*Norm*``, ``*Layer``/``*Block``, ``*MLP*``,
rotary/positional embeddings, activation modules) and peft's LoRA wrappers.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.fx.passes.infra.pass_base import PassResult

from partitioner.errors import LabelError
from partitioner.label_set import Label
from partitioner.op_table import (
    ELEMENTWISE_OPS,
    EMBEDDING_OPS,
    GATHER_OPS,
    MATRIX_PRODUCT_OPS,
    NONLINEAR_OPS,
    NORM_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    op_name,
    props,
)
from passes.base import AnalysisPass, model_weights, teesplit_meta

_ATTENTION = re.compile(r"Attention|Attn")
_NORM = re.compile(r"Norm")
_POSITIONAL = re.compile(r"Rotary|Positional|PositionEmbedding|PosEmb")
_LAYER = re.compile(r"(Layer|Block)$")
_MLP = re.compile(r"MLP|FeedForward|FFN|Intermediate|Expert")
_ACTIVATION_MODULES = ("torch.nn.modules.activation.", "transformers.activations.")


@dataclass(frozen=True)
class Scope:
    """One ``nn_module_stack`` entry: qualified name and class path."""

    qualname: str
    classpath: str

    @property
    def cls(self) -> str:
        return self.classpath.rsplit(".", 1)[-1]


def module_stack(node: torch.fx.Node) -> list[Scope]:
    """Outermost-first module scopes of ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    scopes = []
    for qualname, cls in stack.values():
        classpath = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        scopes.append(Scope(qualname, classpath))
    return scopes


def _effective_scopes(scopes: list[Scope]) -> tuple[list[Scope], bool]:
    """Split off LoRA: returns (scopes for labelling, whether the node belongs to an adapter).

    A peft LoRA wrapper holds the frozen ``base_layer`` and the adapter (``lora_A``/``lora_B``,
    scaling, the add). Nodes under ``base_layer`` are labelled as if the wrapper were absent.
    """
    for i, scope in enumerate(scopes):
        is_wrapper = ".lora." in scope.classpath
        leaf = scope.qualname.rsplit(".", 1)[-1]
        if leaf.startswith("lora_"):
            return scopes, True
        if is_wrapper:
            inner = scopes[i + 1 :]
            if inner and inner[0].qualname.endswith(".base_layer"):
                return scopes[:i] + inner, False
            return scopes, True
    return scopes, False


class LabelPass(AnalysisPass):
    """Assign a :class:`Label` to every ``call_function`` node of an exported graph."""

    def __init__(self, program: ExportedProgram) -> None:
        super().__init__()
        self.weights: dict[str, str] = model_weights(program)
        self.user_inputs = user_input_names(program)

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        names = {n.name for n in graph_module.graph.nodes if n.op == "placeholder"}
        missing = sorted((set(self.weights) | set(self.user_inputs)) - names)
        if missing:
            raise LabelError(
                f"graph does not match its export signature: no placeholders {missing}"
            )

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        weight_derived = self._weight_derived(graph.nodes)
        vocab_sizes, embedding_weights = self._embedding_tables(graph.nodes, weight_derived)
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            label, rule = self._label(node, weight_derived, vocab_sizes, embedding_weights)
            meta = teesplit_meta(node)
            meta["label"] = label
            meta["label_rule"] = rule
        return PassResult(graph_module, False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        unlabelled = [
            n.name
            for n in graph_module.graph.nodes
            if n.op == "call_function" and "label" not in teesplit_meta(n)
        ]
        if unlabelled:
            raise LabelError(f"nodes left unlabelled: {unlabelled[:10]}")

    # -- analysis helpers ------------------------------------------------------------------

    def _weight_derived(
        self, nodes: Iterable[torch.fx.Node]
    ) -> dict[torch.fx.Node, frozenset[str]]:
        """Nodes whose value is a weight, or a weight viewed, transposed, expanded, sliced or
        cast without arithmetic, each with the qualified names of the weights it holds.

        This is what makes a matrix product a weight-linear layer however the model spells it:
        ``linear(x, W)``, ``x @ W.T``, ``matmul(x, Wt)``, ``einsum("bsi,oi->bso", x, W)``,
        ``bmm(x, W.expand(b, -1, -1))`` all have one operand that traces back to a parameter.

        A shape op's data is its first argument (a list of them for ``cat``/``stack``); its
        other tensor arguments only lend a size or a dtype (``expand(W, [sym_size(x, 0), …])``
        under a dynamic batch, ``W.type_as(x)``, ``W.expand_as(x)``), so they need not be
        weights. Two exceptions: a selection by an index operand (``index_select``, ``index``
        …) needs every operand weight-derived, since a weight read at activation-chosen rows is
        an embedding lookup, not the weight; and a factory (``zeros_like(W)``) holds none of
        the weight's values.
        """
        derived: dict[torch.fx.Node, frozenset[str]] = {}
        for node in nodes:
            if node.op == "placeholder" and node.name in self.weights:
                derived[node] = frozenset({self.weights[node.name]})
                continue
            name = op_name(node) if node.op == "call_function" else ""
            if name not in SHAPE_OPS or props(name).factory:
                continue
            data = node.all_input_nodes if props(name).gather else _data_operands(node)
            if data and all(d in derived for d in data):
                derived[node] = frozenset().union(*(derived[d] for d in data))
        return derived

    def _embedding_tables(
        self,
        nodes: Iterable[torch.fx.Node],
        weight_derived: dict[torch.fx.Node, frozenset[str]],
    ) -> tuple[set[int], set[str]]:
        sizes: set[int] = set()
        weights: set[str] = set()
        for node in nodes:
            if node.op == "call_function" and op_name(node) in EMBEDDING_OPS:
                table = node.args[0]
                if isinstance(table, torch.fx.Node):
                    weights |= weight_derived.get(table, frozenset({table.name}))
                    val = table.meta.get("val")
                    if isinstance(val, torch.Tensor) and isinstance(val.shape[0], int):
                        sizes.add(val.shape[0])
        return sizes, weights

    def _label(
        self,
        node: torch.fx.Node,
        weight_derived: dict[torch.fx.Node, frozenset[str]],
        vocab_sizes: set[int],
        embedding_weights: set[str],
    ) -> tuple[Label, str]:
        name = op_name(node)
        if node.target is operator.getitem or name.startswith("sym_") or node.target in _SYM_OPS:
            return Label.SHAPE, "structural"
        scopes, in_lora = _effective_scopes(module_stack(node))
        classes = [s.cls for s in scopes]
        in_attention = any(_ATTENTION.search(c) for c in classes)
        if in_lora:
            return Label.LORA, "scope:lora-adapter"
        norm_scope = next((c for c in reversed(classes) if _NORM.search(c)), None)
        if name in NORM_OPS or norm_scope:
            return Label.NORM, f"scope:{norm_scope}" if norm_scope else f"op:{name}"
        operands = [a for a in node.all_input_nodes]
        weight_operands = [a for a in operands if a in weight_derived]
        if name in EMBEDDING_OPS:
            return Label.EMBEDDING, f"op:{name}"
        if (
            name in GATHER_OPS
            and operands
            and operands[0] in weight_derived
            and len(weight_operands) < len(operands)
        ):
            return Label.EMBEDDING, f"op:{name}-from-weight"
        positional = next((c for c in reversed(classes) if _POSITIONAL.search(c)), None)
        if positional:
            return Label.EMBEDDING, f"scope:{positional}"
        activation = next(
            (
                s.cls
                for s in reversed(scopes)
                if s.classpath.startswith(_ACTIVATION_MODULES) or s.cls.endswith("Activation")
            ),
            None,
        )
        if activation:
            return Label.NONLINEAR, f"scope:{activation}"
        if name in NONLINEAR_OPS:
            return Label.NONLINEAR, f"op:{name}"
        if name in SDPA_OPS:
            return Label.ATTENTION, f"op:{name}"
        if name in MATRIX_PRODUCT_OPS:
            weights = set().union(*(weight_derived[w] for w in weight_operands))
            return self._label_linear(
                node, name, classes, in_attention, weights, vocab_sizes, embedding_weights
            )
        if name in ELEMENTWISE_OPS:
            return Label.ELEMENTWISE, f"op:{name}"
        if name in SHAPE_OPS:
            return Label.SHAPE, f"op:{name}"
        return Label.OTHER, f"unrecognised op {node.target}"

    def _label_linear(
        self,
        node: torch.fx.Node,
        name: str,
        classes: list[str],
        in_attention: bool,
        weights: set[str],
        vocab_sizes: set[int],
        embedding_weights: set[str],
    ) -> tuple[Label, str]:
        """A matrix product with a weight-derived operand (``weights``: the qualified names of
        the weights behind it) is a weight-linear layer, labelled by its module scope alone,
        whatever op spells it; a product of two activations is attention or other."""
        if not weights:
            if in_attention:
                return Label.ATTENTION, f"op:{name}-of-activations-in-attention"
            return Label.OTHER, f"{name} of two activations outside an attention module"
        if in_attention:
            return Label.ATTENTION_PROJECTION, f"weight-{name}-in-attention"
        in_layer = any(_LAYER.search(c) and not _NORM.search(c) for c in classes)
        in_mlp = any(_MLP.search(c) for c in classes)
        val = node.meta.get("val")
        out_dim = val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None
        if not isinstance(out_dim, int):  # a symbolic size is unhashable, and never a vocabulary
            out_dim = None
        if not in_layer and not in_mlp and (weights & embedding_weights or out_dim in vocab_sizes):
            return Label.LM_HEAD, f"weight-{name}-to-vocab"
        if in_layer or in_mlp:
            return Label.FFN, f"weight-{name}-in-layer"
        return Label.OTHER, f"weight-{name} outside any layer, attention or MLP module"


_SYM_OPS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.neg,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
        torch.sym_int,
        torch.sym_float,
        torch.sym_sqrt,
        torch.sym_ite,
    }
)


def _data_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The operands a shape op takes its values from: ``args[0]``, or its nodes when it is a
    list (``cat``, ``stack``). Its other arguments are sizes, dims or shape donors."""
    first = node.args[0] if node.args else None
    if isinstance(first, torch.fx.Node):
        return [first]
    if isinstance(first, (list, tuple)):
        return [a for a in first if isinstance(a, torch.fx.Node)]
    return []


def user_input_names(program: ExportedProgram) -> list[str]:
    """Placeholder names of the user's tensor inputs (constant arguments are baked in)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    return [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument)
    ]


def label_program(program: ExportedProgram) -> ExportedProgram:
    """Run :class:`LabelPass` over ``program`` in place (metadata only) and return it."""
    LabelPass(program)(program.graph_module)
    return program


def label_of(node: torch.fx.Node) -> Label:
    label = node.meta.get("teesplit", {}).get("label")
    if label is None:
        raise LabelError(f"node {node.name} ({node.target}) has no label; run LabelPass first")
    return label
