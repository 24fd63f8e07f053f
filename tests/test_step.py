"""The step library: a split program's enclave stages compiled as one library that calls
back into the executor for each GPU stage (``partitioner.aot_step``, ``enclave_runtime.step``).

Every test runs the tiny Llama's decoder step under ``slalom``, saved compiled, signed and
loaded as the enclave loads it, against a GPU that attacks what the library trusts: the
replies it reads, the requests it hands out, the order in which a call ends."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from adversary import EditingRunner, read_plan, rehash, shrunk_storage, transposed_copy
from conftest import partition_step_for_tests

from enclave_runtime.executor import Executor, InProcessRunner
from enclave_runtime.integrity import RingCheck
from partitioner.aot import NotLowerable
from partitioner.aot_step import build
from partitioner.bundle import AOT_INDEX, PLAN_FILE, load_program
from partitioner.errors import ArtifactError, InputError, IntegrityError
from partitioner.signing import SIGNATURE_FILE, load_private_key, sign

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, key_files):
    """(the bundle's folder, the loaded plan, the public key): tiny-llama's decoder step
    under slalom, saved with its enclave compiled (one step library)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition_step_for_tests("slalom")
        root = tmp_path_factory.mktemp("step-bundle")
        split.save(root, sign_key=key_files[0], compile_enclave="step")
    plan = load_program(root, trusted_key=key_files[1])
    assert plan.step is not None, json.loads((root / AOT_INDEX).read_text()).get("no_step")
    return root, plan, key_files[1]


def empty_cache(plan):
    dims = plan.input_dims
    return [torch.zeros(1, dims[n][1], 0, dims[n][3]) for n in dims if str(n).startswith("past_")]


def call(ex, ids=IDS, cache=None):
    """A prefill (``cache`` None) or a decode step; returns (logits, cache)."""
    plan = ex.spec
    whole = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        out = ex(ids, whole, cache if cache is not None else empty_cache(plan))
    return out[0], list(out[1:])


class Recording(InProcessRunner):
    """A GPU that serves honestly and records each request it is sent."""

    def __init__(self, plan):
        super().__init__(plan)
        self.requests: list[str] = []

    def run(self, stage, tensors, expected=None, **kw):
        self.requests.append(stage)
        return self.reply(stage, super().run(stage, tensors, expected, **kw))

    def reply(self, stage, outs):
        return outs


class Forging(Recording):
    """Adds one to one residue of one stage's reply."""

    def __init__(self, plan, target):
        super().__init__(plan)
        self.target = target

    def reply(self, stage, outs):
        if stage == self.target:
            outs = [o.clone() for o in outs]
            outs[0].view(-1)[7] += 1
        return outs


def gpu_stages(plan):
    return [s.name for s in plan.stages if s.side == "gpu"]


def library_checked(plan):
    return [name for kind, name in plan.step.sources if kind == "check"]


def test_the_step_library_runs_the_program(compiled):
    """A prefill and a decode step through the library give what the stages run one by one
    give (eager here: the library may sum a norm in another order, so within float32's last
    bits), with one request per GPU stage per call."""
    _, plan, _ = compiled
    library = plan.step
    runner = Recording(plan)
    ex = Executor(plan, runner, seed=1)
    logits, cache = call(ex)
    assert ex._step is not None and len(runner.requests) == len(gpu_stages(plan))
    next_logits, _ = call(ex, logits[:, -1:].argmax(-1), cache)
    plan.step = None
    try:
        eager = Executor(plan, seed=1)
        want, want_cache = call(eager)
        want_next, _ = call(eager, logits[:, -1:].argmax(-1), want_cache)
    finally:
        plan.step = library
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(next_logits, want_next, rtol=1e-5, atol=1e-5)
    for got, ref in zip(cache, want_cache, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["library", "executor"])
def test_a_forged_reply_ends_the_call_where_the_gpu_lied(compiled, where):
    """One residue off in a reply the library checks (or, last, the logits, which the
    executor checks): the call is refused naming the GPU stage, the GPU is sent nothing after
    the stage that lied (the library's verdict is an input of the next GPU call, which refuses
    to send), and the check's secret is drawn again."""
    _, plan, _ = compiled
    target = library_checked(plan)[1] if where == "library" else gpu_stages(plan)[-1]
    runner = Forging(plan, target)
    ex = Executor(plan, runner, seed=1)
    s = ex.ring_checks[target].vectors[0][0].clone()
    with pytest.raises(IntegrityError, match=f"GPU stage {target} returned results that fail"):
        call(ex)
    assert ex._step is not None
    assert runner.requests[-1] == target
    assert not torch.equal(s, ex.ring_checks[target].vectors[0][0])


class Shaping(Recording):
    """Replaces one stage's first output by what ``shape`` makes of it."""

    def __init__(self, plan, target, shape):
        super().__init__(plan)
        self.target, self.shape = target, shape

    def reply(self, stage, outs):
        if stage == self.target:
            outs = [self.shape(outs[0]), *outs[1:]]
        return outs


def _strided_short(t):
    """``t``'s values every fourth element of a buffer, the buffer then cut to ``t``'s
    element count: its shape and strides reach past the end of its storage."""
    out = torch.empty(*t.shape[:-1], t.shape[-1] * 4, dtype=t.dtype)[..., ::4]
    out.copy_(t)
    out.untyped_storage().resize_(t.numel() * t.element_size())
    return out


def test_a_reply_the_library_would_misread_is_refused(compiled):
    """Compiled code reads a reply by the shape it computed: a reply one column short, or
    whose storage is smaller than its shape (an in-process runner can make one), is refused
    before the library reads it; one of the right values in another memory layout is read as
    its contiguous copy."""
    _, plan, _ = compiled
    target = library_checked(plan)[0]
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: shape"):
        call(Executor(plan, Shaping(plan, target, lambda t: t[..., 1:]), seed=1))
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: storage"):
        call(Executor(plan, Shaping(plan, target, shrunk_storage), seed=1))
    # strided, with a storage as large as its element count but not as its strides reach (a
    # reviewer's attack: a check by element count passed it, and the copy read past the end)
    with pytest.raises(IntegrityError, match=f"GPU stage {target} output 0: storage"):
        call(Executor(plan, Shaping(plan, target, _strided_short), seed=1))
    got, _ = call(Executor(plan, Shaping(plan, target, transposed_copy), seed=1))
    want, _ = call(Executor(plan, seed=1))
    assert torch.equal(got, want)


def test_a_runner_that_edits_what_it_is_handed_is_caught(compiled):
    """The library checks a reply against the request it sent, after the call: a runner
    that edited the request in place must not move that request, whatever it says."""
    _, plan, _ = compiled
    target = library_checked(plan)[0]
    with pytest.raises(IntegrityError, match=f"GPU stage {target} returned results that fail"):
        call(Executor(plan, EditingRunner(plan, target), seed=1))


def test_a_request_of_many_rows_is_checked_as_it_comes(compiled, monkeypatch):
    """Past ``library_check_rows`` the executor checks each reply in numpy as it comes, and
    the library, told so, does not check it again: a forged reply is refused by that check
    (it names the row), and an honest call equals the library-checked one."""
    _, plan, _ = compiled
    target = library_checked(plan)[0]
    checked = []
    verify = RingCheck.verify

    def counting(self, *a):
        checked.append(self.stage)
        return verify(self, *a)

    monkeypatch.setattr(RingCheck, "verify", counting)
    want, _ = call(Executor(plan, seed=1))
    assert target not in checked
    monkeypatch.setattr(Executor, "library_check_rows", IDS.shape[1] - 1)
    got, _ = call(Executor(plan, seed=1))
    assert target in checked and torch.equal(got, want)
    with pytest.raises(IntegrityError, match=rf"GPU stage {target} returned .* row \["):
        call(Executor(plan, Forging(plan, target), seed=1))


def test_a_value_that_cannot_be_masked_is_never_sent(compiled):
    """A cache holding NaN makes an attention output that no fixed point carries: the call is
    refused with the stages' own error, and the GPU is never sent the value (the mask's
    verdict is an input of the GPU call that would send it)."""
    _, plan, _ = compiled
    honest = Recording(plan)
    _, cache = call(Executor(plan, honest, seed=1))
    cache = [c.clone() for c in cache]
    cache[0].view(-1)[0] = float("nan")
    runner = Recording(plan)
    with pytest.raises(InputError, match="NaN or inf"):
        call(Executor(plan, runner, seed=2), torch.tensor([[4]]), cache)
    stages = gpu_stages(plan)
    assert runner.requests == stages[: len(runner.requests)] and len(runner.requests) < len(stages)


class Failing(Recording):
    def run(self, stage, tensors, expected=None, **kw):
        raise ConnectionResetError(f"worker gone during {stage}")


def test_an_error_of_the_runner_reaches_the_caller_as_raised(compiled):
    _, plan, _ = compiled
    with pytest.raises(ConnectionResetError, match="worker gone during"):
        call(Executor(plan, Failing(plan), seed=1))


def test_inputs_the_library_would_misread_are_refused_by_name(compiled):
    """The library's own checks pass any tensor with no elements (an empty cache of the wrong
    head count) and would fail a wrong dtype with AOTInductor's message: both are refused
    naming the input."""
    _, plan, _ = compiled
    ex = Executor(plan, seed=1)
    cache = empty_cache(plan)
    wrong = list(cache)
    wrong[1] = torch.zeros(1, cache[1].shape[1] + 3, 0, cache[1].shape[3])
    name = [n for n in plan.input_dims if str(n).startswith("past_")][1]
    with pytest.raises(InputError, match=f"input {name}: shape"):
        call(ex, cache=wrong)
    wrong[1] = cache[1].to(torch.float64)
    with pytest.raises(InputError, match=f"input {name}: expected torch.float32"):
        call(ex, cache=wrong)


def _resign(root, key_file):
    """What the compiler's key can do: hash every file again and sign the plan."""
    rehash(root, *read_plan(root)["files"])
    raw = (root / PLAN_FILE).read_bytes()
    (root / SIGNATURE_FILE).write_bytes(sign(raw, load_private_key(key_file)))


def _edited(root, tmp_path, name, edit_calls=None, edit_entry=None):
    copy = tmp_path / name
    shutil.copytree(root, copy)
    index_file = copy / AOT_INDEX
    index = json.loads(index_file.read_text())
    if edit_calls is not None:
        calls = copy / index["step"]["calls"]
        listed = json.loads(calls.read_text())
        edit_calls(listed["nodes"])
        calls.write_text(json.dumps(listed))
    if edit_entry is not None:
        edit_entry(index["step"])
        index_file.write_text(json.dumps(index))
    return copy


def _retarget(nodes):
    nodes[0]["node"]["target"] = "aten::add.Tensor"


def _enclave_stage(nodes):
    nodes[0]["node"]["inputs"][0]["arg"]["as_int"] = 0  # the embedding's enclave stage


def _swapped(nodes):
    nodes[1], nodes[2] = nodes[2], nodes[1]


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (_retarget, "not a GPU stage of the plan"),
        (_enclave_stage, "not a GPU stage of the plan"),
        (_swapped, "each GPU stage once, in the plan's order"),
    ],
)
def test_a_step_library_that_calls_anything_else_is_refused(
    compiled, tmp_path, key_files, edit, refusal
):
    """The library's call list tells AOTInductor which op to call with which arguments: a
    list that names another op (here ``aten::add``), a stage that is not a GPU stage, or the
    GPU stages in another order is refused on load even when the compiler's key signed it;
    one changed after signing fails its hash."""
    root, _, public = compiled
    copy = _edited(root, tmp_path, edit.__name__, edit_calls=edit)
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load_program(copy, trusted_key=public)
    _resign(copy, key_files[0])
    with pytest.raises(ArtifactError, match=refusal):
        load_program(copy, trusted_key=public)


def _same_pad_twice(entry):
    pads = [i for i, (kind, _) in enumerate(entry["sources"]) if kind == "pad"]
    entry["sources"][pads[1]] = entry["sources"][pads[0]]


def _outputs_reordered(entry):
    entry["outputs"] = entry["outputs"][::-1]


def _unknown_pad(entry):
    pad = next(i for i, (kind, _) in enumerate(entry["sources"]) if kind == "pad")
    entry["sources"][pad] = ["pad", "not_a_value"]


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (_same_pad_twice, "named twice"),  # two values masked with one pad
        (_outputs_reordered, "not the plan's outputs"),
        (_unknown_pad, "pad not_a_value is not one of the plan's"),
    ],
)
def test_a_signed_step_entry_that_disagrees_with_the_plan_is_refused(
    compiled, tmp_path, key_files, edit, refusal
):
    """The index's step entry says what feeds each input of the library and what each output
    is; the loader checks it against the plan, signed or not."""
    root, _, public = compiled
    copy = _edited(root, tmp_path, edit.__name__, edit_entry=edit)
    _resign(copy, key_files[0])
    with pytest.raises(ArtifactError, match=refusal):
        load_program(copy, trusted_key=public)


class Reentering(Recording):
    """A runner in the enclave's process that calls the executor again from inside a GPU
    call (the library holds one model, and its run holds the GIL)."""

    executor = None

    def run(self, stage, tensors, expected=None, **kw):
        call(self.executor)
        return super().run(stage, tensors, expected, **kw)


def test_a_call_from_inside_a_gpu_call_is_refused_not_hung(compiled):
    _, plan, _ = compiled
    runner = Reentering(plan)
    runner.executor = Executor(plan, runner, seed=1)
    with pytest.raises(IntegrityError, match="called again from inside its GPU call"):
        call(runner.executor)


def test_programs_the_library_cannot_run_keep_their_stages():
    """A program without exact masks (here cmif: RNM draws its noise per call in the
    executor) gets no step library, with the reason; a compiled bundle of it keeps one
    library per stage (test_aot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = partition_step_for_tests("cmif")
    with pytest.raises(NotLowerable, match="masks nothing exactly"):
        build(split)
