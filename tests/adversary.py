"""The attacker's tools, for tests: what someone who can write a bundle on disk can do, and a
GPU runner that lies about what it does with a request.

A tamperer edits ``plan.json`` (and re-hashes the files it changed, since the hashes live in
the same file), swaps or links files, and plants payloads where the loader reads text. Each
helper does one such thing to a *copy* of a bundle and returns the copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from enclave_runtime.executor import InProcessRunner

MARKER = "teesplit-payload-ran"


def copy_bundle(bundle: Path, where: Path) -> Path:
    shutil.copytree(bundle, where)
    return where


def read_plan(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "plan.json").read_text())


def write_plan(bundle: Path, document: dict[str, Any]) -> None:
    """Write ``plan.json`` as the compiler would (the old signature no longer matches)."""
    (bundle / "plan.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def rehash(bundle: Path, *rels: str) -> None:
    """Update the listed sha256 of ``rels`` to their current content: what an attacker does
    after replacing a file, since nothing but the signature protects the hash table."""
    document = read_plan(bundle)
    for rel in rels:
        document["files"][rel] = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    write_plan(bundle, document)


def swap_file(bundle: Path, donor: Path, rel: str) -> None:
    """Replace ``rel`` with the donor bundle's file of the same name, and fix its hash."""
    shutil.copyfile(donor / rel, bundle / rel)
    rehash(bundle, rel)


def payload(marker_file: Path) -> str:
    """Python that leaves a marker file if anything ever evaluates it."""
    return f"__import__('pathlib').Path({str(marker_file)!r}).write_text({MARKER!r})"


def plant_file_write(bundle: Path, rel: str, target: Path, source: Path, size: int) -> None:
    """Rewrite a stage graph (JSON, no pickle) so that running it overwrites ``target`` with
    the bytes of ``source`` through registered aten ops (``from_file`` + ``copy_``); fix the
    hash. Found by the red team: the graph itself can do file I/O."""
    import io
    import zipfile

    def tensor() -> dict[str, Any]:
        return {"dtype": 1, "sizes": [{"as_int": size}], "requires_grad": False,
                "device": {"type": "cpu", "index": None}, "strides": [{"as_int": 1}],
                "storage_offset": {"as_int": 0}, "layout": 7}  # fmt: skip

    def node(target_op: str, inputs: list[tuple[str, Any]], name: str) -> dict[str, Any]:
        return {"target": target_op,
                "inputs": [{"name": k, "arg": v, "kind": 2 if k == "dtype" else 1}
                           for k, v in inputs],
                "outputs": [{"as_tensor": {"name": name}}], "metadata": {},
                "is_hop_single_tensor_return": None, "name": name}  # fmt: skip

    path = bundle / rel
    original = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as planted:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("models/model.json"):
                document = json.loads(data)
                graph = document["graph_module"]["graph"]
                for name in ("dst", "srcb", "cp"):
                    graph["tensor_values"][name] = tensor()
                read = "torch.ops.aten.from_file.default"
                graph["nodes"][0:0] = [
                    node(read, [("filename", {"as_string": str(target)}),
                                ("shared", {"as_bool": True}), ("size", {"as_int": size}),
                                ("dtype", {"as_scalar_type": 1})], "dst"),
                    node(read, [("filename", {"as_string": str(source)}),
                                ("shared", {"as_bool": False}), ("size", {"as_int": size}),
                                ("dtype", {"as_scalar_type": 1})], "srcb"),
                    node("torch.ops.aten.copy_.default",
                         [("self", {"as_tensor": {"name": "dst"}}),
                          ("src", {"as_tensor": {"name": "srcb"}})], "cp"),
                ]  # fmt: skip
                data = json.dumps(document).encode()
            planted.writestr(info, data)
    path.write_bytes(out.getvalue())
    rehash(bundle, rel)


class EditingRunner(InProcessRunner):
    """Says it copies what it is handed (as a serialising client does), but edits the request
    to stage ``target`` in place and answers the edited request honestly."""

    copies_inputs = True

    def __init__(self, plan: Any, target: str) -> None:
        super().__init__(plan)
        self.target = target

    def run(self, stage: str, tensors: list, expected: Any = None, **kw: Any) -> list:
        if stage == self.target:
            tensors[0].view(-1)[3] += 1
        return super().run(stage, tensors, expected, **kw)


def shrunk_storage(t: Any) -> Any:
    """A copy of ``t`` whose storage holds one element, whatever its shape says (a reply an
    in-process runner can make: compiled code indexing it by its shape reads past its end)."""
    out = t.clone()
    out.untyped_storage().resize_(t.element_size())
    return out


def transposed_copy(t: Any) -> Any:
    """``t``'s values in another memory layout (its dims' strides reversed)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)
