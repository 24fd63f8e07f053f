"""Protection records: what the protection passes inserted, as plan data.

``Correction`` (a GPU stage's unmasking graph), ``RNMSite`` (where RNM runs and its public
parameters), ``ExactSpec`` (exact masking's ring format) and ``Protection`` (all of it
for one program). Each has ``to_dict``/``from_dict``; the callables they carry in memory
(``module``, ``tables``, the Freivalds copies) are never serialised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.errors import ArtifactError
from partitioner.schema import choice, fields, ident, int_, map_, number, shape_, str_, strs

MASKINGS = ("none", "additive", "exact")
MASKED_PROTECTIONS = ("additive", "exact")
ADDITIVE_LEAK = (
    "float masks are uniform on [-mask_scale, mask_scale]: bounded support, so a GPU that "
    "knows the public weights tabulates the possible inputs and keeps those within the pad's "
    "reach (measured on SmolLM2-135M under slalom at scale 1: the exact token at 93 of 128 "
    "positions of an SST-2 text); use masking='exact'"
)


@dataclass
class Correction:
    """The enclave's unmasking graph for one GPU stage.

    ``module(*Δ of delta_inputs, *plaintext of primal_inputs)`` returns
    ``(*Δ of delta_outputs, *plaintext of primal_outputs)``.
    """

    stage: str
    module: Any
    delta_inputs: list[str]
    primal_inputs: list[str]
    delta_outputs: list[str]
    primal_outputs: list[str]
    products: list[str]

    @property
    def precomputable(self) -> bool:
        """True when it depends on the masks alone, so it can be computed ahead of requests."""
        return not self.primal_inputs

    _KEYS = ("delta_inputs", "primal_inputs", "delta_outputs", "primal_outputs", "products")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(getattr(self, k)) for k in self._KEYS}

    @classmethod
    def from_dict(cls, stage: str, data: Any, where: str) -> Correction:
        d = fields(data, where, cls._KEYS)
        lists = {k: strs(d[k], f"{where}.{k}") for k in cls._KEYS}
        return cls(stage, None, **lists)


@dataclass
class RNMSite:
    """Where RNM runs: the token input it sanitises, the sanitised value, the stage; and the
    mechanism's public parameters. ``tables`` holds the candidate tables in memory."""

    token_input: str
    sanitised: str
    stage: str
    epsilon: float
    candidates: int
    special_tokens: int | None  # how many tokens pass through (None: planned on meta weights)
    tables: Any = None
    # how the groups were built: {"method": "cosine"} or RNM's frequency strata and the
    # prior they were built against (partitioner.rnm_tables.TokenPrior.describe)
    grouping: dict[str, Any] = field(default_factory=lambda: {"method": "cosine"})
    # the public token classes (policy rnm.public) and how many ids each passes through
    public: dict[str, int] = field(default_factory=dict)

    @property
    def noise_scale(self) -> float:
        return 2.0 / self.epsilon  # Laplace(2Δ/ε) with Δ = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_input": self.token_input,
            "sanitised": self.sanitised,
            "stage": self.stage,
            "epsilon": self.epsilon,
            "candidates": self.candidates,
            "special_tokens": self.special_tokens,
            "grouping": dict(self.grouping),
            "public": dict(self.public),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection.rnm") -> RNMSite:
        later = ("grouping", "public")  # plans before issue 16: cosine groups, no classes
        keys = tuple(k for k in cls("", "", "", 1.0, 2, None).to_dict() if k not in later)
        d = fields(data, where, keys, optional=later)
        epsilon = number(d["epsilon"], f"{where}.epsilon")
        if not 0 < epsilon < float("inf"):
            raise ArtifactError(f"{where}.epsilon: {epsilon} is not a finite positive number")
        special = d["special_tokens"]
        return cls(
            str_(d["token_input"], f"{where}.token_input"),
            str_(d["sanitised"], f"{where}.sanitised"),
            ident(d["stage"], f"{where}.stage"),
            epsilon,
            int_(d["candidates"], f"{where}.candidates", 2),
            None if special is None else int_(special, f"{where}.special_tokens", 0),
            grouping=_grouping(d.get("grouping", {"method": "cosine"}), f"{where}.grouping"),
            public={
                _public_class(name, f"{where}.public"): int_(count, f"{where}.public.{name}", 0)
                for name, count in map_(d.get("public", {}), f"{where}.public").items()
            },
        )


def _public_class(name: str, where: str) -> str:
    """A public token class as the plan records it: a class name, or ``file:NAME.txt``."""
    if name in ("special", "stopwords", "punctuation") or re.fullmatch(
        r"file:[\w.-]{1,128}\.txt", name
    ):
        return name
    raise ArtifactError(f"{where}: {name[:80]!r} is not a public token class")


def _grouping(data: Any, where: str) -> dict[str, Any]:
    if isinstance(data, Mapping) and data.get("method") == "cosine":
        fields(data, where, ("method",))
        return {"method": "cosine"}
    d = fields(data, where, ("method", "prior", "prior_sha256", "ratio"))
    if d["method"] != "strata":
        raise ArtifactError(f"{where}.method: {d['method']!r} is not 'cosine' or 'strata'")
    digest = str_(d["prior_sha256"], f"{where}.prior_sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ArtifactError(f"{where}.prior_sha256: not a SHA-256 hex digest")
    ratio = number(d["ratio"], f"{where}.ratio")
    if not 1 < ratio < float("inf"):
        raise ArtifactError(f"{where}.ratio: {ratio} is not a finite number above 1")
    return {"method": "strata", "prior": str_(d["prior"], f"{where}.prior"),
            "prior_sha256": digest, "ratio": ratio}  # fmt: skip


@dataclass
class ExactSpec:
    """Exact masking's format (``passes/exact.py``): per masked value its ring (``int32`` is
    ``Z_{2^32}``, ``int64`` is ``Z_{2^64}``), and for values the enclave masks their fractional
    bits and clamp limit; per masked GPU result its fractional bits.

    In memory only: ``inv_scale`` (per masked GPU result, the float64 scalar or per-channel
    tensor its integers are multiplied by; the bundle stores those of program outputs with the
    enclave weights) and the compiler's ``scales`` and quantised ``weights``.
    """

    ring: dict[str, str] = field(default_factory=dict)
    frac_bits: dict[str, int] = field(default_factory=dict)
    limit: dict[str, int] = field(default_factory=dict)
    output_bits: dict[str, int] = field(default_factory=dict)
    # row-scaled values (ops.ring_mask_rows): masked value -> the norm limit of its rows, and
    # the masked GPU results that carry each row's exponent in an extra last column
    row_limit: dict[str, int] = field(default_factory=dict)
    row_outputs: list[str] = field(default_factory=list)
    inv_scale: dict[str, Any] = field(default_factory=dict)
    bias: dict[str, Any] = field(default_factory=dict)  # row-scaled result -> float bias
    scales: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("ring", "frac_bits", "limit", "output_bits", "row_limit", "row_outputs")

    def summary(self) -> dict[str, Any]:
        return {
            "rings": {
                k: "Z_2^32" if v == "int32" else "Z_2^64" for k, v in sorted(self.ring.items())
            },
            "weights": "integers per output channel, 2**31 * max|w| * fan_in <= 2**53",
            "activation_frac_bits": dict(sorted(self.frac_bits.items())),
            "clamp_limits": dict(sorted(self.limit.items())),
            "row_scaled": dict(sorted(self.row_limit.items())),
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: dict(sorted(getattr(self, k).items())) for k in self._KEYS[:-1]}
        out["row_outputs"] = sorted(self.row_outputs)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection.exact") -> ExactSpec:
        d = fields(data, where, cls._KEYS)
        ring = {
            k: choice(v, f"{where}.ring.{k}", ("int32", "int64"))
            for k, v in map_(d["ring"], f"{where}.ring").items()
        }
        ints = {
            key: {k: int_(v, f"{where}.{key}.{k}", 0) for k, v in map_(d[key], key).items()}
            for key in ("frac_bits", "limit", "output_bits", "row_limit")
        }
        return cls(
            ring,
            ints["frac_bits"],
            ints["limit"],
            ints["output_bits"],
            ints["row_limit"],
            strs(d["row_outputs"], f"{where}.row_outputs"),
        )


@dataclass
class Protection:
    """What protection inserted, for the executor, the mask pool, the audit and the plan."""

    masking: str
    mask_scale: float
    # enclave-produced value masked on its way out -> (plan shape, dtype) of its pads
    masked: dict[str, tuple[list[int | str], str]]
    gpu_masked: set[str]  # GPU-produced values that carry a mask
    corrections: dict[str, Correction]  # GPU stage -> its enclave correction
    pooled: list[str]  # stages whose correction the pool precomputes, in stage order
    cost: dict[str, dict[str, Any]]  # GPU stage -> offloaded vs enclave online MFLOP
    rnm: RNMSite | None = None
    token_shape: list[int | str] | None = None  # the token input's shape (RNM noise per token)
    exact: ExactSpec | None = None
    # GPU stage -> (the enclave's own copy of its module, its outputs): checked per request
    freivalds: dict[str, tuple[Any, list[str]]] = field(default_factory=dict)

    @property
    def needs_pool(self) -> bool:
        return bool(self.masked) or self.rnm is not None

    def summary(self) -> dict[str, Any]:
        """The canonical description in ``Plan.describe()`` (the golden-file format)."""
        out: dict[str, Any] = {
            "masking": self.masking,
            "mask_scale": self.mask_scale if self.masking == "additive" else None,
            "masked_values": sorted(self.masked),
            "gpu_masked_values": sorted(self.gpu_masked),
            "corrections": {
                stage: {
                    "precomputed": stage in self.pooled,
                    "products": corr.products,
                    "delta_inputs": corr.delta_inputs,
                    "primal_inputs": corr.primal_inputs,
                    **self.cost[stage],
                }
                for stage, corr in self.corrections.items()
            },
        }
        if self.rnm is not None:
            out["rnm"] = {
                "token_input": self.rnm.token_input,
                "stage": self.rnm.stage,
                "epsilon_per_token": self.rnm.epsilon,
                "candidates": self.rnm.candidates,
                "noise": f"Laplace(scale={self.rnm.noise_scale:g})",
                "special_tokens": self.rnm.special_tokens,
            }
        if self.exact is not None:
            out["exact"] = self.exact.summary()
        if self.masking == "additive":
            out["leak"] = ADDITIVE_LEAK
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "masking": self.masking,
            "mask_scale": self.mask_scale,
            "masked": {k: [list(s), d] for k, (s, d) in sorted(self.masked.items())},
            "gpu_masked": sorted(self.gpu_masked),
            "corrections": {k: c.to_dict() for k, c in self.corrections.items()},
            "pooled": list(self.pooled),
            "cost": self.cost,
            "rnm": self.rnm.to_dict() if self.rnm is not None else None,
            "token_shape": self.token_shape,
            "exact": self.exact.to_dict() if self.exact is not None else None,
            "freivalds": {k: list(outputs) for k, (_, outputs) in self.freivalds.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection") -> Protection:
        keys = ("masking", "mask_scale", "masked", "gpu_masked", "corrections", "pooled",
                "cost", "rnm", "token_shape", "exact", "freivalds")  # fmt: skip
        d = fields(data, where, keys)
        masked = {}
        for name, entry in map_(d["masked"], f"{where}.masked").items():
            if not isinstance(entry, list) or len(entry) != 2:
                raise ArtifactError(f"{where}.masked.{name}: expected [shape, dtype]")
            masked[name] = (shape_(entry[0], f"{where}.masked.{name}"), str_(entry[1], name))
        corrections = {
            ident(k, f"{where}.corrections"): Correction.from_dict(k, v, f"{where}.corrections.{k}")
            for k, v in map_(d["corrections"], f"{where}.corrections").items()
        }
        freivalds = {
            ident(k, f"{where}.freivalds"): (None, strs(v, f"{where}.freivalds.{k}"))
            for k, v in map_(d["freivalds"], f"{where}.freivalds").items()
        }
        token_shape = d["token_shape"]
        return cls(
            masking=choice(d["masking"], f"{where}.masking", MASKINGS),
            mask_scale=number(d["mask_scale"], f"{where}.mask_scale"),
            masked=masked,
            gpu_masked=set(strs(d["gpu_masked"], f"{where}.gpu_masked")),
            corrections=corrections,
            pooled=strs(d["pooled"], f"{where}.pooled"),
            cost={k: map_(v, f"{where}.cost.{k}") for k, v in map_(d["cost"], where).items()},
            rnm=None if d["rnm"] is None else RNMSite.from_dict(d["rnm"], f"{where}.rnm"),
            token_shape=None if token_shape is None else shape_(token_shape, f"{where}.token"),
            exact=None if d["exact"] is None else ExactSpec.from_dict(d["exact"]),
            freivalds=freivalds,
        )
