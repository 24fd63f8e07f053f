"""GPU stages as ONNX, for onnxruntime on the untrusted host.

Reads an exported GPU stage (``torch.export`` program with its weights); writes an ``.onnx``
file through torch's dynamo exporter, with dynamic dims preserved. The ``teesplit::`` ring ops
get translations into plain ONNX arithmetic (double ``MatMul`` over exact integers, ``Mod``),
so an exactly masked stage runs under onnxruntime bit for bit as under torch. Masks and
unmasks never appear in GPU stages, so they need no translation.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from partitioner.errors import ArtifactError


def _wrap32(x: Any) -> Any:
    """int64 integers to int32 residues of ``Z_{2^32}`` (their signed representative)."""
    from onnxscript import opset18 as op

    half = op.Constant(value_int=1 << 31)
    ring = op.Constant(value_int=1 << 32)
    return op.Cast(op.Sub(op.Mod(op.Add(x, half), ring), half), to=6)  # 6: INT32


def _limbs(x: Any) -> list[Any]:
    """Four 16-bit limbs of int64 residues (``x = sum l_k 2**(16 k) mod 2**64``), as doubles."""
    from onnxscript import opset18 as op

    base = op.Constant(value_int=1 << 16)
    out = []
    for _ in range(4):
        limb = op.Mod(x, base)  # fmod=0: the divisor's sign, so in [0, 2**16)
        out.append(op.Cast(limb, to=11))  # 11: DOUBLE
        x = op.Div(op.Sub(x, limb), base)  # exact: no rounding direction involved
    return out


def _combine(parts: list[Any]) -> Any:
    """``sum parts[k] 2**(16 k)`` in int64 (products wrap mod 2**64 like torch's)."""
    from onnxscript import opset18 as op

    total = op.Cast(parts[0], to=7)  # 7: INT64
    for k, part in enumerate(parts[1:], start=1):
        total = op.Add(total, op.Mul(op.Cast(part, to=7), op.Constant(value_int=1 << (16 * k))))
    return total


def _ring_linear(u: Any, w: Any, b: Any, carry: bool = False) -> Any:
    """``teesplit::ring_linear`` as double MatMuls: exact for the same reasons as in torch;
    with ``carry``, the last column (a row's masked exponent) passes through."""
    from onnxscript import opset18 as op

    ring32 = u.dtype.name == "INT32"  # a slice below has no static dtype: decide here
    if carry:
        axis = op.Constant(value_ints=[-1])
        body = op.Slice(u, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]), axis)
        last = op.Slice(u, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]), axis)
        return op.Concat(_linear_body(body, w, b, ring32), last, axis=-1)
    return _linear_body(u, w, b, ring32)


def _linear_body(u: Any, w: Any, b: Any, ring32: bool) -> Any:
    from onnxscript import opset18 as op

    wt = op.Transpose(op.Cast(w, to=11), perm=[1, 0])
    if ring32:
        out = _wrap32(op.Cast(op.MatMul(op.Cast(u, to=11), wt), to=7))
    else:
        out = _combine([op.MatMul(limb, wt) for limb in _limbs(u)])
    return out if b is None else op.Add(out, b)


def _ring_matmul(a: Any, b: Any) -> Any:
    from onnxscript import opset18 as op

    la, lb = _limbs(a), _limbs(b)
    parts = []
    for shift in range(4):
        terms = [op.Cast(op.MatMul(la[i], lb[shift - i]), to=7) for i in range(shift + 1)]
        total = terms[0]
        for term in terms[1:]:
            total = op.Add(total, term)
        parts.append(total)
    out = parts[0]
    for k, part in enumerate(parts[1:], start=1):
        out = op.Add(out, op.Mul(part, op.Constant(value_int=1 << (16 * k))))
    return out


def _opset() -> int:
    """``torch.onnx.export``'s default opset, for which it builds torchlib's registry too."""
    from torch.onnx._constants import ONNX_DEFAULT_OPSET

    return ONNX_DEFAULT_OPSET


@functools.cache
def _registry() -> Any:
    """torchlib's ATen-to-ONNX registry with the ``teesplit::`` ops added, built once.

    ``torch.onnx.export`` builds this registry on every call (1.1–1.7 s here: it signs every
    torchlib function), which a bundle of 121 GPU stages paid 121 times. The exporter's own
    ``_core.export`` takes a registry; torch is pinned, so its private path is stable here.
    """
    from torch.onnx._internal.exporter import _registration

    import partitioner.ops  # noqa: F401 - the teesplit ops must be registered to translate them

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=_opset())
    table = {
        torch.ops.teesplit.ring_linear.default: _ring_linear,
        torch.ops.teesplit.ring_matmul.default: _ring_matmul,
    }
    for torch_op, onnx_op in table.items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


def export_onnx(program: torch.export.ExportedProgram, path: Path, name: str) -> None:
    """Write ``program`` (a GPU stage with real weights) to ``path`` as ONNX.

    What ``torch.onnx.export(program, dynamo=True)`` does, with the registry built once.
    """
    try:  # onnxscript, which _core imports, comes with the onnx extra: a missing one is typed
        from torch.onnx._internal.exporter import _core

        onnx_program = _core.export(
            program, registry=_registry(), verbose=False, opset_version=_opset()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program.save(str(path))
    except Exception as exc:  # the exporter raises many types; all mean no ONNX for this stage
        raise ArtifactError(f"cannot export {name} to ONNX: {type(exc).__name__}: {exc}") from None
