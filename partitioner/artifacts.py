"""Writing split artifacts: ``save(program, dir)``; the layout is in ``partitioner.bundle``.

Each ``.pt2`` is a stage exported with dynamic ``batch``/``seq`` dims; its weights live in the
side's safetensors file (tensors shared between stages are stored once), so the ``.pt2`` holds
meta tensors only. ``plan.json`` holds ``Plan.to_dict()`` (the one schema, in
``partitioner.plan``), library versions and the sha256 of every other file. Reading is
``partitioner.bundle``, below this module: the enclave and the worker read bundles without
importing the compiler.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from enclave_runtime.manifest import TEMPLATE
from enclave_runtime.tokenizer import save_tokenizer
from partitioner import sealing
from partitioner.bundle import (
    AOT_DIR,
    AOT_FORMAT,
    AOT_INDEX,
    ARTIFACT_SCHEMA_VERSION,
    PLAN_FILE,
    RNM_FILE,
    correction_file,
    exact_bias_key,
    exact_outputs,
    exact_scale_key,
    freivalds_file,
    onnx_file,
    sha256,
    stage_file,
    weights_file,
)
from partitioner.errors import ArtifactError
from partitioner.onnx_export import export_onnx
from partitioner.signing import SIGNATURE_FILE, load_private_key, sign


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

    def to_bytes(self, salted: bool = False) -> bytes:
        """The safetensors file; ``salted``: with 16 random bytes in its metadata, so that its
        sha256 in ``plan.json`` (which the GPU host reads) is no fingerprint of its tensors."""
        from safetensors.torch import save

        metadata = {"alias": json.dumps(self.alias)}
        if salted:
            metadata["salt"] = os.urandom(16).hex()
        return save(self.tensors, metadata=metadata)


def _export(program: Any, name: str, module: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Export one stage graph with its named dims dynamic (at example sizes >= 2)."""
    placeholders = list(module.graph.find_nodes(op="placeholder"))
    try:
        args, specs = program.shapes.export_example(
            program.input_dims, [ph.meta.get("val") for ph in placeholders]
        )
    except ValueError as exc:
        raise ArtifactError(f"{name}: {exc} to export with") from None
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
    ep.example_inputs = None  # the loader unpickles nothing: leave no pickled inputs behind
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))


def _compile_enclave(program: Any, root: Path, weights: _Weights, step: bool) -> None:
    """``enclave/aot/``: with ``step``, the step library when the program has one (every
    enclave stage in one library, ``partitioner.aot_step``); else one library per stage
    (``partitioner.aot``); and ``index.json`` naming them."""
    step_entry, why = _compile_step(program, root, weights) if step else (None, "not asked for")
    stages: dict[str, Any] = {}
    eager: dict[str, str] = {}
    if step_entry is None:
        from partitioner.aot import compile_enclave

        report = compile_enclave(program, root / AOT_DIR)
        eager = report.eager
        for name, compiled in report.compiled.items():
            keys = []
            for i, tensor in enumerate(compiled.constants):
                key = f"aot/{name}/{i}"
                weights.add(key, tensor)
                keys.append(key)
            stages[name] = {
                "library": f"{AOT_DIR}/{Path(compiled.path).name}",
                "constants": keys,
                "checks": compiled.checks,
                "inputs": [[dtype, list(shape)] for dtype, shape in compiled.inputs],
                # the GPU stage whose reply the library checks, and its equations' inputs
                "verifies": (
                    [compiled.verifies[0], list(compiled.verifies[1])]
                    if compiled.verifies
                    else None
                ),
            }
    index = {"format": AOT_FORMAT, "stages": stages, "eager": eager, "step": step_entry}
    if why:
        index["no_step"] = why
    (root / AOT_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def _compile_step(program: Any, root: Path, weights: _Weights) -> tuple[dict[str, Any] | None, str]:
    """The index's ``step`` entry (``partitioner.aot_step``: the library, the proxy
    executor's call list beside it, and what feeds each input), or why there is none."""
    from partitioner.aot import why_eager
    from partitioner.aot_step import compile_step

    try:
        library = compile_step(program, root / AOT_DIR)
    except Exception as exc:  # NotLowerable, or export's and Inductor's: one library per stage
        return None, why_eager(exc)
    keys = []
    for i, tensor in enumerate(library.constants):
        keys.append(f"aot/step/{i}")
        weights.add(keys[-1], tensor)
    path = Path(library.path)
    entry = {
        "library": f"{AOT_DIR}/{path.name}",
        "calls": f"{AOT_DIR}/{path.with_suffix('.json').name}",
        "sources": [list(src) for src in library.sources],
        "constants": keys,
        "dtypes": library.dtypes,
        "outputs": [list(out) for out in library.outputs],
    }
    return entry, ""


def save(
    program: Any,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    sign_key: Any = None,
    compile_enclave: bool | str = False,
    enclave_key: Any = None,
) -> Path:
    """Write ``program``'s artifacts to ``directory`` (created; existing files are replaced).

    ``compile_enclave``: also compile the enclave stages ahead of time into ``enclave/aot/``:
    one ``.so`` per distinct stage graph (``partitioner.aot``; ``True`` or ``"stages"``), or
    with ``"step"`` all of them as one library that calls back for the GPU stages
    (``partitioner.aot_step``) where the program allows it; ``index.json`` names the
    libraries and their constants (stored in the enclave's weights file). Like every file,
    the libraries are listed in ``plan.json`` with their sha256 (signed) and in the Gramine
    manifest as trusted files; a stage that cannot be compiled stays eager (the index says why).

    ``tokenizer`` (a transformers fast tokenizer) is saved into the enclave bundle so the
    enclave driver can tokenize prompts without transformers. ``sign_key`` (an Ed25519 private
    key or the path of its PEM file) signs ``plan.json`` into ``plan.json.sig``; the enclave
    refuses an unsigned bundle unless told otherwise.

    ``enclave_key`` (16 or 32 raw bytes, or the path of a file holding them:
    ``partitioner.sealing``) seals ``enclave/weights.safetensors``, every tensor the enclave's
    stages read, the protected parameters among them, and ``enclave/rnm.safetensors`` where
    there is one (RNM's tables, built from the embedding): the files hold AES-GCM
    ciphertext, and ``plan.json`` records that and the key's fingerprint (signed with it).
    Without a key they are written in the clear, readable by whoever can read the enclave
    host's disk.
    """
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        if not (root / PLAN_FILE).is_file():
            raise ArtifactError(f"{root} is not empty and holds no plan.json; refusing to write")
        (root / PLAN_FILE).unlink()
        (root / SIGNATURE_FILE).unlink(missing_ok=True)
        for side in ("enclave", "gpu"):
            if (root / side).exists():
                shutil.rmtree(root / side)
    root.mkdir(parents=True, exist_ok=True)
    weights = {"enclave": _Weights(), "gpu": _Weights()}
    # files only the enclave reads, sealed with an enclave key: RNM's tables are the
    # embedding's cosine neighbours and scores, which describe it where it is protected
    private: dict[str, bytes] = {}
    for stage in program.stages:
        ep = _export(program, stage.name, stage.module)
        if stage.side == "gpu":
            export_onnx(ep, root / onnx_file(stage.name), stage.name)
        _save_exported(
            ep, stage.name, weights[stage.side], root / stage_file(stage.side, stage.name)
        )
    prot = program.protection
    if prot is not None:
        for name, corr in prot.corrections.items():
            ep = _export(program, f"correction of {name}", corr.module)
            _save_exported(
                ep, f"correction/{name}", weights["enclave"], root / correction_file(name)
            )
        for name, (module, _) in prot.freivalds.items():
            ep = _export(program, f"Freivalds copy of {name}", module)
            _save_exported(ep, f"freivalds/{name}", weights["enclave"], root / freivalds_file(name))
        if prot.rnm is not None:
            private[RNM_FILE] = prot.rnm.tables.to_bytes(salted=True)
        if prot.exact is not None:  # stages carry their own; the executor unmasks outputs
            for value in exact_outputs(program.spec):
                weights["enclave"].add(exact_scale_key(value), prot.exact.inv_scale[value])
                if value in prot.exact.bias:
                    weights["enclave"].add(exact_bias_key(value), prot.exact.bias[value])
    if compile_enclave not in (False, None, True, "stages", "step"):
        raise ArtifactError(f"compile_enclave={compile_enclave!r}: expected 'stages' or 'step'")
    if compile_enclave:
        _compile_enclave(program, root, weights["enclave"], step=compile_enclave == "step")
    (root / "gpu").mkdir(parents=True, exist_ok=True)
    (root / weights_file("gpu")).write_bytes(weights["gpu"].to_bytes())
    # salted: plan.json's hashes of files only the enclave reads, in the clear, would let the
    # GPU host, which reads plan.json, test candidate fine-tunes against them (a review's
    # finding); sealed, the cipher's random nonce does the same
    private = {weights_file("enclave"): weights["enclave"].to_bytes(salted=True), **private}
    sealed = None
    if enclave_key is not None:  # never on disk in the clear
        key = sealing.load_key(enclave_key)
        private = {rel: sealing.seal(data, key, rel) for rel, data in private.items()}
        sealed = {"cipher": sealing.CIPHER, "key": sealing.fingerprint(key), "files": [*private]}
    for rel, data in private.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    shutil.copyfile(TEMPLATE, root / "enclave" / TEMPLATE.name)
    if tokenizer is not None:
        save_tokenizer(tokenizer, root)
    files = {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != PLAN_FILE
    }
    document = {
        "artifact_schema_version": ARTIFACT_SCHEMA_VERSION,
        "versions": _versions(),
        "plan": program.spec.to_dict(),
        "files": files,
    }
    if sealed is not None:
        document["sealed"] = sealed
    raw = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")
    (root / PLAN_FILE).write_bytes(raw)
    if sign_key is not None:
        key = sign_key if not isinstance(sign_key, (str, Path)) else load_private_key(sign_key)
        (root / SIGNATURE_FILE).write_bytes(sign(raw, key))
    return root
