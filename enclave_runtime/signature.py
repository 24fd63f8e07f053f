"""A plan's call signature, live: bind ``(args, kwargs)`` to the program's flat inputs.

Reads a :class:`~partitioner.plan.Signature` (pytree specs as text); writes nothing.
:meth:`CallSignature.bind` checks a call against the exported signature and fills the
constants the program was exported with, so a call the program cannot serve fails with a
``TypeError`` naming the argument instead of running on the wrong inputs.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import torch.utils._pytree as pytree

from partitioner.errors import ArtifactError
from partitioner.plan import Signature

_MISSING = object()


# The closed set of containers a program's inputs and outputs may be built from: pytree's own
# (tuple, list, dict, None, ...) need no import; an output type of transformers is allowed only
# from the one module that defines them, and importing it runs no model code.
_OUTPUT_MODULES = frozenset({"transformers.modeling_outputs"})
_BUILTIN_TYPES = frozenset(
    {"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
)
_MAX_SPEC_DEPTH = 64


def _import_output_types(spec: str) -> None:
    """Import the module that defines the output containers a treespec names, if it is in the
    closed set; any other dotted type name is refused (a spec from a file must not choose what
    this process imports)."""

    def walk(node: Any, depth: int) -> None:
        if depth > _MAX_SPEC_DEPTH:
            raise ArtifactError("signature: the output spec nests too deeply")
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if isinstance(kind, str) and "." in kind and kind not in _BUILTIN_TYPES:
            module = kind.rsplit(".", 1)[0]
            if module not in _OUTPUT_MODULES:
                raise ArtifactError(
                    f"signature: output type {kind!r} is not one of the containers teesplit "
                    f"rebuilds ({sorted(_OUTPUT_MODULES)})"
                )
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ArtifactError(f"output type {kind} needs {module}: {exc}") from None
        children = node.get("children_spec", [])
        for child in children if isinstance(children, list) else []:
            walk(child, depth + 1)

    try:
        walk(json.loads(spec)[1], 0)
    except (ValueError, IndexError, TypeError, KeyError, RecursionError) as exc:
        raise ArtifactError(f"signature: malformed output spec ({exc})") from None


def _loads(spec: str, what: str) -> pytree.TreeSpec:
    try:
        return pytree.treespec_loads(spec)
    except Exception as exc:  # pytree raises several types for a spec it cannot rebuild
        raise ArtifactError(f"signature: cannot read the {what} spec ({exc})") from None


class CallSignature:
    """How to turn a call's ``(args, kwargs)`` into the exported graph's flat user inputs."""

    def __init__(self, signature: Signature) -> None:
        _import_output_types(signature.out_spec)
        self.in_spec = _loads(signature.in_spec, "input")
        self.out_spec = _loads(signature.out_spec, "output")
        self.inputs = list(signature.inputs)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map a call to ``{placeholder name: value}``, filling export-time constants."""
        args_spec, kwargs_spec = self.in_spec.children()
        names = list(kwargs_spec.context or [])
        n_positional = args_spec.num_children
        if len(args) > n_positional:  # extra positionals fill keyword inputs in export order
            extra = args[n_positional:]
            args = args[:n_positional]
            for name, value in zip(names, extra, strict=False):
                if name in kwargs:
                    raise TypeError(f"argument {name!r} given twice")
                kwargs[name] = value
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the program takes {names}")
        defaults = self._constants_by_kwarg(names)
        full = {
            name: kwargs[name] if name in kwargs else defaults.get(name, _MISSING) for name in names
        }
        missing = sorted(n for n, v in full.items() if v is _MISSING)
        if missing:
            raise TypeError(f"missing arguments {missing}")
        flat_leaves, spec = pytree.tree_flatten((args, full))
        if spec != self.in_spec:
            raise TypeError(f"inputs do not match the exported signature {self.in_spec}")
        bound: dict[str, Any] = {}
        for (name, constant), leaf in zip(self.inputs, flat_leaves, strict=True):
            if name is not None:
                bound[name] = leaf
            elif leaf != constant:
                raise TypeError(
                    f"the program was exported with a constant {constant!r}, got {leaf!r}"
                )
        return bound

    def _constants_by_kwarg(self, names: list[str]) -> dict[str, Any]:
        n_positional = self.in_spec.child(0).num_children
        keyword_inputs = self.inputs[n_positional:]
        return {
            name: constant
            for name, (placeholder, constant) in zip(names, keyword_inputs, strict=False)
            if placeholder is None
        }
