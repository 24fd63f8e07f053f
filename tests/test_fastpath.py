"""The executor's slot loop (``enclave_runtime.fastpath``): an exactly masked program's stages
run from per-binding slot numbers instead of the generic loop's lookups by name.

Every test runs the tiny Llama's decoder step under ``slalom``, saved with each enclave stage
compiled (each library checking the reply of the GPU stage before it), signed and loaded as
the enclave loads it. The attacks the generic loop is tested against are replayed against
both loops: a forged reply, a reply a library would misread, a runner that edits what it is
handed, a request of many rows, an empty input once a binding's scan is skipped.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from adversary import EditingRunner, shrunk_storage, transposed_copy
from conftest import partition_step_for_tests

from enclave_runtime import fastpath
from enclave_runtime.executor import Executor, InProcessRunner
from partitioner.api import partition
from partitioner.bundle import load_program
from partitioner.errors import InputError, IntegrityError

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, key_files):
    """(the bundle's folder, the public key): tiny-llama's decoder step under slalom, saved
    with one library per enclave stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition_step_for_tests("slalom")
        root = tmp_path_factory.mktemp("stage-libraries")
        split.save(root, sign_key=key_files[0], compile_enclave=True)
    return root, key_files[1]


def load(bundle):
    root, public = bundle
    plan = load_program(root, trusted_key=public)
    assert all(s.compiled is not None for s in plan.stages if s.side == "enclave")
    return plan


@pytest.fixture(params=["fast", "generic"])
def loop(request, bundle, monkeypatch):
    """A freshly loaded plan, run by the fast path or (its fast path refused) by the generic
    loop; with whether the fast path runs."""
    fast = request.param == "fast"
    if not fast:
        monkeypatch.setattr(fastpath, "build", lambda *a: None)
    return load(bundle), fast


def empty_cache(plan):
    dims = plan.input_dims
    return [torch.zeros(1, dims[n][1], 0, dims[n][3]) for n in dims if str(n).startswith("past_")]


def call(ex, ids=IDS, cache=None):
    """A prefill (``cache`` None) or a decode step; returns (logits, cache)."""
    whole = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        out = ex(ids, whole, cache if cache is not None else empty_cache(ex.spec))
    return out[0], list(out[1:])


def gpu_stages(plan):
    return [s.name for s in plan.stages if s.side == "gpu"]


def library_checked(plan):
    return [s.compiled.verifies[0] for s in plan.stages if s.compiled and s.compiled.verifies]


class Recording(InProcessRunner):
    """A GPU that serves honestly, records each request and may change its replies."""

    def __init__(self, plan, target=None, change=None):
        super().__init__(plan)
        self.requests: list[str] = []
        self.target, self.change = target, change

    def run(self, stage, tensors, expected=None, **kw):
        self.requests.append(stage)
        outs = super().run(stage, tensors, expected, **kw)
        if stage == self.target and self.change is not None:
            outs = [self.change(outs[0]), *outs[1:]]
        return outs


def _forged(t):
    out = t.clone()
    out.view(-1)[7] += 1
    return out


def test_the_fast_path_runs_the_program_as_the_generic_loop(bundle, monkeypatch):
    """The same libraries, pads and replies: the fast path's logits and cache equal the
    generic loop's bit for bit, for a prefill and two decode steps, with one request per GPU
    stage per call."""
    plan = load(bundle)
    runner = Recording(plan)
    ex = Executor(plan, runner, seed=1)
    runs = []
    logits, cache = call(ex)
    assert ex._fast is not None and len(runner.requests) == len(gpu_stages(plan))
    tokens = [logits[:, -1:].argmax(-1)]
    runs.append([logits, *cache])
    for _ in range(2):
        logits, cache = call(ex, tokens[-1], cache)
        tokens.append(logits[:, -1:].argmax(-1))
        runs.append([logits, *cache])
    monkeypatch.setattr(fastpath, "build", lambda *a: None)
    generic = Executor(plan, seed=1)
    logits, cache = call(generic)
    want = [[logits, *cache]]
    for token in tokens[:2]:
        logits, cache = call(generic, token, cache)
        want.append([logits, *cache])
    assert generic._fast is None
    for got, ref in zip(runs, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_the_fast_path_lets_go_of_a_value_only_after_its_last_reader(bundle):
    """Each step's ``drop``: the slots no later step reads and the program does not return,
    released once the step is done (so the allocator reuses memory still in cache). A slot
    dropped before a later reader would hand that reader ``None``; one never dropped holds
    its tensor to the call's end. Checked against the reads recomputed here, then run: the
    fast path's call still gives the generic loop's logits (the test above, bit for bit)."""
    plan = load(bundle)
    ex = Executor(plan, InProcessRunner(plan), seed=1)
    call(ex)
    fast = ex._fast
    assert fast is not None
    outputs = {slot for _, slot, _ in fast.outputs}
    reads, writes = [], set()
    for step in fast.steps:
        if type(step) is fastpath._Library:
            reads.append({*step.args, *step.check_slots})
            writes.update(step.outs)
        else:
            reads.append(set(step.sent))
            writes.update([*step.outs, *(slot for _, slot in step.keep)])
    dropped = set()
    for i, step in enumerate(fast.steps):
        assert not set(step.drop) & outputs, step
        for later in reads[i + 1 :]:
            assert not set(step.drop) & later, (i, step.drop)
        assert not set(step.drop) & dropped  # once
        dropped.update(step.drop)
    # every value a step makes is released at its last reader, but the program's outputs
    assert writes - outputs <= dropped and len(dropped) > len(fast.steps)


@pytest.mark.parametrize("where", ["library", "executor"])
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_a_forged_reply_is_refused_by_either_loop(loop, where, step):
    """One residue off in a reply a library checks, or in the logits (checked as they come),
    in a prefill or in a decode step whose input scan the fast path skips: refused naming the
    GPU stage, nothing sent after it, the check's secret drawn again."""
    plan, fast = loop
    target = library_checked(plan)[1] if where == "library" else gpu_stages(plan)[-1]
    runner = Recording(plan, target)
    ex = Executor(plan, runner, seed=1)
    ids, cache = IDS, None
    if step == "decode":
        logits, cache = call(ex)
        ids = logits[:, -1:].argmax(-1)
        call(ex, ids, cache)  # a call scanned in full: the next one skips the scan
    s = ex.ring_checks[target].vectors[0][0].clone()
    runner.requests.clear()
    runner.change = _forged
    with pytest.raises(IntegrityError, match=f"GPU stage {target} returned results that fail"):
        call(ex, ids, cache)
    assert (ex._fast is not None) == fast
    assert runner.requests[-1] == target
    assert not torch.equal(s, ex.ring_checks[target].vectors[0][0])


def test_a_reply_a_library_would_misread_is_refused_by_either_loop(loop):
    """A reply one column short, or whose storage is smaller than its shape (an in-process
    runner can make one), is refused before a library reads it; one of the right values in
    another memory layout is read as its contiguous copy."""
    plan, fast = loop
    target = library_checked(plan)[0]
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: shape"):
        call(Executor(plan, Recording(plan, target, lambda t: t[..., 1:]), seed=1))
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: storage"):
        call(Executor(plan, Recording(plan, target, shrunk_storage), seed=1))
    ex = Executor(plan, Recording(plan, target, transposed_copy), seed=1)
    got, _ = call(ex)
    want, _ = call(Executor(plan, seed=1))
    assert torch.equal(got, want) and (ex._fast is not None) == fast


NO_MEMORY = {
    "zero": lambda t: torch._efficientzerotensor(tuple(t.shape), dtype=t.dtype),
    "functional": lambda t: torch._to_functional_tensor(t.clone()),
    "batched": lambda t: torch._C._functorch._add_batch_dim(torch.stack([t, t]), 0, 1),
}


@pytest.mark.parametrize("form", sorted(NO_MEMORY))
def test_a_reply_with_no_memory_of_its_own_is_refused_by_either_loop(loop, form):
    """An exact ``torch.Tensor`` of the right dtype and shape with no memory behind it (a
    zero tensor or a functionalisation wrapper: data pointer 0; a functorch batched tensor:
    no storage), to a stage a library checks: refused by name before the library reads it (a
    reviewer's attack: the library read address 0, SIGSEGV; the batched one raised
    NotImplementedError)."""
    plan, _ = loop
    target = library_checked(plan)[0]
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0"):
        call(Executor(plan, Recording(plan, target, NO_MEMORY[form]), seed=1))


class _SaysItCopies(Recording):
    copies_inputs = True


def test_a_runner_that_says_it_copies_still_has_its_replies_storage_checked(loop):
    """``copies_inputs`` says what a runner does with a request, not what its replies are:
    a reply whose storage is smaller than its shape is refused as such, never read (a
    reviewer's attack: the library read past the storage's end and only the Freivalds check
    on what it found stopped the call)."""
    plan, _ = loop
    target = library_checked(plan)[0]
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: storage"):
        call(Executor(plan, _SaysItCopies(plan, target, shrunk_storage), seed=1))


def test_a_runner_that_edits_what_it_is_handed_is_caught_by_either_loop(loop):
    """The library checks the reply against the request the enclave sent, not against the
    request a runner that says it copies edited in place."""
    plan, fast = loop
    target = library_checked(plan)[0]
    ex = Executor(plan, EditingRunner(plan, target), seed=1)
    with pytest.raises(IntegrityError, match=f"GPU stage {target} returned results that fail"):
        call(ex)
    assert (ex._fast is not None) == fast


def test_many_rows_are_checked_as_they_come_by_either_loop(loop, monkeypatch):
    """Past ``library_check_rows`` the reply is checked in numpy as it comes (naming the row)
    and the library is told not to check it again; the logits are the same."""
    plan, fast = loop
    target = library_checked(plan)[0]
    want, _ = call(Executor(plan, seed=1))
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1] - 1)
    ex = Executor(plan, seed=1)
    got, _ = call(ex)
    assert torch.equal(got, want) and (ex._fast is not None) == fast
    with pytest.raises(IntegrityError, match=rf"GPU stage {target} returned .* row \["):
        call(Executor(plan, Recording(plan, target, _forged), seed=1))


def test_an_empty_input_after_skipped_scans_is_refused_by_name(loop):
    """The fast path skips the libraries' empty-input scan once a call has passed it, for a
    call whose own inputs are non-empty, at any sizes: a later call, of the same sizes or of
    new ones, with a cache of no elements (a head dim of 0, which the libraries' own checks
    pass) is still refused naming the input, never read."""
    plan, _ = loop
    ex = Executor(plan, seed=1)
    logits, cache = call(ex)
    token = logits[:, -1:].argmax(-1)
    _, longer = call(ex, token, cache)
    call(ex, token, cache)
    for past in (cache, longer):  # the sizes of a call that skipped the scan, and new ones
        wrong = list(past)
        wrong[0] = torch.zeros(*past[0].shape[:-1], 0)
        shape = rf"\[1, 2, {past[0].shape[2]}, 0\]"
        with pytest.raises(IntegrityError, match=rf"enclave stage \w+ input \d+: shape {shape}"):
            call(ex, token, wrong)


def test_a_swapped_library_rebuilds_the_fast_path(bundle):
    """A stage's library replaced after a call (``stage.compiled``): the fast path is built
    again from what the stages hold now (here the stage's module, run op by op), and gives
    what a fresh executor gives."""
    plan = load(bundle)
    ex = Executor(plan, seed=1)
    want, _ = call(ex)
    built = ex._fast
    first = next(s for s in plan.stages if s.compiled is not None and not s.compiled.verifies)
    first.compiled = None
    got, _ = call(Executor(plan, seed=1))
    again, _ = call(ex)
    assert ex._fast is not None and ex._fast is not built
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(64, 128)
        self.down_proj = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class _Tagged(torch.nn.Module):
    """Returns one of its inputs unchanged beside its result (no stage reads the input)."""

    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x, tag):
        return torch.tanh(self.mlp(torch.relu(x) * 2)), tag


@pytest.fixture(scope="module")
def tagged():
    torch.manual_seed(0)
    x, tag = torch.randn(1, 4, 64), torch.arange(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition(_Tagged().eval(), "slalom", (x, tag), seed=1)
    return split.spec, x, tag


def test_an_input_the_program_returns_is_returned_by_the_fast_path(tagged, monkeypatch):
    """A reviewer's finding: an output that is an input no stage reads had no slot, and every
    call of the fast path raised ``KeyError``."""
    plan, x, tag = tagged
    ex = Executor(plan, seed=1)
    with torch.no_grad():
        got = ex(x, tag)
    assert ex._fast is not None and torch.equal(got[1], tag)
    monkeypatch.setattr(fastpath, "build", lambda *a: None)
    with torch.no_grad():
        want = Executor(plan, seed=1)(x, tag)
    assert torch.equal(got[0], want[0])


def test_a_stage_module_swapped_after_a_call_is_the_one_that_runs(tagged):
    """A reviewer's finding: the fast path kept the module a stage had when it was built."""
    plan, x, tag = tagged
    ex = Executor(plan, seed=1)
    with torch.no_grad():
        ex(x, tag)
    stage = next(s for s in plan.stages if s.side == "enclave")
    original, calls = stage.module, []

    def spy(*args):
        calls.append(stage.name)
        return original(*args)

    stage.module = spy
    try:
        with torch.no_grad():
            ex(x, tag)
    finally:
        stage.module = original
    assert calls == [stage.name]


class _Shifty(list):
    """A reply that is a list subclass (an in-process runner can return one): what a second
    pass over it yields need not be what the first pass checked."""


@pytest.mark.parametrize("which", ["fast", "generic"])
def test_a_reply_that_is_a_list_subclass_is_refused(tagged, monkeypatch, which):
    plan, x, tag = tagged
    if which == "generic":
        monkeypatch.setattr(fastpath, "build", lambda *a: None)

    class Runner(InProcessRunner):
        def run(self, stage, tensors, expected=None, **kw):
            return _Shifty(super().run(stage, tensors, expected, **kw))

    ex = Executor(plan, Runner(plan), seed=1)
    with pytest.raises(IntegrityError, match="returned _Shifty, not outputs"), torch.no_grad():
        ex(x, tag)
    assert (ex._fast is not None) == (which == "fast")


def test_a_generation_s_steps_share_their_reply_shapes_and_still_check_them(bundle):
    """A decode step's replies do not depend on the cache length, so the steps of a
    generation share what the replies must be (it took ~1 ms to work out per new length on
    SmolLM2); a reply of another shape is still refused at a length not seen before."""
    plan = load(bundle)
    ex = Executor(plan, seed=1)
    step = {"batch": 1, "seq": 1, "past": 7}
    assert ex.replies(step) is ex.replies({**step, "past": 8})
    assert ex.replies(step) is not ex.replies({**step, "seq": 2})
    target = library_checked(plan)[0]
    runner = Recording(plan, target)
    ex = Executor(plan, runner, seed=1)
    logits, cache = call(ex)
    token = logits[:, -1:].argmax(-1)
    logits, cache = call(ex, token, cache)
    runner.change = lambda t: torch.cat([t, t], dim=1)  # two positions where one was sent
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: shape"):
        call(ex, logits[:, -1:].argmax(-1), cache)


@pytest.fixture
def native_calls(monkeypatch):
    """The calls the C++ loop (``native/step_loop.cpp``) ran, counted: it must be built
    (``make`` builds it), and it runs a call once one of the same program has been scanned
    in full."""
    assert fastpath._step_loop is not None, "python -m partitioner.native builds it"
    calls = []
    original = fastpath.FastPath._run_native

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(fastpath.FastPath, "_run_native", counted)
    return calls


def warm(ex):
    """A prefill and a decode step (the second is scanned in full): the next decode step
    runs in C++ where the loop is built. Returns (the next token, the cache)."""
    logits, cache = call(ex)
    logits, cache = call(ex, logits[:, -1:].argmax(-1), cache)
    return logits[:, -1:].argmax(-1), cache


def test_the_loop_in_cpp_runs_the_program_as_the_python_loop(bundle, native_calls, monkeypatch):
    """Decode steps in C++ give the Python fast path's logits and cache bit for bit, with one
    request per GPU stage in the plan's order, the reply of the logits (checked in numpy as
    it comes) included."""
    plan = load(bundle)
    runs = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(fastpath, "_step_loop", None)
        runner = Recording(plan)
        ex = Executor(plan, runner, seed=1)
        token, cache = warm(ex)
        runner.requests.clear()
        out = []
        for _ in range(3):
            logits, cache = call(ex, token, cache)
            token = logits[:, -1:].argmax(-1)
            out.append([logits, *cache])
        assert runner.requests == gpu_stages(plan) * 3
        assert (ex._fast.native is not None) == native
        runs[native] = out
    assert len(native_calls) == 3
    for got, ref in zip(runs[True], runs[False], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


ATTACKS = {
    "one column short": (lambda t: t[..., 1:], "output 0: shape"),
    "storage smaller than its shape": (shrunk_storage, "output 0: storage"),
    **{f"no memory ({form})": (make, "output 0") for form, make in NO_MEMORY.items()},
    "one residue off": (_forged, "returned results that fail the Freivalds check"),
}


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_reply_after_the_scanned_calls_is_refused_by_either_fast_loop(
    bundle, native_calls, monkeypatch, attack, native
):
    """The attacks on one reply, made on a decode step that the C++ loop runs (and, for
    comparison, the Python fast loop): refused naming the GPU stage, before anything reads
    the reply, nothing sent after it; a failed check draws its secret again."""
    if not native:
        monkeypatch.setattr(fastpath, "_step_loop", None)
    plan = load(bundle)
    change, message = ATTACKS[attack]
    target = library_checked(plan)[1]
    runner = Recording(plan, target)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    s = ex.ring_checks[target].vectors[0][0].clone()
    runner.requests.clear()
    runner.change = change
    with pytest.raises(IntegrityError, match=f"GPU stage {target} {message}"):
        call(ex, token, cache)
    assert len(native_calls) == int(native)
    assert runner.requests[-1] == target
    assert torch.equal(s, ex.ring_checks[target].vectors[0][0]) != ("Freivalds" in message)


def test_the_loop_in_cpp_reads_a_transposed_reply_as_its_contiguous_copy(bundle, native_calls):
    """A reply of the right values in another memory layout, on a step the C++ loop runs:
    read as its contiguous copy, the logits those of an honest GPU."""
    plan = load(bundle)
    target = library_checked(plan)[0]
    runner = Recording(plan, target)
    ex, honest = Executor(plan, runner, seed=1), Executor(plan, seed=1)
    token, cache = warm(ex)
    warm(honest)
    runner.change = transposed_copy
    got, _ = call(ex, token, cache)
    want, _ = call(honest, token, cache)
    assert torch.equal(got, want) and len(native_calls) == 2


def test_a_runner_that_edits_what_it_is_handed_is_caught_by_the_loop_in_cpp(bundle, native_calls):
    """The library the C++ loop calls checks the reply against the enclave's own copy of
    the request, not the request the runner edited in place."""
    plan = load(bundle)
    target = library_checked(plan)[0]
    runner = EditingRunner(plan, target)
    runner.target = None
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    runner.target = target
    with pytest.raises(IntegrityError, match=f"GPU stage {target} returned results that fail"):
        call(ex, token, cache)
    assert len(native_calls) == 1


def test_a_value_the_loop_in_cpp_would_mask_as_nan_is_refused(bundle, native_calls):
    """A cache holding inf, on a step the C++ loop runs: the library that would mask what
    it became refuses it (InputError, naming the stage), and no residue of it is sent."""
    plan = load(bundle)
    runner = Recording(plan)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    cache = [c.clone() for c in cache]
    cache[0].fill_(float("inf"))
    runner.requests.clear()
    with pytest.raises(InputError, match=r"enclave stage \w+: a value to be masked is NaN"):
        call(ex, token, cache)
    assert len(native_calls) == 1 and len(runner.requests) < len(gpu_stages(plan))


def _size1_strides(t):
    """``t``'s values with other strides on its size-1 dims: contiguous by torch's test, so
    both reply checks pass it, but refused by the strides a library was compiled for."""
    strides = [s * 7 + 3 if n == 1 else s for n, s in zip(t.shape, t.stride(), strict=True)]
    base = t.contiguous().clone()
    return torch.empty(0, dtype=t.dtype).set_(base.untyped_storage(), 0, t.shape, strides)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
def test_a_reply_a_checking_library_refuses_redraws_its_secret(
    bundle, native_calls, monkeypatch, native
):
    """A reply the library that checks it refuses for its strides (a reviewer's finding: the
    C++ loop raised without drawing the check's secret again, where the Python loop draws
    it): refused as an IntegrityError naming the stage, the secret drawn again in both."""
    if not native:
        monkeypatch.setattr(fastpath, "_step_loop", None)
    plan = load(bundle)
    target = library_checked(plan)[0]
    runner = Recording(plan, target)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    s = ex.ring_checks[target].vectors[0][0].clone()
    runner.change = _size1_strides
    with pytest.raises(IntegrityError, match=r"enclave stage \w+: its compiled library refused"):
        call(ex, token, cache)
    assert len(native_calls) == int(native)
    assert not torch.equal(s, ex.ring_checks[target].vectors[0][0])


class _SwapWhen:
    """Code of a runner's that runs inside the enclave's own work: a GC callback (run at every
    collection, each allocation of a tracked object once the threshold is 1) that puts
    ``swap`` into ``reply`` at position 0 the first time ``when(frames)`` holds."""

    def __init__(self, reply, swap, when):
        self.reply, self.swap, self.when = reply, swap, when
        self.swapped = False

    def __call__(self, phase, info):
        if self.swapped or phase != "start":
            return
        frame, frames = sys._getframe(1), []
        while frame is not None:
            frames.append((frame.f_code.co_name, frame.f_code.co_filename))
            frame = frame.f_back
        if self.when(frames):
            self.reply[0] = self.swap
            self.swapped = True


class _GcSwapper(Recording):
    """Returns ``make(reply)`` for stage ``target`` and arms a :class:`_SwapWhen` that puts
    ``swap(reply)`` into the list it returned."""

    make = swap = when = None
    armed: _SwapWhen | None = None

    def run(self, stage, tensors, expected=None, **kw):
        outs = super().run(stage, tensors, expected, **kw)
        if stage != self.target or self.make is None:
            return outs
        reply = self.make(list(outs))
        self.armed = _SwapWhen(reply, self.swap(list(outs)), self.when)
        gc.callbacks.append(self.armed)
        gc.set_threshold(1)
        return reply


@pytest.fixture
def gc_restored():
    threshold, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.set_threshold(*threshold)
    gc.callbacks[:] = callbacks


def _in_the_numpy_check(frames):
    return any(name == "verify" and file.endswith("fastpath.py") for name, file in frames)


def _after_the_runner(frames):
    return not any(name == "run" and file.endswith("test_fastpath.py") for name, file in frames)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
def test_a_reply_list_edited_while_its_numpy_check_runs_is_still_refused(
    bundle, native_calls, monkeypatch, gc_restored, native
):
    """A forged reply to the stage checked in numpy as it comes, whose list the runner's own
    code (a GC callback) gives the honest tensor once the check starts reading (a reviewer's
    finding, in both loops: the stages read the forged tensor, the check the honest one, and
    the forged logits were returned). The loops read one snapshot of the reply."""
    if not native:
        monkeypatch.setattr(fastpath, "_step_loop", None)
    plan = load(bundle)
    runner = _GcSwapper(plan)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    runner.target = next(g.name for g in ex._fast.gpus if g.check is not None and not g.keep)
    runner.make = lambda reply: [_forged(reply[0]), *reply[1:]]
    runner.swap = lambda reply: reply[0]
    runner.when = _in_the_numpy_check
    with pytest.raises(IntegrityError, match=f"GPU stage {runner.target} returned results"):
        call(ex, token, cache)
    assert runner.armed.swapped and len(native_calls) == int(native)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
def test_a_reply_list_edited_after_its_check_is_not_what_the_stages_read(
    bundle, native_calls, monkeypatch, gc_restored, native
):
    """An honest reply whose list the runner's own code gives a tensor of another dtype at the
    first collection once the runner has returned (in the Python loop, after the reply check
    and before the slots read it, a reviewer's finding): the enclave reads the reply it
    checked, so the step gives an honest GPU's logits, or (had the swap come before the loop
    took its snapshot) the check refuses the tensor it was given, naming it."""
    if not native:
        monkeypatch.setattr(fastpath, "_step_loop", None)
    plan = load(bundle)
    target = library_checked(plan)[0]
    runner = _GcSwapper(plan, target)
    ex, honest = Executor(plan, runner, seed=1), Executor(plan, seed=1)
    token, cache = warm(ex)
    warm(honest)
    runner.make = list
    runner.swap = lambda reply: reply[0].to(torch.int64)
    runner.when = _after_the_runner
    try:
        got = call(ex, token, cache)[0]
    except IntegrityError as exc:
        got = exc
    assert runner.armed.swapped and len(native_calls) == int(native)
    if isinstance(got, IntegrityError):
        assert f"GPU stage {target} output 0: torch.int64, the plan says" in str(got)
    else:
        gc.callbacks.remove(runner.armed)
        assert torch.equal(got, call(honest, token, cache)[0])


class _Reshaper(Recording):
    """Changes what stage ``target``'s reply must be (the list it is handed) before replying
    with two positions where one was sent."""

    def run(self, stage, tensors, expected=None, **kw):
        outs = super().run(stage, tensors, expected, **kw)
        if stage == self.target:
            for edit in (
                lambda: expected.__setitem__(0, (expected[0][0], None)),
                lambda: expected[0][1].__setitem__(1, 2 * expected[0][1][1]),
            ):
                try:
                    edit()
                except (TypeError, AttributeError):
                    pass
            outs = [torch.cat([outs[0], outs[0]], dim=1), *outs[1:]]
        return outs


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "python"])
def test_a_runner_cannot_change_what_replies_must_be(bundle, native_calls, monkeypatch, native):
    """What a reply must be is handed to the runner (a transport reads the shapes from it) and
    shared by the calls of a binding: a runner that edits it cannot make its own reply pass
    the check, nor change what later replies are checked against."""
    if not native:
        monkeypatch.setattr(fastpath, "_step_loop", None)
    plan = load(bundle)
    target = library_checked(plan)[0]
    runner = _Reshaper(plan)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    runner.target = target
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: shape"):
        call(ex, token, cache)
    runner.target = None
    honest = Executor(plan, seed=1)
    warm(honest)
    assert torch.equal(call(ex, token, cache)[0], call(honest, token, cache)[0])


def test_the_loop_in_cpp_names_a_caller_input_of_another_dtype(bundle, native_calls, monkeypatch):
    """A cache of another dtype on a step the C++ loop runs is refused naming the stage's input
    at fault, as the Python loop names it."""
    messages = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(fastpath, "_step_loop", None)
        plan = load(bundle)
        ex = Executor(plan, seed=1)
        token, cache = warm(ex)
        with pytest.raises((IntegrityError, InputError)) as raised:
            call(ex, token, [c.to(torch.float64) for c in cache])
        messages[native] = str(raised.value)
    assert len(native_calls) == 1
    assert messages[True] == messages[False]
    assert "input" in messages[True]


class _Grower(Recording):
    """A runner that reaches the executor's C++ loop and adds steps to it during a call."""

    loop = None
    raised: Exception | None = None

    def run(self, stage, tensors, expected=None, **kw):
        outs = super().run(stage, tensors, expected, **kw)
        if self.loop is not None:
            loop, self.loop = self.loop, None
            try:
                for _ in range(4096):  # enough to move the loop's step lists in memory
                    loop.add_gpu("x", [0], [0], [], False, [])
            except RuntimeError as exc:
                self.raised = exc
        return outs


def test_the_loop_in_cpp_refuses_new_steps_once_built(bundle, native_calls):
    """Steps added to the C++ loop during a call (runner code reaching into the executor)
    would move the step lists it is reading, and between calls would run unchecked (a
    reviewer's finding: a step re-asking for the logits returned forged ones): the loop is
    sealed once built."""
    plan = load(bundle)
    runner = _Grower(plan)
    ex = Executor(plan, runner, seed=1)
    token, cache = warm(ex)
    honest = Executor(plan, seed=1)
    warm(honest)
    runner.loop = ex._fast.native
    got, _ = call(ex, token, cache)
    assert "sealed" in str(runner.raised) and len(native_calls) == 1
    with pytest.raises(RuntimeError, match="sealed"):
        ex._fast.native.add_gpu("x", [0], [0], [], False, [])
    assert torch.equal(got, call(honest, token, cache)[0])


_SNAPSHOT_UNDER_GC = """
import gc, sys, torch
from enclave_runtime.replies import snapshot
reply = [torch.full((4,), float(i)) for i in range(3)]
fired = []
def emptied(phase, info):  # the runner's finaliser: empties its list, reuses the memory
    if phase == "start" and not fired:
        fired.append(1)
        reply.clear()
        junk = [bytearray(64) for _ in range(100)]
hold = [tuple([object() for _ in range(3)]) for _ in range(2500)]  # no 3-tuple left to reuse
gc.callbacks.append(emptied)
gc.set_threshold(1)
out = snapshot(reply)
gc.set_threshold(700)
gc.callbacks.remove(emptied)
assert fired
print([t.tolist() for t in out])
"""


def test_a_reply_emptied_by_a_finaliser_while_it_is_snapshotted_is_read_whole_or_empty():
    """A runner whose finaliser empties the list it returned at the allocation the snapshot
    makes (a reviewer's finding: ``tuple(a_list)`` then filled the tuple from freed memory,
    SIGSEGV): the snapshot is the list before or after, never freed memory."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT_UNDER_GC],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() in ("[]", str([[float(i)] * 4 for i in range(3)]))
