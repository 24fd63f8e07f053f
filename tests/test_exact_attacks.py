"""Attacks on exact masking (``masking="exact"``, the ``slalom`` preset), written as tests.

Each test asserts the *safe* behaviour that exact masking claims:

1. what a GPU stage receives is a one-time pad over ``Z_{2^32}``: fresh per request, never
   reused (between requests, between values, between pads and Freivalds vectors), the row
   exponent column masked too;
2. the masked split equals :func:`passes.exact.quantised_reference` bit for bit (no wrap);
3. under ``integrity="freivalds"`` any wrong GPU result raises :class:`IntegrityError`, an
   honest one never does;
4. a hostile reply (wrong dtype, shape, count, type) is refused with an :class:`IntegrityError`.

Every hole these attacks found is fixed (see the commit that removed their ``xfail``); a new
finding is kept, marked ``xfail(strict=True)`` with the finding as its
reason, so the suite stays green and the finding stays recorded: fixing the hole turns it into
an unexpected pass, and the mark can go.

Everything runs on ``tiny-llama`` (hidden size 64): one partition for most tests.
"""

from __future__ import annotations

import functools
import threading
import warnings

import pytest
import torch
from conftest import captured, model_output
from models import BUILDERS

from enclave_runtime.executor import Executor, InProcessRunner
from enclave_runtime.randomness import CSPRNG
from partitioner import ops
from partitioner.api import partition
from partitioner.errors import InputError, IntegrityError
from passes.exact import LINEAR_BOUND, quantise_weight, quantised_reference

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 128, 64]])  # distinct tokens: distinct rows
FIRST = "gpu_1"  # q/k/v projections of layer 0: three outputs, row-scaled, exponent carried
LAST = "gpu_17"  # the lm_head


@functools.cache
def slalom():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return partition(captured("tiny-llama"), "slalom", seed=11)


@functools.cache
def reference(ids: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(quantised_reference(slalom())(input_ids=torch.tensor([ids])))


class Runner:
    """The GPU: runs stages honestly in process, records what it gets and replies, and lets a
    hook rewrite the reply (``hook(stage, sent, outs, call) -> outs``, ``call`` counting that
    stage's calls from 1) or the request (``before(stage, sent, call)``)."""

    def __init__(self, split, hook=None, before=None) -> None:
        self.inner = InProcessRunner(split.spec)
        self.hook, self.before = hook, before
        self.calls: dict[str, int] = {}
        self.received: dict[str, list[list[torch.Tensor]]] = {}
        self.replies: dict[str, list[list[torch.Tensor]]] = {}

    def run(self, stage, tensors, expected=None):
        call = self.calls[stage] = self.calls.get(stage, 0) + 1
        if self.before is not None:
            self.before(stage, tensors, call)
        self.received.setdefault(stage, []).append([t.clone() for t in tensors])
        outs = [o.clone() for o in self.inner.run(stage, tensors, expected)]
        self.replies.setdefault(stage, []).append([o.clone() for o in outs])
        if self.hook is not None:
            outs = self.hook(stage, tensors, outs, call)
        return outs


def request(executor, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model_output(executor(input_ids=ids))


def gpu_stages(split) -> list[str]:
    return [s.name for s in split.stages if s.side == "gpu"]


def _within(t: torch.Tensor, bound: int) -> bool:
    """Every entry in [-bound, bound] (not ``abs()``: ``|INT_MIN|`` wraps to a negative)."""
    return bool(((t >= -bound) & (t <= bound)).all())


def _chunks(tensor: torch.Tensor, size: int = 16) -> list[bytes]:
    raw = tensor.contiguous().numpy().tobytes()
    return [raw[i : i + size] for i in range(0, len(raw) - size + 1, size)]


# -- 1. the one-time pad ---------------------------------------------------------------------


def test_pads_are_fresh_per_request_and_cover_the_exponent_column():
    """The same prompt twice: every value every GPU stage gets differs between the requests,
    and ``received - pad`` (mod 2^32) is the plain row quantisation: body within the norm
    limit, the exponent (last column, in [-40, 40]) hidden by the pad like the values."""
    sp = slalom()
    runner = Runner(sp)
    executor = Executor(sp.spec, runner=runner, seed=21)
    binding = executor.binding({"input_ids": IDS})
    executor.pool.fill(binding, 2)
    queued = list(executor.pool._sets[executor.pool.key(binding)])
    request(executor)
    request(executor)
    exact = sp.protection.exact
    stages = {s.name: s for s in sp.stages}
    for stage in gpu_stages(sp):
        first, second = runner.received[stage]
        for name, a, b in zip(stages[stage].inputs, first, second, strict=True):
            assert not torch.equal(a, b), (stage, name)
            assert a.dtype == torch.int32 and name in exact.row_limit
            for sent, pad in ((a, queued[0].pads[name]), (b, queued[1].pads[name])):
                plain = sent - pad  # int32: wraps
                assert _within(plain[..., :-1], exact.row_limit[name])
                assert _within(plain[..., -1], ops.MAX_ROW_BITS)
            # what the GPU sees of the exponent is uniform: nowhere near [-64, 64]
            assert int((a[..., -1].abs() <= 64).sum()) == 0


def test_no_keystream_block_is_used_twice_within_or_across_mask_sets():
    """Every 16-byte block of every pad of several mask sets (and of the Freivalds vectors) is
    distinct: no two values, requests or checks share a pad."""
    sp = slalom()
    executor = Executor(sp.spec, seed=22)
    sets = executor.pool.draw_many({"batch": 1, "seq": 9}, 3)
    blocks = [c for m in sets for pad in m.pads.values() for c in _chunks(pad)]
    blocks += [c for ch in executor.ring_checks.values() for v in ch.vectors for c in _chunks(v[0])]
    assert len(blocks) > 1000 and len(set(blocks)) == len(blocks)


def test_a_batch_of_sets_is_split_per_set_even_when_a_dimension_is_empty():
    """The pool splits a batch's corrections per set: with an empty leading dim (a size the
    background refill may be asked for; requests refuse it, the pool does not) every set
    still gets its own, empty, pads and corrections (a reviewer's finding: the split made
    one piece where there were four sets, and the fill raised)."""
    pool = Executor(slalom().spec, seed=25).pool
    pool.fill({"batch": 0, "seq": 4}, 4, batch=4)
    sets = [pool.take({"batch": 0, "seq": 4}) for _ in range(4)]
    assert pool.misses == 0
    for m in sets:
        assert m.deltas and all(t.shape[0] == 0 for t in m.deltas.values())
        assert all(m.arrays[n].shape == tuple(t.shape) for n, t in m.deltas.items())


def test_unseeded_executors_draw_unpredictable_pads():
    """``seed=None`` keys the CSPRNG from the OS: torch's generator cannot predict it, and two
    executors never share pads."""
    sp = slalom()
    pads = []
    for _ in range(2):
        torch.manual_seed(0)
        executor = Executor(sp.spec, seed=None)
        assert not executor.pool.rng.seeded
        pads.append(executor.pool.draw({"batch": 1, "seq": 9}).pads)
    assert all(not torch.equal(pads[0][n], pads[1][n]) for n in pads[0])


class _SlowCounter(int):
    """A counter whose read (``counter << 64``) stalls in one thread until told to go on: a
    thread switch between reading the CSPRNG's counter and incrementing it, made certain."""

    def __new__(cls, value: int, thread_name: str, reached, go):
        self = super().__new__(cls, value)
        self.thread_name, self.reached, self.go = thread_name, reached, go
        return self

    def __lshift__(self, bits: int) -> int:
        if threading.current_thread().name == self.thread_name:
            self.reached.set()
            self.go.wait(5)  # a CSPRNG with a lock blocks the other thread: time out, go on
        return int(self) << bits


def test_two_threads_drawing_at_once_never_share_a_keystream_block():
    rng = CSPRNG(23)
    reached, go = threading.Event(), threading.Event()
    rng._counter = _SlowCounter(rng._counter, "slow-drawer", reached, go)
    got: dict[str, bytes] = {}

    def slow() -> None:
        got["slow"] = rng.bytes(64)

    thread = threading.Thread(target=slow, name="slow-drawer")
    thread.start()
    assert reached.wait(5)
    try:
        got["fast"] = rng.bytes(64)  # the other thread, between its counter read and increment
    finally:
        go.set()
        thread.join(10)
    assert got["slow"] != got["fast"]


def test_a_redraw_of_s_during_a_background_refill_never_reuses_a_pad():
    sp = slalom()

    def tamper(stage, sent, outs, call):
        if stage == FIRST:
            outs[0][0, 0, 0] += 1
        return outs

    executor = Executor(sp.spec, runner=Runner(sp, tamper), seed=24)
    pool = executor.pool
    binding = executor.binding({"input_ids": IDS})
    pool.fill(binding, 1)  # the request takes this one: it does not wait for the pool's lock
    reached, go = threading.Event(), threading.Event()
    pool.rng._counter = _SlowCounter(pool.rng._counter, "teesplit-refill", reached, go)
    refill = threading.Thread(target=pool.fill, args=(binding, 1), name="teesplit-refill")
    refill.start()
    assert reached.wait(5)
    try:
        with pytest.raises(IntegrityError):
            request(executor)  # the GPU cheats; the check fails and draws a new s
    finally:
        go.set()
        refill.join(10)
    fresh = list(pool._sets[pool.key(binding)])[-1]
    pad_blocks = {c for pad in fresh.pads.values() for c in _chunks(pad)}
    s_blocks = {c for v in executor.ring_checks[FIRST].vectors for c in _chunks(v[0])}
    assert not pad_blocks & s_blocks


# -- 2. bit for bit with the quantised reference ---------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [(5, 17, 99, 3, 200, 42, 7, 128, 64), (0,), (255, 255, 255, 255), tuple(range(0, 256, 13))],
)
def test_an_honest_gpu_passes_and_matches_the_reference_bit_for_bit(ids):
    executor = Executor(slalom().spec, seed=25)
    out = request(executor, torch.tensor([ids]))
    assert torch.equal(out, reference(ids))


def _weight() -> tuple[torch.Tensor, int]:
    gen = torch.Generator().manual_seed(0)
    w, _ = quantise_weight(torch.randn(16, 64, generator=gen))
    norm = float(w.to(torch.int64).pow(2).sum(1).max()) ** 0.5
    return w, int(LINEAR_BOUND // norm)  # the plan's row limit for this weight


def _masked_linear(x: torch.Tensor, w: torch.Tensor, limit: int) -> torch.Tensor:
    """The enclave's row masking, the GPU's ring_linear (carrying the exponent), the unmask."""
    r = CSPRNG(26).ring([*x.shape[:-1], x.shape[-1] + 1], torch.int32)
    y = ops.ring_linear(ops.ring_mask_rows(x, r, limit), w, None, True)
    c = ops.ring_linear(r, w, None, True)
    return ops.ring_unmask_rows(y, c, torch.ones(w.shape[0], dtype=torch.float64), None)


def _reference_linear(x: torch.Tensor, w: torch.Tensor, limit: int) -> torch.Tensor:
    """What quantised_reference computes for the same layer: int64, no ring, no pad."""
    q, e = ops.quantize_rows(x, limit)
    out = torch.matmul(q, w.to(torch.int64).t())
    return ops.dequantize_rows(out, e, torch.ones(w.shape[0], dtype=torch.float64), None)


@pytest.mark.parametrize(
    "scale",
    [1.0, 0.0, 1e-30, 1e10, 1e15, 1e18, 1e30],
)
def test_row_quantisation_stays_inside_its_norm_limit_and_matches_the_reference(scale):
    w, limit = _weight()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's "invalid value encountered in cast"
        q, e = ops.quantize_rows(x, limit)
        assert float(q.double().norm(dim=-1).max()) <= limit
        assert int(e.max()) <= ops.MAX_ROW_BITS  # no lower bound: huge rows, small exponents
        assert torch.equal(_masked_linear(x, w, limit), _reference_linear(x, w, limit))


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_row_is_refused_or_matches_the_reference(poison):
    w, limit = _weight()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    x[1, 7] = poison
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            got = _masked_linear(x, w, limit)
        except Exception:  # refused: the safe outcome
            return
        assert torch.equal(got, _reference_linear(x, w, limit))


def test_clamped_quantisation_refuses_nan():
    with pytest.raises(InputError, match="NaN or inf"):
        ops.quantize(torch.tensor([0.5, float("nan"), -3.0]), 14, 2**20)


@functools.cache
def loud_split():
    """tiny-llama whose layer-0 input norm has weights of 2**60: the q/k/v projections' input
    rows have norms around 2**63, legitimate float32 activations."""
    model = BUILDERS["tiny-llama"]()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(2.0**60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return partition(model, "slalom", seed=27)


def test_an_honest_gpu_never_fails_the_check_even_on_huge_activations():
    request(Executor(loud_split().spec, seed=28))


def test_the_split_matches_the_reference_even_on_huge_activations():
    sp = loud_split()
    executor = Executor(sp.spec, seed=28)
    executor.ring_checks = {}  # as integrity="none" would run it
    out = request(executor)
    with torch.no_grad():
        assert torch.equal(out, model_output(quantised_reference(sp)(input_ids=IDS)))


# -- 3. Freivalds in Z_2^64 ------------------------------------------------------------------


def _add(index, value, output=0):
    def hook(stage, sent, outs, call):
        outs[output][index] += value
        return outs

    return hook


def _swap_rows(stage, sent, outs, call):
    outs[0][0, [1, 4]] = outs[0][0, [4, 1]]
    return outs


def _set_exponent(stage, sent, outs, call):
    outs[0][0, 2, -1] = 2**31 - 1  # unchecked, this would make the row 2**-2147483647 times
    return outs


def _cancelling(stage, sent, outs, call):
    outs[0][0, 3, 0] += 1
    outs[0][0, 3, 1] -= 1  # the row's plain sum unchanged
    return outs


TAMPERS = {
    "exponent column +1": (FIRST, _add((0, 2, -1), 1)),
    "exponent column set to 2**31-1": (FIRST, _set_exponent),
    "2**31 added to one entry": (FIRST, _add((0, 2, 5), -(2**31))),
    "2**31 added to a whole row": (FIRST, _add((0, 2), -(2**31))),
    "2**30 added to one entry": (FIRST, _add((0, 6, 9), 2**30)),
    "+1 and -1 in one row": (FIRST, _cancelling),
    "rows swapped": (FIRST, _swap_rows),
    "first output right, last output wrong": (FIRST, _add((0, 8, 0), 1, output=2)),
    "middle output wrong": (FIRST, _add((0, 0, 3), 7, output=1)),
    "every entry +1": (FIRST, _add((...,), 1)),
    "lm_head off by one": (LAST, _add((0, 0, 0), 1)),
    "lm_head exponent column": (LAST, _add((0, 4, -1), 3)),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_freivalds_catches_a_tampered_reply(case):
    stage, tamper = TAMPERS[case]

    def hook(name, sent, outs, call):
        return tamper(name, sent, outs, call) if name == stage else outs

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook), seed=29)
    with pytest.raises(IntegrityError, match=f"GPU stage {stage} returned results that fail"):
        request(executor)


def test_freivalds_catches_a_replayed_reply():
    """Same prompt twice: the GPU answers the second request with the first one's reply."""
    runner = Runner(slalom())

    def replay(stage, sent, outs, call):
        return runner.replies[stage][0] if call == 2 else outs

    runner.hook = replay
    executor = Executor(slalom().spec, runner=runner, seed=30)
    request(executor)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST} returned results that fail"):
        request(executor)


def test_freivalds_catches_a_reply_meant_for_another_stage():
    """gpu_3 and gpu_11 (the o-projections of layers 0 and 1) take and give the same shapes."""
    runner = Runner(slalom())

    def crossed(stage, sent, outs, call):
        if stage == "gpu_11":
            return runner.replies["gpu_3"][-1]
        return outs

    runner.hook = crossed
    executor = Executor(slalom().spec, runner=runner, seed=31)
    with pytest.raises(IntegrityError, match="GPU stage gpu_11 returned results that fail"):
        request(executor)


def test_every_gpu_stage_is_checked_and_honest_replies_always_pass():
    sp = slalom()
    executor = Executor(sp.spec, seed=32)
    assert set(executor.ring_checks) == set(gpu_stages(sp))
    gen = torch.Generator().manual_seed(3)
    for length in (1, 2, 17, 40):
        ids = torch.randint(0, 256, (1, length), generator=gen)
        request(executor, ids)  # raises IntegrityError if an honest reply failed


def test_s_is_kept_after_a_pass_and_redrawn_after_a_failure():
    cheat = {"on": False}

    def hook(stage, sent, outs, call):
        if cheat["on"] and stage == FIRST:
            outs[0][0, 0, 0] += 1
        return outs

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook), seed=33)
    check = executor.ring_checks[FIRST]
    before = [v[0].clone() for v in check.vectors]
    request(executor)
    assert all(torch.equal(a, v[0]) for a, v in zip(before, check.vectors, strict=True))
    cheat["on"] = True
    with pytest.raises(IntegrityError):
        request(executor)
    assert all(not torch.equal(a, v[0]) for a, v in zip(before, check.vectors, strict=True))


def test_a_gpu_that_edits_the_request_in_place_is_caught():
    def edit(stage, sent, call):
        if stage == FIRST:
            sent[0][..., -1] += 3  # every row's exponent: the layer's result 8x smaller

    executor = Executor(slalom().spec, runner=Runner(slalom(), before=edit), seed=34)
    try:
        out = request(executor)
    except IntegrityError:
        return
    assert torch.equal(out, reference(tuple(IDS[0].tolist())))


def test_errors_that_cancel_across_two_stages_are_caught():
    """+1 in one stage's result and -1 in the same place of another's: each stage has its
    own ``s``, and the first is checked before the second is asked for."""

    def hook(stage, sent, outs, call):
        if stage == "gpu_3":
            outs[0][0, 1, 0] += 1
        if stage == "gpu_11":  # the same shapes, one layer later
            outs[0][0, 1, 0] -= 1
        return outs

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook), seed=35)
    with pytest.raises(IntegrityError, match="GPU stage gpu_3 returned results that fail"):
        request(executor)


def test_a_wrong_result_is_reported_even_when_a_later_stage_fails_first():
    """A wrong result, then a failure further on (the worker gone): the error is the wrong
    result's, naming its stage, not the later one's."""

    def hook(stage, sent, outs, call):
        if stage == FIRST:
            outs[0][0, 2, 5] += 1
        return outs

    def gone(stage, sent, call):
        if stage == "gpu_9":
            raise RuntimeError("the GPU worker went away")

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook, gone), seed=36)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST} returned results that fail"):
        request(executor)
    honest = Executor(slalom().spec, runner=Runner(slalom(), before=gone), seed=36)
    with pytest.raises(RuntimeError, match="went away"):  # no wrong result: the error stands
        request(honest)


def _asked_after_a_lie(ids: tuple[int, ...], shift: int) -> int:
    """The GPU scales row 4 of the first stage's q by ``2**shift`` (its exponent residue) and
    counts the stages it is asked for before the call ends."""

    def hook(stage, sent, outs, call):
        if stage == FIRST:
            outs[0][0, 4, -1] -= shift
        return outs

    runner = Runner(slalom(), hook)
    with pytest.raises(IntegrityError):
        request(Executor(slalom().spec, runner=runner, seed=40), torch.tensor([ids]))
    return sum(runner.calls.values())


def test_where_a_call_ends_after_a_lie_does_not_depend_on_the_prompt():
    """Selective failure (a review's finding against checks deferred to the call's end): the
    enclave went on computing on the wrong value, and whether a later stage refused it (the
    row overflowing to inf) depended on the row's true magnitude, so the number of stages the
    GPU was asked for told it a bit of the prompt per request. Each reply is checked before
    any stage reads it: the call ends where the GPU lied, whatever the prompt."""
    for shift in (1, 64, 129):
        asked = {
            _asked_after_a_lie(tuple(ids), shift) for ids in ([*IDS[0].tolist()], range(1, 10))
        }
        assert asked == {1}, (shift, asked)


def test_an_in_process_runner_cannot_take_its_lie_back_before_the_check():
    """A runner that keeps the reply it gave and writes the honest values back into it during a
    later call: the reply is checked when it arrives, before the enclave reads it."""
    kept = {}

    def hook(stage, sent, outs, call):
        if stage == FIRST:
            kept["honest"] = outs[0].clone()
            outs[0][0, 2, -1] -= 3
            kept["reply"] = outs[0]
        elif stage == LAST and kept:
            kept["reply"].copy_(kept["honest"])
        return outs

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook), seed=50)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST} returned results that fail"):
        request(executor)


def test_a_reply_of_another_width_is_refused_by_the_check_itself():
    """Where the plan leaves a size open, ``check_reply`` checks the dtype only: the check
    refuses a reply that does not fit it with an ``IntegrityError``, not a numpy error."""
    check = Executor(slalom().spec, seed=51).ring_checks[FIRST]
    x = torch.zeros(1, 9, 65, dtype=torch.int32)
    sums = check.expect([x], [x.clone()])
    for widths in ((65, 33, 34), (66, 33, 33)):
        outs = [torch.zeros(1, 9, n, dtype=torch.int32) for n in widths]
        deltas = [torch.zeros(1, 9, n, dtype=torch.int32) for n in (65, 33, 33)]
        with pytest.raises(IntegrityError, match="the check refuses"):
            check.verify(sums, outs, deltas)
    rows = [torch.zeros(1, 8, n, dtype=torch.int32) for n in (65, 33, 33)]
    with pytest.raises(IntegrityError, match="the check refuses"):
        check.verify(sums, rows, [r.clone() for r in rows])


def test_a_runner_that_serialises_is_handed_the_enclave_tensors_and_still_checked():
    """``copies_inputs``: the executor hands a serialising runner its own tensors, uncopied;
    a wrong reply is caught all the same."""
    handed = []

    class Serialising(Runner):
        copies_inputs = True

        def run(self, stage, tensors, expected=None):
            handed.append((stage, tensors))
            return super().run(stage, tensors, expected)

    executor = Executor(slalom().spec, runner=Serialising(slalom(), _add((0, 3, 1), 1)), seed=37)
    with pytest.raises(IntegrityError, match="returned results that fail"):
        request(executor)
    honest = Executor(slalom().spec, runner=Serialising(slalom()), seed=37)
    assert torch.equal(request(honest), reference(tuple(IDS[0].tolist())))


# -- 4. hostile replies ----------------------------------------------------------------------


def _replace_first(make):
    def hook(stage, sent, outs, call):
        if stage == FIRST:
            outs[0] = make(outs[0])
        return outs

    return hook


def _change_count(delta):
    def hook(stage, sent, outs, call):
        if stage == FIRST:
            outs = outs[:delta] if delta < 0 else [*outs, outs[0]]
        return outs

    return hook


HOSTILE = {
    "int64 residues": _replace_first(lambda o: o.to(torch.int64)),
    "float32 values": _replace_first(lambda o: o.to(torch.float32)),
    "uint32 residues": _replace_first(lambda o: o.view(torch.uint32)),
    "no exponent column": _replace_first(lambda o: o[..., :-1].clone()),
    "an extra row": _replace_first(lambda o: torch.cat([o, o[:, :1]], dim=1)),
    "a batch of two": _replace_first(lambda o: torch.cat([o, o])),
    "a flat tensor": _replace_first(lambda o: o.reshape(-1)),
    "a 0-dim tensor": _replace_first(lambda o: o.sum().to(torch.int32)),
    "a numpy array": _replace_first(lambda o: o.numpy()),
    "a list of ints": _replace_first(lambda o: o.tolist()),
    "None": _replace_first(lambda o: None),
    "one output too few": _change_count(-1),
    "one output too many": _change_count(1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_malformed_reply_is_refused_with_an_integrity_error(case):
    executor = Executor(slalom().spec, runner=Runner(slalom(), HOSTILE[case]), seed=35)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST}"):
        request(executor)


def test_a_reply_that_is_not_a_sequence_is_refused_with_an_integrity_error():
    runner = Runner(slalom(), lambda stage, sent, outs, call: None if stage == FIRST else outs)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST}"):
        request(Executor(slalom().spec, runner=runner, seed=36))


def test_a_reply_on_another_device_is_refused_with_an_integrity_error():
    hook = _replace_first(lambda o: torch.empty_like(o, device="meta"))
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST}"):
        request(Executor(slalom().spec, runner=Runner(slalom(), hook), seed=37))


class _NumpyShowsHonest(torch.Tensor):
    """A reply whose torch values are wrong while ``.numpy()`` (what the check reads) shows
    the honest ones: an in-process GPU could return it."""

    honest: torch.Tensor

    def numpy(self, *args, **kwargs):
        return self.honest.numpy()


def _two_faced(reply: torch.Tensor) -> torch.Tensor:
    wrong = reply.clone()
    wrong[0, 2, 3] += 1
    out = wrong.as_subclass(_NumpyShowsHonest)
    out.honest = reply.clone()
    return out


HOSTILE_FORMS = {
    "a subclass whose numpy() is the honest reply": _two_faced,
    "a sparse reply": lambda reply: reply.to_sparse(),
    "a reply with its negative bit set": lambda reply: torch._neg_view(-reply),
    # exact torch.Tensor, strided, of the right dtype and shape, with no memory of their own
    # (a reviewer's attacks: a compiled library read address 0, numpy raised RuntimeError)
    "a zero tensor (no data)": lambda reply: torch._efficientzerotensor(
        tuple(reply.shape), dtype=reply.dtype
    ),
    "a functionalisation wrapper": lambda reply: torch._to_functional_tensor(reply.clone()),
    "a functorch batched tensor": lambda reply: torch._C._functorch._add_batch_dim(
        torch.stack([reply, reply]), 0, 1
    ),
}


@pytest.mark.parametrize("form", sorted(HOSTILE_FORMS))
def test_a_reply_in_another_form_of_tensor_is_refused(form):
    """``check_reply`` takes plain dense tensors only: anything else is refused as an
    ``IntegrityError`` before a stage or the check reads it (a reviewer's attacks: the
    two-faced subclass passed the check while the stages read the lie; the other two raised
    numpy's errors)."""

    def hook(stage, sent, outs, call):
        if stage == FIRST:
            outs[0] = HOSTILE_FORMS[form](outs[0])
        return outs

    executor = Executor(slalom().spec, runner=Runner(slalom(), hook), seed=52)
    with pytest.raises(IntegrityError, match=f"GPU stage {FIRST} output 0"):
        request(executor)


# -- GPU arithmetic (runs where CUDA is; skipped elsewhere) ----------------------------------


def _uniform_int32(shape, gen) -> torch.Tensor:
    wide = torch.randint(-(2**62), 2**62, shape, dtype=torch.int64, generator=gen)
    return ops.wrap(wide, torch.int32)


def test_integer_arithmetic_wraps_and_narrowing_keeps_the_residue():
    """The CPU ring_linear writes its int64 sums into int32 with one narrowing copy: this
    build must keep the low 32 bits (the residue mod 2**32) on every path of that copy
    (vectorised, scalar tail, strided destination)."""
    gen = torch.Generator().manual_seed(7)
    for n in (1, 7, 33, 4099):
        wide = torch.randint(-(2**52), 2**52, (n,), dtype=torch.int64, generator=gen)
        residue = ((wide + 2**31) & (2**32 - 1)) - 2**31
        dense = torch.empty(n, dtype=torch.int32).copy_(wide)
        strided = torch.empty(n, 3, dtype=torch.int32)
        strided[:, 1] = wide
        assert torch.equal(dense.to(torch.int64), residue)
        assert torch.equal(strided[:, 1].to(torch.int64), residue)
    # and ring arithmetic is plain integer arithmetic: int32 and int64 sums and products wrap
    top32 = torch.full((40,), 2**31 - 1, dtype=torch.int32)
    assert bool(((top32 + 1) == -(2**31)).all()) and bool(((top32 * 2) == -2).all())
    top64 = torch.full((40,), 2**63 - 1, dtype=torch.int64)
    assert bool(((top64 + 1) == -(2**63)).all()) and bool(((top64 * 2) == -2).all())


@pytest.mark.parametrize("weights", ["int8", "int16", "float64"])
def test_ring_linear_on_the_cpu_is_the_residue_of_the_exact_product(weights):
    """The int32 CPU path (one float64 GEMM, narrowed once) against the int64 path (four
    16-bit limb GEMMs, a different computation) reduced mod 2**32, on uniform residues: with
    and without the carried exponent column, with a bias, batched, and on a strided input."""
    gen = torch.Generator().manual_seed(9)
    for fan_in, out_features, lead in [(64, 96, (5,)), (577, 40, (3, 2)), (1536, 24, (1, 1))]:
        w, _ = quantise_weight(torch.randn(out_features, fan_in, generator=gen))
        if weights == "int16":
            w = torch.randint(-(2**11), 2**11, w.shape, dtype=torch.int16, generator=gen)
        prepared = w.to(torch.float64) if weights == "float64" else w
        b = _uniform_int32((out_features,), gen) // 4
        u = _uniform_int32((*lead, 2 * (fan_in + 1)), gen)[..., ::2]  # not contiguous
        for carry, bias in [(False, b), (False, None), (True, None)]:
            x = u if carry else u[..., :-1]
            got = ops.ring_linear(x, prepared, bias, carry)
            body = x[..., :-1] if carry else x
            wide = ops.ring_linear(body.to(torch.int64), w, None)
            if bias is not None:
                wide = wide + bias
            want = ops.wrap(wide, torch.int32)
            if carry:
                want = torch.cat([want, x[..., -1:]], -1)
            assert got.dtype == torch.int32
            assert torch.equal(got, want), (fan_in, out_features, carry, bias is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prepared", [False, True], ids=["int8-digits", "float64"])
def test_ring_linear_on_cuda_is_bit_exact_on_uniform_residues(prepared):
    """What an honest CUDA GPU returns is what the enclave's own arithmetic gives: both the
    int8 ``_int_mm`` digits (GPUs without fast FP64) and the float64 GEMM (prepared weights)."""
    gen = torch.Generator().manual_seed(4)
    for fan_in, out_features, rows in [
        (64, 256, 40),
        (64, 64, 5),
        (128, 64, 17),
        (1024, 512, 33),
        (4096, 96, 24),
    ]:
        w, _ = quantise_weight(torch.randn(out_features, fan_in, generator=gen))
        b = _uniform_int32((out_features,), gen) // 4
        u = _uniform_int32((2, rows, fan_in + 1), gen)
        on_device = w.to(torch.float64).cuda() if prepared else w.cuda()
        for carry in (False, True):
            x = u if carry else u[..., :-1]
            bias = None if carry else b
            cpu = ops.ring_linear(x, w, bias, carry)
            gpu = ops.ring_linear(x.cuda(), on_device, None if bias is None else bias.cuda(), carry)
            assert torch.equal(cpu, gpu.cpu()), (fan_in, out_features, rows, carry)
        u64 = torch.randint(-(2**62), 2**62, (rows, fan_in), dtype=torch.int64, generator=gen)
        assert torch.equal(
            ops.ring_linear(u64, w, None), ops.ring_linear(u64.cuda(), on_device, None).cpu()
        )
    a = torch.randint(-(2**62), 2**62, (2, 33, 40), dtype=torch.int64, generator=gen)
    b64 = torch.randint(-(2**62), 2**62, (2, 40, 24), dtype=torch.int64, generator=gen)
    assert torch.equal(ops.ring_matmul(a, b64), ops.ring_matmul(a.cuda(), b64.cuda()).cpu())
