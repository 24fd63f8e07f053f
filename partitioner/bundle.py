"""Reading a saved split program: the bundle reader shared by the enclave, the worker and tools.

Layout (written by ``partitioner.artifacts.save``)::

    DIR/plan.json                        the plan (``Plan.to_dict``), library versions, and
                                         the sha256 of every other file
    DIR/{enclave,gpu}/stages/NAME.pt2    each stage (torch.export, weights stripped)
    DIR/gpu/stages/NAME.onnx             each GPU stage for onnxruntime
    DIR/enclave/corrections/NAME.pt2     the enclave's unmasking graph of GPU stage NAME
    DIR/enclave/freivalds/NAME.pt2       the enclave's own copy of checked GPU stage NAME
    DIR/{enclave,gpu}/weights.safetensors, DIR/enclave/rnm.safetensors

Every path is derived from a stage name (a plain identifier, checked by ``Plan.from_dict``),
never read from the file. Reads ``plan.json`` and the files of the sides asked for; writes
nothing; guarantees: a missing, tampered or unlisted file, and a malformed ``plan.json``, is an
:class:`ArtifactError` naming it, raised before anything from the bundle runs.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from partitioner import sealing
from partitioner.errors import ArtifactError
from partitioner.ops import OPS  # .pt2 files name teesplit:: ops: this registers them
from partitioner.plan import CompiledLibrary, Plan, StepLibrary
from partitioner.rnm_tables import RNMTables
from partitioner.schema import shape_

ARTIFACT_SCHEMA_VERSION = 2
PLAN_FILE = "plan.json"
RNM_FILE = "enclave/rnm.safetensors"
_LOAD_LOCK = threading.Lock()


AOT_DIR = "enclave/aot"  # ahead-of-time compiled enclave stages (partitioner.aot)
AOT_INDEX = f"{AOT_DIR}/index.json"
# 2: a library that checks a GPU reply takes, as its check vector's last entry, whether to
# make the check (partitioner.aot.gated_freivalds); format 1 (no "format" key) had no entry
AOT_FORMAT = 2


def stage_file(side: str, name: str) -> str:
    return f"{side}/stages/{name}.pt2"


def onnx_file(name: str) -> str:
    return f"gpu/stages/{name}.onnx"


def correction_file(name: str) -> str:
    return f"enclave/corrections/{name}.pt2"


def exact_scale_key(value: str) -> str:
    return f"exact/inv_scale/{value}"


def exact_bias_key(value: str) -> str:
    return f"exact/bias/{value}"


def exact_outputs(plan: Plan) -> list[str]:
    """Masked GPU results that are program outputs: the executor unmasks them itself."""
    prot = plan.protection
    outputs = {v for v in plan.flat_outputs if isinstance(v, str)}
    return sorted(outputs & prot.gpu_masked) if prot is not None else []


def freivalds_file(name: str) -> str:
    return f"enclave/freivalds/{name}.pt2"


def weights_file(side: str) -> str:
    return f"{side}/weights.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(
    root: Path, files: dict[str, str], sides: tuple[str, ...], *, contents: bool = True
) -> None:
    """Check every listed file of ``sides`` (against its hash when ``contents``); refuse
    unlisted files, links and special files there."""
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise ArtifactError(f"{root / PLAN_FILE}: 'files' must map paths to sha256 digests")
    files = {rel: d for rel, d in files.items() if rel.split("/", 1)[0] in sides}
    for rel, digest in sorted(files.items()):
        if not _inside(root, rel):
            raise ArtifactError(f"artifact {rel!r} is not a file inside the bundle")
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"artifact {rel} is missing from {root}")
        if contents and sha256(path) != digest:
            raise ArtifactError(f"artifact {rel} does not match its sha256 in plan.json (tampered)")
    listed = set(files) | {PLAN_FILE}
    for side in sides:  # rglob does not descend into a linked folder: refuse links outright
        for p in [root / side, *(root / side).rglob("*")]:
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise ArtifactError(
                    f"{p.relative_to(root)} in {root} is a link or not a regular file"
                )
    extra = sorted(
        str(p.relative_to(root))
        for side in sides
        for p in (root / side).rglob("*")
        if not p.is_dir() and str(p.relative_to(root)) not in listed
    )
    if extra:
        raise ArtifactError(f"unlisted files in {root}: {extra[:5]}; refusing a modified bundle")


def _inside(root: Path, rel: str) -> bool:
    """``rel`` names a regular file under ``root``, with no link, ``..`` or absolute part."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return False
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            return False
    return path.resolve().is_relative_to(root.resolve())


_MAX_PLAN_BYTES = 1 << 30  # plan.json is metadata; a larger file is not a bundle of ours


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ArtifactError(f"duplicate keys {dupes[:5]}")
    return dict(pairs)


def read_document(
    root: str | Path,
    sides: tuple[str, ...] = (),
    *,
    trusted_key: Any = None,
    hash_contents: bool = True,
) -> dict[str, Any]:
    """A bundle's ``plan.json``, schema-checked; the files of ``sides`` are verified too.

    With ``trusted_key`` (an Ed25519 public key or the path of its PEM file) the signature in
    ``plan.json.sig`` is checked over the file's exact bytes before anything is parsed.
    ``hash_contents=False`` leaves the hashes to a caller that reads every file it uses
    through :class:`VerifiedFiles` (which hashes the bytes it parses), so no file is read and
    hashed twice.
    """
    root = Path(root)
    plan_path = root / PLAN_FILE
    try:
        if plan_path.is_symlink() or not plan_path.is_file():
            raise ArtifactError(f"{plan_path} is missing or not a regular file")
        if plan_path.stat().st_size > _MAX_PLAN_BYTES:
            raise ArtifactError(f"{plan_path} is larger than any plan teesplit writes")
        raw = plan_path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {plan_path}: {exc.strerror}") from None
    if trusted_key is not None:
        _check_signature(root, raw, trusted_key)
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ArtifactError as exc:
        raise ArtifactError(f"{plan_path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ArtifactError(f"{plan_path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{plan_path}: expected a JSON object")
    if document.get("artifact_schema_version") != ARTIFACT_SCHEMA_VERSION:
        raise ArtifactError(
            f"{plan_path}: artifact schema {document.get('artifact_schema_version')!r}, "
            f"this teesplit reads {ARTIFACT_SCHEMA_VERSION}"
        )
    if sides:
        _verify(root, document.get("files"), sides, contents=hash_contents)
    return document


def _check_signature(root: Path, raw: bytes, trusted_key: Any) -> None:
    from partitioner.signing import SIGNATURE_FILE, load_public_key, verify

    key = trusted_key if not isinstance(trusted_key, (str, Path)) else load_public_key(trusted_key)
    try:  # a FIFO or a huge file must not hang or fill the enclave: a regular file, 64 bytes
        fd = os.open(root / SIGNATURE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise ArtifactError(f"{root} is not signed ({SIGNATURE_FILE} is missing)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ArtifactError(f"{root / SIGNATURE_FILE} is not a regular file")
        signature = f.read(65)
    verify(raw, signature, key, str(root / PLAN_FILE))


def read_plan(root: str | Path, document: dict[str, Any] | None = None) -> Plan:
    """The bundle's :class:`Plan` (no callables attached)."""
    root = Path(root)
    document = read_document(root) if document is None else document
    return Plan.from_dict(document.get("plan"), where=f"{root / PLAN_FILE}: plan")


def _safetensors(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file's bytes (a format with no code in it)."""
    from safetensors.torch import load as load_tensors

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        return load_tensors(data), meta
    except Exception as exc:  # safetensors and json raise several types for a bad file
        raise ArtifactError(f"cannot read {what}: {exc}") from None


def weights_from_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """A side's weights: stored tensors, expanded by the alias table (shared storages)."""
    stored, meta = _safetensors(data, what)
    try:
        alias = json.loads(meta.get("alias", "{}"))
        return {key: stored[target] for key, target in alias.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"cannot read {what}: bad alias table ({exc})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read weights {path}: {exc.strerror}") from None
    return weights_from_bytes(data, f"weights {path}")


def write_inside(root: Path, rel: str, data: bytes) -> Path:
    """Write a file of our own into a bundle folder (a manifest, a drawing) without following
    a link someone planted there: the folders on the way and the file itself must not be
    links, and the file is opened with ``O_NOFOLLOW``."""
    path = root
    for part in rel.split("/")[:-1]:
        path = path / part
        if path.is_symlink():
            raise ArtifactError(f"{path} is a link; refusing to write through it")
        path.mkdir(exist_ok=True)
    path = root / rel
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class VerifiedFiles:
    """Reads a bundle's files only if ``plan.json`` lists them: each is opened without
    following links, read once, and its bytes are checked against the listed sha256 before
    anything parses them (so the file cannot change between the check and the use)."""

    def __init__(self, root: Path, files: Any) -> None:
        if not isinstance(files, dict):
            raise ArtifactError(f"{root / PLAN_FILE}: 'files' must map paths to sha256 digests")
        self.root = root
        self.files = files

    def read(self, rel: str) -> bytes:
        digest = self.files.get(rel)
        if not isinstance(digest, str) or not _inside(self.root, rel):
            raise ArtifactError(f"artifact {rel} is not listed in plan.json as a bundle file")
        try:
            fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            raise ArtifactError(f"artifact {rel} is missing from {self.root}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ArtifactError(f"artifact {rel} is not a regular file")
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"artifact {rel} does not match its sha256 in plan.json (tampered)")
        return data


_MAX_GRAPH_BYTES = 256 << 20  # a stage graph's JSON; refuse a zip bomb before inflating it


def load_exported(
    source: Path | bytes, rel: str, key: str, weights: dict[str, torch.Tensor]
) -> Any:
    """The module of one ``.pt2``, with its weights from the side's safetensors file.

    ``torch.export.load`` unpickles parts of the archive (sample inputs, weights, constants),
    and a pickle runs code. So only the graph is read from the archive, as JSON
    (``models/model.json``, torch's own serialisation schema) and rebuilt by torch's
    deserializer, with every tensor taken from safetensors; nothing in the archive is
    unpickled.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    try:
        data = source if isinstance(source, bytes) else (source / rel).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            graphs = [n for n in archive.namelist() if n.endswith("/models/model.json")]
            if len(graphs) != 1:
                raise ArtifactError(f"{rel}: expected one models/model.json, found {len(graphs)}")
            if archive.getinfo(graphs[0]).file_size > _MAX_GRAPH_BYTES:
                raise ArtifactError(f"{rel}: the stage graph is larger than any teesplit writes")
            raw = archive.read(graphs[0])
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {rel}: {type(exc).__name__}: {exc}") from None
    try:
        serialized = _bytes_to_dataclass(schema.ExportedProgram, raw)
        specs = serialized.graph_module.signature.input_specs
        params = {s.parameter.parameter_name for s in specs if s.type == "parameter"}
        prefix, const = f"{key}/", f"{key}/const/"
        state = {
            k[len(prefix) :]: torch.nn.Parameter(v, requires_grad=False)
            if k[len(prefix) :] in params
            else v
            for k, v in weights.items()
            if k.startswith(prefix) and not k.startswith(const)
        }
        constants = {k[len(const) :]: v for k, v in weights.items() if k.startswith(const)}
        with _LOAD_LOCK:  # the deserializer keeps global state
            ep = ExportedProgramDeserializer().deserialize(serialized, state, constants, b"")
        _check_ops(ep.graph, rel)
        return ep.module()
    except ArtifactError:
        raise
    except Exception as exc:  # a malformed graph raises many types; all mean "not ours"
        raise ArtifactError(f"cannot load {rel}: {type(exc).__name__}: {exc}") from None


def _check_rnm_stage(plan: Plan, tables: RNMTables) -> None:
    """The tables the RNM stage carries are the bundle's checked ones: a stage whose copy
    makes every token its own group would send the prompt to the GPU as it is."""
    import functools

    site = plan.protection.rnm
    stage = next((s for s in plan.stages if s.name == site.stage), None)
    if stage is None or stage.module is None:
        raise ArtifactError(f"protection.rnm.stage: no stage {site.stage!r} in the plan")
    graph = stage.module.graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target == OPS.rnm.default]
    if len(calls) != 1:
        raise ArtifactError(
            f"stage {stage.name}: expected one teesplit::rnm call, found {len(calls)}"
        )
    for arg, name in zip(calls[0].args[1:4], ("candidates", "scores", "keep"), strict=True):
        value = (
            functools.reduce(getattr, arg.target.split("."), stage.module)
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"
            else None
        )
        if not isinstance(value, torch.Tensor) or not torch.equal(value, getattr(tables, name)):
            raise ArtifactError(
                f"stage {stage.name}: the RNM {name} it carries are not those of {RNM_FILE}"
            )


# A stage computes; it does not touch files or mutate what it reads. A graph may only call
# aten and teesplit ops whose schema writes nothing, and Python's own ``operator`` functions:
# aten.from_file, aten.copy_ and every other mutating or I/O op are refused by name.
_OP_NAMESPACES = frozenset({"aten", "teesplit"})
_REFUSED_OPS = frozenset({"from_file", "_from_file"})
# in-place ops that only change a tensor's autograd metadata (export keeps them in decoders)
_METADATA_ONLY = frozenset({"detach_"})


def _check_ops(graph: torch.fx.Graph, rel: str) -> None:
    import operator

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target._schema.name.split("::")[-1]
            if (
                target.namespace not in _OP_NAMESPACES
                or (target._schema.is_mutable and name not in _METADATA_ONLY)
                or name in _REFUSED_OPS
            ):
                raise ArtifactError(f"{rel}: node {node.name} calls {target}, which no stage may")
        elif getattr(target, "__module__", None) not in ("_operator", operator.__name__):
            raise ArtifactError(f"{rel}: node {node.name} calls {target!r}, which no stage may")


def load_stage_modules(
    root: Path, plan: Plan, side: str, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.nn.Module]:
    """``{name: module}`` for each stage of ``side``, weights restored from the side's file
    (or from ``weights``, when the caller has read that file already)."""
    if weights is None:
        weights = read_weights(root / weights_file(side))
    return {
        s.name: load_exported(root, stage_file(side, s.name), s.name, weights)
        for s in plan.stages
        if s.side == side
    }


def private_copy(data: bytes, name: str, beside: Path | None = None) -> Path:
    """``data`` (a library's bytes, already checked against the bundle's sha256) written to a
    new directory only this process's user can open (or to ``beside``'s, one made so), so
    that what is loaded is what was checked, whatever happens to the bundle's file
    afterwards."""
    if beside is None:
        directory = Path(tempfile.mkdtemp(prefix="teesplit-aot-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    else:
        directory = beside.parent
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


_AOT_ENTRY = {"library", "constants", "checks", "inputs", "verifies"}
_DTYPES = {"float32", "float64", "int32", "int64", "bool", "float16", "bfloat16", "int8"}


def _input_specs(value: Any, where: str, stage: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """A compiled stage's input dtypes and shapes, one per input of the stage."""
    count = len(stage.inputs) + len(stage.extra_inputs)
    if not isinstance(value, list) or len(value) != count:
        raise ArtifactError(f"{where}: expected one [dtype, shape] per input ({count})")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 2 or item[0] not in _DTYPES:
            raise ArtifactError(f"{where}[{i}]: expected [dtype, shape]")
        out.append((item[0], tuple(shape_(item[1], f"{where}[{i}]"))))
    return tuple(out)


def _attach_compiled(plan: Plan, files: VerifiedFiles, weights: dict[str, torch.Tensor]) -> None:
    """Give each enclave stage that ``enclave/aot/index.json`` names its compiled library:
    its bytes are read once and checked against ``plan.json`` (signed) before a private copy
    is loaded, so the code that runs is the code the compiler listed."""
    try:
        index = json.loads(files.read(AOT_INDEX), object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise ArtifactError(f"{AOT_INDEX}: not JSON ({exc})") from None
    entries = index.get("stages") if isinstance(index, dict) else None
    if not isinstance(entries, dict):
        raise ArtifactError(f"{AOT_INDEX}: expected {{'stages': {{stage: entry}}}}")
    _check_format(index, entries)
    stages = {s.name: s for s in plan.stages if s.side == "enclave"}
    loaded: dict[str, Path] = {}
    for name, entry in entries.items():
        where = f"{AOT_INDEX}: stage {name}"
        if name not in stages:
            raise ArtifactError(f"{where}: the plan has no enclave stage of that name")
        # an entry saved before libraries could verify a reply has no "verifies": none does
        if isinstance(entry, dict) and set(entry) == _AOT_ENTRY - {"verifies"}:
            entry = {**entry, "verifies": None}
        if not isinstance(entry, dict) or set(entry) != _AOT_ENTRY:
            raise ArtifactError(
                f"{where}: expected keys library, constants, checks, inputs, verifies"
            )
        library, keys, checks = entry["library"], entry["constants"], entry["checks"]
        inputs = _input_specs(entry["inputs"], f"{where}.inputs", stages[name])
        if not isinstance(library, str) or not library.startswith(f"{AOT_DIR}/"):
            raise ArtifactError(f"{where}: library must be a file under {AOT_DIR}/")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ArtifactError(f"{where}: constants must be a list of weight keys")
        if not isinstance(checks, bool):
            raise ArtifactError(f"{where}: checks must be true or false")
        verifies = _verifies(entry["verifies"], f"{where}.verifies")
        missing = [k for k in keys if k not in weights]
        if missing:
            raise ArtifactError(f"{where}: constant {missing[0]} is not in the enclave weights")
        if library not in loaded:
            loaded[library] = private_copy(files.read(library), Path(library).name)
        constants = tuple(weights[k] for k in keys)
        stages[name].compiled = CompiledLibrary(
            str(loaded[library]), constants, checks, inputs, verifies
        )
    if index.get("step") is not None:
        plan.step = _step_library(plan, index["step"], files, weights)


_STEP_ENTRY = {"library", "calls", "sources", "constants", "dtypes", "outputs"}
_STEP_SOURCES = {"zero", "input", "pad", "delta", "check"}
_STEP_ARGS = ["stage", "verdict", "sent", "like", "widths"]


def _step_library(
    plan: Plan, entry: Any, files: VerifiedFiles, weights: dict[str, torch.Tensor]
) -> StepLibrary:
    """The index's ``step`` entry (``partitioner.aot_step``), checked against the plan: its
    library and call list are read once and checked against ``plan.json``; every call the
    library makes back into Python is ``teesplit_step::gpu`` on a GPU stage of the plan."""
    where = f"{AOT_INDEX}: step"
    if not isinstance(entry, dict) or set(entry) != _STEP_ENTRY:
        raise ArtifactError(f"{where}: expected keys {sorted(_STEP_ENTRY)}")
    library, calls = entry["library"], entry["calls"]
    if not isinstance(library, str) or not library.startswith(f"{AOT_DIR}/"):
        raise ArtifactError(f"{where}: library must be a file under {AOT_DIR}/")
    if not library.endswith(".so") or calls != library[: -len(".so")] + ".json":
        raise ArtifactError(f"{where}: calls must be the library's .json beside it")
    gpu = {i: s.name for i, s in enumerate(plan.stages) if s.side == "gpu"}
    prot = plan.protection
    checked = set(prot.freivalds) if prot is not None and prot.exact is not None else set()
    sources = entry["sources"]
    if not isinstance(sources, list) or not all(
        isinstance(x, list) and len(x) == 2 and x[0] in _STEP_SOURCES and isinstance(x[1], str)
        for x in sources
    ):
        raise ArtifactError(f"{where}.sources: expected [[kind, name], ...]")
    masked = set(prot.masked) if prot is not None else set()
    corrected = masked | {
        name for corr in (prot.corrections.values() if prot else ()) for name in corr.delta_outputs
    }
    known = {"zero": {""}, "input": set(plan.input_dims), "pad": masked, "delta": corrected}
    known["check"] = checked
    for kind, name in sources:
        if name not in known[kind]:
            raise ArtifactError(f"{where}.sources: {kind} {name} is not one of the plan's")
    if (
        len({(k, n) for k, n in sources}) != len(sources)
        or [k for k, _ in sources].count("zero") != 1
    ):
        raise ArtifactError(f"{where}.sources: an input is named twice, or no zero verdict")
    why = plan.between_stages()
    if why is not None:
        raise ArtifactError(f"{where}: the plan cannot run as one library: {why}")
    keys = entry["constants"]
    if not isinstance(keys, list) or not all(isinstance(k, str) and k in weights for k in keys):
        raise ArtifactError(f"{where}.constants: expected weight keys of the enclave weights")
    dtypes = entry["dtypes"]
    if not isinstance(dtypes, dict) or not all(
        name in plan.input_dims and d in _DTYPES for name, d in dtypes.items()
    ):
        raise ArtifactError(f"{where}.dtypes: expected {{input: dtype}}")
    outputs = entry["outputs"]
    if not isinstance(outputs, list) or not all(
        isinstance(x, list) and len(x) == 2 and x[0] in ("env", "gpu") and isinstance(x[1], str)
        for x in outputs
    ):
        raise ArtifactError(f"{where}.outputs: expected [[env|gpu, value], ...]")
    if [name for _, name in outputs] != [v for v in plan.flat_outputs if isinstance(v, str)]:
        raise ArtifactError(f"{where}.outputs: not the plan's outputs, in its order")
    listed = files.read(calls)
    try:
        nodes = json.loads(listed, object_pairs_hook=_no_duplicates)["nodes"]
        calls_made = [
            (
                n["node"]["target"],
                [i["name"] for i in n["node"]["inputs"]],
                n["node"]["inputs"][0]["arg"]["as_int"],
            )
            for n in nodes
        ]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ArtifactError(f"{calls}: not the call list of a step library") from None
    for target, names, stage in calls_made:
        if target != "teesplit_step::gpu" or names != _STEP_ARGS or stage not in gpu:
            raise ArtifactError(f"{calls}: calls {target}({stage}), not a GPU stage of the plan")
    if [stage for *_, stage in calls_made] != sorted(gpu):
        raise ArtifactError(f"{calls}: does not call each GPU stage once, in the plan's order")
    path = private_copy(files.read(library), Path(library).name)
    private_copy(listed, Path(calls).name, beside=path)
    return StepLibrary(
        str(path),
        tuple((kind, name) for kind, name in sources),
        tuple(weights[k] for k in keys),
        dict(dtypes),
        tuple((w, name) for w, name in outputs),
    )


def _check_format(index: dict[str, Any], entries: dict[str, Any]) -> None:
    """Refuse an index whose libraries take inputs this runtime does not hand them: a
    verifying library of format 1 takes a shorter check vector, and every call of it would
    be refused at run time as if the GPU had lied."""
    version = index.get("format", 1)
    if version not in (1, AOT_FORMAT) or isinstance(version, bool):
        raise ArtifactError(f"{AOT_INDEX}: format {version!r} is not one this runtime reads")
    verifying = [name for name, e in entries.items() if isinstance(e, dict) and e.get("verifies")]
    if version == 1 and verifying:
        raise ArtifactError(
            f"{AOT_INDEX}: stage {verifying[0]}'s library checks a GPU reply as a teesplit "
            "older than this runtime compiled it (index format 1): compile the bundle again"
        )


def _verifies(value: Any, where: str) -> tuple[str, tuple[int, ...]] | None:
    """``null``, or ``[GPU stage, [input index per equation]]`` (the executor then checks
    that the plan has that stage, before this one, with that check)."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], list)
        or not value[1]
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value[1])
    ):
        raise ArtifactError(f"{where}: expected null or [GPU stage, [input index, ...]]")
    return value[0], tuple(value[1])


def sealed_files(document: dict[str, Any], rnm: bool) -> tuple[str, dict[str, Any] | None]:
    """``plan.json``'s record of sealed files (``partitioner.sealing``): (the enclave's
    weights file, the record), or (that file, None) for a bundle in the clear. The record
    names every file only the enclave reads: the weights file, then the RNM tables where the
    plan has RNM (``rnm``), so that tables left in the clear beside sealed weights are
    refused, not read. :class:`ArtifactError` for a record of any other shape."""
    rel = weights_file("enclave")
    record = document.get("sealed")
    if record is None:
        return rel, None
    files = [rel, RNM_FILE] if rnm else [rel]
    if (
        not isinstance(record, dict)
        or set(record) != {"cipher", "key", "files"}
        or record["cipher"] != sealing.CIPHER
        or not isinstance(record["key"], str)
        or record["files"] != files
    ):
        raise ArtifactError(f"{PLAN_FILE}: 'sealed' must be {{cipher, key, files: {files}}}")
    return rel, record


class _EnclaveFiles:
    """The files only the enclave reads, unsealed with ``enclave_key`` (bytes or a key
    file's path; None: the path in ``$TEESPLIT_ENCLAVE_KEY``) where ``plan.json`` says they
    are sealed.

    Refused: a sealed bundle whose signature was not checked (whoever can write the folder
    would choose the graphs that read the unsealed weights, and could make them send the
    weights to the GPU), and a key given for a bundle that is not sealed (a plaintext bundle
    swapped in where sealed ones are expected)."""

    def __init__(
        self,
        document: dict[str, Any],
        files: VerifiedFiles,
        enclave_key: Any,
        signed: bool,
        rnm: bool,
    ) -> None:
        rel, record = sealed_files(document, rnm)
        if enclave_key is None:
            enclave_key = os.environ.get(sealing.ENV) or None
        if record is None and enclave_key is not None:
            raise ArtifactError(
                f"{rel} is not sealed, though an enclave key was given (enclave_key= or "
                f"${sealing.ENV}): refusing a bundle in the clear where sealed ones are expected"
            )
        self.files, self.sealed, self.key = files, [], b""
        if record is None:
            return
        if not signed:
            raise ArtifactError(
                f"{rel} is sealed, and a sealed bundle is unsealed only with its signature "
                "checked (a trusted key): unsigned, whoever can write the folder chooses the "
                "graphs that read the weights"
            )
        if enclave_key is None:
            raise ArtifactError(
                f"{rel} is sealed: give the enclave key (the path of its file in "
                f"${sealing.ENV}, or enclave_key= in Python)"
            )
        self.key = sealing.load_key(enclave_key)
        if sealing.fingerprint(self.key) != record["key"]:
            raise ArtifactError(f"{rel} was sealed under another enclave key than the one given")
        self.sealed = record["files"]

    def read(self, rel: str) -> bytes:
        data = self.files.read(rel)
        return sealing.unseal(data, self.key, rel) if rel in self.sealed else data


def load_program(
    directory: str | Path,
    *,
    gpu: bool = True,
    trusted_key: Any = None,
    allow_unsigned: bool = False,
    enclave_key: Any = None,
) -> Plan:
    """A saved program as a :class:`Plan` whose records carry their callables.

    Verifies the bundle's signature with ``trusted_key`` and then every hash, before anything
    from the bundle is parsed or loaded. Without a key the bundle is refused unless the caller
    opts out with ``allow_unsigned=True`` (then nothing authenticates it: anyone who can write
    the folder chooses what runs). ``gpu=False`` reads the enclave side only (the enclave host
    need not hold ``gpu/``): GPU stages then have no module, and a runner serves them.
    ``enclave_key`` (bytes, or a key file's path; default ``$TEESPLIT_ENCLAVE_KEY``) unseals
    the enclave's weights and RNM tables where the bundle sealed them (``partitioner.sealing``).
    """
    root = Path(directory)
    if trusted_key is None and not allow_unsigned:
        raise ArtifactError(
            f"{root}: no trusted key to verify the bundle's signature; give the compiler's "
            "public key (trusted_key=, --trusted-key) or opt out explicitly (allow_unsigned="
            "True, --allow-unsigned)"
        )
    sides = ("enclave", "gpu") if gpu else ("enclave",)
    # every file used below is read (and hashed) once, by ``files``
    document = read_document(root, sides, trusted_key=trusted_key, hash_contents=False)
    plan = read_plan(root, document)
    files = VerifiedFiles(root, document["files"])
    rnm = plan.protection is not None and plan.protection.rnm is not None
    private = _EnclaveFiles(document, files, enclave_key, trusted_key is not None, rnm)
    weights = {
        side: weights_from_bytes(
            (private if side == "enclave" else files).read(weights_file(side)), weights_file(side)
        )
        for side in sides
    }
    for stage in plan.stages:
        if stage.side in sides:
            rel = stage_file(stage.side, stage.name)
            stage.module = load_exported(files.read(rel), rel, stage.name, weights[stage.side])
    if AOT_INDEX in document["files"] and "enclave" in sides:
        if trusted_key is None:
            raise ArtifactError(
                f"{root}: {AOT_DIR}/ holds native code for the enclave to run; an unsigned "
                "bundle may not carry it (whoever can write the folder would choose the code)"
            )
        _attach_compiled(plan, files, weights["enclave"])
    prot = plan.protection
    if prot is not None:
        enclave = weights["enclave"]
        for name, corr in prot.corrections.items():
            rel = correction_file(name)
            corr.module = load_exported(files.read(rel), rel, f"correction/{name}", enclave)
        for name, (_, outputs) in list(prot.freivalds.items()):
            rel = freivalds_file(name)
            own = load_exported(files.read(rel), rel, f"freivalds/{name}", enclave)
            prot.freivalds[name] = (own, outputs)
        if prot.rnm is not None:
            tables = RNMTables.from_bytes(private.read(RNM_FILE), RNM_FILE)
            if tables.epsilon != prot.rnm.epsilon or tables.k != prot.rnm.candidates:
                raise ArtifactError(f"{RNM_FILE}: its ε or K disagrees with the plan")
            passed = int(tables.keep.sum())
            if prot.rnm.special_tokens is not None and passed != prot.rnm.special_tokens:
                raise ArtifactError(
                    f"{RNM_FILE}: passes {passed} tokens through unchanged, the plan says "
                    f"{prot.rnm.special_tokens}"
                )
            _check_rnm_stage(plan, tables)
            prot.rnm.tables = tables
        if prot.exact is not None:
            for value in exact_outputs(plan):
                key = exact_scale_key(value)
                if key not in enclave:
                    raise ArtifactError(f"{weights_file('enclave')}: no {key} for output {value}")
                prot.exact.inv_scale[value] = enclave[key]
                if exact_bias_key(value) in enclave:
                    prot.exact.bias[value] = enclave[exact_bias_key(value)]
    return plan
