"""The attacker's tools, for tests: what someone who can write a bundle on disk can do.

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
