"""A split program's whole enclave side as one ahead-of-time compiled library.

Why: with each enclave stage its own library, a SmolLM2 decode step crosses into Python 242
times (121 libraries, 121 GPU stages); replayed, the executor's loop between the libraries
costs as much as the libraries themselves (benchmarks/README.md). Here the enclave stages'
lowered graphs (``partitioner.aot.lower``, with the Freivalds checks they fuse) are inlined
into one graph in program order, and each GPU stage becomes a call of
``teesplit_step::gpu`` (``partitioner.step_op``), which the library makes back into the
enclave's Python: the executor sends the request, checks the reply and returns it.

Pass: reads a split program whose enclave stages all lower; writes one graph and compiles
it to ``<key>.so`` (and the ``.json`` AOTInductor's proxy executor reads), returning a
:class:`~partitioner.plan.StepLibrary`. Guarantees:

* **The same stages.** Each enclave stage's lowered graph is copied as it is, with the
  inputs the executor would pass it (the call's inputs, the mask set's pads and
  corrections, the check's vectors, its constants), so the step computes what the stages
  compute, op for op.
* **The same order of refusals.** The verdict so far (the first refusal: a stage's fused
  check, naming the GPU stage it checked, before its masks' flag) is an input of each GPU
  call, whose handler raises before sending anything, and passed on by it to the next (so
  the calls are made in program order), and an output of the library: the call ends where
  the per-stage executor would end it, with its error.
* **Only where it holds.** A program with RNM, held GPU state, a correction the executor
  computes per call, float Freivalds checks, a stage that does not lower, or a GPU stage
  whose outputs are not rows of one of its inputs gets no step library
  (:class:`~partitioner.aot.NotLowerable`, with the reason).
"""

from __future__ import annotations

import hashlib
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx

from partitioner import step_op
from partitioner.aot import _FORMAT, NotLowerable, _requantised, fused_check, lower
from partitioner.aot_compiler import compile_exported
from partitioner.plan import ENCLAVE, GPU, StepLibrary


def _verdict(
    previous: torch.Tensor,
    verified: torch.Tensor | None,
    checked: int,
    masks_ok: torch.Tensor | None,
) -> torch.Tensor:
    """The verdict after an enclave stage (``partitioner.step_op``): the first refusal
    stands; within the stage its check's (of the GPU stage at position ``checked``) comes
    before its masks', as the stage's own library raises them."""
    code = previous
    if verified is not None:
        code = torch.where((code == step_op.GO_ON) & ~verified, step_op.FAILED + checked, code)
    if masks_ok is not None:
        code = torch.where((code == step_op.GO_ON) & ~masks_ok, step_op.REFUSED, code)
    return code


def _eligible(program: Any) -> None:
    why = program.spec.between_stages()
    if why is not None:
        raise NotLowerable(why)
    prot = program.protection
    if _requantised(program):
        raise NotLowerable("a row-scaled value is quantised again for a correction")
    checked = {s.name for s in program.stages if s.side == GPU and s.name in prot.freivalds}
    if not checked:
        raise NotLowerable("no GPU stage is checked")


def _reply_rule(stage: Any) -> tuple[list[int], list[int]]:
    """Per output of a GPU stage: the input whose rows it has, and its width."""
    inputs = [p.meta.get("val") for p in stage.module.graph.find_nodes(op="placeholder")]
    out = next(iter(stage.module.graph.find_nodes(op="output"))).args[0]
    outs = [out] if isinstance(out, torch.fx.Node) else list(out)
    like, widths = [], []
    for node in outs:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(val.shape[-1], int):
            raise NotLowerable(f"GPU stage {stage.name}: an output has no static width")
        match = next(
            (
                i
                for i, x in enumerate(inputs)
                if isinstance(x, torch.Tensor)
                and x.dtype == val.dtype
                and x.dim() == val.dim()
                and all(a == b for a, b in zip(x.shape[:-1], val.shape[:-1], strict=True))
            ),
            None,
        )
        if match is None:
            raise NotLowerable(f"GPU stage {stage.name}: an output is not rows of an input")
        like.append(match)
        widths.append(int(val.shape[-1]))
    return like, widths


class _Builder:
    def __init__(self, program: Any) -> None:
        self.program = program
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}  # the enclave's values
        self.gpu: dict[str, torch.fx.Node] = {}  # what the GPU holds (masked where masked)
        self.inputs: list[str] = []  # the call's inputs, in placeholder order
        self.pool: dict[str, torch.fx.Node] = {}  # "pad:x" / "delta:x" -> placeholder
        self.constants: list[torch.Tensor] = []
        self.placeholders: list[torch.fx.Node] = []
        self.sources: list[tuple[str, str]] = []  # per placeholder: what feeds it

    def placeholder(self, kind: str, name: str, val: Any) -> torch.fx.Node:
        node = self.graph.placeholder(f"p{len(self.placeholders)}")
        node.meta["val"] = val
        self.placeholders.append(node)
        self.sources.append((kind, name))
        return node

    def value(self, name: str, val: Any, gpu_first: bool) -> torch.fx.Node:
        first, second = (self.gpu, self.env) if gpu_first else (self.env, self.gpu)
        node = first.get(name, second.get(name))
        if node is None:  # a call input, read for the first time
            node = self.env[name] = self.placeholder("input", name, val)
            self.inputs.append(name)
        return node

    def pooled(self, kind: str, name: str, val: Any) -> torch.fx.Node:
        key = f"{kind}:{name}"
        if key not in self.pool:
            self.pool[key] = self.placeholder(kind, name, val)
        return self.pool[key]

    def enclave(self, position: int, stage: Any, code: torch.fx.Node) -> torch.fx.Node:
        verify = fused_check(self.program, position)
        lowered = lower(stage.module, verify)
        phs = list(lowered.module.graph.find_nodes(op="placeholder"))
        val_map: dict[torch.fx.Node, Any] = {}
        n_in = len(stage.inputs)
        at = n_in + len(stage.extra_inputs)
        if at != lowered.stage_inputs:
            raise NotLowerable(f"enclave stage {stage.name}: inputs do not match its graph")
        for ph, name in zip(phs[:n_in], stage.inputs, strict=True):
            val_map[ph] = self.value(name, ph.meta.get("val"), gpu_first=False)
        for ph, (kind, name) in zip(phs[n_in:at], stage.extra_inputs, strict=True):
            if kind not in ("mask", "delta"):
                raise NotLowerable(f"enclave stage {stage.name} takes {kind} inputs")
            val_map[ph] = self.pooled("pad" if kind == "mask" else "delta", name, ph.meta["val"])
        if verify is not None:
            neighbour = self.program.stages[position - 1]
            for eq, source in enumerate(verify.sources):
                name = neighbour.inputs[source]
                sent, pad = phs[at + 2 * eq], phs[at + 2 * eq + 1]
                val_map[sent] = self.value(name, sent.meta["val"], gpu_first=True)
                # the check's pad is the executor's delta of what was sent: the pool's pad
                val_map[pad] = self.pooled("delta", name, pad.meta["val"])
            vector = phs[at + 2 * len(verify.sources)]
            val_map[vector] = self.placeholder("check", verify.stage, vector.meta["val"])
        for ph, value in zip(phs[at + lowered.check_inputs :], lowered.constants, strict=True):
            val_map[ph] = self.placeholder("constant", str(len(self.constants)), value)
            self.constants.append(value)
        result = self.graph.graph_copy(lowered.module.graph, val_map)
        outs = list(result)
        n = len(stage.outputs)
        self.env.update(zip(stage.outputs, outs[:n], strict=True))
        rest = outs[n:]
        self.gpu.update(zip(stage.masked_outputs, rest[: len(stage.masked_outputs)], strict=True))
        rest = rest[len(stage.masked_outputs) :]
        verified = rest.pop(0) if lowered.verifies is not None else None
        masks_ok = rest.pop(0) if lowered.checks else None
        if rest:
            raise NotLowerable(f"enclave stage {stage.name}: unexpected outputs")
        prot = self.program.protection
        clear = {e.name for e in self.program.edges if e.direction == "enclave->gpu"}
        for name in stage.outputs:
            if name in clear and name not in prot.masked:
                self.gpu[name] = self.env[name]
        if verified is None and masks_ok is None:
            return code
        return self.graph.call_function(_verdict, (code, verified, position - 1, masks_ok))

    def gpu_stage(self, position: int, stage: Any, code: torch.fx.Node) -> torch.fx.Node:
        like, widths = _reply_rule(stage)
        vals = [p.meta.get("val") for p in stage.module.graph.find_nodes(op="placeholder")]
        sent = [self.value(n, v, gpu_first=True) for n, v in zip(stage.inputs, vals, strict=True)]
        call = self.graph.call_function(step_op.GPU, (position, code, sent, like, widths))
        for i, name in enumerate(stage.outputs):
            self.gpu[name] = self.graph.call_function(operator.getitem, (call, i))
        # the verdict the call passes on: the next call depends on this one
        return self.graph.call_function(operator.getitem, (call, len(stage.outputs)))


def build(program: Any) -> tuple[torch.fx.GraphModule, _Builder, list[tuple[str, str]]]:
    """The step graph and what feeds it; raises :class:`NotLowerable`."""
    _eligible(program)
    b = _Builder(program)
    code = b.placeholder("zero", "", torch.zeros((), dtype=torch.int64))
    for position, stage in enumerate(program.stages):
        if stage.side == ENCLAVE:
            if not isinstance(stage.module, torch.fx.GraphModule):
                raise NotLowerable(f"enclave stage {stage.name} has no graph")
            code = b.enclave(position, stage, code)
        else:
            code = b.gpu_stage(position, stage, code)
    outputs: list[tuple[str, str]] = []
    nodes = []
    for value in program.flat_outputs:
        if not isinstance(value, str):
            continue
        if value in b.env:
            outputs.append(("env", value))
            nodes.append(b.env[value])
        elif value in b.gpu:
            outputs.append(("gpu", value))
            nodes.append(b.gpu[value])
        else:
            raise NotLowerable(f"output {value} is produced by no stage")
    b.graph.output((*nodes, code))
    # the constants last, so that the runtime appends them as they are
    phs = b.placeholders
    order = [i for i, (k, _) in enumerate(b.sources) if k != "constant"]
    order += [i for i, (k, _) in enumerate(b.sources) if k == "constant"]
    for i in reversed(order):
        next(iter(b.graph.nodes)).prepend(phs[i])
    b.placeholders = [phs[i] for i in order]
    b.sources = [b.sources[i] for i in order]
    return torch.fx.GraphModule(torch.nn.Module(), b.graph), b, outputs


def _key(module: torch.fx.GraphModule, b: _Builder) -> str:
    """What the library depends on: the graph's code, each input's dtype and plan shape,
    the lowering (``_FORMAT``), this pass and the GPU call's definition."""
    shapes = b.program.shapes
    parts = [
        _FORMAT,
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        hashlib.sha256(Path(step_op.__file__).read_bytes()).hexdigest()[:16],
        module.code,
        [(str(p.meta["val"].dtype), str(shapes.shape(p.meta["val"]))) for p in b.placeholders],
    ]
    return "step-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def compile_step(program: Any, directory: str | Path) -> StepLibrary:
    """Build and compile ``program``'s step library into ``directory`` (cached by key) and
    attach it to the plan (``program.spec.step``). Raises :class:`NotLowerable`."""
    module, b, outputs = build(program)
    key = _key(module, b)
    path = Path(directory) / f"{key}.so"
    if not path.is_file() or not path.with_suffix(".json").is_file():
        vals = [p.meta["val"] for p in b.placeholders]
        try:
            args, specs = program.shapes.export_example(program.input_dims, vals)
        except ValueError as exc:
            raise NotLowerable(str(exc)) from None
        n = len(b.constants)
        args = args[: len(args) - n] + list(b.constants)
        specs = specs[: len(specs) - n] + [None] * n
        ep = torch.export.export(module, tuple(args), dynamic_shapes=tuple(specs), strict=False)
        compile_exported(ep, tuple(args), path, calls=True)
    dtypes = {
        name: str(p.meta["val"].dtype).removeprefix("torch.")
        for p, (kind, name) in zip(b.placeholders, b.sources, strict=True)
        if kind == "input"
    }
    library = StepLibrary(
        str(path),
        tuple(src for src in b.sources if src[0] != "constant"),
        tuple(b.constants),
        dtypes,
        tuple(outputs),
    )
    program.spec.step = library
    return library
