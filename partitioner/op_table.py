"""One table of what each op is: the properties every pass reads, keyed by :func:`op_name`.

Why one table: the op lists used to be kept by hand in each pass (the labeller's ``SHAPE_OPS``,
the linearity analysis' ``_LINEAR_IN_FIRST``, exact masking's set derived from it, RNM's view
ops, the FLOP counter's linear ops …) and they had drifted apart: ``gather``/``index``/``take``
were shape ops for the labeller but nonlinear for the mask analysis, while ``index_select`` was
in both lists; ``getitem`` was linear for the analysis but did not pass a weight on for the
labeller or the placer; RNM's view ops missed ``unflatten`` and ``detach``. Here each op has one
row, so a property is decided once, for every pass.

This module sits at the bottom layer: it imports torch and the standard library only, never
``passes`` or another ``partitioner`` module, so any layer can import it.

What each property guarantees (an op not in the table has none of them):

``shape_only``
    Moves data without arithmetic: every output element is an element of an input (viewed,
    selected, repeated, reordered or cast), a constant fill, or the op yields no tensor data
    (a size, a scalar read, an assertion). A value computed from a weight through such ops
    alone still exposes that weight (the labeller's weight-derived values, the placer's
    protected-parameter pins); the labeller labels such an op ``shape`` when no other rule
    applies. ``one_hot`` is here as an index encoding (no arithmetic on float data).
``cast``
    Changes the dtype, so it may round: not exact on an encoded value.
``factory``
    The output's values depend on no input's values, only on sizes, dtype and device
    (``zeros_like(x)`` is the same for ``x`` and ``x + Δ``). Never ``linear_in_first``:
    applying the op to a mask would give ``f(Δ) != 0``.
``linear_in_first``
    ``f(x + Δ, *rest) = f(x, *rest) + f(Δ, *rest)`` for fixed ``rest``: the correction of a
    masked first operand is the op applied to its mask. Any other tensor argument (an index, a
    shape donor) must be unmasked. Two exceptions are left to the analysis, which checks the
    arguments: ``_to_copy`` to an integer dtype rounds, and ``constant_pad_nd`` with a nonzero
    value is affine, not linear. Casts that take their dtype positionally (``to``,
    ``type_as``), ``pad`` (its mode and value are not checked) and ``as_strided`` (it addresses
    storage, and a mask has its own layout) are deliberately not ``linear_in_first``.
``concat``
    Joins a list of operands (``args[0]``): linear in all of them jointly,
    ``cat(xs + Δs) = cat(xs) + cat(Δs)`` (zeros for the unmasked parts).
``bilinear``
    ``P(a, b)`` of exactly two tensor operands ``args[0]``, ``args[1]``, linear in each:
    ``P(a + Δa, b + Δb) - P(a, b) = P(a, Δb) + P(Δa, b + Δb)``.
``weight_linear``
    A linear layer ``x·W (+ b)`` whose weight may be a constant 2-D matrix (``linear``:
    ``args[1]`` is ``Wᵀ``; ``addmm``: ``args[1]·args[2] + args[0]``; ``mm``/``matmul``:
    ``args[0]·args[1]``): affine in ``x`` when ``W`` is constant, and what exact masking turns
    into ``ring_linear``.
``matrix_product``
    Contracts a dimension (matrix products, convolutions, ``einsum``): the labeller labels it
    by its weight operand and its module scope; the FLOP counter counts it. Every
    ``weight_linear`` op is one.
``ring``
    A ``teesplit::`` ring op of exact masking, affine in its masked operand (``ring_linear``:
    its weights and bias are constants).
``reshape``
    Same elements in the same order, only the shape differs (``args[0]`` is the data): a
    per-element transformation of the input commutes with it (RNM finds token ids through it).
``embedding``, ``gather``, ``sdpa``, ``norm``, ``nonlinear``, ``elementwise``
    The labeller's op classes: a table lookup by token id; a row/element selection by index
    (an embedding when it reads a weight); scaled-dot-product attention as one op; a
    normalisation; the activations and transcendental functions it labels ``nonlinear``
    (comparisons, ``max`` … are mathematically nonlinear too, but are ``elementwise``); cheap
    pointwise ops and reductions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx


@dataclass(frozen=True)
class OpProps:
    """What one op guarantees; see the module docstring for each property."""

    shape_only: bool = False
    cast: bool = False
    factory: bool = False
    linear_in_first: bool = False
    concat: bool = False
    bilinear: bool = False
    weight_linear: bool = False
    matrix_product: bool = False
    ring: bool = False
    reshape: bool = False
    embedding: bool = False
    gather: bool = False
    sdpa: bool = False
    norm: bool = False
    nonlinear: bool = False
    elementwise: bool = False

    @property
    def passes_values(self) -> bool:
        """Moves elements of its first operand unchanged (no arithmetic, no cast), so the same
        op runs as is on any additive encoding of them, e.g. residues mod ``p``."""
        return self.shape_only and self.linear_in_first and not self.cast


PROPERTIES = tuple(f.name for f in dataclasses.fields(OpProps))
NONE = OpProps()


def _p(*names: str) -> OpProps:
    return OpProps(**dict.fromkeys(names, True))


_MOVE = _p("shape_only", "linear_in_first")  # a view, a selection, a reordering
_RESHAPE = _p("shape_only", "linear_in_first", "reshape")
_SELECT = _p("shape_only", "linear_in_first", "gather")  # by an index operand
_FACTORY = _p("shape_only", "factory")
_STRUCTURAL = _p("shape_only")  # no tensor data: sizes, scalar reads, assertions
_ELEMENTWISE = _p("elementwise")
_NONLINEAR = _p("nonlinear")
_NORM = _p("norm")
_SDPA = _p("sdpa")

TABLE: dict[str, OpProps] = {
    # -- data movement ----------------------------------------------------------------------
    "view": _RESHAPE,
    "reshape": _RESHAPE,
    "_unsafe_view": _RESHAPE,
    "view_as": _RESHAPE,
    "reshape_as": _RESHAPE,
    "flatten": _RESHAPE,
    "unflatten": _RESHAPE,
    "unsqueeze": _RESHAPE,
    "squeeze": _RESHAPE,
    "contiguous": _RESHAPE,
    "clone": _RESHAPE,
    "alias": _RESHAPE,
    "detach": _RESHAPE,
    "lift_fresh_copy": _RESHAPE,
    "permute": _MOVE,
    "transpose": _MOVE,
    "t": _MOVE,
    # Python's spellings of a transpose reach the graph as their own aten ops (``W.T`` is
    # ``numpy_T``, ``W.mT`` is ``mT``): without rows here ``x @ W.T`` was no weight product.
    "numpy_T": _MOVE,
    "mT": _MOVE,
    "swapaxes": _MOVE,
    "swapdims": _MOVE,
    # conjugate transposes: a plain transpose of a real tensor (every tensor teesplit masks or
    # multiplies); on a complex one the conjugation is additive, so still linear
    "matrix_H": _MOVE,
    "mH": _MOVE,
    "adjoint": _MOVE,
    "movedim": _MOVE,
    "moveaxis": _MOVE,
    "expand": _MOVE,
    "expand_as": _MOVE,
    "broadcast_to": _MOVE,
    "slice": _MOVE,
    "select": _MOVE,
    "narrow": _MOVE,
    "split": _MOVE,
    "split_with_sizes": _MOVE,
    "chunk": _MOVE,
    "unbind": _MOVE,
    "getitem": _MOVE,  # operator.getitem: one output of a multi-output op
    "repeat": _MOVE,
    "repeat_interleave": _MOVE,
    "flip": _MOVE,
    "roll": _MOVE,
    "tril": _MOVE,  # zeroes elements: still linear
    "triu": _MOVE,
    "constant_pad_nd": _MOVE,  # linear only with value 0; the analysis checks it
    "pad": _p("shape_only"),
    "as_strided": _p("shape_only"),
    "cat": _p("shape_only", "concat"),
    "concat": _p("shape_only", "concat"),
    "stack": _p("shape_only", "concat"),
    "index_select": _SELECT,
    "index": _SELECT,
    "gather": _SELECT,
    "take": _SELECT,
    "one_hot": _p("shape_only"),
    # -- casts ------------------------------------------------------------------------------
    "_to_copy": _p("shape_only", "cast", "linear_in_first"),  # dtype is a kwarg: checked
    "to": _p("shape_only", "cast"),
    "type_as": _p("shape_only", "cast"),
    # -- factories --------------------------------------------------------------------------
    "arange": _FACTORY,
    "ones": _FACTORY,
    "zeros": _FACTORY,
    "full": _FACTORY,
    "empty": _FACTORY,
    "scalar_tensor": _FACTORY,
    "new_ones": _FACTORY,
    "new_zeros": _FACTORY,
    "new_full": _FACTORY,
    "new_empty": _FACTORY,
    "zeros_like": _FACTORY,
    "ones_like": _FACTORY,
    "full_like": _FACTORY,
    "empty_like": _FACTORY,
    # -- structural -------------------------------------------------------------------------
    "sym_size": _STRUCTURAL,
    "sym_numel": _STRUCTURAL,
    "sym_stride": _STRUCTURAL,
    "sym_constrain_range_for_size": _STRUCTURAL,
    "_assert_scalar": _STRUCTURAL,
    "_assert_tensor_metadata": _STRUCTURAL,
    "_local_scalar_dense": _STRUCTURAL,
    "item": _STRUCTURAL,
    # -- products ---------------------------------------------------------------------------
    "linear": _p("matrix_product", "weight_linear"),
    "addmm": _p("matrix_product", "weight_linear"),
    "mm": _p("matrix_product", "weight_linear", "bilinear"),
    "matmul": _p("matrix_product", "weight_linear", "bilinear"),
    "bmm": _p("matrix_product", "bilinear"),
    "baddbmm": _p("matrix_product"),
    "einsum": _p("matrix_product"),
    "conv1d": _p("matrix_product"),
    "conv2d": _p("matrix_product"),
    "convolution": _p("matrix_product"),
    "ring_linear": _p("ring"),
    "ring_matmul": _p("matrix_product", "bilinear"),
    # -- attention, norms, lookups ----------------------------------------------------------
    "scaled_dot_product_attention": _SDPA,
    "_scaled_dot_product_flash_attention_for_cpu": _SDPA,
    "_scaled_dot_product_flash_attention": _SDPA,
    "_scaled_dot_product_efficient_attention": _SDPA,
    "layer_norm": _NORM,
    "native_layer_norm": _NORM,
    "rms_norm": _NORM,
    "group_norm": _NORM,
    "batch_norm": _NORM,
    "_native_batch_norm_legit_no_training": _NORM,
    "instance_norm": _NORM,
    "embedding": _p("embedding"),
    "embedding_bag": _p("embedding"),
    # -- nonlinear --------------------------------------------------------------------------
    **dict.fromkeys(
        (
            "softmax",
            "_softmax",
            "_safe_softmax",
            "log_softmax",
            "_log_softmax",
            "gelu",
            "silu",
            "relu",
            "relu6",
            "tanh",
            "sigmoid",
            "exp",
            "log",
            "erf",
            "elu",
            "selu",
            "celu",
            "leaky_relu",
            "hardtanh",
            "hardswish",
            "hardsigmoid",
            "mish",
            "softplus",
            "glu",
            "cos",
            "sin",
            "sqrt",
            "rsqrt",
            "pow",
            "reciprocal",
            "logsumexp",
        ),
        _NONLINEAR,
    ),
    # -- elementwise and reductions ---------------------------------------------------------
    "neg": _p("elementwise", "linear_in_first"),
    "sum": _p("elementwise", "linear_in_first"),
    "mean": _p("elementwise", "linear_in_first"),
    "mul": _p("elementwise", "bilinear"),
    **dict.fromkeys(
        (
            "add",
            "sub",
            "rsub",
            "div",
            "where",
            "masked_fill",
            "clamp",
            "clamp_min",
            "clamp_max",
            "maximum",
            "minimum",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "__and__",
            "__or__",
            "__xor__",
            "__invert__",
            "bitwise_and",
            "bitwise_or",
            "bitwise_not",
            "logical_and",
            "logical_or",
            "logical_not",
            "cumsum",
            "diff",
            "max",
            "min",
            "amax",
            "amin",
            "argmax",
            "argmin",
            "abs",
            "dropout",
            "square",
            "floor_divide",
            "remainder",
            "any",
            "all",
            "isinf",
            "isnan",
            "sign",
            "floor",
            "ceil",
            "round",
            "trunc",
            "fill",
            "lerp",
            "addcmul",
            "addcdiv",
            "var",
            "std",
            "prod",
            "topk",
            "sort",
        ),
        _ELEMENTWISE,
    ),
}


def op_name(node: torch.fx.Node) -> str:
    """Short op name: ``aten.linear.default`` -> ``linear``; ``operator.getitem`` -> ``getitem``."""
    target = node.target
    name = getattr(target, "_opname", None)
    if name is None:
        name = getattr(target, "__name__", str(target))
    return name


def props(name: str) -> OpProps:
    """The row of ``name`` (an :func:`op_name`); an op not in the table has no property."""
    return TABLE.get(name, NONE)


def ops_with(prop: str) -> frozenset[str]:
    """The ops that have property ``prop``."""
    if prop not in PROPERTIES:
        raise KeyError(f"no op property {prop!r}; known: {PROPERTIES}")
    return frozenset(n for n, p in TABLE.items() if getattr(p, prop))


def is_shape_op(name: str) -> bool:
    return props(name).shape_only


def is_linear_in_first(name: str) -> bool:
    return props(name).linear_in_first


def is_weight_linear(name: str) -> bool:
    return props(name).weight_linear


# Views of the table, for passes that test membership in one class.
SHAPE_OPS = ops_with("shape_only")
MATRIX_PRODUCT_OPS = ops_with("matrix_product")
SDPA_OPS = ops_with("sdpa")
NORM_OPS = ops_with("norm")
EMBEDDING_OPS = ops_with("embedding")
GATHER_OPS = ops_with("gather")
NONLINEAR_OPS = ops_with("nonlinear")
ELEMENTWISE_OPS = ops_with("elementwise")
