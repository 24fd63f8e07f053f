"""Review of held state, resident and passing values (the commits since "The cache stays
where it is computed"). Each test here showed one problem the review found, and failed until
it was fixed (in-process holders return the real refills; an executor refuses to continue a
generation after another one started, ``Executor.run(sequence=...)``).

1. A held cache's ``present`` outputs come back from ``Executor.run`` as stand-ins (stride-0
   zeros) that look like data. The decoder step's documented contract
   (``partitioner.generation``: ``(input_ids, past) -> (logits, *present)``, "the caller
   appends ``present`` to ``past`` between calls") then silently yields a cache of zeros, and
   the in-process holder accepts that real-looking tensor as the cache ("a real tensor
   replaces what is held"): wrong logits, no error.
2. The held state lives in the executor's runner (``InProcessRunner._state``, and
   ``WorkerClient._sequences`` for a worker), one sequence per stage, with nothing naming
   which generation a call belongs to. Two generations interleaved on one executor (two
   requests served by one executor, or two ``decode_steps`` iterators) run on each other's
   caches whenever their lengths agree: the first continues, in silence, on the second's
   cache (its tokens then depend on the other request's prompt) and only the second is
   refused, a step later. In process and over a worker alike.
"""

import pytest
import torch
from conftest import TRUSTED, partition_step_for_tests, shared_step_bundle
from test_generation import args, prompt
from test_held_state import without_holders

from enclave_runtime.driver import connect
from enclave_runtime.executor import Executor
from enclave_runtime.generation import _empty_state, decode_steps, generate
from partitioner.errors import TeesplitError
from runtime.worker import GPUWorker, serve

pytestmark = pytest.mark.filterwarnings("ignore:no CUDA device")

NEW = 4


@pytest.fixture(scope="module")
def split():
    # all_gpu: the cache is held (tests/test_held_state.py) and nothing is random, so two
    # executors of the plan give the same tokens whatever the order of their calls
    out = partition_step_for_tests("all_gpu")
    assert {spec.holder for spec in out.spec.state.values()} != {None}
    return out


@pytest.fixture(scope="module")
def bundle(split, tmp_path_factory):
    return shared_step_bundle(tmp_path_factory, "all_gpu")


def manual_decode(executor: Executor, ids: torch.Tensor, new: int) -> list[int]:
    """Greedy decoding as partitioner.generation documents the step: append ``present``."""
    plan = executor.spec
    specs = [plan.state[n] for n, _ in plan.signature.inputs if n in plan.state]
    past = _empty_state(plan, ids.shape[0], ids.device)
    tokens, step_ids = [], ids
    for _ in range(new):
        with torch.no_grad():
            out = executor.run(args(step_ids, past), {})
        next_ids = out[0][:, -1].argmax(-1)
        tokens.append(int(next_ids[0]))
        past = [
            torch.cat([p, out[spec.output]], dim=spec.dim)
            for p, spec in zip(past, specs, strict=True)
        ]
        step_ids = next_ids[:, None]
    return tokens


def test_present_outputs_of_a_held_cache_are_the_new_keys_and_values(split):
    """``present`` is part of the step's result; with a holder it is zeros, without one the
    keys and values the model computed."""
    ids = prompt(batch=1, seq=5)
    past = _empty_state(split.spec, 1, ids.device)
    held = Executor(split.spec, seed=1).run(args(ids, past), {})
    sent = Executor(without_holders(split.spec), seed=1).run(args(ids, past), {})
    assert torch.equal(held[0], sent[0])
    assert any(bool(t.abs().sum() > 0) for t in sent[1:])
    for i, (h, s) in enumerate(zip(held[1:], sent[1:], strict=True)):
        assert torch.equal(h, s), f"present[{i}] is not what the model computed"


def test_decoding_by_the_documented_step_contract_gives_generate_tokens(split):
    """A caller that appends ``present`` to ``past`` (the documented contract, and what a
    plan without holders needs) gets the tokens of ``generate`` -- or an error; never other
    tokens in silence."""
    ids = prompt(batch=1, seq=5)
    want = generate(Executor(split.spec, seed=2), ids, max_new_tokens=NEW)[0, 5:].tolist()
    assert manual_decode(Executor(without_holders(split.spec), seed=2), ids, NEW) == want
    assert manual_decode(Executor(split.spec, seed=2), ids, NEW) == want


def interleaved(executor: Executor, prompts: list[torch.Tensor]) -> list[list[int]]:
    """Each prompt's tokens, its decoding steps taken in turn with the others' on one
    executor (as two requests served by one executor would). A generation that is refused
    stops there (a refusal is fine): what it yielded before stands."""
    steps = [decode_steps(executor, ids, max_new_tokens=NEW) for ids in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    refused: set[int] = set()
    for _ in range(NEW):
        for i, it in enumerate(steps):
            if i in refused:
                continue
            try:
                out[i].append(int(next(it)[0]))
            except TeesplitError:  # typed: the request fails, visibly
                refused.add(i)
    return out


def wrong_in_silence(got: list[list[int]], want: list[list[int]]) -> list[tuple[int, int]]:
    """(generation, step) of every token yielded that is not that generation's own."""
    return [
        (i, j)
        for i, (g, w) in enumerate(zip(got, want, strict=True))
        for j, token in enumerate(g)
        if token != w[j]
    ]


def test_two_generations_on_one_executor_keep_their_own_caches(split):
    """Without holders, interleaving two generations on one executor is harmless (each passes
    its own cache); with them, the second one's start replaces the first one's cache and the
    first continues on it (the lengths agree) without an error: its next token is computed on
    the other request's prompt. Refusing is fine; another request's cache is not."""
    prompts = [prompt(batch=1, seed=s) for s in (1, 2)]
    want = [
        generate(Executor(split.spec, seed=0), ids, max_new_tokens=NEW)[0, 7:].tolist()
        for ids in prompts
    ]
    assert want[0] != want[1]
    assert interleaved(Executor(without_holders(split.spec), seed=0), prompts) == want
    got = interleaved(Executor(split.spec, seed=0), prompts)
    assert wrong_in_silence(got, want) == [], (got, want)


def test_two_generations_over_one_worker_session_keep_their_own_caches(split, bundle, tmp_path):
    """The same over a worker: the client keeps one sequence per stage
    (``WorkerClient._sequences``), so the second generation's sequence_start replaces the
    first's and the first continues, on the worker, on the second's cache."""
    prompts = [prompt(batch=1, seed=s) for s in (1, 2)]
    want = [
        generate(Executor(split.spec, seed=0), ids, max_new_tokens=NEW)[0, 7:].tolist()
        for ids in prompts
    ]
    address = f"unix:{tmp_path / 'w.sock'}"
    server = serve(GPUWorker(bundle / "gpu"), address)
    try:
        remote = connect(bundle, address, trusted_key=TRUSTED, seed=0)
        got = interleaved(remote, prompts)
        assert wrong_in_silence(got, want) == [], (got, want)
    finally:
        server.shutdown()
