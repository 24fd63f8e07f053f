"""Small graph edits shared by the passes: copy a stage's graph, add an input, find the
placeholder of a value, wrap a graph with its weights, rewrite a copy of a program. None edits a
graph it is given.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from partitioner.plan import Stage


def copy_graph(module: torch.fx.GraphModule) -> tuple[torch.fx.Graph, dict[str, torch.fx.Node]]:
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(module.graph, value_map)
    graph.output(out)
    return graph, {old.name: new for old, new in value_map.items()}


def rewritten(
    program: ExportedProgram,
    rewrite: Callable[[torch.fx.Graph, dict[torch.fx.Node, torch.fx.Node]], None],
) -> ExportedProgram:
    """A new program whose graph is a copy of ``program``'s, changed by ``rewrite(graph,
    value_map)`` (``value_map``: each original node to its copy); weights are shared, the
    copy's teesplit tags are its own."""
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(program.graph, value_map)
    graph.output(output)
    for old, new in value_map.items():  # graph_copy shares each node's meta values
        if "teesplit" in old.meta:  # our tags: a pass that tags the copy must not tag this
            new.meta["teesplit"] = dict(old.meta["teesplit"])  # its values are immutable
    rewrite(graph, value_map)
    graph.lint()
    module = torch.fx.GraphModule(program.graph_module, graph)
    return program._update(module, program.graph_signature)


def append_placeholder(graph: torch.fx.Graph, name: str, like: Any) -> torch.fx.Node:
    last = list(graph.find_nodes(op="placeholder"))
    ctx = (
        graph.inserting_after(last[-1]) if last else graph.inserting_before(next(iter(graph.nodes)))
    )
    with ctx:
        ph = graph.placeholder(name)
    ph.meta["val"] = like
    return ph


def input_node(stage: Stage, nodes: dict[str, torch.fx.Node], value: str) -> torch.fx.Node:
    """The copied placeholder through which ``stage`` reads ``value``."""
    old = list(stage.module.graph.find_nodes(op="placeholder"))[stage.inputs.index(value)]
    return nodes[old.name]


def graph_module(
    root: torch.fx.GraphModule, graph: torch.fx.Graph, extra: dict[str, torch.Tensor], name: str
) -> torch.fx.GraphModule:
    attrs: dict[str, Any] = dict(extra)
    for node in graph.find_nodes(op="get_attr"):
        if node.target not in attrs:
            attrs[node.target] = operator.attrgetter(node.target)(root)
    return torch.fx.GraphModule(attrs, graph, class_name=name)
