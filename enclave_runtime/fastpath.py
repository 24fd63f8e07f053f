"""A call's stages as a list of slot moves, for programs masked exactly.

Why: a SmolLM2 decode step under ``slalom`` makes 121 library calls and 121 GPU round trips.
Replayed, the executor's generic loop (``Executor.execute``: dict lookups by name, per-stage
branches for features the program does not use, an empty-input scan of every library input)
took about as long as the libraries themselves (benchmarks/README.md). Everything that loop
works out per stage depends only on the plan and the call's sizes, so it is worked out here
once per binding: each value gets a slot in a list, each stage a tuple of slot numbers.

Reads an :class:`~enclave_runtime.executor.Executor`'s plan, runner, ring checks and
libraries; writes nothing of theirs. :func:`build` returns ``None`` for a plan it does not
cover (the executor then runs its generic loop), so the two never disagree on what is
covered: RNM, float masks or float Freivalds checks, a correction computed per call, GPU
stages that hold state, a step library.

Guarantees, the same as the generic loop's (the adversarial tests run through both):

* the GPU receives the tensors the plan says, in the stage's order, as the enclave's own
  tensors only to a runner that says it copies them (``copies_inputs``), else copies;
* every reply is refused unless it has the plan's count, dtypes and shapes
  (:func:`~enclave_runtime.replies.check_reply`), memory of its own and a storage as large
  as its shape, before anything reads it;
* a checked reply is verified before any stage reads its values: by the next stage's library
  (on the enclave's own copy of what was sent, never a tensor a runner was handed) where it
  makes the check and the request has at most ``Executor.library_check_rows`` rows, else in
  numpy as it arrives; a failed check redraws the check's secret vectors before it raises;
* no library is given an empty input of a shape it does not take. AOTInductor's own checks
  pass any input with no elements, whatever its sizes, so ``CompiledCall`` scans for one. The
  scan is made here on the call's own inputs, every call: when none is empty, nothing the
  GPU or the caller chose can be, since every reply has exactly the shape the binding gives
  (the fast path runs only where every reply's shape is known) and the pads and corrections
  have the binding's shapes by construction; what the libraries compute from those has the
  shapes their graphs give. So once one call has gone through the libraries' full input
  checks (which would catch libraries that disagree on a shape), a call whose own inputs are
  all non-empty skips the scan, whatever its sizes (a generation's every step has new ones).
  A call with an empty input of its own (a prefill's empty cache) is scanned in full.

A call that skips the scans runs in C++ where ``native/step_loop.cpp`` is built
(:meth:`FastPath._run_native`: the same moves, the libraries called without the Python
binding's conversions, Python entered for each GPU request, its reply check and, for a reply
checked as it comes, the numpy check), with the same guarantees; else here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from enclave_runtime import native_modules
from enclave_runtime import replies as replies_module
from enclave_runtime.compiled import CompiledCall
from enclave_runtime.integrity import RingCheck
from enclave_runtime.replies import check_reply, snapshot
from partitioner.errors import IntegrityError
from partitioner.plan import ENCLAVE, Stage

_PADS, _DELTAS = 0, 1
# the same loop in C++ (``native/step_loop.cpp``), for calls it covers (``FastPath.native``)
_step_loop = native_modules.load("teesplit_step_loop")


@dataclass
class _Library:
    """An enclave stage: its library, the slots of its inputs and outputs, and, when it
    checks the reply of the GPU stage before it, that stage's check and the slots of what
    was sent (the enclave's copies) and of the pads, per equation."""

    call: CompiledCall | _Callable
    args: list[int]
    outs: list[int]
    check: RingCheck | None
    check_slots: list[int]
    drop: tuple[int, ...] = ()  # slots no later stage reads (set by :func:`_build`)


@dataclass
class _Gpu:
    """A GPU stage: the slots it is sent and its replies go to, its inputs' and outputs'
    names (whose pads and corrections a check made here reads), and its check. ``keep``:
    where the next library can make the check, the slots that library reads what was sent
    from, per checked input (position in ``sent``, slot)."""

    name: str
    sent: list[int]
    outs: list[int]
    inputs: list[str]
    outputs: list[str]
    check: RingCheck | None
    keep: list[tuple[int, int]]
    drop: tuple[int, ...] = ()  # as _Library's

    def expect(self, sent: list[torch.Tensor], views: tuple[dict, dict, dict]) -> list[Any]:
        """The check made as the reply comes, its first half: from the enclave's own
        ``sent``, before the GPU gets it. ``views``: as :func:`_view` reads them."""
        return self.check.expect(sent, [_view(n, views) for n in self.inputs])

    def verify(self, sums: list[Any], outs: Any, views: tuple[dict, dict, dict]) -> None:
        """Its second half, on the accepted reply ``outs``: raises IntegrityError."""
        self.check.verify(sums, list(outs), [_view(n, views) for n in self.outputs])


def checked_by_next(stage: Stage, neighbour: Stage | None) -> bool:
    """Whether the stage after GPU stage ``stage`` is a library that checks its reply."""
    return (
        neighbour is not None
        and neighbour.side == ENCLAVE
        and neighbour.compiled is not None
        and neighbour.compiled.verifies is not None
        and neighbour.compiled.verifies[0] == stage.name
    )


def request_rows(t: torch.Tensor) -> int:
    """How many rows (vectors of its last dim) a request holds (what
    ``Executor.library_check_rows`` counts)."""
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else t.numel()


def _view(name: str, views: tuple[dict, dict, dict]) -> Any:
    """A pad or correction as the generic loop's numpy check reads it, from ``views`` (the
    set's numpy views, pads and corrections): the numpy view where it has one, else the
    tensor (a correction before a pad of the same name), else ``None`` (a value the GPU
    holds unmasked)."""
    arrays, pads, deltas = views
    if name in arrays:
        return arrays[name]
    return deltas[name] if name in deltas else pads.get(name)


class FastPath:
    """One program's stages as slot moves (see the module docstring). ``run`` is one call."""

    def __init__(
        self,
        steps: list[Any],
        size: int,
        inputs: list[tuple[int, str]],
        pads: list[tuple[int, int, str]],
        outputs: list[tuple[str, int, bool]],
    ) -> None:
        self.steps = steps
        self.size = size
        self.inputs = inputs
        self.pads = pads
        self.outputs = outputs
        # whether a call has gone through the libraries' full input checks (module docstring)
        self.scanned = False
        self.native = _native_loop(self)
        self.libraries = [step for step in steps if type(step) is _Library]
        self.gpus = [step for step in steps if type(step) is _Gpu]
        self.wanted = [slot for _, slot, _ in outputs]

    def run(
        self,
        env: dict[str, Any],
        masks: Any,
        replies: dict[str, Any],
        run: Any,
        copies: bool,
        limit: int,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One call: the program's outputs by name, as the enclave holds them and as the GPU
        does (``Executor._output`` unmasks the latter)."""
        v: list[Any] = [None] * self.size
        nonempty = True
        for slot, name in self.inputs:
            value = env[name]
            v[slot] = value
            if nonempty and isinstance(value, torch.Tensor) and not value.numel():
                nonempty = False
        scanned = nonempty and self.scanned
        tables = (masks.pads, masks.deltas)
        for slot, table, name in self.pads:
            v[slot] = tables[table][name]
        views = (masks.arrays, *tables)
        unlimited = limit == sys.maxsize
        if self.native is not None and scanned and unlimited:
            given = [(slot, v[slot]) for slot, _ in self.inputs]
            given += [(slot, v[slot]) for slot, _, _ in self.pads]
            if all(type(t) is torch.Tensor for _, t in given):
                # a view as its contiguous copy, as a library's refusal of its strides makes
                # the Python loop pass it (CompiledCall.run_nonempty)
                given = [(slot, t.contiguous()) for slot, t in given]
                return self._run_native(given, views, replies, run, copies)
        verified = False  # whether the next library checks the reply before it
        for step in self.steps:
            if type(step) is _Library:
                args = [v[i] for i in step.args]
                check = step.check
                if check is None:
                    outs = step.call.run_nonempty(args) if scanned else step.call(*args)
                else:
                    extra = [v[i] for i in step.check_slots]
                    extra.append(check.fused_vector(verified))
                    try:
                        if scanned:
                            outs = step.call.run_nonempty(args, extra)
                        else:
                            outs = step.call(*args, checks=extra)
                    except IntegrityError:
                        check.draw()  # a failed check told the GPU something about s
                        raise
                for slot, out in zip(step.outs, outs, strict=True):
                    v[slot] = out
                for slot in step.drop:
                    v[slot] = None
                continue
            name = step.name
            sent = [v[i] for i in step.sent]
            expected = replies[name]
            check = step.check
            # the next library checks the reply if the request is of few enough rows
            # (``Executor.library_check_rows``); else it is checked here as it comes
            here = bool(step.keep) and (unlimited or request_rows(sent[check.sources[0]]) <= limit)
            sums = None
            if check is not None and not here:
                sums = step.expect(sent, views)
            for position, slot in step.keep:
                # what the library checks the reply against: the enclave's own tensor,
                # copied if the runner is handed the original
                v[slot] = sent[position].clone() if copies and here else sent[position]
            outs = snapshot(run(name, sent if copies else [t.clone() for t in sent], expected))
            check_reply(name, outs, expected)
            for slot, out in zip(step.outs, outs, strict=True):
                v[slot] = out
            if check is not None and not here:
                step.verify(sums, outs, views)
            for slot in step.drop:
                v[slot] = None
            verified = here
        if nonempty:
            self.scanned = True
        return self._named(v)

    def _named(self, values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The program's outputs by name from ``values`` (indexed by slot): as the enclave
        holds them, and as the GPU does."""
        clear = {name: values[slot] for name, slot, in_env in self.outputs if in_env}
        return clear, {name: values[slot] for name, slot, in_env in self.outputs if not in_env}

    def _run_native(
        self,
        given: list[tuple[int, torch.Tensor]],
        views: tuple[dict, dict, dict],
        replies: dict[str, Any],
        run: Any,
        copies: bool,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`run` in C++ (``native/step_loop.cpp``), for a call whose own inputs are
        tensors (contiguous), none empty, after a call has been scanned in full, with no
        limit on the rows a library checks. Raises as :meth:`run`."""
        accepts = replies_module.native_accepts or _refuse_all
        gpus = self.gpus

        def expect(index: int, sent: list[torch.Tensor]) -> list[Any]:
            return gpus[index].expect(sent, views)

        def verify(index: int, sums: list[Any], outs: Any) -> None:
            gpus[index].verify(sums, outs, views)

        code, index, detail, values = self.native.run(
            given, run, accepts, check_reply, expect, verify, replies, copies, self.wanted
        )
        if code != _step_loop.DONE:
            step = self.libraries[index]
            call = step.call
            if code == _step_loop.CHECK_FAILED:
                step.check.draw()  # a failed check told the GPU something about s
                raise call.check_failed()
            if code == _step_loop.MASKS_REFUSED:
                raise call.masks_refused()
            if step.check is not None:
                step.check.draw()  # as the Python loop: a refused reply told the GPU about s
            if values is not None:
                call.check(tuple(values))  # names the input at fault, as the Python loop does
            raise IntegrityError(
                f"enclave stage {call.name}: its compiled library refused the inputs: {detail}"
            )
        return self._named(dict(zip(self.wanted, values, strict=True)))


def _refuse_all(outputs: object, expected: object) -> bool:
    """Where the native reply check is not built: every reply goes to ``check_reply``."""
    return False


def _native_loop(fast: FastPath) -> Any | None:
    """``fast``'s steps as the C++ loop's (``native/step_loop.cpp``), or ``None`` where it is
    not built or an enclave stage is not a library (run op by op, or wrapped by a caller)."""
    if _step_loop is None:
        return None
    loop = _step_loop.Loop(fast.size)
    for step in fast.steps:
        if type(step) is _Library:
            call = step.call
            if type(call) is not CompiledCall:
                return None
            loop.add_library(
                call._runner,
                step.args,
                step.outs,
                step.check_slots,
                step.check,
                call.constants,
                bool(call.checks),
                call.verifies is not None,
                list(step.drop),
            )
        else:
            here = step.check is not None and not step.keep  # checked in numpy as it comes
            loop.add_gpu(step.name, step.sent, step.outs, step.keep, here, list(step.drop))
    loop.seal()  # no step added later, by anyone (a reviewer's finding: runner code did)
    return loop


class _Callable:
    """What runs an enclave stage when it is not a library this module calls directly (the
    stage's module, run op by op, or a caller's wrapper around either), called as a library
    is: the check's vectors passed only where there are some."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def __call__(self, *args: Any, checks: list[Any] | None = None) -> Any:
        return self.run(*args, checks=checks) if checks else self.run(*args)

    def run_nonempty(self, args: list[Any], checks: list[Any] | None = None) -> Any:
        return self(*args, checks=checks)


class _Unsupported(Exception):
    """The plan uses something only the generic loop runs (:func:`build` returns ``None``)."""


def build(executor: Any, env: dict[str, Any], masks: Any) -> FastPath | None:
    """The slot moves of ``executor``'s program for calls like this one (``env``'s names,
    ``masks``' tables), or ``None`` where the generic loop must run it (module docstring).
    Loads every enclave stage's library (``Executor._module``, which refuses one that checks
    a reply this plan does not place before it)."""
    spec = executor.spec
    prot = spec.protection
    if (
        prot is None
        or prot.exact is None
        or prot.rnm is not None
        or spec.step is not None
        or executor._holders
        or masks is None
        or masks.freivalds
        or masks.noise
        or any(name not in prot.pooled for name in prot.corrections)
    ):
        return None
    try:
        return _build(executor, env, masks)
    except _Unsupported:
        return None


def _build(executor: Any, env: dict[str, Any], masks: Any) -> FastPath:
    checks = executor.ring_checks
    slots: dict[tuple[str, ...], int] = {}
    inputs: list[tuple[int, str]] = []
    pads: list[tuple[int, int, str]] = []
    env_names, gpu_names = set(env), set()

    def read(name: str, enclave: bool) -> int:
        """The slot of ``name`` as a stage reads it: an enclave stage prefers the enclave's
        plaintext, a GPU stage what the GPU holds (the generic loop's lookups)."""
        order = ("e", "g") if enclave else ("g", "e")
        for space in order:
            if name in (env_names if space == "e" else gpu_names):
                key = (space, name)
                if key not in slots and space == "e" and name in env:
                    inputs.append((len(slots), name))
                return slots.setdefault(key, len(slots))
        raise _Unsupported(name)

    def table(name: str, kind: int) -> int:
        # kind 0: the pads; kind 1: the corrections, read before the pads of the same name
        if kind == 1 and name in masks.deltas:
            which = _DELTAS
        elif name in masks.pads:
            which = _PADS
        else:
            raise _Unsupported(name)
        key = ("pool", str(which), name)
        if key not in slots:
            pads.append((len(slots), which, name))
        return slots.setdefault(key, len(slots))

    def write(space: str, name: str) -> int:
        names = env_names if space == "e" else gpu_names
        if name in names:  # a name written twice: the generic loop's dicts would overwrite
            raise _Unsupported(name)
        names.add(name)
        return slots.setdefault((space, name), len(slots))

    steps: list[Any] = []
    pending: _Gpu | None = None  # the GPU stage before, until the stage after it is seen
    for stage, extras, clear_outputs, neighbour in executor._steps:
        if stage.side == ENCLAVE:
            call = executor._module(stage)
            if type(call) is not CompiledCall:
                call = _Callable(call)
            args = [read(n, True) for n in stage.inputs]
            for kind, name in extras:
                if kind not in (0, 1):
                    raise _Unsupported(name)
                args.append(table(name, kind))
            check, check_slots = None, []
            if stage.compiled is not None and stage.compiled.verifies is not None:
                # _module has refused a library that checks any stage but the one before
                if pending is None or pending.name != neighbour.name or pending.check is None:
                    raise _Unsupported(stage.name)
                check = pending.check
                kept = dict(pending.keep)
                for source in check.sources:
                    name = neighbour.inputs[source]
                    check_slots += [kept[source], table(name, 1)]
            elif pending is not None and pending.keep:
                raise _Unsupported(pending.name)  # a fused check no library makes
            pending = None
            outs = [write("e", name) for name in stage.outputs]
            outs += [write("g", name) for name in stage.masked_outputs]
            for name in clear_outputs:  # the GPU reads the enclave's tensor itself
                if name in gpu_names:
                    raise _Unsupported(name)
                gpu_names.add(name)
                slots[("g", name)] = slots[("e", name)]
            steps.append(_Library(call, args, outs, check, check_slots))
            continue
        if pending is not None and pending.keep:
            raise _Unsupported(pending.name)
        check = checks.get(stage.name)
        sent = [read(n, False) for n in stage.inputs]
        fused = check is not None and checked_by_next(stage, neighbour)
        keep: list[tuple[int, int]] = []
        if fused:
            keep = [
                (s, slots.setdefault(("sent", stage.name, str(s)), len(slots)))
                for s in check.sources
            ]
        outs = [write("g", name) for name in stage.outputs]
        pending = _Gpu(stage.name, sent, outs, list(stage.inputs), list(stage.outputs), check, keep)
        steps.append(pending)
    if pending is not None and pending.keep:
        raise _Unsupported(pending.name)
    outputs = []
    for value in executor.spec.flat_outputs:
        if isinstance(value, str):  # as Executor._output looks it up (an input returned too)
            outputs.append((value, read(value, True), value in env_names))
    _drop_dead(steps, {slot for _, slot, _ in outputs})
    return FastPath(steps, len(slots), inputs, pads, outputs)


def _drop_dead(steps: list[Any], outputs: set[int]) -> None:
    """Gives each step the slots that no later step reads and that are not the program's
    outputs, for ``run`` to let go of once the step is done. Why: a decode step makes hundreds
    of tensors (library outputs, replies, kept requests); held to the step's end, each library
    writes to memory no recent call touched, where released after its last reader the
    allocator hands the next call the blocks just freed, still in cache (the 121 libraries
    of a replayed SmolLM2 step, called in a loop: 5.6 ms with their outputs dropped at once,
    6.8 ms with them held; ``benchmarks/README.md``)."""
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        if type(step) is _Library:
            touched = [*step.args, *step.check_slots, *step.outs]
        else:
            touched = [*step.sent, *(slot for _, slot in step.keep), *step.outs]
        for slot in touched:
            last[slot] = i
    dead: list[list[int]] = [[] for _ in steps]
    for slot, i in last.items():
        if slot not in outputs:
            dead[i].append(slot)
    for step, slots in zip(steps, dead, strict=True):
        step.drop = tuple(sorted(slots))
