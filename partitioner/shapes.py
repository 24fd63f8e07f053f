"""Symbolic shapes made readable and countable.

Export gives dynamic dims as sympy symbols (``s70``). This module names them after the
``Dim`` the caller chose (``seq``), writes shapes as ``["batch", "seq", 576]`` for plans, and
evaluates sizes at a *reference binding* (default batch=1, seq=128, clamped to the export's
range) for byte and FLOP accounting, since a cost model needs numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy
import torch
from torch.export import Dim, ExportedProgram
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from partitioner.dims import EXPORT_DEFAULT, EXPORT_SIZES, concrete_shape, names_in
from partitioner.errors import PartitionError
from partitioner.op_table import MATRIX_PRODUCT_OPS, SDPA_OPS, op_name


class ShapeContext:
    """Names and evaluates the symbolic dims of one exported program."""

    def __init__(
        self,
        program: ExportedProgram,
        dim_names: Mapping[str, str],
        reference: Mapping[str, int],
    ) -> None:
        self.names: dict[sympy.Symbol, str] = {}
        self.binding: dict[sympy.Symbol, int] = {}
        self.lower: dict[str, int] = {}  # smallest size each named dim may take
        self.upper: dict[str, int] = {}  # largest, where the export bounds it
        for sym, bounds in program.range_constraints.items():
            if not isinstance(sym, sympy.Symbol):
                continue
            name = dim_names.get(str(sym), str(sym))
            self.names[sym] = name
            self.lower[name] = min(self.lower.get(name, int(bounds.lower)), int(bounds.lower))
            if bounds.upper.is_finite:
                self.upper[name] = max(self.upper.get(name, 0), int(bounds.upper))
            if name in reference:
                lo, hi = int(bounds.lower), bounds.upper
                value = max(int(reference[name]), lo)
                if hi.is_finite:
                    value = min(value, int(hi))
                self.binding[sym] = value
        self.reference = {self.names[s]: v for s, v in self.binding.items()}

    def _expr(self, size: int | torch.SymInt) -> sympy.Expr | int:
        if isinstance(size, torch.SymInt):
            return size.node.expr
        return int(size)

    def evaluate(self, size: int | torch.SymInt) -> int:
        """Concrete value of a size at the reference binding (hints for unbound symbols)."""
        if not isinstance(size, torch.SymInt):
            return int(size)
        expr = size.node.expr
        free = expr.free_symbols - set(self.binding)
        hints = {s: size.node.shape_env.var_to_val[s] for s in free}
        return int(expr.xreplace({**hints, **self.binding}))

    def dim(self, size: int | torch.SymInt) -> int | str:
        """A JSON-ready dim: an int, or the expression in the caller's dim names."""
        expr = self._expr(size)
        if isinstance(expr, int) or expr.is_Integer:
            return int(expr)
        renamed = expr.xreplace(
            {s: sympy.Symbol(self.names.get(s, str(s))) for s in expr.free_symbols}
        )
        text = str(renamed)
        try:  # a plan is read back by partitioner.dims' grammar, never by sympify
            names_in(text)
        except ValueError as exc:
            raise PartitionError(
                f"symbolic size {text!r} cannot be written to a plan: {exc}"
            ) from None
        return text

    def shape(self, val: torch.Tensor) -> list[int | str]:
        return [self.dim(s) for s in val.shape]

    def concrete_shape(self, val: torch.Tensor) -> list[int]:
        return [self.evaluate(s) for s in val.shape]

    def nbytes(self, val: Any) -> int:
        if isinstance(val, torch.Tensor):
            numel = 1
            for s in val.shape:
                numel *= self.evaluate(s)
            return numel * val.element_size()
        if isinstance(val, (list, tuple)):
            return sum(self.nbytes(v) for v in val)
        return 0

    def meta_tensor(self, val: torch.Tensor) -> torch.Tensor:
        return torch.empty(self.concrete_shape(val), dtype=val.dtype, device="meta")

    def export_example(
        self, input_dims: Mapping[str, list[Any]], vals: list[Any]
    ) -> tuple[list[torch.Tensor], list[Any]]:
        """Example inputs for ``torch.export`` of a graph whose inputs are ``vals`` (their
        fake tensors), at sizes >= 2 so no dim specialises to 0/1, and each input's dynamic
        dims named after the program's (``input_dims``: the program inputs' named dims). A
        KV cache's ``past`` may be 0 (the prefill); other dims start at 1. ``ValueError``
        names the first input that is not a tensor."""
        names = {d for ds in input_dims.values() for d in ds if isinstance(d, str)}
        example = {n: EXPORT_SIZES.get(n, EXPORT_DEFAULT) for n in names if n.isidentifier()}
        dims = {n: Dim(n, min=min(1, self.lower.get(n, 1))) for n in example}
        args, specs = [], []
        for i, val in enumerate(vals):
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"input {i} has no tensor metadata")
            shape = self.shape(val)
            args.append(torch.zeros(concrete_shape(shape, example), dtype=val.dtype))
            spec = {j: dims.get(d, Dim.AUTO) for j, d in enumerate(shape) if isinstance(d, str)}
            specs.append(spec or None)
        return args, specs


def node_flops(node: torch.fx.Node, shapes: ShapeContext) -> int:
    """FLOPs of one node as ``torch.utils.flop_counter`` counts them (matrix products, attention).

    The node is replayed on meta tensors of its reference-binding shapes under
    ``FlopCounterMode``; whole SDPA ops use ``sdpa_flop_count`` (the CPU kernel is not in the
    counter's registry; grouped-query attention is counted with its keys and values read once
    per query head, as torch 2.13 counts it, where older releases refuse the shapes).
    Elementwise work is not counted, as in the counter itself.
    """
    name = op_name(node)
    if name in SDPA_OPS:
        q, k, v = (shapes.concrete_shape(a.meta["val"]) for a in node.args[:3])
        heads = q[-3:-2]  # (batch..., heads, seq, dim): each query head reads its group's k, v
        k, v = [*k[:-3], *heads, *k[-2:]], [*v[:-3], *heads, *v[-2:]]
        return int(sdpa_flop_count(q, k, v))
    if name not in MATRIX_PRODUCT_OPS:
        return 0

    def to_meta(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            val = a.meta.get("val")
            return shapes.meta_tensor(val) if isinstance(val, torch.Tensor) else val
        if isinstance(a, (list, tuple)):
            return type(a)(to_meta(x) for x in a)
        return a

    args = to_meta(node.args)
    kwargs = {k: to_meta(v) for k, v in node.kwargs.items()}
    with FlopCounterMode(display=False) as counter:
        node.target(*args, **kwargs)
    return int(counter.get_total_flops())
