"""GPU stages as ONNX, for onnxruntime on the untrusted host.

Reads an exported GPU stage (``torch.export`` program with its weights); writes an ``.onnx``
file through torch's dynamo exporter, with dynamic dims preserved. The ``teesplit::`` field ops
get translations into plain ONNX integer arithmetic (``MatMul`` on int64, ``Div``/``Mod``), so
a field-masked stage runs under onnxruntime bit for bit as under torch. Masks and unmasks never
appear in GPU stages, so they need no translation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from partitioner.errors import ArtifactError


def _field_linear(x: Any, w: Any, b: Any, prime: int) -> Any:
    from onnxscript import opset18 as op

    p = op.Constant(value_int=prime)
    limb = op.Constant(value_int=1 << 31)
    high_x = op.Div(x, limb)  # residues are non-negative, so Div is a floor
    low_x = op.Sub(x, op.Mul(high_x, limb))
    wt = op.Transpose(w, perm=[1, 0])
    high = op.Mod(op.MatMul(high_x, wt), p)
    low = op.Mod(op.MatMul(low_x, wt), p)
    rest = op.Constant(value_int=1 << 30)  # high * 2**31 mod (2**61 - 1) is a 31-bit rotation
    rotated = op.Add(op.Mul(op.Mod(high, rest), limb), op.Div(high, rest))
    out = op.Mod(op.Add(rotated, low), p)
    if b is not None:
        out = op.Mod(op.Add(out, b), p)
    return out


def _field_add(a: Any, b: Any, prime: int) -> Any:
    from onnxscript import opset18 as op

    return op.Mod(op.Add(a, b), op.Constant(value_int=prime))


def export_onnx(program: torch.export.ExportedProgram, path: Path, name: str) -> None:
    """Write ``program`` (a GPU stage with real weights) to ``path`` as ONNX."""
    import partitioner.ops  # noqa: F401 - the teesplit ops must be registered to translate them

    table = {
        torch.ops.teesplit.field_linear.default: _field_linear,
        torch.ops.teesplit.field_add.default: _field_add,
    }
    try:
        onnx_program = torch.onnx.export(
            program, dynamo=True, verbose=False, custom_translation_table=table
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program.save(str(path))
    except Exception as exc:  # the exporter raises many types; all mean no ONNX for this stage
        raise ArtifactError(f"cannot export {name} to ONNX: {type(exc).__name__}: {exc}") from None
