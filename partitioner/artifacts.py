"""Split artifacts: ``save(program, dir)`` and ``load(dir)``.

Layout (DESIGN.md, "Artifacts")::

    DIR/plan.json                  the plan, library versions, the executor state, sha256 of
                                   every other file
    DIR/enclave/stages/*.pt2       enclave stages (torch.export, weights stripped)
    DIR/enclave/corrections/*.pt2  the enclave's unmasking graphs, one per GPU stage
    DIR/enclave/freivalds/*.pt2    the enclave's own copy of each checked GPU stage
    DIR/enclave/weights.safetensors, DIR/enclave/rnm.safetensors
    DIR/enclave/teesplit-enclave.manifest.template   the Gramine manifest template
    DIR/gpu/stages/*.pt2, *.onnx   GPU stages (ONNX for onnxruntime; it embeds its weights)
    DIR/gpu/weights.safetensors    GPU weights: never a parameter the policy protects

Each ``.pt2`` is a stage exported with dynamic ``batch``/``seq`` dims; its weights live in the
side's safetensors file (tensors shared between stages are stored once), so the ``.pt2`` holds
meta tensors only. ``load`` needs no model source code: it checks every file against the hashes
in ``plan.json`` and refuses a missing, tampered or unlisted artifact with an
:class:`ArtifactError` naming it, then rebuilds a runnable :class:`SplitProgram` with a fresh
mask pool.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from partitioner.errors import ArtifactError
from partitioner.onnx_export import export_onnx
from partitioner.policy import Policy
from partitioner.split import Edge, Stage
from passes import ops as _ops  # noqa: F401 - .pt2 files name teesplit:: ops: register them

ARTIFACT_SCHEMA_VERSION = 1
_LOAD_LOCK = threading.Lock()
_EXPORT_DIMS = {"batch": 2}  # export at sizes >= 2 so no dim specialises to 0/1
_EXPORT_DEFAULT = 17


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "teesplit"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class _Weights:
    """Collects tensors for one safetensors file, storing each storage once."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self._by_storage: dict[tuple[int, tuple[int, ...], str], str] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape), str(tensor.dtype))
        if ident in self._by_storage:
            self.alias[key] = self._by_storage[ident]
            return
        self._by_storage[ident] = key
        self.tensors[key] = tensor.contiguous().clone()
        self.alias[key] = key

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors, str(path), metadata={"alias": json.dumps(self.alias)})


def _export(program: Any, name: str, module: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Export one stage graph with its named dims dynamic (at example sizes >= 2)."""
    from passes.pool import concrete_shape

    names = {d for ds in program.input_dims.values() for d in ds if isinstance(d, str)}
    example = {n: _EXPORT_DIMS.get(n, _EXPORT_DEFAULT) for n in names if n.isidentifier()}
    # a KV cache's ``past`` may be 0 (the prefill); other dims start at 1
    dims = {n: Dim(n, min=min(1, program.shapes.lower.get(n, 1))) for n in example}
    args, specs = [], []
    for ph in module.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ArtifactError(f"{name}: input {ph.name} has no tensor metadata to export with")
        shape = program.shapes.shape(val)
        args.append(torch.zeros(concrete_shape(shape, example), dtype=val.dtype))
        spec = {i: dims.get(d, Dim.AUTO) for i, d in enumerate(shape) if isinstance(d, str)}
        specs.append(spec or None)
    try:
        return torch.export.export(module, tuple(args), dynamic_shapes=tuple(specs), strict=False)
    except Exception as exc:  # export raises many types; all mean this stage cannot be saved
        raise ArtifactError(f"cannot export {name}: {type(exc).__name__}: {exc}") from None


def _save_exported(
    ep: torch.export.ExportedProgram, key: str, weights: _Weights, path: Path
) -> None:
    for name, tensor in list(ep.state_dict.items()):
        weights.add(f"{key}/{name}", tensor)
        ep.state_dict[name] = torch.nn.Parameter(tensor.to("meta"), requires_grad=False)
    for name, tensor in list(ep.constants.items()):
        if isinstance(tensor, torch.Tensor):
            weights.add(f"{key}/const/{name}", tensor)
            ep.constants[name] = tensor.to("meta")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))


def save(program: Any, directory: str | Path) -> Path:
    """Write ``program``'s artifacts to ``directory`` (created; existing files are replaced)."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        if not (root / "plan.json").is_file():
            raise ArtifactError(f"{root} is not empty and holds no plan.json; refusing to write")
        (root / "plan.json").unlink()
        for side in ("enclave", "gpu"):
            if (root / side).exists():
                shutil.rmtree(root / side)
    root.mkdir(parents=True, exist_ok=True)
    weights = {"enclave": _Weights(), "gpu": _Weights()}
    prot = program.protection
    stage_files = {}
    for stage in program.stages:
        rel = f"{stage.side}/stages/{stage.name}.pt2"
        ep = _export(program, stage.name, stage.module)
        if stage.side == "gpu":
            export_onnx(ep, root / "gpu" / "stages" / f"{stage.name}.onnx", stage.name)
        _save_exported(ep, stage.name, weights[stage.side], root / rel)
        stage_files[stage.name] = rel
    state: dict[str, Any] = {
        "signature": {
            "in_spec": pytree.treespec_dumps(program.signature.in_spec),
            "out_spec": pytree.treespec_dumps(program.signature.out_spec),
            "inputs": [list(x) for x in program.signature.inputs],
        },
        "flat_outputs": program.flat_outputs,
        "input_dims": program.input_dims,
        "kv_state": {name: spec.to_dict() for name, spec in program.state.items()},
        "stage_files": stage_files,
        "protection": None,
    }
    if prot is not None:
        corrections = {}
        for name, corr in prot.corrections.items():
            rel = f"enclave/corrections/{name}.pt2"
            ep = _export(program, f"correction of {name}", corr.module)
            _save_exported(ep, f"correction/{name}", weights["enclave"], root / rel)
            corrections[name] = {
                "file": rel,
                "delta_inputs": corr.delta_inputs,
                "primal_inputs": corr.primal_inputs,
                "delta_outputs": corr.delta_outputs,
                "primal_outputs": corr.primal_outputs,
                "products": corr.products,
            }
        freivalds = {}
        for name, (module, outputs) in prot.freivalds.items():
            rel = f"enclave/freivalds/{name}.pt2"
            ep = _export(program, f"Freivalds copy of {name}", module)
            _save_exported(ep, f"freivalds/{name}", weights["enclave"], root / rel)
            freivalds[name] = {"file": rel, "outputs": outputs}
        rnm = None
        if prot.rnm is not None:
            prot.rnm.tables.save(root / "enclave" / "rnm.safetensors")
            rnm = {
                "file": "enclave/rnm.safetensors",
                "token_input": prot.rnm.token_input,
                "sanitised": prot.rnm.sanitised,
                "stage": prot.rnm.stage,
            }
        field = None
        if prot.field_plan is not None:
            fp = prot.field_plan
            field = {
                "prime": fp.prime,
                "frac_bits": fp.frac_bits,
                "weight_bits": fp.weight_bits,
                "output_bits": fp.output_bits,
                "output_range": fp.output_range,
            }
        state["protection"] = {
            "masking": prot.masking,
            "mask_scale": prot.mask_scale,
            "masked": {k: [list(shape), dtype] for k, (shape, dtype) in prot.masked.items()},
            "gpu_masked": sorted(prot.gpu_masked),
            "corrections": corrections,
            "pooled": prot.pooled,
            "cost": prot.cost,
            "rnm": rnm,
            "token_shape": prot.token_shape,
            "field": field,
            "freivalds": freivalds,
        }
    for side, collected in weights.items():
        (root / side).mkdir(parents=True, exist_ok=True)
        collected.save(root / side / "weights.safetensors")
    from enclave_runtime.manifest import TEMPLATE

    shutil.copyfile(TEMPLATE, root / "enclave" / TEMPLATE.name)
    files = {
        str(p.relative_to(root)): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "plan.json"
    }
    document = {
        "artifact_schema_version": ARTIFACT_SCHEMA_VERSION,
        "versions": _versions(),
        "plan": program.plan(),
        "state": state,
        "files": files,
    }
    (root / "plan.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return root


# -- load ---------------------------------------------------------------------------------


def _verify(root: Path, files: dict[str, str], sides: tuple[str, ...] = ("enclave", "gpu")) -> None:
    """Check every listed file of ``sides`` against its hash; refuse unlisted files there."""
    files = {rel: d for rel, d in files.items() if rel.split("/", 1)[0] in sides}
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"artifact {rel} is missing from {root}")
        if _sha256(path) != digest:
            raise ArtifactError(f"artifact {rel} does not match its sha256 in plan.json (tampered)")
    listed = set(files) | {"plan.json"}
    extra = sorted(
        str(p.relative_to(root))
        for side in sides
        for p in (root / side).rglob("*")
        if p.is_file() and str(p.relative_to(root)) not in listed
    )
    if extra:
        raise ArtifactError(f"unlisted files in {root}: {extra[:5]}; refusing a modified bundle")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            alias = json.loads((f.metadata() or {}).get("alias", "{}"))
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ArtifactError(f"cannot read weights {path}: {exc}") from None
    return {key: stored[target] for key, target in alias.items()}


def _load_exported(root: Path, rel: str, key: str, weights: dict[str, torch.Tensor]) -> Any:
    try:
        with _LOAD_LOCK:  # torch.export.load keeps global deserializer state
            ep = torch.export.load(str(root / rel))
    except Exception as exc:  # a corrupt archive raises many types
        raise ArtifactError(f"cannot load {rel}: {type(exc).__name__}: {exc}") from None
    for name in list(ep.state_dict):
        tensor = weights.get(f"{key}/{name}")
        if tensor is None:
            raise ArtifactError(f"{rel}: weight {name} is not in the weights file")
        ep.state_dict[name] = torch.nn.Parameter(tensor, requires_grad=False)
    for name, value in list(ep.constants.items()):
        if isinstance(value, torch.Tensor):
            tensor = weights.get(f"{key}/const/{name}")
            if tensor is None:
                raise ArtifactError(f"{rel}: constant {name} is not in the weights file")
            ep.constants[name] = tensor
    return ep.module()


def _import_output_types(spec: str) -> None:
    """Import the modules that define the output containers a treespec names (e.g.
    ``transformers.modeling_outputs``), so pytree knows them; no model code is imported."""
    import importlib

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and "." in kind:
                module = kind.rsplit(".", 1)[0]
                try:
                    importlib.import_module(module)
                except ImportError as exc:
                    raise ArtifactError(f"output type {kind} needs {module}: {exc}") from None
            for child in node.get("children_spec", []):
                walk(child)

    walk(json.loads(spec)[1])


def read_document(root: Path, sides: tuple[str, ...] = ()) -> dict[str, Any]:
    """A bundle's ``plan.json``, schema-checked; the files of ``sides`` are verified too."""
    plan_path = root / "plan.json"
    try:
        document = json.loads(plan_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{plan_path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{plan_path} is not valid JSON: {exc}") from None
    if document.get("artifact_schema_version") != ARTIFACT_SCHEMA_VERSION:
        raise ArtifactError(
            f"{plan_path}: artifact schema {document.get('artifact_schema_version')!r}, "
            f"this teesplit reads {ARTIFACT_SCHEMA_VERSION}"
        )
    if sides:
        _verify(root, document["files"], sides)
    return document


def load_stage_modules(
    root: Path,
    document: dict[str, Any],
    side: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for each stage of ``side``, weights restored from the side's file
    (or from ``weights``, when the caller has read that file already)."""
    if weights is None:
        weights = _read_weights(root / side / "weights.safetensors")
    files = document["state"]["stage_files"]
    return [
        (entry["name"], _load_exported(root, files[entry["name"]], entry["name"], weights))
        for entry in document["plan"]["stages"]
        if entry["side"] == side
    ]


def _kv_state(state: dict[str, Any], plan_path: Path) -> dict[str, Any]:
    from partitioner.generation import StateSpec

    try:
        return {name: StateSpec(**spec) for name, spec in state.get("kv_state", {}).items()}
    except TypeError as exc:
        raise ArtifactError(f"{plan_path}: bad kv_state entry ({exc})") from None


def load(directory: str | Path, *, seed: int | None = None, gpu: bool = True) -> Any:
    """Load a saved split program; ``seed`` fixes its mask pool's CSPRNG (tests only).

    ``gpu=False`` loads the enclave side only (the enclave host need not hold ``gpu/``): GPU
    stages get no module, and the enclave driver plugs in calls to the worker.
    """
    from partitioner.program import SplitProgram, _Signature
    from passes.field import FieldPlan
    from passes.linearity import Correction
    from passes.pool import MaskPool
    from passes.protect import Protection, RNMSite
    from passes.randomness import CSPRNG
    from passes.rnm import RNMTables

    root = Path(directory)
    plan_path = root / "plan.json"
    sides = ("enclave", "gpu") if gpu else ("enclave",)
    document = read_document(root, sides)
    plan, state = document["plan"], document["state"]
    weights = {side: _read_weights(root / side / "weights.safetensors") for side in sides}
    modules = {
        name: module
        for side in sides
        for name, module in load_stage_modules(root, document, side, weights[side])
    }
    stages = [
        Stage(
            entry["name"],
            entry["side"],
            modules.get(entry["name"]),
            list(entry["inputs"]),
            list(entry["outputs"]),
            list(entry["nodes"]),
            list(entry["params"]),
            extra_inputs=[tuple(x) for x in entry["extra_inputs"]],
            masked_outputs=list(entry["masked_outputs"]),
        )
        for entry in plan["stages"]
    ]
    edges = [
        Edge(
            e["name"],
            e["producer"],
            e["consumer"],
            e["shape"],
            e["dtype"],
            e["bytes"],
            e["direction"],
            e["protection"],
        )
        for e in plan["edges"]
    ]
    sig = state["signature"]
    _import_output_types(sig["out_spec"])
    signature = _Signature(
        pytree.treespec_loads(sig["in_spec"]),
        pytree.treespec_loads(sig["out_spec"]),
        [tuple(x) for x in sig["inputs"]],
    )
    protection = None
    p = state["protection"]
    if p is not None:
        corrections = {}
        for name, c in p["corrections"].items():
            corrections[name] = Correction(
                name,
                _load_exported(root, c["file"], f"correction/{name}", weights["enclave"]),
                c["delta_inputs"],
                c["primal_inputs"],
                c["delta_outputs"],
                c["primal_outputs"],
                c["products"],
            )
        rnm = None
        if p["rnm"] is not None:
            r = p["rnm"]
            tables = RNMTables.load(root / r["file"])
            rnm = RNMSite(tables, r["token_input"], r["sanitised"], r["stage"])
        field = None
        if p["field"] is not None:
            f = p["field"]
            field = FieldPlan(
                f["prime"], f["frac_bits"], f["weight_bits"], f["output_bits"], f["output_range"]
            )
        freivalds = {
            name: (
                _load_exported(root, v["file"], f"freivalds/{name}", weights["enclave"]),
                v["outputs"],
            )
            for name, v in p["freivalds"].items()
        }
        protection = Protection(
            masking=p["masking"],
            mask_scale=p["mask_scale"],
            taint={},
            masked={k: (v[0], v[1]) for k, v in p["masked"].items()},
            gpu_masked=set(p["gpu_masked"]),
            corrections=corrections,
            pooled=p["pooled"],
            cost=p["cost"],
            rnm=rnm,
            token_shape=p["token_shape"],
            field_plan=field,
            freivalds=freivalds,
        )
    return SplitProgram(
        model_name=plan["model"],
        policy=Policy.from_dict(plan["policy"], source=str(plan_path)),
        stages=stages,
        edges=edges,
        flat_outputs=state["flat_outputs"],
        signature=signature,
        shapes=None,
        placement=None,
        input_dims=state["input_dims"],
        state=_kv_state(state, plan_path),
        protection=protection,
        pool=MaskPool(protection, CSPRNG(seed)) if protection and protection.needs_pool else None,
        saved_plan=plan,
    )
