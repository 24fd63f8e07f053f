"""A bundle's GPU side as a Triton Inference Server model repository (onnxruntime backend).

Reads ``DIR/plan.json`` (its hashes verified, and its signature with a trusted key) and each GPU
stage's ``gpu/stages/NAME.onnx`` through :class:`VerifiedFiles`, so every byte used is checked
against ``plan.json``. Writes, per GPU stage, ``REPO/NAME/config.pbtxt`` (a ``ModelConfig``
message from ``tritonclient``'s ``model_config_pb2``, written by protobuf's text format) and
``REPO/NAME/VERSION/model.onnx``. ``VERSION`` is the first 8 hex digits of ``plan.json``'s
sha256 as an integer (1 if they are 0); the full digest is the config's ``teesplit.plan_sha256``
parameter and ``version_policy`` serves that version only.

Guarantees: the model's inputs and outputs carry the plan's value names (the ONNX graph's are
renamed to them), in the plan's order, with Triton types mapped from the plan's torch dtypes
(the int32 residues of exact masking are ``TYPE_INT32``) and the plan's dims (a named, dynamic
dim is -1); ``max_batch_size: 0`` (the batch is part of each tensor); one GPU instance.
A stage that touches the program's state (a KV-cache input of ``Plan.state``, or the output that
refills one) gets the sequence batcher, with START/END/READY control inputs (``TYPE_INT32`` of
dims [1], added to the ONNX graph, unused by it) so a session is dropped at its end or after
``idle_us``. A state the stage holds (``StateSpec.holder``: it reads the state itself and
computes its refill in the clear) becomes Triton implicit state: the graph gains ``NAME__next =
Concat(NAME, refill, axis)`` and the state starts as zeros of the plan's smallest shape (each
named dim at its lower bound in ``Plan.dim_ranges``: the growing dim at 0, so a sequence
carries batch 1). A cache the enclave holds (masked, or read by a checked stage) stays an
ordinary input; what was not mapped is listed in ``teesplit.unmapped_state``.
Errors are :class:`ArtifactError` naming the stage and value.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from partitioner.bundle import PLAN_FILE, VerifiedFiles, onnx_file, read_document, read_plan
from partitioner.errors import ArtifactError
from partitioner.plan import Plan, Stage

CONTROLS = (("START", "CONTROL_SEQUENCE_START"), ("END", "CONTROL_SEQUENCE_END"),
            ("READY", "CONTROL_SEQUENCE_READY"))  # fmt: skip
IDLE_US = 60_000_000  # a session idle this long is dropped with its state
# torch dtype name -> (Triton DataType name, ONNX TensorProto element type)
DTYPES = {
    "bool": ("TYPE_BOOL", 9), "uint8": ("TYPE_UINT8", 2), "int8": ("TYPE_INT8", 3),
    "uint16": ("TYPE_UINT16", 4), "int16": ("TYPE_INT16", 5), "int32": ("TYPE_INT32", 6),
    "int64": ("TYPE_INT64", 7), "float16": ("TYPE_FP16", 10), "float32": ("TYPE_FP32", 1),
    "float64": ("TYPE_FP64", 11), "uint32": ("TYPE_UINT32", 12), "uint64": ("TYPE_UINT64", 13),
    "bfloat16": ("TYPE_BF16", 16),
}  # fmt: skip


def version_of(digest: str) -> int:
    """Triton's version directory for a plan: a positive integer from its sha256."""
    return int(digest[:8], 16) or 1


def _dtype(stage: str, value: str, dtype: str) -> tuple[str, int]:
    if dtype not in DTYPES:
        raise ArtifactError(f"stage {stage}: {value} has dtype {dtype}, which Triton cannot carry")
    return DTYPES[dtype]


def _values(plan: Plan, stage: Stage) -> tuple[list[Any], list[Any]]:
    """The plan's (name, shape, dtype) of each input and output of ``stage``, in call order."""
    consumed = {e.name: e for e in plan.edges if e.consumer == stage.name}
    produced = {}
    for edge in plan.edges:
        if edge.producer == stage.name:
            produced.setdefault(edge.name, edge)
    ins, outs = [], []
    for names, edges, out in (
        (stage.inputs, consumed, ins),
        (stage.outputs + stage.masked_outputs, produced, outs),
    ):
        for name in names:
            if name not in edges:
                raise ArtifactError(f"stage {stage.name}: no edge of the plan describes {name}")
            out.append((name, edges[name].shape, edges[name].dtype))
    return ins, outs


def _rename(graph: Any, old: list[str], new: list[str], taken: set[str]) -> None:
    """Rename graph values ``old`` to ``new`` everywhere, first moving aside any other value
    that already holds one of the new names."""
    mapping = dict(zip(old, new, strict=True))
    clash = (set(new) - set(old)) & taken
    for n in sorted(clash):
        fresh = f"{n}__onnx"
        while fresh in taken or fresh in mapping.values():
            fresh += "_"
        mapping[n] = fresh
    _apply(graph, mapping)


def _apply(graph: Any, mapping: dict[str, str]) -> None:
    """``mapping`` over every value name of ``graph`` and of its subgraphs (If, Loop, Scan
    bodies read outer values by name)."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        for attr in node.attribute:
            for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                _apply(sub, mapping)
    for group in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in group:
            item.name = mapping.get(item.name, item.name)


def _describe(message: Any, stage: str, name: str, shape: list[Any], dtype: str) -> None:
    """Fill a ``ModelInput``/``ModelOutput``/``State``'s type and dims (dynamic: -1)."""
    from tritonclient.grpc import model_config_pb2 as pb

    if hasattr(message, "name"):
        message.name = name
    message.data_type = pb.DataType.Value(_dtype(stage, name, dtype)[0])
    message.dims[:] = [d if isinstance(d, int) else -1 for d in shape]


def _add_input(graph: Any, name: str, elem: int, dims: list[Any]) -> Any:
    from onnx import helper

    graph.input.append(helper.make_tensor_value_info(name, elem, dims))
    return graph.input[-1]


def _onnx_model(files: VerifiedFiles, plan: Plan, stage: Stage) -> Any:
    """The stage's ONNX model with the plan's value names, and any external data it names."""
    import onnx

    rel = onnx_file(stage.name)
    try:
        model = onnx.load_model_from_string(files.read(rel))
    except ArtifactError:
        raise
    except Exception as exc:  # protobuf raises DecodeError and others for a bad file
        raise ArtifactError(f"cannot read {rel}: {type(exc).__name__}: {exc}") from None
    graph = model.graph
    ins, outs = _values(plan, stage)
    have_in, have_out = [i.name for i in graph.input], [o.name for o in graph.output]
    if len(have_in) != len(ins) or len(have_out) != len(outs):
        raise ArtifactError(
            f"{rel}: {len(have_in)} inputs and {len(have_out)} outputs, but plan.json gives "
            f"stage {stage.name} {len(ins)} and {len(outs)}"
        )
    # a value that is both an output and an input (or two outputs) needs its own node
    for i, out in enumerate(graph.output):
        fresh = f"__teesplit_out_{i}"
        graph.node.append(onnx.helper.make_node("Identity", [out.name], [fresh]))
        out.name = fresh
    taken = {n for node in graph.node for n in [*node.input, *node.output]}
    taken |= {v.name for v in [*graph.value_info, *graph.initializer]}
    names_in = [v[0] for v in ins]
    names_out = [v[0] for v in outs]
    _rename(graph, have_in + [o.name for o in graph.output], names_in + names_out, taken)
    for info, (name, _, dtype) in zip([*graph.input, *graph.output], [*ins, *outs], strict=True):
        if info.type.tensor_type.elem_type != _dtype(stage.name, name, dtype)[1]:
            raise ArtifactError(f"{rel}: {name} is not {dtype} as plan.json says")
    return model


def _external(model: Any, files: VerifiedFiles, rel: str) -> dict[str, bytes]:
    """Verified bytes of the external-data files ``model`` names (ONNX over 2 GB)."""
    out = {}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in out:
                if "/" in entry.value or entry.value in ("", ".", ".."):
                    raise ArtifactError(f"{rel}: external data {entry.value!r} is not a file name")
                out[entry.value] = files.read(f"gpu/stages/{entry.value}")
    return out


def stage_config(plan: Plan, stage: Stage, model: Any, digest: str, idle_us: int = IDLE_US) -> Any:
    """The ``ModelConfig`` of one GPU stage; adds the state and control values to ``model``."""
    from onnx import helper
    from tritonclient.grpc import model_config_pb2 as pb

    ins, outs = _values(plan, stage)
    config = pb.ModelConfig(name=stage.name, backend="onnxruntime", max_batch_size=0)
    config.version_policy.specific.versions.append(version_of(digest))
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=1)
    config.parameters["teesplit.plan_sha256"].string_value = digest
    config.parameters["teesplit.model"].string_value = plan.model
    implicit, unmapped = {}, []
    for name, spec in sorted(plan.state.items()):
        refill = plan.flat_outputs[spec.output] if spec.output < len(plan.flat_outputs) else None
        if spec.holder == stage.name:
            implicit[name] = (refill, spec)
        elif name in stage.inputs:
            unmapped.append(f"{name} (read here; the enclave holds it and sends it)")
        elif refill in stage.outputs:
            unmapped.append(f"{name} (refilled by {refill} here; the enclave holds it)")
    for name, shape, dtype in ins:
        if name not in implicit:
            _describe(config.input.add(), stage.name, name, shape, dtype)
    for name, shape, dtype in outs:
        _describe(config.output.add(), stage.name, name, shape, dtype)
    if not implicit and not unmapped:
        return config
    taken = {v.name for v in [*model.graph.input, *model.graph.output]}
    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = idle_us
    for control, kind in CONTROLS:
        if control in taken:
            raise ArtifactError(f"stage {stage.name}: a value is named {control}")
        _add_input(model.graph, control, 6, [1])  # 6: INT32
        entry = batching.control_input.add(name=control).control.add()
        entry.kind = pb.ModelSequenceBatching.Control.Kind.Value(kind)
        entry.int32_false_true[:] = [0, 1]
    shapes = {n: (s, d) for n, s, d in ins}
    for name, (refill, spec) in implicit.items():
        shape, dtype = shapes[name]
        out = f"{name}__next"
        if out in taken:
            raise ArtifactError(f"stage {stage.name}: a value is named {out}")
        grown = [None if i == spec.dim else d for i, d in enumerate(shape)]
        model.graph.node.append(helper.make_node("Concat", [name, refill], [out], axis=spec.dim))
        model.graph.output.append(
            helper.make_tensor_value_info(out, _dtype(stage.name, name, dtype)[1], grown)
        )
        state = batching.state.add(input_name=name, output_name=out)
        _describe(state, stage.name, name, shape, dtype)
        initial = state.initial_state.add(data_type=state.data_type, zero_data=True)
        initial.name = f"{name} empty"
        # the smallest state the plan allows: each named dim at its lower bound (past: 0)
        initial.dims[:] = [
            d if isinstance(d, int) else plan.dim_ranges.get(d, [1])[0] for d in shape
        ]
    if unmapped:
        config.parameters["teesplit.unmapped_state"].string_value = "; ".join(unmapped)
    return config


def export_repository(
    bundle: str | Path, out: str | Path, *, trusted_key: Any = None, idle_us: int = IDLE_US
) -> dict[str, Path]:
    """Write the Triton model repository of ``bundle``'s GPU stages under ``out``;
    ``{stage: its model.onnx}``. ``bundle`` is ``DIR`` or ``DIR/gpu``."""
    import onnx
    from google.protobuf import text_format

    root = Path(bundle)
    if root.name == "gpu" and not (root / PLAN_FILE).exists():
        root = root.parent
    try:
        digest = hashlib.sha256((root / PLAN_FILE).read_bytes()).hexdigest()
    except OSError as exc:
        raise ArtifactError(f"cannot read {root / PLAN_FILE}: {exc.strerror}") from None
    # every GPU file is hashed before anything is written (and again as it is parsed)
    document = read_document(root, ("gpu",), trusted_key=trusted_key)
    plan = read_plan(root, document)
    files = VerifiedFiles(root, document["files"])
    stages = [s for s in plan.stages if s.side == "gpu"]
    if not stages:
        raise ArtifactError(f"{root}: the plan has no GPU stage to serve")
    written: dict[str, Path] = {}
    for stage in stages:
        model = _onnx_model(files, plan, stage)
        external = _external(model, files, onnx_file(stage.name))
        config = stage_config(plan, stage, model, digest, idle_us)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # the checker raises ValidationError and others
            raise ArtifactError(
                f"stage {stage.name}: the exported ONNX model is invalid: {exc}"
            ) from None
        directory = Path(out) / stage.name / str(version_of(digest))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in external.items():
                (directory / name).write_bytes(data)
            (directory / "model.onnx").write_bytes(model.SerializeToString())
            (directory.parent / "config.pbtxt").write_text(text_format.MessageToString(config))
        except OSError as exc:
            raise ArtifactError(f"cannot write {directory}: {exc.strerror}") from None
        written[stage.name] = directory / "model.onnx"
    return written
