"""Enclave stages compiled ahead of time (``partitioner.aot``, ``enclave_runtime.compiled``).

What must hold: the lowered graphs (ring ops spelled in aten) compute what the eager kernels
compute, bit for bit; a compiled library refuses what the eager kernels refuse; a bundle's
libraries are loaded only if they are the ones ``plan.json`` lists.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

import numpy as np
import pytest
import torch
from adversary import EditingRunner
from conftest import captured

from enclave_runtime.compiled import CompiledCall
from enclave_runtime.executor import Executor, InProcessRunner
from enclave_runtime.integrity import RingCheck
from partitioner import ops
from partitioner.aot import compile_library, fused_check, input_specs, lower
from partitioner.api import partition
from partitioner.bundle import AOT_INDEX, load_program
from partitioner.errors import ArtifactError, InputError, IntegrityError
from partitioner.plan import CompiledLibrary

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 128, 64]])
ONE = torch.ones(1, dtype=torch.int64)


@functools.cache
def slalom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return partition(captured("tiny-llama"), "slalom", seed=5)


def stage_calls(split, ids=IDS):
    """Each enclave stage's arguments in one request, and the eager outputs."""
    ex = split.executor(seed=3)
    calls = {}
    direct = ex._module

    def recording(stage):
        module = direct(stage)

        def run(*args):
            outs = module(*args)
            calls[stage.name] = (args, outs)
            return outs

        return run

    ex._module = recording
    with torch.no_grad():
        ex(input_ids=ids)
    return calls


def test_lowered_stages_equal_the_eager_kernels_bit_for_bit():
    split = slalom()
    calls = stage_calls(split)
    rings = 0
    for stage in split.stages:
        if stage.side != "enclave":
            continue
        lowered = lower(stage.module)
        args, eager = calls[stage.name]
        with torch.no_grad():
            outs = list(lowered.module(*args, *lowered.constants))
        if lowered.checks:
            assert bool(outs.pop()), stage.name
        assert len(outs) == len(eager), stage.name
        for got, want in zip(outs, eager, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), stage.name
            rings += got.dtype == torch.int32
    assert rings >= 5  # masked values were among what was compared


def test_layers_share_their_compiled_code():
    split = slalom()
    keys = [lower(s.module).key for s in split.stages if s.side == "enclave"]
    assert len(set(keys)) < len(keys) - 2  # 2 layers of stages, a handful of structures


def test_lowered_mask_refuses_what_the_eager_kernel_refuses():
    r = torch.zeros(2, 9, dtype=torch.int32)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 8)
        x[1, 3] = bad
        with pytest.raises(InputError):
            ops.ring_mask_rows(x, r, 1000)
        module = torch.fx.symbolic_trace(_MaskRows())
        lowered = lower(module)
        *_, flag = lowered.module(x, r, *lowered.constants)
        assert not bool(flag)


def test_rows_no_exponent_can_carry_are_refused_by_both_kernels():
    """A float64 row whose norm overflows, and a norm limit below the rounding's slack: the
    eager kernel used to emit a garbage exponent, the compiled one a zero row."""
    cases = [
        (torch.tensor([[1.7e308, 1.7e308, 0.0, 0.0]], dtype=torch.float64), 1000),
        (torch.randn(4, 8), 2),
    ]
    for x, limit in cases:
        r = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=torch.int32)
        with pytest.raises(InputError):
            ops.ring_mask_rows(x, r, limit)
        lowered = lower(torch.fx.symbolic_trace(_MaskRows(limit)))
        *_, flag = lowered.module(x, r, *lowered.constants)
        assert not bool(flag)


class _MaskRows(torch.nn.Module):
    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return ops.OPS.ring_mask_rows(x, r, self.limit)


class _Recording:
    """Stands in for an enclave stage whose compiled library checks the reply before it:
    records what the executor hands it (the stage's inputs and the check's vectors) and
    runs the eager stage."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __call__(self, *args, checks=()):
        self.calls.append((args, list(checks)))
        return self.module(*args)


def fused_call(split, stage, verify, ids=IDS):
    """One request's inputs of ``stage`` and the fused check's vectors, as the executor
    hands them to a library that makes ``verify``; and the eager outputs."""
    ex = split.executor(seed=3)
    ex.library_check_rows = ids.shape[1]  # the library checks this request's replies
    direct = ex._module
    recording = _Recording(ops.direct_calls(stage.module))
    ex._module = lambda s: recording if s is stage else direct(s)
    # what the executor reads to hand a stage the check's vectors (never loaded here)
    stage.compiled = CompiledLibrary("unused", (), True, (), (verify.stage, verify.sources))
    try:
        with torch.no_grad():
            ex(input_ids=ids)
    finally:
        stage.compiled = None
    ((args, checks),) = recording.calls
    return args, checks, recording.module(*args)


def _fusable(split):
    """The first enclave stage (unmask, residual, RMSNorm, mask) that unmasks the reply of
    a checked GPU stage right before it, with its position and the check to fuse."""
    for position, stage in enumerate(split.stages):
        nodes = stage.module.graph.nodes if stage.side == "enclave" else []
        if (
            any(n.target == ops.OPS.ring_unmask_rows.default for n in nodes)
            and any(n.target == ops.OPS.ring_mask_rows.default for n in nodes)
            and not any("attention" in str(n.target) for n in nodes)
            and fused_check(split, position) is not None
        ):
            return position, stage, fused_check(split, position)
    raise AssertionError("no enclave stage follows a checked GPU stage")


@pytest.fixture(scope="module")
def compiled_stage(tmp_path_factory):
    """One stage of the split (unmask, residual, RMSNorm, mask) compiled to a library, as
    ``compile_enclave`` compiles it: with the Freivalds check of the GPU stage before it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(captured("tiny-llama"), "slalom", seed=5)
    _, stage, verify = _fusable(split)
    lowered = lower(stage.module, verify)
    path = tmp_path_factory.mktemp("aot") / f"{lowered.key}.so"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the library is must not depend on it (test below)
    try:
        compile_library(split, lowered, path)
    finally:
        torch.set_num_threads(threads)
    library = CompiledLibrary(
        str(path),
        tuple(lowered.constants),
        lowered.checks,
        input_specs(split, lowered),
        (verify.stage, verify.sources),
    )
    call = CompiledCall(stage.name, library)
    return split, stage, call, library, fused_call(split, stage, verify)


def _zero_check(checks):
    """Check vectors under which any reply passes (``a``, ``κ``, ``s`` all zero; the check
    still made, the last entry kept): for reaching what the stage refuses after the check."""
    *pairs, vector = checks
    zero = torch.zeros_like(vector)
    zero[-1] = vector[-1]
    return [*pairs, zero]


def test_a_compiled_stage_computes_the_eager_stage(compiled_stage):
    _, stage, call, _, (args, checks, eager) = compiled_stage
    outs = call(*args, checks=checks)
    assert len(outs) == len(eager)
    for got, want in zip(outs, eager, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == torch.int32:  # masked residues: exact
            assert torch.equal(got, want)
        else:  # a reduction may be summed in another order: the last bit may differ
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    # the library takes other sizes of its dynamic dims (here one position, as in decode);
    # the check holds row by row, so the last position of each value still passes it
    def last(a):
        return a[:, -1:].contiguous() if a.dim() >= 2 and a.shape[1] == IDS.shape[1] else a

    one, one_checks = [last(a) for a in args], [last(c) for c in checks]
    direct = ops.direct_calls(stage.module)
    for got, want in zip(call(*one, checks=one_checks), direct(*one), strict=True):
        assert got.shape == want.shape


def test_a_library_has_no_openmp_region(compiled_stage):
    """Libraries are single-threaded code (``partitioner.aot_compiler``): what the compiling
    process's thread count was must not change the library its key names. A library with a
    parallel region calls the OpenMP runtime to start it (``GOMP_parallel`` in GCC's,
    ``__kmpc_fork_call`` in LLVM's); the fixture compiles it with two torch threads."""
    *_, library, _ = compiled_stage
    with open(library.path, "rb") as f:
        code = f.read()
    assert b"GOMP_parallel" not in code and b"__kmpc_fork_call" not in code


def test_a_compiled_stage_checks_the_reply_it_unmasks(compiled_stage):
    """The GPU stage's Freivalds check, compiled into the stage that unmasks its reply: a
    reply changed by one unit, by 2**31 (the int32 ring's half) or in its exponent column
    is refused as the GPU's, and an honest one passes (the products and sums of the check
    wrap mod 2**64 in compiled int64 code as in numpy's uint64: ``a`` and ``s`` are uniform
    over 64 bits, so every honest product overflows)."""
    _, _, call, library, (args, checks, _) = compiled_stage
    gpu = library.verifies[0]
    call(*args, checks=checks)
    reply = next(i for i, a in enumerate(args) if a.dtype == torch.int32)
    for change in (
        lambda t: t[0, 3, 7].add_(1),
        lambda t: t[0, 0, 0].add_(2**31),
        lambda t: t[..., -1].sub_(2**30),
    ):
        hostile = [a.clone() for a in args]
        change(hostile[reply])
        with pytest.raises(IntegrityError, match=f"GPU stage {gpu} returned results that fail"):
            call(*hostile, checks=checks)


def test_a_compiled_stage_refuses_a_value_it_cannot_mask(compiled_stage):
    """A GPU that shifts the masked exponent column of its reply makes the unmasked value
    overflow to inf (and NaN after the non-linearity): the mask that follows must refuse it,
    compiled as eager, instead of sending the GPU a residue that stands for nothing. The
    reply's check comes first (above); with check vectors that pass anything, the mask's
    own refusal is what remains."""
    _, stage, call, _, (args, checks, _) = compiled_stage
    hostile = [a.clone() for a in args]
    reply = next(i for i, a in enumerate(hostile) if a.dtype == torch.int32)
    hostile[reply][..., -1] -= 2**30  # 2**-e becomes 2**(2**30 + ...): inf
    with pytest.raises(InputError):
        ops.direct_calls(stage.module)(*hostile)
    with pytest.raises(InputError, match="NaN or inf"):
        call(*hostile, checks=_zero_check(checks))
    with pytest.raises(IntegrityError, match="Freivalds"):  # the check's verdict first
        call(*hostile, checks=checks)


def test_a_failed_check_leaves_the_stage_no_reply_to_work_on(compiled_stage):
    """After a failed check the stage's work must not depend on what the GPU wrote (its
    time could tell the GPU about the data it was combined with): the lowered graph unmasks
    a refused reply to zeros. Run eagerly, a stage given a forged reply computes exactly
    what it computes given its correction as the reply."""
    split, stage, _, _, (args, checks, _) = compiled_stage
    lowered = lower(stage.module, fused_check(split, split.stages.index(stage)))
    reply = next(i for i, a in enumerate(args) if a.dtype == torch.int32)
    delta = len(stage.inputs) + stage.extra_inputs.index(("delta", stage.inputs[reply]))

    def run(values):
        with torch.no_grad():
            return list(lowered.module(*values, *checks, *lowered.constants))

    forged = [a.clone() for a in args]
    forged[reply][0, 2, 5] += 12345
    zeroed = list(args)
    zeroed[reply] = args[delta]  # unmasks to zeros
    got, want = run(forged), run(zeroed)
    assert not bool(got[-2]) and not bool(want[-2])  # both fail the check
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert bool(run(list(args))[-2])  # the honest reply passes


def test_a_compiled_stage_takes_a_view_as_its_contiguous_copy(compiled_stage):
    """The library's own checks refuse strides it was not compiled for; an input that is a
    view (a slice of a longer row, a row expanded with stride 0) runs as its contiguous copy,
    with the same outcome, and leaves what it was handed unchanged."""
    _, _, call, _, (args, checks, _) = compiled_stage
    want = call(*args, checks=checks)
    for index in (0, next(i for i, a in enumerate(args) if a.dtype == torch.int32)):
        wide = torch.cat([args[index], args[index]], dim=-1)
        viewed = list(args)
        viewed[index] = wide[..., : args[index].shape[-1]]  # same values, a longer row
        assert not viewed[index].is_contiguous()
        before = viewed[index].clone()
        got = call(*viewed, checks=checks)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(viewed[index], before)
    # a stride-0 view (one row read for every row) is its copy's values, never a short read
    rows = args[0].shape[-2]
    assert rows > 1
    spread = list(args)
    spread[0] = args[0][..., :1, :].expand_as(args[0])
    copied = list(spread)
    copied[0] = spread[0].contiguous()

    def outcome(inputs):  # its outputs, or what it refuses (these rows are not a real reply)
        try:
            return call(*inputs, checks=_zero_check(checks))
        except (IntegrityError, InputError) as exc:
            return f"{type(exc).__name__}: {exc}"

    got, want = outcome(spread), outcome(copied)
    if isinstance(want, str):
        assert got == want
    else:
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_a_compiled_stage_refuses_inputs_of_the_wrong_shape(compiled_stage):
    """Compiled code indexes memory by the sizes it is given: a GPU reply one position
    shorter than the correction it is unmasked with, or one column short, must be refused
    before the library reads it (eager ops raise on their own; compiled code would read
    past the end)."""
    _, stage, call, _, (args, checks, _) = compiled_stage
    reply = next(i for i, a in enumerate(args) if a.dtype == torch.int32)
    # the last: a reply with no positions, which the library's own checks pass whatever
    # its sizes (a reviewer's finding: read as the full shape, SIGSEGV)
    for cut in (lambda t: t[:, :-1], lambda t: t[..., :-1], lambda t: t[0], lambda t: t[:, :0]):
        hostile = list(args)
        hostile[reply] = cut(args[reply]).contiguous()
        with pytest.raises(IntegrityError, match=f"enclave stage {stage.name} input"):
            call(*hostile, checks=checks)
    wrong_dtype = list(args)
    wrong_dtype[reply] = args[reply].to(torch.int64)
    with pytest.raises(IntegrityError):
        call(*wrong_dtype, checks=checks)


class _Forging(InProcessRunner):
    """A GPU that adds one to one residue of one stage's reply."""

    def __init__(self, plan, target):
        super().__init__(plan)
        self.target = target

    def run(self, stage, tensors, expected=None, **kw):
        outs = super().run(stage, tensors, expected, **kw)
        if stage == self.target:
            outs = [o.clone() for o in outs]
            outs[0].view(-1)[7] += 1
        return outs


def test_the_executor_leaves_a_fused_check_to_the_library(compiled_stage, monkeypatch):
    """With the library attached, the executor hands it the check's vectors and makes no
    check of its own on that reply (numpy's ``verify`` is made to fail the test if it is
    called for it), so the library's check is the only one: a forged reply is refused
    through it, naming the GPU stage, and the secret ``s`` is drawn again."""
    split, stage, _, library, _ = compiled_stage
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1])
    gpu = library.verifies[0]
    verify = RingCheck.verify

    def only_others(self, *a):
        assert self.stage != gpu, "the executor checked a reply its library checks"
        return verify(self, *a)

    with torch.no_grad():
        want = split.executor(seed=3)(input_ids=IDS).logits
        monkeypatch.setattr(RingCheck, "verify", only_others)
        monkeypatch.setattr(stage, "compiled", library)
        got = split.executor(seed=3)(input_ids=IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ex = split.executor(_Forging(split.spec, gpu), seed=3)
        s = ex.ring_checks[gpu].vectors[0][0].clone()
        with pytest.raises(IntegrityError, match=f"GPU stage {gpu} returned results that fail"):
            ex(input_ids=IDS)
        assert not torch.equal(s, ex.ring_checks[gpu].vectors[0][0])


def test_by_default_the_library_checks_a_prefill_too(compiled_stage, monkeypatch):
    """With ``library_check_rows`` as shipped, a request of many rows (48 positions, past
    the 16 the executor used to check itself) is checked by the library, and a forged
    reply is refused there, naming the GPU stage, with no numpy check of that reply."""
    split, stage, _, library, _ = compiled_stage
    gpu = library.verifies[0]
    monkeypatch.setattr(stage, "compiled", library)
    numpy_checks = []
    verify = RingCheck.verify

    def counting(self, *a):
        numpy_checks.append(self.stage)
        return verify(self, *a)

    monkeypatch.setattr(RingCheck, "verify", counting)
    ids = (torch.arange(48) * 37 % 250 + 1)[None]
    with torch.no_grad():
        ex = split.executor(_Forging(split.spec, gpu), seed=3)
        with pytest.raises(IntegrityError, match=rf"GPU stage {gpu} .*made in enclave stage"):
            ex(input_ids=ids)
    assert gpu not in numpy_checks


def test_a_request_of_many_rows_is_checked_by_the_executor(compiled_stage, monkeypatch):
    """Past ``library_check_rows`` the executor checks the reply in numpy as it comes and
    tells the library so (the check vector's last entry 0): the library then unmasks the
    reply without checking it again, and a forged reply is refused by the executor's check,
    before the stage runs. A library told so passes anything: the executor's check is the
    only one."""
    split, stage, call, library, (args, checks, _) = compiled_stage
    gpu = library.verifies[0]
    monkeypatch.setattr(stage, "compiled", library)
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1] - 1)
    told, numpy_checks = [], []
    fused_vector, verify = RingCheck.fused_vector, RingCheck.verify

    def telling(self, here=True):  # what either loop tells the library (its vector's flag)
        told.append(here)
        return fused_vector(self, here)

    def counting(self, *a):
        numpy_checks.append(self.stage)
        return verify(self, *a)

    monkeypatch.setattr(RingCheck, "fused_vector", telling)
    monkeypatch.setattr(RingCheck, "verify", counting)
    with torch.no_grad():
        ex = split.executor(_Forging(split.spec, gpu), seed=3)
        with pytest.raises(IntegrityError, match=rf"GPU stage {gpu} returned .* row \["):
            ex(input_ids=IDS)
        assert told == []  # refused as it came: the stage never ran
        numpy_checks.clear()
        split.executor(seed=3)(input_ids=IDS[:, :4])  # 4 rows: the library checks
        assert told == [True] and gpu not in numpy_checks
        got = split.executor(seed=3)(input_ids=IDS).logits  # 9 rows: the executor does
        assert told == [True, False] and gpu in numpy_checks
        monkeypatch.setattr(stage, "compiled", None)
        want = split.executor(seed=3)(input_ids=IDS).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(stage, "compiled", library)
    # told that the executor checked, the library does not check the reply
    reply = fused_check(split, split.stages.index(stage)).outputs[0][1]
    forged = list(args)
    forged[reply] = args[reply].clone()
    forged[reply].view(-1)[7] += 1
    with pytest.raises(IntegrityError, match=f"GPU stage {gpu} returned results that fail"):
        call(*forged, checks=checks)
    off = [*checks[:-1], checks[-1].clone()]
    off[-1][-1] = 0
    call(*forged, checks=off)


class _Swapping(_Forging):
    """Forges the reply, and takes the library that was to check it off the next stage
    while the reply is in flight (a stage's ``compiled`` replaced between two stages)."""

    def __init__(self, plan, target, stage):
        super().__init__(plan, target)
        self.stage = stage

    def run(self, stage, tensors, expected=None, **kw):
        if stage == self.target:
            self.stage.compiled = None
        return super().run(stage, tensors, expected, **kw)


def test_a_reply_whose_library_is_gone_is_checked_by_the_executor(compiled_stage, monkeypatch):
    """The executor skips its own check of a reply when the next stage's library makes
    it; if that library is gone by the time the stage runs, the executor checks the reply
    itself before the stage reads it (before: the stage read it unchecked)."""
    split, stage, _, library, _ = compiled_stage
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1])
    monkeypatch.setattr(stage, "compiled", library)
    gpu = library.verifies[0]
    ex = split.executor(_Swapping(split.spec, gpu, stage), seed=3)
    with pytest.raises(IntegrityError, match=f"GPU stage {gpu} returned results that fail"):
        with torch.no_grad():
            ex(input_ids=IDS)
    assert stage.compiled is None  # the swap happened


def test_a_fused_check_is_made_on_what_was_sent(compiled_stage, monkeypatch):
    """The compiled check runs after the GPU call: its right-hand side must still be what
    the enclave sent, not a request a runner edited in place afterwards (the reply to the
    edited request is consistent with it, and passed a check made on it)."""
    split, stage, _, library, _ = compiled_stage
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1])
    monkeypatch.setattr(stage, "compiled", library)
    gpu = library.verifies[0]
    ex = split.executor(EditingRunner(split.spec, gpu), seed=3)
    with pytest.raises(IntegrityError, match=f"GPU stage {gpu} returned results that fail"):
        with torch.no_grad():
            ex(input_ids=IDS)


def test_the_compiled_check_wraps_as_the_numpy_check(compiled_stage):
    """The check's int64 products and sums overflow on every honest input (``a`` and ``s``
    are uniform over 64 bits); compiled C++ must wrap them mod 2**64 as numpy's uint64 does.
    Random residues, pads, corrections and vectors, with ``κ`` solved in numpy so that the
    equation holds, at row counts around the vector width: the library's flag is set, and
    cleared when the last row's last residue is off by one."""
    split, stage, call, _, (args, checks, _) = compiled_stage
    verify = fused_check(split, split.stages.index(stage))
    assert len(verify.sources) == 1  # one equation: the outputs read one input
    generator = torch.Generator().manual_seed(11)
    width_in = checks[0].shape[-1]
    widths = [args[reply].shape[-1] for _, reply, _ in verify.outputs]
    assert checks[2].numel() == width_in + 1 + sum(widths) + 1  # and last, "check here"

    def ints(*shape, dtype=torch.int32):
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, dtype=dtype, generator=generator)

    def u64(t):
        return t.numpy().astype(np.int64).view(np.uint64)

    def residue(d):  # a difference in Z_2^32, as its signed residue, sign-extended
        return d.astype(np.uint32).astype(np.int32).astype(np.int64).view(np.uint64)

    def grow(t, rows):
        if t.dim() < 2 or t.shape[1] != IDS.shape[1]:
            return t
        return t.repeat(1, -(-rows // t.shape[1]), *[1] * (t.dim() - 2))[:, :rows].contiguous()

    for rows in (1, 7, 9, 17):
        replies = [(ints(1, 1, w), ints(1, 1, w), ints(w, dtype=torch.int64)) for w in widths]
        x, r, a = ints(1, 1, width_in), ints(1, 1, width_in), ints(width_in, dtype=torch.int64)
        lhs = sum(residue(u64(y) - u64(c)) @ u64(v) for y, c, v in replies)
        rhs = residue(u64(x) - u64(r)) @ u64(a)
        kappa = np.asarray((lhs - rhs).reshape(-1)[0], dtype=np.uint64).view(np.int64)
        vec = torch.cat([a, torch.tensor([int(kappa)]), *(v for _, _, v in replies), ONE])
        for off, want in ((0, True), (1, False)):  # holds in every row; the last off by one
            values = [grow(t, rows) for t in args]
            for (_, reply, delta), (y, c, _) in zip(verify.outputs, replies, strict=True):
                values[reply], values[delta] = y.repeat(1, rows, 1), c.repeat(1, rows, 1)
            values[verify.outputs[-1][1]][0, -1, -1] += off
            extra = [x.repeat(1, rows, 1), r.repeat(1, rows, 1), vec]
            assert bool(call._runner.run(values + extra + call.constants)[-2]) == want, rows


def test_a_library_checking_another_stage_is_refused(compiled_stage, monkeypatch):
    """The executor skips its own check of a reply only where the plan has that check
    right before the library: one that claims another stage, or other equations, is
    refused before it runs (else nothing would check the reply)."""
    split, stage, _, library, _ = compiled_stage
    other = next(s.name for s in split.stages if s.side == "gpu" and s.name != library.verifies[0])
    for verifies in ((other, library.verifies[1]), (library.verifies[0], (1,))):
        monkeypatch.setattr(stage, "compiled", dataclasses.replace(library, verifies=verifies))
        with pytest.raises(ArtifactError, match=f"enclave stage {stage.name}: its compiled"):
            split.executor(seed=3)(input_ids=IDS)


def test_a_bundle_index_names_what_a_library_verifies():
    from partitioner.bundle import _verifies

    assert _verifies(None, "x") is None
    assert _verifies(["gpu_1", [0, 2]], "x") == ("gpu_1", (0, 2))
    for bad in (["gpu_1"], ["gpu_1", []], ["gpu_1", [-1]], [1, [0]], ["gpu_1", [True]], "gpu_1"):
        with pytest.raises(ArtifactError, match="expected null or"):
            _verifies(bad, "x")


def test_an_index_of_an_older_check_format_is_refused():
    """A library compiled before the check vector's last entry (format 1) takes a shorter
    vector: the bundle is refused on load, naming the stage, not failed on every call."""
    from partitioner.bundle import AOT_FORMAT, _check_format

    entry = {"verifies": ["gpu_1", [0]]}
    _check_format({"format": AOT_FORMAT}, {"enclave_2": entry})
    _check_format({}, {"enclave_2": {**entry, "verifies": None}})  # format 1, none verifies
    with pytest.raises(ArtifactError, match=r"stage enclave_2's library .* compile the bundle"):
        _check_format({}, {"enclave_2": entry})
    for bad in (3, "2", True, None):
        with pytest.raises(ArtifactError, match="is not one this runtime reads"):
            _check_format({"format": bad}, {})


@pytest.fixture(scope="module")
def compiled_bundle(tmp_path_factory, key_files):
    """cmif on tiny-llama (one enclave stage: the embedding and RNM), saved compiled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(captured("tiny-llama"), "cmif", seed=9)
    root = tmp_path_factory.mktemp("bundle")
    split.save(root, sign_key=key_files[0], compile_enclave=True)
    return split, root, key_files[1]


def test_a_compiled_bundle_runs_as_the_eager_program(compiled_bundle):
    _, root, public = compiled_bundle
    index = json.loads((root / AOT_INDEX).read_text())
    assert index["stages"] and not index["eager"]
    plan = load_program(root, trusted_key=public)
    assert all(s.compiled is not None for s in plan.stages if s.side == "enclave")
    from enclave_runtime.executor import Executor

    compiled, eager = Executor(plan, seed=1), Executor(plan, seed=1)
    with torch.no_grad():
        got = compiled(input_ids=IDS)
        for stage in plan.stages:
            stage.compiled = None
        want = eager(input_ids=IDS)
    # the same noise picks the same tokens; the rotary tables may differ in their last bit
    sanitised = [ex.last_request["sanitised_tokens"] for ex in (compiled, eager)]
    assert torch.equal(*sanitised) and not torch.equal(sanitised[0], IDS)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_an_unsigned_bundle_may_not_carry_compiled_code(compiled_bundle):
    """Without a signature, whoever can write the folder would choose the enclave's native
    code: the operator's opt-out covers stage graphs, not machine code."""
    _, root, _ = compiled_bundle
    with pytest.raises(ArtifactError, match="unsigned bundle may not carry"):
        load_program(root, allow_unsigned=True)


def test_a_swapped_library_is_refused_before_it_is_loaded(compiled_bundle, tmp_path):
    import shutil

    _, root, public = compiled_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    library = next((copy / "enclave" / "aot").glob("*.so"))
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the attacker's code in place of the compiler's
    library.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_program(copy, trusted_key=public)


def test_full_vector_loads_is_in_place_and_undone():
    """The compile-time rewrite of Inductor's integer loads (``partitioner.aot_compiler``)
    applies on the pinned torch (else the libraries silently lose ~1.4x on a prefill) and
    leaves Inductor as it found it; that it changes no result is what the bit-for-bit tests
    above check, every library being compiled with it."""
    from torch._inductor.codegen import cpp

    from partitioner.aot_compiler import full_vector_loads

    before = cpp.CppVecKernel._get_vec_load_line
    with full_vector_loads() as applied:
        assert applied
        assert cpp.CppVecKernel._get_vec_load_line is not before
    assert cpp.CppVecKernel._get_vec_load_line is before


def test_int64_products_are_rewritten_and_wrap_as_eager_bit_for_bit():
    """The compile-time int64 product (``partitioner.aot_compiler``, three 32-bit multiplies
    per lane on AVX2) against eager torch's wrapping product, on the values where a wrong
    carry, sign or shift shows: 0, +-1, +-2**31, +-2**32, the int64 extremes and random
    pairs, elementwise and in the Freivalds check's product-and-sum. The generated code must
    use it (else this test would compare Inductor with itself), and Inductor is left as found."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa
    from torch._inductor.codegen import cpp
    from torch._inductor.utils import run_and_get_code

    from partitioner.aot_compiler import SIMDLEN, wrapping_int64_products

    edges = [0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, -(2**32)]
    edges += [2**62, 2**63 - 1, -(2**63), -(2**63) + 1, 0x0123456789ABCDEF, -0x7EDCBA9876543210]
    e = torch.tensor(edges, dtype=torch.int64)
    gen = torch.Generator().manual_seed(5)
    random = torch.randint(-(2**63), 2**63 - 1, (2, 963), dtype=torch.int64, generator=gen)
    a = torch.cat([e.repeat_interleave(len(edges)), random[0]])
    b = torch.cat([e.repeat(len(edges)), random[1]])

    def products(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a * b, (a.view(-1, 1) * b.view(-1, 1)).view(-1, 53).sum(-1)

    before = cpp.CppVecOverrides.__dict__["mul"]
    # the vector width the compiler sets before its rewrites (AVX2 on any CPU that has it)
    width = {"cpp.simdlen": SIMDLEN, "fx_graph_cache": False}
    with inductor_config.patch(width), wrapping_int64_products() as applied:
        isa = str(cpu_vec_isa.pick_vec_isa())
        compiled = torch.compile(products, dynamic=False)
        got, code = run_and_get_code(compiled, a, b)
    assert cpp.CppVecOverrides.__dict__["mul"] is before
    want = products(a, b)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    if isa != "avx2":
        pytest.skip("no AVX2 here; the products above are Inductor's own")
    assert applied  # else a torch upgrade dropped the hook, and the check lost ~1.9x
    assert "_mm256_mul_epu32" in "".join(code)


def test_a_failed_compile_is_reported_in_one_line_whatever_it_raised():
    """The reason a stage (or a step library) stays eager: a NotLowerable's own, else the
    error's type and its message's first line, cut to 200 characters; an error with no
    message still gives a reason (an inline ``splitlines()[0]`` raised IndexError there,
    inside the handler that was to keep the stage eager)."""
    from partitioner.aot import NotLowerable, why_eager

    assert why_eager(NotLowerable("call_module node x")) == "call_module node x"
    long = RuntimeError("C++ compile error " + "x" * 300 + "\nthe generated code")
    assert why_eager(long) == "RuntimeError: " + ("C++ compile error " + "x" * 300)[:200]
    assert why_eager(RuntimeError()) == "RuntimeError: "
    with pytest.raises(IndexError):  # the expression the reports used before
        str(RuntimeError()).splitlines()[0]


def test_compile_time_rewrites_are_one_compile_at_a_time():
    """The rewrites patch Inductor's shared classes: a second thread's compile must wait
    for the first's to end, else the first's exit restores the originals under the second
    (whose libraries would lose the rewrite, or be keyed as having it). The second thread
    must not get in while the first holds them, and both leave Inductor as found."""
    import threading

    from torch._inductor.codegen import cpp

    from partitioner.aot_compiler import rewrites

    before = cpp.CppVecOverrides.__dict__["mul"]
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with rewrites():
            inside.set()
            release.wait(10)

    def second() -> None:
        inside.wait(10)
        with rewrites():
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert inside.wait(10)
    assert not second_in.wait(0.5)  # the second compile waits while the first runs
    release.set()
    for t in threads:
        t.join(10)
    assert second_in.is_set()
    assert cpp.CppVecOverrides.__dict__["mul"] is before


def test_lowered_ring_helpers_equal_the_eager_arithmetic_bit_for_bit():
    """The lowering's shortcuts (a narrowing conversion for the residue mod 2**32, ``2**-e``
    built from its bits) against the arithmetic they replace: ``2**-e`` eager and through
    Inductor at exponents that give normal, subnormal, zero and inf results; the residues
    eager (the compiled stages' bit-for-bit tests run them through Inductor on uniform
    pads). A rounding, saturating or off-by-one shortcut fails."""
    from partitioner import aot

    e = torch.cat([torch.arange(-2200, 2200), torch.tensor([-(2**31), 2**31 - 1])])
    e = e.to(torch.int32)
    with np.errstate(over="ignore"):
        want = torch.from_numpy(np.exp2(-e.numpy().astype(np.float64)))
    for fn in (aot._exp2_neg, torch.compile(aot._exp2_neg, dynamic=False)):
        assert torch.equal(fn(e).view(torch.int64), want.view(torch.int64))
    gen = torch.Generator().manual_seed(3)
    for n in (1, 9, 1537):
        y, c = (
            torch.randint(-(2**31), 2**31, (3, n), dtype=torch.int32, generator=gen) for _ in "yc"
        )
        wide = y.to(torch.int64) - c.to(torch.int64)
        residue = ((wide + 2**31) & (2**32 - 1)) - 2**31
        assert torch.equal(aot._ring_diff(y, c).to(torch.int64), residue)
        assert torch.equal(
            aot._wrap32(wide * 12345).to(torch.int64),
            ops.wrap(wide * 12345, torch.int32).to(torch.int64),
        )


def test_float32_row_mask_equals_the_eager_kernel_at_every_magnitude():
    """The float32 mask's shorter lowering (``aot._mask_narrow_rows``: no scaled-norm path,
    ``2**e`` from its bits, the ring sum before the exponent's column is joined), compiled by
    Inductor as the stage libraries are, against the eager kernel: rows of zeros, of
    subnormals, near float32's largest value, of one huge entry among tiny ones, at norm
    limits from 40 to 2**30, on uniform pads; and NaN or inf refused. A scale that is not
    exactly ``2**e``, or a residue summed in the wrong width, changes some integer."""
    from partitioner import aot
    from partitioner.aot_compiler import rewrites

    with rewrites():
        compiled = torch.compile(aot.mask_rows, dynamic=False)
    gen = torch.Generator().manual_seed(11)
    rows, width = 6, 37
    for trial in range(8):
        power = torch.randint(-149, 125, (rows, 1), generator=gen).to(torch.float32)
        x = torch.randn(rows, width, generator=gen) * torch.exp2(power)
        x[0] = 0.0
        x[1] = torch.finfo(torch.float32).smallest_normal / 3  # subnormal
        x[2, :3] = torch.finfo(torch.float32).max
        x[3, 5] = 1e30 * (trial + 1)
        for dtype in (torch.float32, torch.float16):
            xs = x.to(dtype) if dtype == torch.float32 else x.clamp(-6e4, 6e4).to(dtype)
            r = torch.randint(-(2**31), 2**31, (rows, width + 1), dtype=torch.int32, generator=gen)
            for limit in (40, 55532, 2**30):
                want = ops.ring_mask_rows(xs, r, limit)
                with rewrites():
                    got, ok = compiled(xs, r, torch.tensor(float(limit), dtype=torch.float64))
                assert bool(ok)
                assert torch.equal(got, want), (trial, dtype, limit)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(3, 8)
        x[1, 2] = bad
        r = torch.zeros(3, 9, dtype=torch.int32)
        with rewrites():
            assert not bool(compiled(x, r, torch.tensor(1000.0, dtype=torch.float64))[1])
