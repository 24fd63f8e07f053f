"""The split program as data: stages, edges, protection records and the plan that holds them.

This is the bottom of the layer rule (``docs/design.md``): it imports only ``errors``,
``label_set`` and ``policy`` (and torch for type names), and every other part of teesplit reads
and writes a split program through these classes. Each class has one ``to_dict``/``from_dict``
pair, and together they are the one definition of ``plan.json``'s ``plan`` section:
``from_dict(to_dict(x))`` describes the same program, and ``from_dict`` refuses anything else
with an :class:`ArtifactError` naming the key at fault, so a malformed file never reaches the
code that runs it.

Three records also carry, while in memory, the callables that run them: a :class:`Stage`'s
``module``, a :class:`Correction`'s ``module`` and a Freivalds copy in
:class:`Protection.freivalds`; an :class:`RNMSite`'s ``tables``. They are never serialised:
the compiler sets them when it builds a program and the bundle reader when it loads one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.errors import ArtifactError
from partitioner.label_set import Label
from partitioner.policy import Policy

PLAN_SCHEMA_VERSION = 2
ENCLAVE, GPU = "enclave", "gpu"
SIDES = (ENCLAVE, GPU)
INPUT, OUTPUT = "input", "output"  # the producer of user inputs, the consumer of outputs
DIRECTIONS = ("enclave->gpu", "gpu->enclave", "enclave->enclave", "gpu->gpu")
EXTRA_INPUT_KINDS = ("mask", "delta", "noise")
MASKED_PROTECTIONS = ("additive", "field")
MASKINGS = ("none", "additive", "field")
# Stage names become file names in a bundle: keep them to one safe path component.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


# -- reading dicts --------------------------------------------------------------------------


def _fields(
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


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ArtifactError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ArtifactError(f"{where}: {value!r} is not a plain identifier")
    return value


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArtifactError(f"{where}: expected an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ArtifactError(f"{where}: {value} is below {minimum}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArtifactError(f"{where}: expected a number, got {type(value).__name__}")
    return float(value)


def _strs(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ArtifactError(f"{where}: expected a list, got {type(value).__name__}")
    return [_str(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ArtifactError(f"{where}: {value!r} is not one of {list(choices)}")
    return value


def _shape(value: Any, where: str) -> list[int | str]:
    """A plan shape: integers and dim expressions (parsed later by ``partitioner.dims``)."""
    if not isinstance(value, list):
        raise ArtifactError(f"{where}: expected a list, got {type(value).__name__}")
    out: list[int | str] = []
    for i, size in enumerate(value):
        if isinstance(size, str):
            out.append(size)
        else:
            out.append(_int(size, f"{where}[{i}]", 0))
    return out


def _map(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ArtifactError(f"{where}: expected an object with string keys")
    return dict(value)


# -- records ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """A run of nodes on one side, in program order. ``module`` runs it (never serialised)."""

    name: str
    side: str
    module: Any
    inputs: list[str]  # value names, in placeholder order
    outputs: list[str]  # value names, in output order
    nodes: list[str]  # placed compute nodes, topological order
    params: list[str]  # fqns of the weights this stage owns
    # Protection adds inputs after ``inputs``: ("mask", value) takes the pad for value,
    # ("delta", value) the correction that unmasks it, ("noise", value) RNM's Laplace noise.
    extra_inputs: list[tuple[str, str]] = field(default_factory=list)
    masked_outputs: list[str] = field(default_factory=list)  # returned after ``outputs``
    labels: dict[str, int] = field(default_factory=dict)  # label -> nodes with it (reporting)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "side": self.side,
            "labels": dict(sorted(self.labels.items())),
            "nodes": self.nodes,
            "params": self.params,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "extra_inputs": [list(x) for x in self.extra_inputs],
            "masked_outputs": self.masked_outputs,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "stage") -> Stage:
        d = _fields(data, where, cls.to_dict_keys())
        where = f"stage {_name(d['name'], f'{where}.name')}"
        extras = []
        if not isinstance(d["extra_inputs"], list):
            raise ArtifactError(f"{where}.extra_inputs: expected a list")
        for i, pair in enumerate(d["extra_inputs"]):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ArtifactError(f"{where}.extra_inputs[{i}]: expected [kind, value]")
            kind = _choice(pair[0], f"{where}.extra_inputs[{i}]", EXTRA_INPUT_KINDS)
            extras.append((kind, _str(pair[1], f"{where}.extra_inputs[{i}]")))
        labels = _map(d["labels"], f"{where}.labels")
        return cls(
            d["name"],
            _choice(d["side"], f"{where}.side", SIDES),
            None,
            _strs(d["inputs"], f"{where}.inputs"),
            _strs(d["outputs"], f"{where}.outputs"),
            _strs(d["nodes"], f"{where}.nodes"),
            _strs(d["params"], f"{where}.params"),
            extra_inputs=extras,
            masked_outputs=_strs(d["masked_outputs"], f"{where}.masked_outputs"),
            labels={k: _int(v, f"{where}.labels.{k}", 0) for k, v in labels.items()},
        )

    @staticmethod
    def to_dict_keys() -> tuple[str, ...]:
        return ("name", "side", "labels", "nodes", "params", "inputs", "outputs",
                "extra_inputs", "masked_outputs")  # fmt: skip


@dataclass
class Edge:
    """A value consumed by a stage (or the program output) that another place produced."""

    name: str
    producer: str  # stage name, or "input"
    consumer: str  # stage name, or "output"
    shape: list[int | str]
    dtype: str
    nbytes: int  # at the reference binding
    direction: str  # "enclave->gpu", "gpu->enclave", "enclave->enclave", "gpu->gpu"
    protection: str = "none"

    @property
    def crossing(self) -> bool:
        src, dst = self.direction.split("->")
        return src != dst

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "producer": self.producer,
            "consumer": self.consumer,
            "shape": self.shape,
            "dtype": self.dtype,
            "bytes": self.nbytes,
            "direction": self.direction,
            "protection": self.protection,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "edge") -> Edge:
        keys = ("name", "producer", "consumer", "shape", "dtype", "bytes", "direction",
                "protection")  # fmt: skip
        d = _fields(data, where, keys)
        where = f"edge {_str(d['name'], f'{where}.name')}"
        return cls(
            d["name"],
            _str(d["producer"], f"{where}.producer"),
            _str(d["consumer"], f"{where}.consumer"),
            _shape(d["shape"], f"{where}.shape"),
            _str(d["dtype"], f"{where}.dtype"),
            _int(d["bytes"], f"{where}.bytes", 0),
            _choice(d["direction"], f"{where}.direction", DIRECTIONS),
            _str(d["protection"], f"{where}.protection"),
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
        d = _fields(data, where, cls._KEYS)
        lists = {k: _strs(d[k], f"{where}.{k}") for k in cls._KEYS}
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
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection.rnm") -> RNMSite:
        d = _fields(data, where, tuple(cls("", "", "", 1.0, 2, None).to_dict()))
        epsilon = _number(d["epsilon"], f"{where}.epsilon")
        if not 0 < epsilon < float("inf"):
            raise ArtifactError(f"{where}.epsilon: {epsilon} is not a finite positive number")
        special = d["special_tokens"]
        return cls(
            _str(d["token_input"], f"{where}.token_input"),
            _str(d["sanitised"], f"{where}.sanitised"),
            _name(d["stage"], f"{where}.stage"),
            epsilon,
            _int(d["candidates"], f"{where}.candidates", 2),
            None if special is None else _int(special, f"{where}.special_tokens", 0),
        )


@dataclass
class FieldSpec:
    """Exact masking's fixed-point format: the prime, and fractional bits per weight/value."""

    prime: int
    frac_bits: int
    weight_bits: dict[str, int] = field(default_factory=dict)  # node -> weight fractional bits
    output_bits: dict[str, int] = field(default_factory=dict)  # value -> fractional bits
    output_range: dict[str, float] = field(default_factory=dict)  # value -> max |y| that is exact

    def summary(self) -> dict[str, Any]:
        return {
            "prime": self.prime,
            "activation_frac_bits": self.frac_bits,
            "weight_frac_bits": dict(sorted(self.weight_bits.items())),
            "exact_output_range": dict(sorted(self.output_range.items())),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "prime": self.prime,
            "frac_bits": self.frac_bits,
            "weight_bits": dict(sorted(self.weight_bits.items())),
            "output_bits": dict(sorted(self.output_bits.items())),
            "output_range": dict(sorted(self.output_range.items())),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection.field") -> FieldSpec:
        keys = ("prime", "frac_bits", "weight_bits", "output_bits", "output_range")
        d = _fields(data, where, keys)
        bits = {
            key: {k: _int(v, f"{where}.{key}.{k}", 0) for k, v in _map(d[key], key).items()}
            for key in ("weight_bits", "output_bits")
        }
        return cls(
            _int(d["prime"], f"{where}.prime", 3),
            _int(d["frac_bits"], f"{where}.frac_bits", 0),
            bits["weight_bits"],
            bits["output_bits"],
            {
                k: _number(v, f"{where}.output_range.{k}")
                for k, v in _map(d["output_range"], where).items()
            },
        )


@dataclass(frozen=True)
class StateSpec:
    """How one state input is refilled: ``past = cat(past, outputs[output], dim)``."""

    output: int  # index into the program's flat outputs
    dim: int  # the dim that grows
    dtype: str  # torch dtype name, for the empty state of the first call

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "dim": self.dim, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any, where: str = "state") -> StateSpec:
        d = _fields(data, where, ("output", "dim", "dtype"))
        return cls(
            _int(d["output"], f"{where}.output", 0),
            _int(d["dim"], f"{where}.dim", 0),
            _str(d["dtype"], f"{where}.dtype"),
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
    field_plan: FieldSpec | None = None
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
        if self.field_plan is not None:
            out["field"] = self.field_plan.summary()
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
            "field": self.field_plan.to_dict() if self.field_plan is not None else None,
            "freivalds": {k: list(outputs) for k, (_, outputs) in self.freivalds.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "protection") -> Protection:
        keys = ("masking", "mask_scale", "masked", "gpu_masked", "corrections", "pooled",
                "cost", "rnm", "token_shape", "field", "freivalds")  # fmt: skip
        d = _fields(data, where, keys)
        masked = {}
        for name, entry in _map(d["masked"], f"{where}.masked").items():
            if not isinstance(entry, list) or len(entry) != 2:
                raise ArtifactError(f"{where}.masked.{name}: expected [shape, dtype]")
            masked[name] = (_shape(entry[0], f"{where}.masked.{name}"), _str(entry[1], name))
        corrections = {
            _name(k, f"{where}.corrections"): Correction.from_dict(k, v, f"{where}.corrections.{k}")
            for k, v in _map(d["corrections"], f"{where}.corrections").items()
        }
        freivalds = {
            _name(k, f"{where}.freivalds"): (None, _strs(v, f"{where}.freivalds.{k}"))
            for k, v in _map(d["freivalds"], f"{where}.freivalds").items()
        }
        token_shape = d["token_shape"]
        return cls(
            masking=_choice(d["masking"], f"{where}.masking", MASKINGS),
            mask_scale=_number(d["mask_scale"], f"{where}.mask_scale"),
            masked=masked,
            gpu_masked=set(_strs(d["gpu_masked"], f"{where}.gpu_masked")),
            corrections=corrections,
            pooled=_strs(d["pooled"], f"{where}.pooled"),
            cost={k: _map(v, f"{where}.cost.{k}") for k, v in _map(d["cost"], where).items()},
            rnm=None if d["rnm"] is None else RNMSite.from_dict(d["rnm"], f"{where}.rnm"),
            token_shape=None if token_shape is None else _shape(token_shape, f"{where}.token"),
            field_plan=None if d["field"] is None else FieldSpec.from_dict(d["field"]),
            freivalds=freivalds,
        )


@dataclass
class Signature:
    """How a call's ``(args, kwargs)`` map to the program's flat inputs, and its outputs back.

    ``in_spec``/``out_spec`` are pytree specs in ``torch.utils._pytree.treespec_dumps`` form;
    ``inputs`` pairs each flat input with a placeholder name, or with the constant it was
    exported with.
    """

    in_spec: str
    out_spec: str
    inputs: list[tuple[str | None, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_spec": self.in_spec,
            "out_spec": self.out_spec,
            "inputs": [list(x) for x in self.inputs],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "signature") -> Signature:
        d = _fields(data, where, ("in_spec", "out_spec", "inputs"))
        inputs = []
        if not isinstance(d["inputs"], list):
            raise ArtifactError(f"{where}.inputs: expected a list")
        for i, pair in enumerate(d["inputs"]):
            ok = isinstance(pair, list) and len(pair) == 2
            if not ok or (pair[0] is not None and not isinstance(pair[0], str)):
                raise ArtifactError(f"{where}.inputs[{i}]: expected [name or null, constant]")
            if not isinstance(pair[1], (type(None), bool, int, float, str)):
                raise ArtifactError(f"{where}.inputs[{i}]: constants are JSON scalars")
            inputs.append((pair[0], pair[1]))
        return cls(_str(d["in_spec"], f"{where}.in_spec"), _str(d["out_spec"], where), inputs)


@dataclass
class Plan:
    """One model under one policy, split: everything the executor and the reports need."""

    model: str
    policy: Policy
    reference_dims: dict[str, int]
    stages: list[Stage]
    edges: list[Edge]
    flat_outputs: list[Any]  # value names, or constants the model returns as they are
    input_dims: dict[str, list[int | str]]  # user input -> its shape
    signature: Signature
    state: dict[str, StateSpec] = field(default_factory=dict)  # KV-cache input -> refill
    protection: Protection | None = None
    other_nodes: dict[str, str] = field(default_factory=dict)  # unclassified node -> why

    @property
    def cut_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.crossing]

    def bytes_crossing(self) -> dict[str, int]:
        totals = {"enclave->gpu": 0, "gpu->enclave": 0}
        for edge in self.cut_edges:
            totals[edge.direction] += edge.nbytes
        return totals

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def describe(self) -> dict[str, Any]:
        """Canonical, deterministic description (the golden-file format)."""
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model": self.model,
            "policy": self.policy.to_dict(),
            "reference_dims": dict(sorted(self.reference_dims.items())),
            "stages": [s.to_dict() for s in self.stages],
            "edges": [e.to_dict() for e in self.edges],
            "bytes_crossing": self.bytes_crossing(),
            "other_nodes": self.other_nodes,
            "protection": self.protection.summary() if self.protection is not None else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything ``from_dict`` needs: the description plus what the executor reads."""
        out = self.describe()
        out["protection"] = self.protection.to_dict() if self.protection is not None else None
        out["flat_outputs"] = self.flat_outputs
        out["input_dims"] = self.input_dims
        out["signature"] = self.signature.to_dict()
        out["state"] = {k: v.to_dict() for k, v in self.state.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        keys = ("schema_version", "model", "policy", "reference_dims", "stages", "edges",
                "bytes_crossing", "other_nodes", "protection", "flat_outputs", "input_dims",
                "signature", "state")  # fmt: skip
        d = _fields(data, where, keys)
        if d["schema_version"] != PLAN_SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}.schema_version: {d['schema_version']!r}, this teesplit reads "
                f"{PLAN_SCHEMA_VERSION}"
            )
        try:
            policy = Policy.from_dict(_map(d["policy"], f"{where}.policy"), source=where)
        except ValueError as exc:  # PolicyError: the plan's policy is itself malformed
            raise ArtifactError(f"{where}.policy: {exc}") from None
        if not isinstance(d["stages"], list) or not isinstance(d["edges"], list):
            raise ArtifactError(f"{where}: stages and edges must be lists")
        stages = [Stage.from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(d["stages"])]
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ArtifactError(f"{where}.stages: duplicate stage names {dupes}")
        edges = [Edge.from_dict(e, f"{where}.edges[{i}]") for i, e in enumerate(d["edges"])]
        flat = d["flat_outputs"]
        if not isinstance(flat, list) or not all(
            isinstance(v, (type(None), bool, int, float, str)) for v in flat
        ):
            raise ArtifactError(f"{where}.flat_outputs: expected a list of names or constants")
        protection = d["protection"]
        plan = cls(
            model=_str(d["model"], f"{where}.model"),
            policy=policy,
            reference_dims={
                k: _int(v, f"{where}.reference_dims.{k}", 0)
                for k, v in _map(d["reference_dims"], f"{where}.reference_dims").items()
            },
            stages=stages,
            edges=edges,
            flat_outputs=list(flat),
            input_dims={
                k: _shape(v, f"{where}.input_dims.{k}")
                for k, v in _map(d["input_dims"], f"{where}.input_dims").items()
            },
            signature=Signature.from_dict(d["signature"], f"{where}.signature"),
            state={
                k: StateSpec.from_dict(v, f"{where}.state.{k}")
                for k, v in _map(d["state"], f"{where}.state").items()
            },
            protection=None if protection is None else Protection.from_dict(protection),
            other_nodes={
                k: _str(v, f"{where}.other_nodes.{k}")
                for k, v in _map(d["other_nodes"], f"{where}.other_nodes").items()
            },
        )
        plan._check_references(where)
        return plan

    def _check_references(self, where: str) -> None:
        """Every name the records use refers to something the plan defines."""
        names = {s.name for s in self.stages}
        for edge in self.edges:
            for end in (edge.producer, edge.consumer):
                if end not in names and end not in (INPUT, OUTPUT):
                    raise ArtifactError(f"{where}: edge {edge.name} names unknown stage {end}")
        prot = self.protection
        if prot is None:
            return
        sides = {s.name: s.side for s in self.stages}
        for name in [*prot.corrections, *prot.freivalds, *prot.pooled]:
            if sides.get(name) != GPU:
                raise ArtifactError(f"{where}.protection: {name} is not a GPU stage")
        if prot.rnm is not None and sides.get(prot.rnm.stage) != ENCLAVE:
            raise ArtifactError(f"{where}.protection.rnm: {prot.rnm.stage} is not an enclave stage")


def label_counts(labels: Mapping[str, Label | str], nodes: list[str]) -> dict[str, int]:
    """``{label: count}`` over ``nodes``, sorted: a stage's ``labels`` entry."""
    return dict(sorted(Counter(str(labels[n]) for n in nodes).items()))
