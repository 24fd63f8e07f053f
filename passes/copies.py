"""The audit's search by value: GPU stage tensors that copy a protected parameter, whole or part.

Reads the source program's weights (which are protected, which public) and every tensor a GPU
stage holds; writes nothing; returns one line per copy found. A GPU stage may not hold a
protected parameter by name or storage (the audit checks both); this finds a copy that names
and storages do not show: one a pass folded into a constant, quantised, reshaped, sliced or
stacked with other weights. It reports a GPU tensor that

1. equals a protected parameter or is an affine copy of it (a quantised or rescaled weight:
   correlation above ``COPY_CORRELATION``), in its order or its transpose's (so a reshaped
   or flattened copy too); or (1b), 2-D, is one row by row or column by column, each with its
   own scale and offset (a weight quantised per channel, however narrow its rows);
2. holds, as a row of its view at some width ``w`` (its elements ``w`` at a time) or as a
   column (a 2-D tensor ``w`` rows tall), an affine copy of a row or column, ``w`` wide, of a
   protected parameter (``w >= MIN_WIDTH``): some rows or columns of it, one row, or rows
   stacked under a public weight the stage holds anyway (as a fused projection would).

How (2) scales to a model's weights: every row is centred and signed against ``TABLES``
tables of ``BITS`` random hyperplanes (one hashing key per table). An affine copy ``a x + b``
of a row has the same keys where no projection changes sign under its quantisation (``a < 0``
flips them all: the protected rows enter with both signs), so a pair is a candidate when one
table's keys agree, and a candidate is a copy when its correlation is above
``COPY_CORRELATION``. At that correlation's angle (0.14 rad) a table's key differs with
probability ~0.52, so a row is missed with probability ~0.52**8 < 0.6 %, and a slice of k rows
only if every one is; copies closer than that are missed less often.

Under a public base the audit also asks the converse (:func:`unexplained_on_gpu`): that
every GPU tensor is a public parameter or its quantisation, recomputed.

Not a copy: a held row that a public parameter's row is at least as close to (a trainable
token's row left as its base's, or the public base quantised beside a fine-tuned row ~0.995
its base's): the GPU holding the public row learns nothing the public base does not tell.

Not found by the search (a review tried each; under a public base the allow-list refuses
them all): a copy that is not affine row by row (a product with another matrix, a rotation,
entries permuted or reversed within a row, int4 values packed into wider integers); rows
narrower than ``MIN_WIDTH`` or wider than ``MAX_WIDTH``; a row stored across a row boundary
of the view (a weight padded to a wider row, a sub-block ``W[:a, :b]``, a flattened copy
shifted by a few elements, a slice of a vector at an offset that is not a multiple of its
width).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

COPY_CORRELATION = 0.99
MIN_WIDTH = 16  # narrower rows correlate by chance too often to call one a copy
MAX_WIDTH = 1 << 16  # wider rows are only compared whole (their hyperplanes: width x 128 floats)
BITS = 16
TABLES = 8
_SEED = 20251205


def rowwise_copy(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether 2-D ``a`` (``b``'s shape) is, row by row, an affine copy of ``b``, each row with
    its own scale and offset (a weight quantised per channel; check 1b): every row of ``b``
    that is not constant correlates above ``COPY_CORRELATION`` with ``a``'s. At least
    ``_ROWWISE_ROWS`` such rows at least 3 wide (two centred values always correlate fully;
    three, by chance, above 0.99 with probability ~0.09 a row)."""
    if a.dim() != 2 or a.shape != b.shape or a.shape[1] < 3:
        return False
    live = (b - b.mean(1, keepdim=True)).norm(dim=1) > 0
    if int(live.sum()) < _ROWWISE_ROWS:
        return False
    corr = (_unit(a[live]) * _unit(b[live])).sum(1).abs()
    return bool((corr > COPY_CORRELATION).all())


_ROWWISE_ROWS = 8


def whole_copy(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether flat ``a`` equals flat ``b`` or is an affine copy of it (check 1)."""
    if torch.equal(a, b):
        return True
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    denom = float(a.norm() * b.norm())
    return denom > 0 and abs(float(a @ b)) / denom > COPY_CORRELATION


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm, float32 (a constant row: zeros)."""
    rows = rows.to(torch.float32)
    rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)


class _Hyperplanes:
    """``TABLES`` x ``BITS`` random hyperplanes per width, the same in every call."""

    def __init__(self) -> None:
        self._planes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._weights = torch.tensor([1 << i for i in range(BITS)], dtype=torch.int64)

    def keys(self, rows: torch.Tensor) -> np.ndarray:
        """(rows, TABLES) int64 keys: the signs of the centred rows' projections (a row's
        centring and scale change no sign, so neither is computed: ``(x - m) · p = x · p -
        m Σp``)."""
        width = rows.shape[1]
        if width not in self._planes:
            gen = torch.Generator().manual_seed(_SEED + width)
            planes = torch.randn(width, TABLES * BITS, generator=gen)
            self._planes[width] = (planes, planes.sum(0))
        planes, sums = self._planes[width]
        x = rows.to(torch.float32)
        proj = x @ planes - x.mean(dim=1, keepdim=True) * sums
        signs = (proj > 0).to(torch.int64).view(-1, TABLES, BITS)
        return (signs * self._weights).sum(-1).numpy()


def _views(tensor: torch.Tensor, width: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The rows ``width`` wide that ``tensor`` holds: its rows (the last dimension ``width``;
    a vector: its elements ``width`` at a time), and its columns where it is 2-D and ``width``
    rows tall."""
    t = tensor.detach()
    if t.shape[-1] == width or (t.dim() == 1 and t.numel() % width == 0):
        yield "row", t.reshape(-1, width)
    if t.dim() == 2 and t.shape[0] == width and t.shape[1] > 1:
        yield "column", t.t()


def _protected_rows(
    values: Iterable[tuple[str, torch.Tensor]],
) -> dict[int, list[tuple[str, str, torch.Tensor]]]:
    """Per width: (fqn, "row"/"column", rows) of every protected value at least MIN_WIDTH wide."""
    out: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
    for fqn, value in values:
        t = value.detach()
        if t.dim() <= 1:
            if t.numel() >= MIN_WIDTH:
                out.setdefault(t.numel(), []).append((fqn, "row", t.reshape(1, -1)))
            continue
        rows = t.reshape(-1, t.shape[-1])
        if rows.shape[1] >= MIN_WIDTH:
            out.setdefault(rows.shape[1], []).append((fqn, "row", rows))
        if t.dim() == 2 and t.shape[0] >= MIN_WIDTH and t.shape[1] > 1:
            out.setdefault(t.shape[0], []).append((fqn, "column", t.t()))
    return out


class _Index:
    """Protected rows of one width: their unit rows, keys (both signs) and owners."""

    def __init__(self, planes: _Hyperplanes, entries: list[tuple[str, str, torch.Tensor]]) -> None:
        self.planes = planes
        self.owners = [(fqn, kind, i) for fqn, kind, rows in entries for i in range(len(rows))]
        rows = torch.cat([r.to(torch.float32) for _, _, r in entries])
        self.unit = _unit(rows)
        keys = planes.keys(rows)
        both = np.concatenate([keys, keys ^ ((1 << BITS) - 1)])  # -x: every sign flipped
        self.order = [np.argsort(both[:, t], kind="stable") for t in range(TABLES)]
        self.sorted = [both[self.order[t], t] for t in range(TABLES)]

    def pairs(self, rows: torch.Tensor) -> list[tuple[int, int, float]]:
        """(row of ``rows``, indexed row, |correlation|) for every pair whose keys agree in
        some table."""
        keys = self.planes.keys(rows)
        count = len(self.owners)
        pairs: set[tuple[int, int]] = set()
        for t in range(TABLES):
            lo = np.searchsorted(self.sorted[t], keys[:, t], side="left")
            hi = np.searchsorted(self.sorted[t], keys[:, t], side="right")
            hits = np.nonzero(hi > lo)[0]
            for i in hits.tolist():
                pairs.update((i, int(j) % count) for j in self.order[t][lo[i] : hi[i]])
        if not pairs:
            return []
        mine = torch.tensor([i for i, _ in pairs])
        theirs = torch.tensor([j for _, j in pairs])
        corr = (_unit(rows[mine]) * self.unit[theirs]).sum(1).abs()
        return list(zip(mine.tolist(), theirs.tolist(), corr.tolist(), strict=True))

    def matches(self, rows: torch.Tensor) -> list[tuple[int, int, float]]:
        """:meth:`pairs` that are copies: correlation above ``COPY_CORRELATION``."""
        return [p for p in self.pairs(rows) if p[2] > COPY_CORRELATION]

    def best(self, rows: torch.Tensor) -> dict[int, float]:
        """Per row of ``rows``: its best correlation with an indexed row (where some key
        agrees; absent: none found)."""
        out: dict[int, float] = {}
        for i, _, c in self.pairs(rows):
            out[i] = max(out.get(i, 0.0), c)
        return out


def copies_on_gpu(
    stages: Iterable[tuple[str, list[tuple[str, torch.Tensor]]]],
    protected: list[tuple[str, torch.Tensor]],
    public: list[tuple[str, torch.Tensor]],
) -> list[str]:
    """Checks 1 and 2 (module docstring) of every ``(stage name, [(attribute, tensor)])`` in
    ``stages`` against the ``protected`` weights; a row found in part is excused where some
    ``public`` weight's row is at least as close to it (the GPU holds the public one). One
    line per copy (per tensor and protected parameter). Work and memory follow what the GPU
    holds: nothing held, nothing computed; a width no held tensor has, no index."""
    stages = [
        (stage, [(n, _real(t)) for n, t in tensors if _searchable(t)]) for stage, tensors in stages
    ]
    if not any(tensors for _, tensors in stages):
        return []
    protected = [(fqn, _real(t)) for fqn, t in protected if _searchable(t) and not _constant(t)]
    held = [t for _, tensors in stages for _, t in tensors]
    sizes = {t.numel() for t in held}
    shapes = {tuple(t.shape) for t in held if t.dim() == 2}
    found: dict[tuple[str, str, str], str] = {}
    by_size: dict[int, list[tuple[str, torch.Tensor]]] = {}
    shaped: list[tuple[str, torch.Tensor]] = []
    for fqn, t in protected:
        if t.numel() in sizes:
            flat = t.detach().to(torch.float64)
            by_size.setdefault(flat.numel(), []).append((fqn, flat.flatten()))
            if flat.dim() == 2:
                by_size[flat.numel()].append((fqn, flat.t().flatten()))
        if t.dim() == 2 and (tuple(t.shape) in shapes or tuple(t.shape)[::-1] in shapes):
            shaped.append((fqn, t.detach().to(torch.float64)))
    for stage, tensors in stages:
        for name, tensor in tensors:
            same_size = by_size.get(tensor.numel(), ())
            if not same_size and not (tensor.dim() == 2 and shaped):
                continue
            mine = tensor.detach().to(torch.float64)  # once, and only for a comparison
            for fqn, ref in same_size:
                if whole_copy(mine.flatten(), ref):
                    found.setdefault((stage, name, fqn), "whole")
            if tensor.dim() != 2:
                continue
            for fqn, ref in shaped:
                pairs = ((mine, ref), (mine.t(), ref.t()), (mine, ref.t()), (mine.t(), ref))
                if any(rowwise_copy(a, b) for a, b in pairs):
                    found.setdefault((stage, name, fqn), "whole, a scale and offset per channel")
    planes = _Hyperplanes()
    for width, entries in sorted(_protected_rows(protected).items()):
        if width > MAX_WIDTH or not any(True for t in held for _ in _views(t, width)):
            continue
        index = _Index(planes, entries)
        hits: list[tuple[str, str, torch.Tensor, list[tuple[int, int, float]]]] = []
        for stage, tensors in stages:
            for name, tensor in tensors:
                for _, rows in _views(tensor, width):
                    matched = index.matches(rows)
                    if matched:
                        hits.append((stage, name, rows, matched))
        if not hits:
            continue
        # a hit is excused where a public row is at least as close to the held row: the GPU
        # holds the public one (a trainable token's row left as its base's), not the secret
        # (a fine-tuned row is ~0.995 its base's: excusing every protected row that close to
        # a public one hid trained rows stacked under the public weight; a review's finding)
        entries = [(f, k, r) for f, v in public if _searchable(v) for k, r in _views(v, width)]
        public_index = _Index(planes, entries) if entries else None
        for stage, name, rows, matched in hits:
            best = public_index.best(rows) if public_index is not None else {}
            for i, j, c in matched:
                if best.get(i, 0.0) < c:
                    fqn, kind, row = index.owners[j]
                    found.setdefault((stage, name, fqn), f"its {kind} {row}, {width} wide")
                    break
    return [_line(stage, name, fqn, how) for (stage, name, fqn), how in found.items()]


def _searchable(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and t.dim() >= 1 and t.numel() > 1


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts, side by side in the last dimension."""
    return torch.view_as_real(t).flatten(-2) if t.is_complex() else t


def unexplained_on_gpu(
    stages: Iterable[tuple[str, list[tuple[str, torch.Tensor]]]],
    public: list[tuple[str, torch.Tensor]],
) -> list[str]:
    """Under a public base, an allow-list rather than a search: every tensor a GPU stage
    holds must be bit for bit a public parameter (a 2-D one in its layout or transposed; any
    one cast to the tensor's float dtype) or, 2-D, the exact pass's integer quantisation of
    one (:func:`passes.exact.quantise_weight`, of it or of its transpose). No honest
    ``private_finetune`` split of the 29 peft configurations a review built holds anything
    else (their GPU stages hold 2-D weights alone); a GPU bias quantised at a calibrated
    scale (an input that is not row-scaled) would be refused here. One line per tensor
    that is neither: it catches what no search for copies can (a protected parameter's
    product with a public one, such as a merged ``W + s·BA``, or its rows permuted), since
    it recomputes what the GPU may hold instead of looking for what it must not. Tensors
    are compared exactly, within buckets of dtype, shape and end rows; the transposed
    quantisations are computed only for what the direct ones leave unexplained."""
    from passes.exact import quantise_weight

    held: dict[tuple[torch.dtype, tuple[int, ...], bytes], list[tuple[str, torch.Tensor]]] = {}
    for stage, tensors in stages:
        for name, tensor in tensors:
            if tensor.dim() >= 1 and tensor.device.type != "meta" and tensor.numel():
                where = f"{stage} attribute {name}"
                held.setdefault(_key(tensor), []).append((where, tensor.detach()))
    missing = {where for entries in held.values() for where, _ in entries}
    shapes = {shape for _, shape, _ in held}
    dtypes = {dtype for dtype, _, _ in held}

    def offer(candidate: torch.Tensor) -> None:
        if tuple(candidate.shape) not in shapes or candidate.dtype not in dtypes:
            return
        for where, tensor in held.get(_key(candidate), ()):
            if where in missing and torch.equal(tensor, candidate):
                missing.discard(where)

    float_dtypes = {d for d in dtypes if d.is_floating_point}
    for _, value in public:
        if value.dim() != 2 and value.dim() >= 1 and value.device.type != "meta":
            for candidate in (value.detach(), *(value.detach().to(d) for d in float_dtypes)):
                offer(candidate)
    for transposed in (False, True):
        for _, value in public:
            if not missing:
                return []
            if value.dim() != 2 or value.device.type == "meta":
                continue
            form = value.detach().t() if transposed else value.detach()
            if tuple(form.shape) not in shapes and tuple(form.shape)[::-1] not in shapes:
                continue
            candidates = [quantise_weight(form)[0]]
            if not transposed:
                candidates += [form.to(dtype) for dtype in float_dtypes]
            for candidate in candidates:
                offer(candidate)
                offer(candidate.t())
    return [
        f"GPU stage {where} {tuple(tensor.shape)} {tensor.dtype} is neither a public parameter "
        "nor the exact pass's quantisation of one (by value: under a public base every GPU "
        "tensor must be one of them)"
        for entries in held.values()
        for where, tensor in entries
        if where in missing
    ]


def _key(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """A cheap bucket for an exact comparison: dtype, shape, and the first and last rows'
    bytes (a tensor only ever equals one in its bucket)."""
    ends = torch.stack([t[0], t[-1]]).contiguous().reshape(-1).view(torch.uint8)
    return t.dtype, tuple(t.shape), bytes(ends.numpy())


def _constant(t: torch.Tensor) -> bool:
    # a constant (a bias left at zero, a norm at its initial ones, any other one value)
    # equals every constant of its size: searched for, an honest split's zeros were a "copy"
    # (a reviewer's finding); it tells nothing beyond its size and one number
    flat = t.detach().reshape(-1)
    return bool((flat == flat[0]).all())


def _line(stage: str, name: str, fqn: str, how: str) -> str:
    return (
        f"GPU stage {stage} attribute {name} holds a copy of protected parameter {fqn} "
        f"(by value: {how})"
    )
