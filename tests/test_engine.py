"""The serving scheduler (``enclave_runtime.engine``): every session decoding at once advances
in one call per step, with one sequence per row (``rows``) that the cache's holder keeps apart.

Attacks on its one promise, that each session gets what it would get alone: sessions of
different prompt lengths and answer lengths batched together, in process and over a real
worker (greedy tokens equal to decoding each alone, far fewer calls than tokens); a preset
whose cache the enclave keeps (left-padded in the enclave); a cancelled session (dropped before
the next step, its cache freed on the worker); and hostile row calls to the worker (malformed
ids, a row that was never started or is started twice, a cache length out of step, a release
carrying tensors).
"""

from __future__ import annotations

import queue
import threading
import types

import grpc
import pytest
import torch
from conftest import TRUSTED, partition_step_for_tests, shared_step_bundle
from test_generation import prompt
from test_held_state import _stage_request

from enclave_runtime.driver import WorkerError, worker_client
from enclave_runtime.engine import Engine, Request
from enclave_runtime.executor import Executor, InProcessRunner
from enclave_runtime.generation import context_length, decode_steps
from enclave_runtime.openai_api import Job
from enclave_runtime.sessions import Session
from partitioner.bundle import load_program
from runtime.kserve import service
from runtime.state import RowStates, StateError, row_ids, stand_in
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")

# (prompt length, tokens asked for): caches of different lengths, sessions ending at different steps
LOAD = [(3, 6), (9, 4), (5, 7), (12, 2)]


@pytest.fixture(scope="module")
def cmif():
    return partition_step_for_tests("cmif")


@pytest.fixture(scope="module")
def cmif_root(cmif, tmp_path_factory):
    return shared_step_bundle(tmp_path_factory, "cmif")


class Tokens:
    """A stand-in tokenizer: token ``i`` is the text ``<i>``, so the text gives the ids back."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


class LocalClient(InProcessRunner):
    """The in-process runner with what the engine reads of a worker client."""

    broken = False
    bytes_sent = bytes_received = 0

    def __init__(self, plan) -> None:
        super().__init__(plan)
        self.calls = 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return super().run(*args, **kwargs)

    def close(self) -> None:
        pass


def model(plan, client):
    return types.SimpleNamespace(
        plan=plan,
        tokenizer=Tokens(),
        eos=set(),
        policy=plan.policy.name,
        client=lambda _: client,
        context=context_length(plan),
    )


def submit(
    engine: Engine, ids: torch.Tensor, new: int, private: bool = False
) -> tuple[Session, queue.Queue]:
    items: queue.Queue = queue.Queue()
    job = Job("completion", "m", prompt_ids=ids[0].tolist(), max_tokens=new, temperature=0)
    session = Session()
    ended = lambda: items.put(("ended",))  # noqa: E731
    # the prompt public unless asked: RNM's noise (drawn per call) would make "alone" differ
    public = None if private else torch.ones_like(ids, dtype=torch.bool)
    engine.submit(Request(session, job, ids, public, new, items.put, ended))
    return session, items


def collect(items: queue.Queue) -> tuple[list[int], tuple]:
    """The tokens a session streamed, and its final item."""
    text = ""
    while True:
        item = items.get(timeout=60)
        if item[0] != "text":
            assert items.get(timeout=60) == ("ended",)
            return [int(t) for t in text.strip("<>").split("><") if t], item
        text += item[1]


def collect_final(items: queue.Queue) -> tuple[list[int], tuple]:
    """As :func:`collect`, for a session whose ``ended`` puts nothing."""
    text = ""
    while (item := items.get(timeout=60))[0] == "text":
        text += item[1]
    return [int(t) for t in text.strip("<>").split("><") if t], item


def alone(plan, ids: torch.Tensor, new: int) -> list[int]:
    public = torch.ones_like(ids, dtype=torch.bool)
    steps = decode_steps(Executor(plan, seed=0), ids, max_new_tokens=new, public_prompt=public)
    return [int(t[0]) for t in steps]


def run_load(engine: Engine, plan) -> None:
    prompts = [prompt(batch=1, seq=n, seed=20 + i) for i, (n, _) in enumerate(LOAD)]
    # submitted together: they are prefilled in one turn and decode side by side
    with engine._cond:
        sessions = [submit(engine, ids, new) for ids, (_, new) in zip(prompts, LOAD, strict=True)]
    for (ids, (_, new)), (_, items) in zip(zip(prompts, LOAD, strict=True), sessions, strict=True):
        tokens, final = collect(items)
        assert final[0] == "done" and final[1] == "length", final
        assert tokens == alone(plan, ids, new)


@pytest.mark.parametrize("policy", ["cmif", "slalom"])
def test_sessions_decoded_together_get_the_tokens_they_get_alone(policy, cmif):
    """cmif: the GPU stage holds each row's cache; slalom: the enclave keeps the caches and
    left-pads them itself (exact masks, per-row quantisation)."""
    split = cmif if policy == "cmif" else partition_step_for_tests(policy)
    client = LocalClient(split.spec)
    engine = Engine(model(split.spec, client))
    try:
        run_load(engine, split.spec)
    finally:
        engine.close()
    held = sum(len(r.rows) for r in client._rows.values())
    assert held == 0  # every finished session's cache was freed
    if policy == "cmif":
        # 4 prefills, then one call per step for every session still decoding (7 steps)
        assert engine.steps <= max(new for _, new in LOAD)
        assert client.calls <= len(LOAD) + max(new for _, new in LOAD) - 1


def test_prompts_prefilled_together_are_each_charged_their_own_epsilon(cmif):
    """One call sanitises every new prompt (left-padded): each request's ε counts its own
    private positions, never its batch-mates' or the pad's."""
    site = cmif.spec.protection.rnm
    engine = Engine(model(cmif.spec, LocalClient(cmif.spec)))
    prompts = [prompt(batch=1, seq=n, seed=50 + n) for n in (2, 11, 6)]
    try:
        with engine._cond:
            sessions = [submit(engine, ids, 2, private=True) for ids in prompts]
        for ids, (_, items) in zip(prompts, sessions, strict=True):
            _, final = collect(items)
            assert final[3]["epsilon"] == site.tables.request_epsilon(ids) > 0
            assert final[3]["epsilon_per_token"] == site.epsilon
    finally:
        engine.close()


def test_a_prompt_the_program_refuses_fails_alone(cmif):
    """A hostile client's prompt (an id outside the vocabulary, past the server's own checks)
    prefilled with others: it is refused, they are answered."""
    engine = Engine(model(cmif.spec, LocalClient(cmif.spec)))
    good = [prompt(batch=1, seq=n, seed=60 + n) for n in (4, 7)]
    bad = torch.tensor([[5, cmif.spec.vocab + 9, 6]])
    try:
        with engine._cond:
            first = submit(engine, good[0], 3)
            _, refused = submit(engine, bad, 3)
            last = submit(engine, good[1], 3)
        assert collect(refused)[1][1].status == 400
        for ids, (_, items) in zip(good, [first, last], strict=True):
            assert collect(items)[0] == alone(cmif.spec, ids, 3)
    finally:
        engine.close()


def test_a_long_prompt_cannot_push_a_short_one_past_the_context(cmif):
    """A short prompt's left pad stays in its cache: prefilled beside a prompt almost as long as
    the context, it would overflow the context while decoding (and the refused step would fail
    every session decoding with it). Such prompts are prefilled apart."""
    engine = Engine(model(cmif.spec, LocalClient(cmif.spec)))
    context = context_length(cmif.spec)
    short = prompt(batch=1, seq=4, seed=3)
    try:
        _, bystander = submit(engine, prompt(batch=1, seq=5, seed=1), 40)
        assert bystander.get(timeout=60)[0] == "text"  # decoding already
        with engine._cond:
            _, hostile = submit(engine, prompt(batch=1, seq=context - 8, seed=2), 1)
            _, victim = submit(engine, short, context - 4)  # fits the context alone
        for items in (hostile, victim, bystander):
            assert collect(items)[1][:2][0] == "done"
    finally:
        engine.close()


def test_a_session_finished_by_its_first_token_takes_no_more_steps(cmif):
    ids = prompt(batch=1, seq=6, seed=2)
    first = alone(cmif.spec, ids, 1)[0]
    for eos, stop, new in [(set(), [], 1), ({first}, [], 5), (set(), [f"<{first}>"], 5)]:
        served = model(cmif.spec, LocalClient(cmif.spec))
        served.eos = eos
        engine = Engine(served)
        items: queue.Queue = queue.Queue()
        job = Job("completion", "m", prompt_ids=ids[0].tolist(), max_tokens=new, temperature=0,
                  stop=stop)  # fmt: skip
        public = torch.ones_like(ids, dtype=torch.bool)
        engine.submit(Request(Session(), job, ids, public, new, items.put, lambda: None))
        try:
            tokens, final = collect_final(items)
        finally:
            engine.close()
        assert final[2]["completion_tokens"] == 1, (eos, stop, new)
        assert tokens == ([first] if not eos and not stop else [])


def test_a_row_that_fails_in_the_enclave_fails_alone(cmif):
    """A failure on one session's row (here: sending its first token fails) ends that session
    once; the session prefilled with it decodes on, and the scheduler keeps running."""
    engine = Engine(model(cmif.spec, LocalClient(cmif.spec)))
    ids = [prompt(batch=1, seq=n, seed=70 + n) for n in (3, 5)]
    try:
        with engine._cond:
            _, broken = submit(engine, ids[0], 4)
            _, fine = submit(engine, ids[1], 4)
            request = engine._pending[0]
            sent = request.emit

            def emit(item, calls=[]):  # noqa: B006 - counts this session's items
                calls.append(item)
                if len(calls) == 1:
                    raise RuntimeError("the client's queue fell over")
                sent(item)

            request.emit = emit
        items = []
        while (item := broken.get(timeout=60)) != ("ended",):
            items.append(item)
        assert [i[0] for i in items] == ["error"] and items[0][1].status == 500
        assert collect(fine)[0] == alone(cmif.spec, ids[1], 4)
        _, again = submit(engine, ids[0], 2)
        assert collect(again)[1][0] == "done"  # the scheduler is still running
    finally:
        engine.close()


def test_over_a_worker_each_row_continues_its_own_cache(cmif, cmif_root, tmp_path):
    root = cmif_root
    worker = GPUWorker(root / "gpu")
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(worker, address)
    plan = load_program(root, gpu=False, trusted_key=TRUSTED)
    stage = next(iter(worker.stages))
    try:
        engine = Engine(model(plan, worker_client(plan, address)))
        try:
            run_load(engine, cmif.spec)
            assert worker.stats[stage]["calls"] <= len(LOAD) + max(new for _, new in LOAD) - 1
            assert worker.held_sequences() == 0
            # a cancelled session leaves the batch and the worker's memory
            long_ids = prompt(batch=1, seq=4, seed=40)
            with engine._cond:
                session, items = submit(engine, long_ids, 60)
                _, other = submit(engine, prompt(batch=1, seq=6, seed=41), 3)
            assert collect(other)[1][0] == "done"
            assert items.get(timeout=60)[0] == "text"  # decoding
            assert worker.held_sequences() == 1
            session.cancel()
            while (item := items.get(timeout=60))[0] == "text":
                pass
            assert item[1].status == 499 and items.get(timeout=60) == ("ended",)
            assert worker.held_sequences() == 0
        finally:
            engine.close()
    finally:
        server.shutdown()


def test_row_ids_are_checked():
    assert row_ids("a,b-2,C_3") == ["a", "b-2", "C_3"]
    for bad in ["", "a,,b", "a,a", "x" * 65, "a b", "../etc", "a;b"]:
        with pytest.raises(StateError):
            row_ids(bad)


def test_the_holder_refuses_rows_out_of_step(cmif):
    [slots] = cmif.spec.held().values()
    states = RowStates("gpu", slots, max_rows=3)
    zero = [torch.zeros(1, 2, 0, 16)] * (max(s.input for s in slots) + 1)
    for rows, n in (["a"], 3), (["b"], 5):  # two sequences of different lengths
        batch = states.batch(rows, start=True)
        given = batch.inputs(list(zero))
        outs = [torch.randn(1, 2, n, 16) for _ in range(max(s.output for s in slots) + 1)]
        batch.keep(given, outs)
    with pytest.raises(StateError, match="started already"):
        states.batch(["a"], start=True)
    with pytest.raises(StateError, match="holds no sequence c"):
        states.batch(["a", "c"], start=False)
    with pytest.raises(StateError, match="limit of 3"):
        states.batch(["c", "d"], start=True)
    slot = slots[0]
    batch = states.batch(["a", "b"], start=False)
    assert batch.held_shape(slot) == [2, 2, 5, 16]  # the longest row
    wrong = [stand_in([2, 2, 3, 16], torch.float32)] * len(zero)
    with pytest.raises(StateError, match="holds"):
        batch.inputs(wrong)  # the shorter row's length: out of step
    padded = batch.inputs([stand_in([2, 2, 5, 16], torch.float32)] * len(zero))[slot.input]
    a = states.rows["a"][slot.input]
    assert torch.equal(padded[0, :, 2:], a[0]) and not padded[0, :, :2].any()  # left-padded
    states.release(["a", "zzz"])  # unknown ids are ignored
    assert set(states.rows) == {"b"}


def test_a_worker_restarted_while_idle_costs_no_request(cmif, cmif_root, tmp_path):
    """The stream dies while nothing holds a cache on it: the next prompts are tried once
    more on a new stream instead of failing."""
    worker = GPUWorker(cmif_root / "gpu")
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(worker, address)
    plan = load_program(cmif_root, gpu=False, trusted_key=TRUSTED)
    engine = Engine(model(plan, None))
    engine.model.client = lambda _: worker_client(plan, address, timeout=10)
    ids = prompt(batch=1, seq=5, seed=1)
    try:
        assert collect(submit(engine, ids, 3)[1])[1][0] == "done"
        server.shutdown()
        server = serve(worker, address)  # restarted: the engine's stream is gone
        with engine._cond:
            sessions = [submit(engine, ids, 3), submit(engine, prompt(1, 7, 2), 3)]
        for _, items in sessions:
            assert collect(items)[1][0] == "done"
    finally:
        engine.close()
        server.shutdown()


def test_a_session_finished_before_a_stream_dies_ends_as_it_finished(cmif):
    """A first prefill group finishes at its first token; the worker then dies on the second
    group's prefill, on the retry's new stream too: the first answer stands, the second
    fails (502), and the next request is served."""
    context = context_length(cmif.spec)
    doomed = prompt(1, 10, 2)
    died = []

    class Dying(LocalClient):
        broken = False

        def run(self, stage, tensors, *args, rows=None, **kwargs):
            if rows is not None and any(t.shape[:2] == (1, doomed.shape[1]) for t in tensors):
                died.append(rows[0])
                self.broken = True
                raise WorkerError("the worker died")
            return super().run(stage, tensors, *args, rows=rows, **kwargs)

    engine = Engine(model(cmif.spec, None))
    engine.model.client = lambda _: Dying(cmif.spec)
    try:
        with engine._cond:  # too long together: two prefill groups, the longer first
            _, first = submit(engine, prompt(1, context - 20, 1), 1)
            _, second = submit(engine, doomed, 30)
        assert collect(first)[1][:2] == ("done", "length")
        final = collect(second)[1]
        assert final[0] == "error" and final[1].status == 502, (final, died)
        assert len(died) == 2  # tried once more on a new stream, which died too
        assert collect(submit(engine, prompt(1, 6, 3), 2)[1])[1][0] == "done"
    finally:
        engine.close()


def test_the_worker_refuses_malformed_row_calls(cmif, cmif_root, tmp_path):
    root = cmif_root
    address = f"unix:{tmp_path / 'w.sock'}"
    worker = GPUWorker(root / "gpu")
    server = serve(worker, address)
    try:
        [stage] = [s for s in cmif.stages if s.side == "gpu"]
        _, service_grpc = service()
        stub = service_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
        edges = {e.name: e for e in cmif.edges if e.consumer == stage.name}

        def request(rows: int, **params):
            sizes = {
                n: [{"batch": rows, "seq": 1}.get(d, d) if isinstance(d, str) else d
                    for d in edges[n].shape]
                for n in stage.inputs
                if n not in cmif.spec.state
            }  # fmt: skip
            return _stage_request(stage, sizes, **params)

        calls = [
            request(2, teesplit_rows="a,b", sequence_start=True),  # starts two sequences
            request(2, teesplit_rows="a,b"),  # continues them
            request(1, teesplit_rows="a", sequence_start=True),  # a second start: refused
            request(1, teesplit_rows="c"),  # never started: refused
            request(2, teesplit_rows="a,a"),  # one sequence, two rows: refused
            request(1, teesplit_rows="a/../../x"),  # not an id: refused
            request(1, teesplit_rows="a,b"),  # two sequences named for one row
        ]
        release = _stage_request(stage, {}, teesplit_release="a,nobody")
        with_tensor = request(1, teesplit_release="b")
        replies = list(stub.ModelStreamInfer(iter([*calls, release, with_tensor]), timeout=30))
        errors = [r.error_message for r in replies]
        assert errors[:2] == ["", ""]
        assert "started already" in errors[2]
        assert "holds no sequence c" in errors[3]
        assert "names two rows" in errors[4]
        assert "is not a sequence id" in errors[5]
        assert "2 sequences named for 1 rows" in errors[6], errors[6]
        assert errors[7] == "" and "carries no tensors" in errors[8]
        assert [len(r.infer_response.outputs) for r in replies[:2]] == [len(stage.outputs)] * 2
        assert worker.held_sequences() == 0  # the stream ended: b went with it
        # outside a session (ModelInfer) nothing is held: the omitted caches are refused
        with pytest.raises(grpc.RpcError, match="INVALID_ARGUMENT"):
            stub.ModelInfer(request(1, teesplit_rows="a"), timeout=10)
    finally:
        server.shutdown()


def test_decode_steps_take_mask_sets_drawn_ahead_by_the_background_refill():
    """The offline work is offline when serving: a thread keeps one-session decode mask sets
    stocked, so a step takes one instead of drawing it (and its corrections) on the spot;
    only the prefill, whose length varies, draws its own. ``/health`` reports the stock."""
    split = partition_step_for_tests("slalom")
    engine = Engine(model(split.spec, LocalClient(split.spec)))
    try:
        for _ in range(600):  # the first batch, drawn while nothing is asked
            if engine.masks()["mask_sets_ready"] >= 8:
                break
            threading.Event().wait(0.05)
        stats = engine.masks()
        assert stats["mask_sets_ready"] >= 8 and stats["mask_set_misses"] == 0
        ids = prompt(batch=1, seq=5, seed=4)
        tokens, final = collect(submit(engine, ids, 6)[1])
        assert final[0] == "done" and tokens == alone(split.spec, ids, 6)
        assert engine.masks()["mask_set_misses"] == 1  # the prefill; 5 decode steps took sets
        assert engine.masks()["mask_sets_per_s"] > 0
    finally:
        engine.close()
    assert engine._refill.is_set()  # the refill thread stops with the engine


def test_a_preset_whose_mask_sets_grow_with_the_cache_is_not_stocked():
    """secureinfer's pads cover the attention products, whose shapes name the cache length: a
    set for one decode step serves no other, so none is stocked (the refill used to start and
    die on the unbound size, leaving ``/health`` at zero for good)."""
    split = partition_step_for_tests("secureinfer")
    engine = Engine(model(split.spec, LocalClient(split.spec)))
    try:
        assert engine._refill is None
        assert engine.masks() == {"mask_sets_ready": 0, "mask_set_misses": 0, "mask_sets_per_s": 0}
        ids = prompt(batch=1, seq=4, seed=5)
        tokens, final = collect(submit(engine, ids, 3)[1])
        assert final[0] == "done" and tokens == alone(split.spec, ids, 3)
    finally:
        engine.close()
