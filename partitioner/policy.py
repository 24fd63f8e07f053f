"""Privacy policies: what goes to the enclave, what the enclave protects, and how.

A :class:`Policy` is frozen and validated when it is built, so an impossible policy fails at
construction with a :class:`PolicyError` naming the offending key or labels, never later inside
placement. Presets follow docs/design.md; files (YAML or JSON) build the same objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner.errors import PolicyError
from partitioner.label_set import ALL_LABELS, WEIGHT_BEARING, Label

PROTECTABLE = frozenset({"input", "model"})
MASKING_MODES = ("none", "additive", "exact")
INTEGRITY_MODES = ("none", "freivalds")
UNMASKABLE_MODES = ("error", "enclave", "cross_terms")
PUBLIC_CLASSES = ("special", "stopwords", "punctuation")
MAX_CANDIDATES = 4096  # an RNM group larger than this is a vocabulary, not a candidate set
# Float masks are added to activations in float32: a pad wider than this swamps every value
# (x + r - r loses x entirely) long before it overflows to inf.
MAX_MASK_SCALE = 2.0**20


@dataclass(frozen=True)
class RNMConfig:
    """Report-Noisy-Max settings (CMIF): per-token privacy budget and candidate-set size."""

    epsilon: float = 1.0
    candidates: int = 20
    # token classes passed through unchanged, spending no ε (issue 15): "special",
    # "stopwords", "punctuation", or a .txt file of token ids; the default passes only the
    # special tokens, as every release has
    public: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        public = self.public
        if isinstance(public, str) or not isinstance(public, (list, tuple)):
            raise PolicyError(f"rnm.public must be a list of token classes, got {public!r}")
        for entry in public:
            if not isinstance(entry, str) or not (
                entry in PUBLIC_CLASSES or entry.endswith(".txt")
            ):
                raise PolicyError(
                    f"rnm.public: {entry!r} is not a token class {list(PUBLIC_CLASSES)} or a "
                    ".txt file of token ids"
                )
        if len(set(public)) != len(public):
            raise PolicyError(f"rnm.public names a class twice: {list(public)}")
        object.__setattr__(self, "public", tuple(public))
        # ε = inf would let every token through unchanged while reporting a DP guarantee
        if not _is_number(self.epsilon) or not 0 < self.epsilon < math.inf:
            raise PolicyError(f"rnm.epsilon must be a finite positive number, got {self.epsilon!r}")
        if not _is_int(self.candidates) or not 2 <= self.candidates <= MAX_CANDIDATES:
            raise PolicyError(
                f"rnm.candidates must be an integer in [2, {MAX_CANDIDATES}], "
                f"got {self.candidates!r}"
            )


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _labels(value: Iterable[str] | str, key: str) -> frozenset[Label]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PolicyError(f"{key} must be a list of labels, got {value!r}")
    names = list(value)
    unknown = sorted(
        v if isinstance(v, str) else repr(v)
        for v in names
        if not isinstance(v, str) or v not in ALL_LABELS
    )
    if unknown:
        raise PolicyError(
            f"{key} names unknown labels {unknown}; known labels: {sorted(map(str, ALL_LABELS))}"
        )
    return frozenset(Label(v) for v in names)


@dataclass(frozen=True)
class Policy:
    """Where each label runs and how crossing tensors are protected.

    ``enclave`` and ``gpu`` pin labels to a side; labels in neither are *free* and placed by the
    byte-minimising min-cut. ``protects`` says what the enclave keeps secret: ``"model"`` makes
    every parameter protected (a node reading one is forced into the enclave); ``"input"`` means
    values derived from the request must not reach the GPU in the clear, so it needs masking or
    RNM whenever anything runs on the GPU.

    ``on_unmaskable`` says what to do with a GPU op that a masked value reaches but whose
    result is not affine in it (QKᵀ, softmax·V, or a nonlinearity): ``"error"`` refuses with a
    :class:`PartitionError` naming the edge, ``"enclave"`` moves the op into the enclave, and
    ``"cross_terms"`` keeps products of two activations on the GPU while the enclave computes
    the cross terms online (two products of the same size; the plan states the cost).
    ``masking`` is ``"exact"`` by default: fixed point in ``Z_{2^32}``/``Z_{2^64}`` with a pad
    uniform over the whole ring, so what the GPU receives is independent of the data.
    ``"additive"`` (float pads uniform on ``[-mask_scale, mask_scale]``) is an explicit opt-in
    that leaks: the pad's support is bounded, and a GPU that knows the public weights keeps
    only the inputs within its reach (the plan and ``docs/threat-model.md`` name the figure).
    """

    name: str = "custom"
    enclave: frozenset[Label] = frozenset()
    gpu: frozenset[Label] = frozenset()
    protects: frozenset[str] = frozenset()
    masking: str = "exact"
    rnm: RNMConfig | None = None
    integrity: str = "none"
    min_gpu_block: int = 1
    on_unmaskable: str = "error"
    mask_scale: float = 1.0
    public_base: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "enclave", _labels(self.enclave, "enclave"))
        set_(self, "gpu", _labels(self.gpu, "gpu"))
        if isinstance(self.protects, str) or not isinstance(self.protects, Iterable):
            raise PolicyError(f"protects must be a list, got {self.protects!r}")
        if not all(isinstance(p, str) for p in self.protects):
            raise PolicyError(f"protects must list strings, got {sorted(map(repr, self.protects))}")
        set_(self, "protects", frozenset(self.protects))
        if isinstance(self.rnm, Mapping):
            set_(self, "rnm", _rnm_from_dict(self.rnm))
        self._validate()

    def _validate(self) -> None:
        both = sorted(str(label) for label in self.enclave & self.gpu)
        if both:
            raise PolicyError(f"labels {both} are pinned to both the enclave and the GPU")
        bad = sorted(self.protects - PROTECTABLE)
        if bad:
            raise PolicyError(f"protects names {bad}; allowed: {sorted(PROTECTABLE)}")
        if self.masking not in MASKING_MODES:
            raise PolicyError(f"masking={self.masking!r}; allowed: {list(MASKING_MODES)}")
        if self.integrity not in INTEGRITY_MODES:
            raise PolicyError(f"integrity={self.integrity!r}; allowed: {list(INTEGRITY_MODES)}")
        if self.on_unmaskable not in UNMASKABLE_MODES:
            raise PolicyError(
                f"on_unmaskable={self.on_unmaskable!r}; allowed: {list(UNMASKABLE_MODES)}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise PolicyError(f"name must be a non-empty string, got {self.name!r}")
        if not _is_number(self.mask_scale) or not 0 < self.mask_scale <= MAX_MASK_SCALE:
            raise PolicyError(
                f"mask_scale must be a number in (0, {MAX_MASK_SCALE:g}] (float32 activations "
                f"lose all precision beyond it), got {self.mask_scale!r}"
            )
        if not _is_int(self.min_gpu_block) or self.min_gpu_block < 1:
            raise PolicyError(f"min_gpu_block must be an integer >= 1, got {self.min_gpu_block!r}")
        if self.rnm is not None and not isinstance(self.rnm, RNMConfig):
            raise PolicyError(f"rnm must be an RNMConfig, a mapping or None, got {self.rnm!r}")
        if self.public_base is not None:
            if not isinstance(self.public_base, str) or not self.public_base:
                raise PolicyError(
                    "public_base must be 'peft' or the path of a transformers folder or a "
                    f".safetensors file, got {self.public_base!r}"
                )
            if "model" not in self.protects:
                raise PolicyError(
                    "public_base says which parameters of a protected model are public, but "
                    "protects does not include 'model'"
                )
        if "model" in self.protects and self.public_base is None:
            # with a public base the GPU pins apply to public weights only (a node reading a
            # protected parameter is forced into the enclave whatever its label)
            weighted = sorted(str(label) for label in self.gpu & WEIGHT_BEARING)
            if weighted:
                raise PolicyError(
                    f"protects 'model' but pins weight-bearing labels {weighted} to the GPU "
                    "(name a public_base to offload a fine-tune's public base)"
                )
        if self.rnm is not None:
            if Label.EMBEDDING not in self.enclave:
                raise PolicyError("rnm is set but 'embedding' is not pinned to the enclave")
            if "input" not in self.protects:
                raise PolicyError("rnm is set but protects does not include 'input'")
        if "input" in self.protects and self.gpu and self.masking == "none" and self.rnm is None:
            raise PolicyError(
                "protects 'input' and pins labels to the GPU, but masking='none' and rnm is "
                "unset: nothing would protect the values that cross"
            )

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def preset(cls, preset: str, /, **overrides: Any) -> Policy:
        """A named preset (docs/design.md, "Policies"), optionally with fields overridden."""
        if preset not in PRESETS:
            raise PolicyError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        base = PRESETS[preset]
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        """Build from a mapping; ``preset`` names a base whose fields the others override."""
        if not isinstance(data, Mapping):
            raise PolicyError(
                f"{source}: expected a mapping at top level, got {type(data).__name__}"
            )
        allowed = {f.name for f in dataclasses.fields(cls) if f.init} | {"preset"}
        unknown = sorted(k if isinstance(k, str) else repr(k) for k in set(data) - allowed)
        if unknown:
            raise PolicyError(f"{source}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        fields = dict(data)
        preset = fields.pop("preset", None)
        if preset is not None and not isinstance(preset, str):
            raise PolicyError(f"{source}: preset must be a preset name, got {preset!r}")
        if "rnm" in fields and not isinstance(fields["rnm"], (Mapping, type(None), RNMConfig)):
            raise PolicyError(f"{source}: rnm must be a mapping or null, got {fields['rnm']!r}")
        try:
            if preset is not None:
                fields.setdefault("name", f"{preset}+custom" if fields else preset)
                return cls.preset(preset, **fields)
            return cls(**fields)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a YAML (``.yaml``/``.yml``) or JSON policy file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise PolicyError(f"policy file {path} is not UTF-8 text ({exc.reason})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml and json raise different types; both are parse errors
            raise PolicyError(f"cannot parse policy file {path}: {exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get("public_base"), str):
            base = data["public_base"]
            if base != "peft" and not Path(base).is_absolute():  # relative to the policy file
                data = {**data, "public_base": str(path.parent / base)}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def resolve(cls, policy: Policy | str | Path) -> Policy:
        """Accept a Policy, a preset name, or a path to a policy file."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, str) and policy in PRESETS:
            return PRESETS[policy]
        if isinstance(policy, (str, Path)) and Path(policy).suffix in (".json", ".yaml", ".yml"):
            return cls.from_file(policy)
        raise PolicyError(
            f"policy {policy!r} is neither a Policy, a preset {sorted(PRESETS)}, nor a "
            ".json/.yaml file"
        )

    # -- queries ----------------------------------------------------------------------------

    def pinned_side(self, label: Label) -> str | None:
        if label in self.enclave:
            return "enclave"
        if label in self.gpu:
            return "gpu"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Canonical, JSON-ready form (sorted lists), used in plans and golden files."""
        return {
            "name": self.name,
            "enclave": sorted(str(label) for label in self.enclave),
            "gpu": sorted(str(label) for label in self.gpu),
            "protects": sorted(self.protects),
            "masking": self.masking,
            "rnm": {**dataclasses.asdict(self.rnm), "public": list(self.rnm.public)}
            if self.rnm
            else None,
            "integrity": self.integrity,
            "min_gpu_block": self.min_gpu_block,
            "on_unmaskable": self.on_unmaskable,
            "mask_scale": self.mask_scale,
        } | ({"public_base": self.public_base_name()} if self.public_base is not None else {})

    def public_base_name(self) -> str | None:
        """``public_base`` as a plan records it: ``peft``, or the base's file or folder name
        without the deployer's path (the plan goes to the GPU's side too)."""
        if self.public_base in (None, "peft"):
            return self.public_base
        return Path(self.public_base).resolve().name or "public-base"  # "/" has no name


def _rnm_from_dict(data: Mapping[str, Any]) -> RNMConfig:
    if not all(isinstance(k, str) for k in data):
        raise PolicyError("rnm: keys must be strings")
    allowed = {f.name for f in dataclasses.fields(RNMConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PolicyError(f"rnm: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return RNMConfig(**data)


L = Label
PRESETS: dict[str, Policy] = {
    "cmif": Policy(
        name="cmif",
        enclave=frozenset({L.EMBEDDING}),
        gpu=ALL_LABELS - {L.EMBEDDING, L.SHAPE, L.ELEMENTWISE, L.OTHER},
        protects=frozenset({"input"}),
        masking="none",
        rnm=RNMConfig(epsilon=1.0, candidates=20),
    ),
    "secureinfer": Policy(
        name="secureinfer",
        enclave=frozenset({L.NONLINEAR, L.NORM, L.ATTENTION_PROJECTION, L.FFN, L.LORA}),
        gpu=frozenset({L.ATTENTION}),
        protects=frozenset({"input", "model"}),
        masking="exact",
        on_unmaskable="cross_terms",
    ),
    "slalom": Policy(
        name="slalom",
        enclave=frozenset({L.EMBEDDING, L.NONLINEAR, L.NORM, L.ATTENTION, L.ELEMENTWISE, L.LORA}),
        gpu=frozenset({L.ATTENTION_PROJECTION, L.FFN, L.LM_HEAD}),
        protects=frozenset({"input"}),
        masking="exact",
        integrity="freivalds",
    ),
    # a public base (here peft's) on the GPU on exactly masked activations; the adapter, every
    # changed parameter, norms, nonlinearities, attention and the KV cache in the enclave
    "private_finetune": Policy(
        name="private_finetune",
        enclave=frozenset({L.EMBEDDING, L.NONLINEAR, L.NORM, L.ATTENTION, L.ELEMENTWISE, L.LORA}),
        gpu=frozenset({L.ATTENTION_PROJECTION, L.FFN, L.LM_HEAD}),
        protects=frozenset({"input", "model"}),
        masking="exact",
        integrity="freivalds",
        public_base="peft",
    ),
    "all_enclave": Policy(
        name="all_enclave",
        enclave=ALL_LABELS,
        protects=frozenset({"input", "model"}),
        masking="none",
    ),
    "all_gpu": Policy(name="all_gpu", gpu=ALL_LABELS, masking="none"),
}
del L
