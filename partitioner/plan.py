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

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.errors import ArtifactError
from partitioner.label_set import Label
from partitioner.policy import Policy
from partitioner.protection import (  # noqa: F401 - part of the data model's surface
    MASKED_PROTECTIONS,
    Correction,
    ExactSpec,
    Protection,
    RNMSite,
)
from partitioner.schema import choice, fields, ident, int_, map_, shape_, str_, strs

PLAN_SCHEMA_VERSION = 5
ENCLAVE, GPU = "enclave", "gpu"
SIDES = (ENCLAVE, GPU)
INPUT, OUTPUT = "input", "output"  # the producer of user inputs, the consumer of outputs
DIRECTIONS = ("enclave->gpu", "gpu->enclave", "enclave->enclave", "gpu->gpu")
EXTRA_INPUT_KINDS = ("mask", "delta", "noise")


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledLibrary:
    """An enclave stage compiled ahead of time (``partitioner.aot``): the shared object to
    load (a verified file), the constants appended to the stage's inputs, whether its last
    output is a check flag, and the GPU reply it verifies, if any. ``enclave_runtime.compiled``
    runs it."""

    path: str
    constants: tuple[Any, ...]
    checks: bool
    # per input of the stage (before the constants): its dtype name and plan shape (ints and
    # named sizes); compiled code trusts its inputs' shapes, so the runtime checks them first
    inputs: tuple[tuple[str, tuple[int | str, ...]], ...] = ()
    # (GPU stage, its inputs per equation): the library checks that stage's reply itself
    # (``partitioner.aot.FusedCheck``): it takes the check's vectors after the stage's
    # inputs and returns the check's flag before the masks' flag
    verifies: tuple[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class StepLibrary:
    """A split program's enclave stages compiled as one library (``partitioner.aot_step``),
    which calls ``teesplit_step::gpu`` where the program has a GPU stage.
    ``enclave_runtime.step`` runs it.

    ``sources``: what each input is, in order: ``("zero", "")`` (a zero verdict), ``("input",
    name)`` a call input, ``("pad", name)`` / ``("delta", name)`` the mask set's pad or
    correction of a value, ``("check", stage)`` the check vector of that GPU stage; then the
    ``constants``. ``dtypes``: each call input's dtype name. ``outputs``: per output
    ``("env" | "gpu", name)``; the library returns the call's verdict after them
    (``partitioner.step_op``)."""

    path: str
    sources: tuple[tuple[str, str], ...]
    constants: tuple[Any, ...]
    dtypes: dict[str, str]
    outputs: tuple[tuple[str, str], ...]


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
    # an enclave stage's ahead-of-time compiled library, which the executor runs instead of
    # ``module``. Never serialised here: the bundle's enclave/aot/index.json lists them.
    compiled: CompiledLibrary | None = None

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
        d = fields(data, where, cls.to_dict_keys())
        where = f"stage {ident(d['name'], f'{where}.name')}"
        extras = []
        if not isinstance(d["extra_inputs"], list):
            raise ArtifactError(f"{where}.extra_inputs: expected a list")
        for i, pair in enumerate(d["extra_inputs"]):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ArtifactError(f"{where}.extra_inputs[{i}]: expected [kind, value]")
            kind = choice(pair[0], f"{where}.extra_inputs[{i}]", EXTRA_INPUT_KINDS)
            extras.append((kind, str_(pair[1], f"{where}.extra_inputs[{i}]")))
        labels = map_(d["labels"], f"{where}.labels")
        return cls(
            d["name"],
            choice(d["side"], f"{where}.side", SIDES),
            None,
            strs(d["inputs"], f"{where}.inputs"),
            strs(d["outputs"], f"{where}.outputs"),
            strs(d["nodes"], f"{where}.nodes"),
            strs(d["params"], f"{where}.params"),
            extra_inputs=extras,
            masked_outputs=strs(d["masked_outputs"], f"{where}.masked_outputs"),
            labels={k: int_(v, f"{where}.labels.{k}", 0) for k, v in labels.items()},
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
        d = fields(data, where, keys)
        where = f"edge {str_(d['name'], f'{where}.name')}"
        return cls(
            d["name"],
            str_(d["producer"], f"{where}.producer"),
            str_(d["consumer"], f"{where}.consumer"),
            shape_(d["shape"], f"{where}.shape"),
            str_(d["dtype"], f"{where}.dtype"),
            int_(d["bytes"], f"{where}.bytes", 0),
            choice(d["direction"], f"{where}.direction", DIRECTIONS),
            str_(d["protection"], f"{where}.protection"),
        )


@dataclass(frozen=True)
class StateSpec:
    """How one state input is refilled: ``past = cat(past, outputs[output], dim)``.

    ``holder`` is the GPU stage that keeps the state itself (``None``: the enclave keeps it and
    sends it with each call). A stage may hold a state only when it computes the refill in
    the clear and is the only stage that reads the state's values: the GPU then holds nothing
    it did not compute, and the enclave sends no cache and receives none (issue 13)."""

    output: int  # index into the program's flat outputs
    dim: int  # the dim that grows
    dtype: str  # torch dtype name, for the empty state of the first call
    holder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "dim": self.dim, "dtype": self.dtype, "holder": self.holder}

    @classmethod
    def from_dict(cls, data: Any, where: str = "state") -> StateSpec:
        d = fields(data, where, ("output", "dim", "dtype", "holder"))
        return cls(
            int_(d["output"], f"{where}.output", 0),
            int_(d["dim"], f"{where}.dim", 0),
            str_(d["dtype"], f"{where}.dtype"),
            None if d["holder"] is None else str_(d["holder"], f"{where}.holder"),
        )


@dataclass(frozen=True)
class HeldSlot:
    """A state a GPU stage holds, in that stage's terms: which of its inputs the state is,
    which of its outputs refills it, along which dim (see :meth:`Plan.held`)."""

    state: str  # the state input's name
    input: int  # index into the stage's inputs
    output: int  # index into the stage's outputs
    dim: int


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
        d = fields(data, where, ("in_spec", "out_spec", "inputs"))
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
        return cls(str_(d["in_spec"], f"{where}.in_spec"), str_(d["out_spec"], where), inputs)


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
    # What a request may be: the token input and its vocabulary, each named dim's [min, max]
    token_input: str | None = None
    vocab: int | None = None
    dim_ranges: dict[str, list[int | None]] = field(default_factory=dict)
    # The input counting each row's left padding of the state (``[batch, 1]`` int64, public):
    # a holder may run several sequences as one left-padded batch
    padding: str | None = None
    # every enclave stage as one compiled library (``partitioner.aot_step``), which the
    # executor runs instead of the stages when it can. Never serialised.
    step: StepLibrary | None = field(default=None, repr=False, compare=False)

    @property
    def cut_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.crossing]

    def bytes_crossing(self) -> dict[str, int]:
        """Bytes each way per call at the reference dims; a state the GPU holds never crosses."""
        held = self.held_values()
        totals = {"enclave->gpu": 0, "gpu->enclave": 0}
        for edge in self.cut_edges:
            if edge.name not in held:
                totals[edge.direction] += edge.nbytes
        return totals

    def between_stages(self) -> str | None:
        """Why the executor must do work of its own between enclave stages (which a step
        library, ``partitioner.aot_step``, would skip), or ``None``: exact masks, no RNM,
        no state held on the GPU, every correction pooled."""
        prot = self.protection
        if prot is None or prot.exact is None:
            return "the program masks nothing exactly"
        if prot.rnm is not None:
            return "RNM draws its noise per call in the executor"
        if self.held():
            return "a GPU stage holds state between calls"
        if set(prot.corrections) - set(prot.pooled):
            return "a correction is computed per call"
        return None

    def held(self) -> dict[str, list[HeldSlot]]:
        """Per GPU stage, the states it holds (inputs it is not sent, outputs it keeps)."""
        out: dict[str, list[HeldSlot]] = {}
        for name, spec in self.state.items():
            if spec.holder is None:
                continue
            stage = self.stage(spec.holder)
            refill = self.flat_outputs[spec.output]
            out.setdefault(stage.name, []).append(
                HeldSlot(name, stage.inputs.index(name), stage.outputs.index(refill), spec.dim)
            )
        return out

    def resident(self) -> dict[str, set[str]]:
        """Per GPU stage, its inputs that an earlier GPU stage produced: a worker that ran that
        stage in the same session has them already, so they need not travel back up."""
        sides = {s.name: s.side for s in self.stages}
        out: dict[str, set[str]] = {}
        for edge in self.edges:
            if sides.get(edge.producer) == GPU and sides.get(edge.consumer) == GPU:
                out.setdefault(edge.consumer, set()).add(edge.name)
        return out

    def passing(self) -> dict[str, set[str]]:
        """Per GPU stage, the outputs only later GPU stages read, none of them checked: the
        enclave need not receive them (a Freivalds check would read its copy of them)."""
        sides = {s.name: s.side for s in self.stages}
        checked = set(self.protection.freivalds) if self.protection is not None else set()
        readers: dict[tuple[str, str], set[str]] = {}
        for edge in self.edges:
            readers.setdefault((edge.producer, edge.name), set()).add(edge.consumer)
        out: dict[str, set[str]] = {}
        for stage in self.stages:
            if stage.side != GPU:
                continue
            for name in stage.outputs:
                to = readers.get((stage.name, name), set())
                if to and all(sides.get(c) == GPU and c not in checked for c in to):
                    out.setdefault(stage.name, set()).add(name)
        return out

    def held_values(self) -> set[str]:
        """The state inputs the GPU holds and the outputs that refill them."""
        return {
            v
            for name, spec in self.state.items()
            if spec.holder is not None
            for v in (name, self.flat_outputs[spec.output])
        }

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
        out["token_input"] = self.token_input
        out["vocab"] = self.vocab
        out["dim_ranges"] = dict(sorted(self.dim_ranges.items()))
        out["padding"] = self.padding
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        keys = ("schema_version", "model", "policy", "reference_dims", "stages", "edges",
                "bytes_crossing", "other_nodes", "protection", "flat_outputs", "input_dims",
                "signature", "state", "token_input", "vocab", "dim_ranges",
                "padding")  # fmt: skip
        d = fields(data, where, keys)
        if d["schema_version"] != PLAN_SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}.schema_version: {d['schema_version']!r}, this teesplit reads "
                f"{PLAN_SCHEMA_VERSION}"
            )
        try:
            policy = Policy.from_dict(map_(d["policy"], f"{where}.policy"), source=where)
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
            model=str_(d["model"], f"{where}.model"),
            policy=policy,
            reference_dims={
                k: int_(v, f"{where}.reference_dims.{k}", 0)
                for k, v in map_(d["reference_dims"], f"{where}.reference_dims").items()
            },
            stages=stages,
            edges=edges,
            flat_outputs=list(flat),
            input_dims={
                k: shape_(v, f"{where}.input_dims.{k}")
                for k, v in map_(d["input_dims"], f"{where}.input_dims").items()
            },
            signature=Signature.from_dict(d["signature"], f"{where}.signature"),
            state={
                k: StateSpec.from_dict(v, f"{where}.state.{k}")
                for k, v in map_(d["state"], f"{where}.state").items()
            },
            protection=None if protection is None else Protection.from_dict(protection),
            other_nodes={
                k: str_(v, f"{where}.other_nodes.{k}")
                for k, v in map_(d["other_nodes"], f"{where}.other_nodes").items()
            },
            token_input=None if d["token_input"] is None else str_(d["token_input"], where),
            vocab=None if d["vocab"] is None else int_(d["vocab"], f"{where}.vocab", 1),
            dim_ranges={
                k: _dim_range(v, f"{where}.dim_ranges.{k}")
                for k, v in map_(d["dim_ranges"], f"{where}.dim_ranges").items()
            },
            padding=None if d["padding"] is None else str_(d["padding"], f"{where}.padding"),
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
        sides = {s.name: s.side for s in self.stages}
        for name, spec in self.state.items():
            self._check_holder(name, spec, sides, where)
        self._check_padding(where)
        prot = self.protection
        if prot is None:
            return
        for name in [*prot.corrections, *prot.freivalds, *prot.pooled]:
            if sides.get(name) != GPU:
                raise ArtifactError(f"{where}.protection: {name} is not a GPU stage")
        if prot.rnm is not None and sides.get(prot.rnm.stage) != ENCLAVE:
            raise ArtifactError(f"{where}.protection.rnm: {prot.rnm.stage} is not an enclave stage")

    def _check_padding(self, where: str) -> None:
        """The padding input is one count per row (``[batch, 1]``) of a program with state:
        never the token input or a state (it is sent as public, and callers pass zeros)."""
        name = self.padding
        if name is None:
            return
        dims = self.input_dims.get(name)
        if (
            not self.state
            or dims is None
            or len(dims) != 2
            or dims[1] != 1
            or name == self.token_input
            or name in self.state
            or name not in [n for n, _ in self.signature.inputs]
        ):
            raise ArtifactError(
                f"{where}.padding: {name!r} is not a [batch, 1] input beside the state inputs"
            )

    def _check_holder(
        self, name: str, spec: StateSpec, sides: Mapping[str, str], where: str
    ) -> None:
        """A state's refill is a tensor output; a holder is a GPU stage that reads the state,
        computes its refill unmasked, and is the only stage the state's value goes to."""
        at = f"{where}.state.{name}"
        if not 0 <= spec.output < len(self.flat_outputs) or not isinstance(
            self.flat_outputs[spec.output], str
        ):
            raise ArtifactError(f"{at}.output: {spec.output} is not a tensor output")
        if spec.holder is None:
            return
        refill = self.flat_outputs[spec.output]
        if sides.get(spec.holder) != GPU:
            raise ArtifactError(f"{at}.holder: {spec.holder} is not a GPU stage")
        stage = self.stage(spec.holder)
        if name not in stage.inputs or refill not in stage.outputs:
            raise ArtifactError(
                f"{at}.holder: stage {spec.holder} does not read {name} and return {refill}"
            )
        if self.protection is not None and spec.holder in self.protection.freivalds:
            raise ArtifactError(f"{at}.holder: {spec.holder} is checked: its inputs stay sent")
        masked = self.protection.gpu_masked if self.protection is not None else set()
        if refill in masked or refill in stage.masked_outputs:
            raise ArtifactError(f"{at}.holder: its refill {refill} is masked: it may not be held")
        # enclave stages may read the state's shape (positions), never its values: they are
        # handed a stand-in of the right shape (Executor)
        readers = [
            e.consumer
            for e in self.edges
            if e.name == name and e.producer == INPUT and sides.get(e.consumer) == GPU
        ]
        if readers != [spec.holder]:
            raise ArtifactError(
                f"{at}.holder: {name} goes to GPU stages {readers}, not to {spec.holder} alone"
            )


def _dim_range(value: Any, where: str) -> list[int | None]:
    if not isinstance(value, list) or len(value) != 2:
        raise ArtifactError(f"{where}: expected [min, max or null]")
    low = int_(value[0], where, 0)
    high = None if value[1] is None else int_(value[1], where, low)
    return [low, high]


def label_counts(labels: Mapping[str, Label | str], nodes: list[str]) -> dict[str, int]:
    """``{label: count}`` over ``nodes``, sorted: a stage's ``labels`` entry."""
    return dict(sorted(Counter(str(labels[n]) for n in nodes).items()))
