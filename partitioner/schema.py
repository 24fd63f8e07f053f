"""Reading plan data from JSON: typed field checks that name the key at fault.

Every ``from_dict`` in the data layer goes through these, so a malformed ``plan.json`` is an
:class:`ArtifactError` naming the key, never a ``KeyError``/``TypeError`` deep in the runtime.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from partitioner.dims import names_in
from partitioner.errors import ArtifactError

# Stage names become file names in a bundle: keep them to one safe path component.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def fields(
    data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict:
    """``data`` as a dict with exactly ``required`` keys (plus any of ``optional``)."""
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{where}: expected an object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if missing or unknown:
        raise ArtifactError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    return dict(data)


def str_(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ArtifactError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def ident(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ArtifactError(f"{where}: {value!r} is not a plain identifier")
    return value


def int_(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArtifactError(f"{where}: expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ArtifactError(f"{where}: {value} is below {minimum}")
    return value


def number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArtifactError(f"{where}: expected a number, got {type(value).__name__}")
    return float(value)


def strs(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ArtifactError(f"{where}: expected a list, got {type(value).__name__}")
    return [str_(v, f"{where}[{i}]") for i, v in enumerate(value)]


def choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ArtifactError(f"{where}: {value!r} is not one of {list(choices)}")
    return value


def shape_(value: Any, where: str) -> list[int | str]:
    """A plan shape: integers and size expressions, each checked against ``partitioner.dims``'
    grammar here, so a shape that is not one never reaches the executor."""
    if not isinstance(value, list) or len(value) > 64:
        raise ArtifactError(f"{where}: expected a list of at most 64 sizes")
    out: list[int | str] = []
    for i, size in enumerate(value):
        if isinstance(size, str):
            try:
                names_in(size)
            except ValueError as exc:
                raise ArtifactError(f"{where}[{i}]: {exc}") from None
            out.append(size)
        else:
            out.append(int_(size, f"{where}[{i}]", 0))
    return out


def map_(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ArtifactError(f"{where}: expected an object with string keys")
    return dict(value)
