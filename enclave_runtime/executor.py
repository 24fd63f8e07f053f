"""The executor: runs a split program's stages in order, on the enclave side.

Reads a :class:`~partitioner.plan.Plan` whose enclave stages (and corrections, Freivalds
copies, RNM tables) carry their callables, and a :class:`StageRunner` for the GPU stages.
Owns the mask pool, the CSPRNG behind it and the last request's privacy account. Guarantees:
every value the GPU receives is what the plan says it may receive (masked, sanitised or
public); every masked GPU result is unmasked here and, where the plan checks it, verified by
Freivalds before anything reads it.

In-process and two-process runs are this same code with a different runner: an
:class:`InProcessRunner` calls the GPU stages' modules here, the enclave driver's worker client
sends them to a GPU worker.
"""

from __future__ import annotations

import operator
import sys
from collections import ChainMap
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.fx
import torch.utils._pytree as pytree

from enclave_runtime import fastpath, integrity
from enclave_runtime.compiled import CompiledCall
from enclave_runtime.fastpath import FastPath
from enclave_runtime.pool import MaskPool, MaskSet
from enclave_runtime.randomness import CSPRNG
from enclave_runtime.replies import Expected, check_reply, snapshot
from enclave_runtime.signature import CallSignature
from enclave_runtime.step import StepCall, run_step
from partitioner import ops
from partitioner.dims import concrete_shape, names_in
from partitioner.errors import ArtifactError, InputError, IntegrityError, PartitionError
from partitioner.ops import direct_calls, prepare_ring_weights
from partitioner.plan import ENCLAVE, GPU, CompiledLibrary, Plan, Stage, StepLibrary
from runtime.state import HeldState, RowStates, StateError


class StageRunner(Protocol):
    """Runs one GPU stage: ``run(stage, tensors, expected) -> tensors`` (inputs and outputs
    in the stage's order). ``expected`` is what the plan says the reply is; a runner that
    reads replies from elsewhere refuses one that differs before reading its payload. A stage
    that holds state (``Plan.held``) is also passed ``end=True`` on its sequence's last call:
    the holder frees the state afterwards (Triton: ``sequence_end``), or ``rows``: one
    sequence per batch row (an enclave batching its sessions), which ``release`` frees.

    A runner that never touches the tensors it is handed after ``run`` returns, because it
    copies them out (serialises them to a worker), says so with ``copies_inputs = True``;
    the executor then hands it its own tensors instead of copies."""

    def run(
        self,
        stage: str,
        tensors: list[torch.Tensor],
        expected: Expected | None = None,
        end: bool = False,
        rows: Sequence[str] | None = None,
    ) -> list[torch.Tensor]: ...

    def release(self, stage: str, rows: Sequence[str]) -> None: ...


class InProcessRunner:
    """GPU stages run here, by the modules the plan's GPU stages carry (looked up per call).
    States a GPU stage holds (``Plan.held``) are kept here, as a worker keeps them."""

    def __init__(self, plan: Plan) -> None:
        self._stages = {s.name: s for s in plan.stages if s.side == GPU}
        self._prepared: dict[str, tuple[Any, Any]] = {}  # stage -> (module, its prepared copy)
        self._state = {stage: HeldState(stage, slots) for stage, slots in plan.held().items()}
        self._rows = {stage: RowStates(stage, slots) for stage, slots in plan.held().items()}

    def release(self, stage: str, rows: Sequence[str]) -> None:
        self._rows[stage].release(rows)

    def run(
        self,
        stage: str,
        tensors: list[torch.Tensor],
        expected: Expected | None = None,
        end: bool = False,
        rows: Sequence[str] | None = None,
    ) -> list[torch.Tensor]:
        module = self._stages[stage].module
        if module is None:
            raise PartitionError(f"GPU stage {stage} has no module in this process")
        cached = self._prepared.get(stage)
        if cached is None or cached[0] is not module:
            cached = (module, prepare_ring_weights(module))
            self._prepared[stage] = cached
        if rows is not None:
            slots = self._rows[stage].slots
            start = all(tensors[slot.input].shape[slot.dim] == 0 for slot in slots)
            batch = self._rows[stage].batch(list(rows), start)
            inputs = batch.inputs(tensors)
            return batch.keep(inputs, list(cached[1](*inputs)), stand_ins=False)
        state = self._state.get(stage)
        if state is None:
            return list(cached[1](*tensors))
        inputs = state.inputs(tensors)
        outs = state.keep(inputs, list(cached[1](*inputs)), stand_ins=False)
        if end:
            state.tensors.clear()
        return outs


_EXPECTED_CACHE = 256  # distinct bindings (each holds every GPU stage)


class Executor:
    """One split program, ready to serve requests: its stages, a runner and a mask pool.

    ``seed`` fixes the pool's CSPRNG and is for tests only; by default it is keyed from the OS.
    """

    #: A GPU reply whose check the next stage's library can make (``partitioner.aot``) is
    #: checked there when the request sent has at most this many rows, and by the executor
    #: in numpy otherwise. Since the libraries read integer vectors whole
    #: (``partitioner.aot_compiler``) the library's check costs less than numpy's at every
    #: size measured, 1 to 2,048 rows (benchmarks/README.md), so by default the library
    #: checks every reply it can; tests lower this to reach the numpy path. Rows: the
    #: request's batch x positions.
    library_check_rows = sys.maxsize

    def __init__(
        self, plan: Plan, runner: StageRunner | None = None, *, seed: int | str | None = None
    ) -> None:
        self.spec = plan
        self.runner = runner if runner is not None else InProcessRunner(plan)
        self.signature = CallSignature(plan.signature)
        prot = plan.protection
        self.pool = MaskPool(prot, CSPRNG(seed)) if prot is not None and prot.needs_pool else None
        self.ring_checks: dict[str, integrity.RingCheck] = {}
        if prot is not None and prot.exact is not None and self.pool is not None:
            inputs = {s.name: s.inputs for s in plan.stages}
            self.ring_checks = {
                name: integrity.RingCheck(name, module, inputs[name], self.pool.rng)
                for name, (module, _) in prot.freivalds.items()
            }
        # With RNM: the last request's sanitised tokens and its total ε (sequential composition).
        self.last_request: dict[str, Any] = {}
        masked = prot.masked if prot is not None else {}
        self._replies = self._reply_specs()
        # the dims the replies' shapes name: what they are cached by (a decode step's replies
        # do not depend on the cache length, so a generation's steps share one entry)
        self._reply_dims = sorted(
            {
                name
                for outs in self._replies.values()
                for _, shape in outs
                for size in shape or ()
                if isinstance(size, str)
                for name in names_in(size)
            }
        )
        # per key: what each reply must be, and whether every reply's shape is known
        self._expected: dict[tuple[tuple[str, int | None], ...], tuple[dict[str, Expected], bool]]
        self._expected = {}
        # enclave stage -> (its module or library, what runs it)
        self._direct: dict[str, tuple[Any, Any]] = {}
        self._holders = set(plan.held())  # GPU stages that keep a state between calls
        self._step: tuple[StepLibrary, StepCall] | None = None
        # the program as slot moves (None: the generic loop runs it)
        self._fast: FastPath | None = None
        self._fast_for: list[Any] | None = None  # the libraries it was built with
        self._enclave_stages = [s for s in plan.stages if s.side == ENCLAVE]
        self._open: object = None  # the generation whose state they hold
        # Enclave values that cross to the GPU unmasked (public, DP-sanitised, or unprotected).
        clear = {
            e.name for e in plan.edges if e.direction == "enclave->gpu" and e.name not in masked
        }
        # per stage, what the loop would otherwise work out on every call: where each extra
        # input comes from (0 the pads, 1 the corrections, 2 RNM's noise), and which of an
        # enclave stage's outputs the GPU also reads in the clear
        sources = {"mask": 0, "delta": 1}
        # per input, the positions of its dims that a plain name binds (a decode step has
        # 60 cache inputs: each call reads only these)
        self._named_dims = [
            (name, [(i, d) for i, d in enumerate(dims) if isinstance(d, str) and d.isidentifier()])
            for name, dims in plan.input_dims.items()
        ]
        # and its neighbour: a GPU stage's next stage (whose compiled library may check its
        # reply: partitioner.aot.FusedCheck), an enclave stage's previous one
        stages = plan.stages

        def neighbour(i: int) -> Stage | None:
            j = i + 1 if stages[i].side == GPU else i - 1
            return stages[j] if 0 <= j < len(stages) else None

        self._steps = [
            (
                stage,
                [(sources.get(kind, 2), name) for kind, name in stage.extra_inputs],
                [name for name in stage.outputs if name in clear],
                neighbour(i),
            )
            for i, stage in enumerate(stages)
        ]

    def _reply_specs(self) -> dict[str, list[tuple[torch.dtype, list[int | str]]]]:
        """Per GPU stage, each output's dtype and plan shape (from the edges it feeds)."""
        prot = self.spec.protection
        exact = prot.exact if prot is not None else None
        edges = {(e.producer, e.name): e for e in self.spec.edges}
        specs = {}
        for stage in self.spec.stages:
            if stage.side != GPU:
                continue
            outs = []
            for name in stage.outputs:
                edge = edges[(stage.name, name)]
                # residues cross as the ring's integers
                dtype = exact.ring[name] if exact is not None and name in exact.ring else edge.dtype
                outs.append((getattr(torch, dtype), edge.shape))
            specs[stage.name] = outs
        return specs

    def replies(self, binding: Mapping[str, int]) -> dict[str, Expected]:
        """What each GPU stage's reply must be for a call with these sizes (built once per
        distinct value of the dims the replies' shapes name)."""
        return self._replies_known(binding)[0]

    def _replies_known(self, binding: Mapping[str, int]) -> tuple[dict[str, Expected], bool]:
        """:meth:`replies`, and whether every reply's shape is known before it comes."""
        key = tuple((dim, binding.get(dim)) for dim in self._reply_dims)
        cached = self._expected.get(key)
        if cached is None:
            if len(self._expected) > _EXPECTED_CACHE:  # a long-running server's many sizes
                self._expected.clear()
            expected = {stage: self._expect(stage, binding) for stage in self._replies}
            known = all(shape is not None for outs in expected.values() for _, shape in outs)
            cached = self._expected[key] = (expected, known)
        return cached

    def _expect(self, stage: str, binding: Mapping[str, int]) -> Expected:
        out = []
        for dtype, shape in self._replies[stage]:
            try:
                out.append((dtype, tuple(concrete_shape(shape, binding))))
            except ValueError:  # a size the inputs do not name: check the dtype only
                out.append((dtype, None))
        return tuple(out)

    @property
    def stages(self) -> list[Stage]:
        return self.spec.stages

    @property
    def policy(self) -> Any:
        return self.spec.policy

    def plan(self) -> dict[str, Any]:
        """The plan's canonical description (as ``SplitProgram.plan()``)."""
        return self.spec.describe()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(args, kwargs)

    def run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        public_tokens: bool | torch.Tensor = False,
        last: bool = False,
        sequence: object = None,
        rows: Sequence[str] | None = None,
    ) -> Any:
        """One call; ``public_tokens`` (all, or a bool mask over the token input) marks token
        positions that RNM passes through unchanged and that spend no ε. ``last``: no call
        will continue from this one's state, so the stages holding it free it.

        ``rows`` (a scheduler batching many sequences): one sequence id per batch row. The
        GPU stages holding state keep each row's cache apart, addressed by its id, and the
        call's held stand-ins are as long as its longest row (the shorter rows left-padded,
        their ``padding`` input raised by as much); :meth:`release` frees finished rows.

        With states a GPU stage holds, an executor runs one generation at a time: a call
        whose states are empty starts one (``sequence`` names it), and a later call naming
        another sequence is refused (:class:`StateError`) instead of continuing on the cache
        of the generation that started since. ``generate`` names each of its generations.

        Public positions are those the GPU knows anyway or that carry nothing private: a
        generated token (the arg-max of logits the GPU computed in the clear; under RNM
        placements the lm_head runs there) and the chat template around a user's text.
        ``last_request["epsilon"]`` counts the sanitised positions only.
        """
        env = self.signature.bind(args, dict(kwargs))
        binding = self.binding(env)
        self.check_inputs(env, binding)
        if rows is not None:
            rows = list(rows)
            if len(rows) != binding.get("batch", len(rows)):
                raise InputError(f"{len(rows)} sequences named for {binding['batch']} rows")
        elif self._holders:
            self._follow(env, sequence)
        masks = self.pool.take(binding) if self.pool is not None else None
        prot = self.spec.protection
        site = prot.rnm if prot is not None else None
        public = None
        if site is not None and masks is not None and public_tokens is not False:
            ids = env[site.token_input]
            public = (
                torch.ones_like(ids, dtype=torch.bool)
                if public_tokens is True
                else public_tokens.to(torch.bool)
            )
            if public.shape != ids.shape:
                raise PartitionError(
                    f"public_tokens has shape {list(public.shape)}, but the token input "
                    f"{site.token_input} has {list(ids.shape)}"
                )
            noise = masks.noise[site.token_input]
            identity = site.tables.identity_noise(ids, noise.dtype)
            masks.noise[site.token_input] = torch.where(public[..., None], identity, noise)
        # the enclave never differentiates: without autograd's bookkeeping on each tensor
        # a replayed SmolLM2 decode step takes ~13 % less (benchmarks/README.md); what it
        # returns are inference tensors (read anywhere, written in place only in this mode)
        with torch.inference_mode():
            flat = self.execute(env, masks, binding, last, rows)
        if last:
            self._open = None
        if public is not None:
            sanitised = ~site.tables.keep[env[site.token_input]] & ~public
            # per row (a scheduler's batch of sessions: each is charged its own positions)
            counts = sanitised.reshape(sanitised.shape[0], -1).sum(-1).tolist()
            self.last_request["epsilon"] = float(site.epsilon * sum(counts))
            self.last_request["epsilon_rows"] = [float(site.epsilon * n) for n in counts]
        return pytree.tree_unflatten(flat, self.signature.out_spec)

    def release(self, rows: Sequence[str]) -> None:
        """Free the row-addressed sequences ``rows`` on every GPU stage that holds state."""
        for stage in sorted(self._holders):
            self.runner.release(stage, list(rows))

    def _follow(self, env: Mapping[str, Any], sequence: object) -> None:
        """Start or continue the generation whose cache the GPU stages hold."""
        held = [(n, s) for n, s in self.spec.state.items() if s.holder is not None]
        if any(isinstance(env.get(n), torch.Tensor) and env[n].shape[s.dim] == 0 for n, s in held):
            self._open = sequence
        elif sequence is not None and sequence is not self._open:
            raise StateError(
                "another generation started on this executor since this one began: the GPU "
                "holds its cache now (an executor with held state runs one at a time)"
            )

    def check_inputs(self, env: Mapping[str, Any], binding: Mapping[str, int]) -> None:
        """Refuse a request the program does not take, with an :class:`InputError` naming
        it: a size outside the range it was exported for (an empty prompt, a context longer
        than the model's), token ids that are not integers inside the vocabulary."""
        for name, value in binding.items():
            low, high = self.spec.dim_ranges.get(name, [0, None])
            if value < low or (high is not None and value > high):
                raise InputError(
                    f"{name} = {value} is outside the range the program takes "
                    f"[{low}, {'∞' if high is None else high}]"
                )
        token = self.spec.token_input
        ids = env.get(token) if token is not None else None
        if isinstance(ids, torch.Tensor) and ids.numel():
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise InputError(f"{token} must hold integer token ids, got {ids.dtype}")
            vocab = self.spec.vocab
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or (vocab is not None and high >= vocab):
                raise InputError(
                    f"{token} holds ids outside the vocabulary [0, {vocab}): min {low}, max {high}"
                )

    def binding(self, env: Mapping[str, Any]) -> dict[str, int]:
        """The named dims' values for one call (``{"batch": 1, "seq": 12}``), from the inputs.
        Raises :class:`InputError` naming two inputs that give one dim different values (a
        cache one position short): a compiled stage reads some inputs for their sizes only,
        and would otherwise compute on the wrong one."""
        out: dict[str, int] = {}
        for name, named in self._named_dims:
            value = env.get(name)
            if not isinstance(value, torch.Tensor):
                continue
            shape = value.shape
            for index, dim in named:
                if index < len(shape):
                    size = int(shape[index])
                    if out.setdefault(dim, size) != size:
                        raise InputError(
                            f"input {name} has {dim} = {size}, where input "
                            f"{self._first_naming(env, dim)} has {dim} = {out[dim]}"
                        )
        return out

    def _first_naming(self, env: Mapping[str, Any], dim: str) -> str:
        """The first input of a call that gives ``dim`` a value (for :meth:`binding`'s error:
        found when needed rather than recorded on every call)."""
        return next(
            name
            for name, named in self._named_dims
            if isinstance(env.get(name), torch.Tensor)
            and any(d == dim and i < env[name].dim() for i, d in named)
        )

    def execute(
        self,
        env: dict[str, Any],
        masks: MaskSet | None,
        binding: Mapping[str, int],
        last: bool = False,
        rows: list[str] | None = None,
    ) -> list[Any]:
        """Run the stages in order, keeping what the enclave and the GPU each hold apart.

        ``env`` is the enclave's plaintext; ``gpu`` what the GPU holds (masked where the plan
        masks); ``delta`` the corrections the enclave knows for masked GPU values; ``shadow``
        plaintext of GPU values that a product correction needs.
        """
        prot = self.spec.protection
        gpu: dict[str, Any] = {}
        delta: dict[str, Any] = {}
        shadow: dict[str, Any] = {}
        replies, known = self._replies_known(binding)
        copies = bool(getattr(self.runner, "copies_inputs", False))
        fast = self._fast_path(env, masks, known, rows)
        if fast is not None:
            clear, held = fast.run(
                env, masks, replies, self.runner.run, copies, self.library_check_rows
            )
            pooled_values = ChainMap(masks.deltas, masks.pads)
            return [self._output(v, clear, held, pooled_values) for v in self.spec.flat_outputs]
        if masks is not None:
            delta.update(masks.pads)
            delta.update(masks.deltas)
        step = self._step_call(replies, masks, rows)
        if step is not None and masks is not None:
            return run_step(self, step, env, masks, delta, binding, replies)
        checks = self.ring_checks
        pools = (masks.pads, delta, masks.noise) if masks is not None else None
        # the checks read the set's pads and corrections as numpy views made offline
        arrays = masks.arrays if masks is not None else {}
        float_checks = masks.freivalds if masks is not None else {}
        corrections = prot.corrections if prot is not None else {}
        pooled = prot.pooled if prot is not None else ()
        run = self.runner.run
        # a reply whose check the next stage's library makes: (its check, what was sent,
        # the reply), until that stage has run; and the GPU stage whose reply the executor
        # checked last, which that library then unmasks without checking it again
        deferred: tuple[Any, list[Any], list[Any]] | None = None
        verified: str | None = None
        for stage, extras, clear_outputs, neighbour in self._steps:
            if stage.side == ENCLAVE:
                args = [env[n] if n in env else gpu[n] for n in stage.inputs]
                if extras:
                    args += [pools[k][name] for k, name in extras]
                module = self._module(stage)  # refuses a library that checks another stage
                if stage.compiled is not None and stage.compiled.verifies is not None:
                    # the reply of the GPU stage before it is checked in its library,
                    # unless the executor checked it as it came (a request of many rows)
                    check = checks[neighbour.name]
                    here = deferred is not None
                    # unreachable today (_module refuses a library whose GPU stage has no
                    # check first): the one place that would otherwise pass a reply unchecked
                    if not here and verified != neighbour.name:
                        raise IntegrityError(
                            f"GPU stage {neighbour.name}: its reply reached enclave stage "
                            f"{stage.name} unchecked"
                        )
                    sent = (
                        deferred[1]
                        if here
                        else [gpu[n] if n in gpu else env[n] for n in neighbour.inputs]
                    )
                    pads = [delta.get(n) for n in neighbour.inputs]
                    deferred = verified = None
                    try:
                        outs = module(*args, checks=check.fused_args(sent, pads, here))
                    except IntegrityError:
                        check.draw()  # a failed check told the GPU something about s
                        raise
                else:
                    if deferred is not None:  # the library that was to check it is gone
                        self._check_now(neighbour, deferred, delta)
                        deferred = None
                    outs = module(*args)
                n = len(stage.outputs)
                env.update(zip(stage.outputs, outs[:n], strict=True))
                if stage.masked_outputs:
                    gpu.update(zip(stage.masked_outputs, outs[n:], strict=True))
                for name in clear_outputs:
                    gpu[name] = env[name]
                continue
            name = stage.name
            sent = [gpu[n] if n in gpu else env[n] for n in stage.inputs]
            expected = replies[name]
            check = checks.get(name)
            # the next stage's compiled library checks this reply before anything reads it,
            # if the request is of few rows
            fused = (
                check is not None
                and fastpath.checked_by_next(stage, neighbour)
                and fastpath.request_rows(sent[check.sources[0]]) <= self.library_check_rows
            )
            sums = None
            handed = sent
            if check is not None:
                # the check's right-hand side from the enclave's own tensors, before the
                # GPU has them; a runner in this process that could edit what it is handed
                # gets copies, so that no later stage reads an edited request either
                if not fused:
                    pads = [arrays[n] if n in arrays else delta.get(n) for n in stage.inputs]
                    sums = check.expect(sent, pads)
                if not copies:
                    handed = [t.clone() for t in sent]
                elif fused:  # checked after the call: on what was sent, whatever the runner does
                    sent = [t.clone() for t in sent]
            if name not in self._holders:
                outs = run(name, handed, expected)
            elif rows is not None:
                outs = run(name, handed, expected, rows=rows)
            elif last:
                outs = run(name, handed, expected, end=True)
            else:
                outs = run(name, handed, expected)
            outs = snapshot(outs)
            check_reply(name, outs, expected)
            gpu.update(zip(stage.outputs, outs, strict=True))
            if name in float_checks:
                integrity.check(name, float_checks[name], sent, list(outs))
            corr = corrections.get(name)
            if corr is not None and name not in pooled:
                results = corr.module(
                    *(delta[n] for n in corr.delta_inputs),
                    *(self._primal(n, env, shadow) for n in corr.primal_inputs),
                )
                k = len(corr.delta_outputs)
                delta.update(zip(corr.delta_outputs, results[:k], strict=True))
                shadow.update(zip(corr.primal_outputs, results[k:], strict=True))
            if fused:
                deferred = (check, sent, list(outs))
            elif check is not None:
                # checked now, before any enclave stage reads the reply: a stage that
                # refused what a wrong value became (a NaN, a norm past its limit) would
                # end the call at a point that depends on the private data; a failed
                # check ends it where the GPU lied, which the GPU knows anyway
                deltas = [arrays[n] if n in arrays else delta.get(n) for n in stage.outputs]
                check.verify(sums, list(outs), deltas)
                verified = name
        if prot is not None and prot.rnm is not None:
            site = prot.rnm
            self.last_request = {
                "sanitised_tokens": env[site.sanitised],
                "epsilon": site.tables.request_epsilon(env[site.token_input]),
                "epsilon_per_token": site.epsilon,
                # the classes the policy made public (the special tokens always are)
                "public_classes": sorted({"special", *site.public}),
            }
        return [self._output(v, env, gpu, delta) for v in self.spec.flat_outputs]

    def _fast_path(
        self,
        env: dict[str, Any],
        masks: MaskSet | None,
        known: bool,
        rows: list[str] | None,
    ) -> FastPath | None:
        """The program as slot moves (``enclave_runtime.fastpath``) when this call can run so:
        a mask set drawn, no rows to address, and every reply's shape ``known`` before it comes
        (``check_reply`` then vouches for every reply's shape, which the fast path's skipped
        input scans rely on). ``None``: the generic loop runs the call."""
        if masks is None or rows is not None or not known:
            return None
        # built again when what runs a stage changes: its library swapped (or first given
        # one), its module, what resolves a stage to its callable (a benchmark's timers), or
        # a step library given to the plan (which the generic loop then runs)
        libraries = [
            self.spec.step,
            self.__dict__.get("_module"),
            type(self)._module,
            *(s.compiled if s.compiled is not None else s.module for s in self._enclave_stages),
        ]
        if self._fast_for is None or not all(map(operator.is_, libraries, self._fast_for)):
            self._fast = fastpath.build(self, env, masks)
            self._fast_for = libraries
        return self._fast

    def _step_call(
        self, replies: dict[str, Expected], masks: MaskSet | None, rows: list[str] | None
    ) -> StepCall | None:
        """The plan's step library (``partitioner.aot_step``) when this call can run it:
        a mask set drawn, no rows to address, and every reply's shape known before it
        comes (the library indexes replies by the shapes it computed)."""
        library = self.spec.step
        if library is None or masks is None or rows is not None:
            return None
        if any(shape is None for expected in replies.values() for _, shape in expected):
            return None
        if self._step is None or self._step[0] is not library:
            why = self.spec.between_stages()
            if why is not None:
                raise ArtifactError(f"the plan has a step library, but cannot run as one: {why}")
            missing = sorted(StepCall.checked_stages(library) - set(self.ring_checks))
            if missing:
                raise ArtifactError(
                    f"the step library checks GPU stages {missing}, which this plan does "
                    "not check in the ring"
                )
            self._step = (library, StepCall(library))
        return self._step[1]

    def _module(self, stage: Stage) -> Any:
        """The enclave stage's compiled library when it has one (``partitioner.aot``), else
        its module with its ``teesplit::`` calls made directly
        (:func:`partitioner.ops.direct_calls`), built once per module object."""
        source = stage.compiled if stage.compiled is not None else stage.module
        cached = self._direct.get(stage.name)
        if cached is None or cached[0] is not source:
            if isinstance(source, CompiledLibrary):
                run = CompiledCall(stage.name, source)
                if source.verifies is not None:
                    self._check_fused(stage, source.verifies)
            elif isinstance(source, torch.fx.GraphModule):
                run = direct_calls(source)
            else:
                run = source
            cached = self._direct[stage.name] = (source, run)
        return cached[1]

    @staticmethod
    def _check_now(gpu: Stage, deferred: tuple[Any, list[Any], list[Any]], delta: dict) -> None:
        """The numpy check of a reply that a library was to check, when the stage after it
        no longer runs that library (its ``compiled`` swapped since the reply came)."""
        check, sent, outs = deferred
        pads = [delta.get(n) for n in gpu.inputs]
        check.check(sent, outs, pads, [delta.get(n) for n in gpu.outputs])

    def _check_fused(self, stage: Stage, verifies: tuple[str, tuple[int, ...]]) -> None:
        """Refuse a library that checks a reply this plan does not check that way: it must
        follow the GPU stage it verifies, whose ring check has the library's equations
        (otherwise the executor would skip a check no one makes)."""
        gpu, sources = verifies
        previous = next((n for s, _, _, n in self._steps if s is stage), None)
        check = self.ring_checks.get(gpu)
        if previous is None or previous.name != gpu or check is None or check.sources != sources:
            raise ArtifactError(
                f"enclave stage {stage.name}: its compiled library checks GPU stage {gpu} "
                f"(equations on inputs {list(sources)}), which this plan does not place "
                "before it with that check"
            )

    def _output(self, value: Any, env: dict[str, Any], gpu: dict[str, Any], delta: dict) -> Any:
        if not isinstance(value, str):
            return value
        if value in env:
            return env[value]
        prot = self.spec.protection
        if prot is not None and value in prot.gpu_masked:
            exact = prot.exact
            if exact is not None and value in exact.row_outputs:
                return ops.ring_unmask_rows(
                    gpu[value], delta[value], exact.inv_scale[value], exact.bias.get(value)
                )
            if exact is not None:
                return ops.ring_unmask(gpu[value], delta[value], exact.inv_scale[value])
            return ops.unmask(gpu[value], delta[value])
        return gpu[value]

    def _primal(self, name: str, env: dict[str, Any], shadow: dict[str, Any]) -> Any:
        """A correction's plaintext operand; under exact masking, the integers the GPU's
        residues stand for (the enclave's plaintext quantised exactly as it was masked)."""
        if name not in env:
            return shadow[name]
        exact = self.spec.protection.exact
        if exact is not None and name in exact.row_limit:
            zero = torch.zeros((), dtype=torch.int32)
            return ops.ring_mask_rows(env[name], zero, exact.row_limit[name])
        if exact is not None and name in exact.frac_bits:
            zero = torch.zeros((), dtype=getattr(torch, exact.ring[name]))
            return ops.ring_mask(env[name], zero, exact.frac_bits[name], exact.limit[name])
        return env[name]
