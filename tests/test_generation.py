"""KV-cache generation through split programs, token for token against transformers."""

import dataclasses

import pytest
import torch
from conftest import (
    SIGN_KEY,
    STEP_SEED,
    TRUSTED,
    built,
    partition_step_for_tests,
    shared_step_bundle,
    step,
)
from models import tiny_llama

from enclave_runtime.driver import connect
from enclave_runtime.generation import generate
from partitioner.api import load, partition
from partitioner.capturing import capture
from partitioner.errors import PartitionError
from partitioner.generation import capture_decoder
from partitioner.policy import Policy
from runtime.worker import GPUWorker, serve

DECODERS = ["tiny-llama", "tiny-qwen2", "tiny-phi3", "tiny-gpt2", "tiny-opt", "tiny-llama-lora"]
# cmif's placement with RNM switched off: the only way its tokens can equal generate's
CMIF_NO_RNM = dataclasses.replace(
    Policy.resolve("cmif"), name="cmif-no-rnm", rnm=None, protects=frozenset()
)


def args(ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A decoder step's arguments for whole rows: ``(ids, padding zeros, past)``."""
    return (ids, torch.zeros(ids.shape[0], 1, dtype=torch.long), past)


def hf_generate(model, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def prompt(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 200, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_capture_declares_the_cache_as_state():
    captured = step("tiny-llama")
    assert set(captured.dim_names.values()) == {"batch", "seq", "past"}
    layers = built("tiny-llama").config.num_hidden_layers
    assert sorted(captured.state) == sorted(f"past_{i}" for i in range(2 * layers))
    assert [s.output for s in captured.state.values()] == list(range(1, 2 * layers + 1))
    assert captured.reference == {"batch": 1, "seq": 1, "past": 128}
    assert not built("tiny-llama").training  # capture leaves the caller's model in eval


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("policy", [CMIF_NO_RNM, "secureinfer", "slalom", "all_gpu"])
def test_tokens_equal_transformers_generate(name, policy):
    """Float placements give transformers' tokens. Exact masks (slalom) compute the model
    with integer weights and fixed-point activations, bit for bit: their tokens are those of
    that quantised model, which agrees with the float one on ~99 % of arg-maxes, so a near-tie
    may flip against transformers, never against the quantised model."""
    ids = prompt()
    split = partition(step(name), policy, seed=3)
    if split.policy.masking == "exact" and split.protection.masked:
        expected = generate(_QuantisedReference(split), ids, max_new_tokens=10)
    else:
        expected = hf_generate(built(name), ids, 10, eos_token_id=None)
    assert torch.equal(generate(split, ids, max_new_tokens=10), expected)


class _QuantisedReference:
    """``passes.exact.quantised_reference`` behind the executor surface ``generate`` uses:
    the unsplit decoder step in the same fixed point, with no masks."""

    def __init__(self, split) -> None:
        from passes.exact import quantised_reference

        self.spec = split.spec
        self.last_request: dict = {}
        self._step = quantised_reference(split)

    def executor(self):
        return self

    def run(self, args, kwargs, *, public_tokens=False, last=False, sequence=None):
        return self._step(*args, **kwargs)


def test_cmif_sanitises_the_prompt_only():
    """Under RNM the output is exactly generate() on the sanitised prompt: decode steps feed
    the generated tokens through unchanged, and the request's ε is the prompt's."""
    ids = prompt(batch=1, seq=12)
    split = partition(step("tiny-llama"), "cmif", seed=5)
    executor = split.executor()
    out = generate(executor, ids, max_new_tokens=8)
    sanitised = executor.last_request["sanitised_tokens"]
    assert sanitised.shape == ids.shape and not torch.equal(sanitised, ids)
    assert torch.equal(
        out[:, 12:], hf_generate(built("tiny-llama"), sanitised, 8, eos_token_id=None)[:, 12:]
    )
    assert executor.last_request["epsilon"] == pytest.approx(12 * split.policy.rnm.epsilon)


def test_generation_stops_at_eos_and_pads_finished_rows():
    ids = prompt()
    full = hf_generate(built("tiny-llama"), ids, 10, eos_token_id=None)
    eos = int(full[0, 9])  # the third generated token of row 0
    split = partition(step("tiny-llama"), "secureinfer", seed=3)
    out = generate(split, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, hf_generate(built("tiny-llama"), ids, 10, eos_token_id=eos))


def test_a_program_without_state_cannot_generate():
    from conftest import captured

    split = partition(captured("tiny-llama"), "all_gpu")
    with pytest.raises(PartitionError, match="no KV-cache state"):
        generate(split, prompt(), max_new_tokens=2)


def count_full_inputs(program) -> list[int]:
    """Wrap the worker client to add up the bytes stage inputs would take if sent whole."""
    total = [0]
    inner = program.runner.run

    def counted(stage, tensors, expected=None, **kwargs):
        total[0] += sum(t.numel() * t.element_size() for t in tensors)
        return inner(stage, tensors, expected, **kwargs)

    program.runner.run = counted
    return total


@pytest.mark.parametrize("policy", ["cmif", "secureinfer", "slalom"])
def test_saved_program_generates_over_a_worker(policy, tmp_path_factory, tmp_path):
    """Save, load the enclave side only, serve the GPU side with onnxruntime: same tokens as
    the in-process program (the prefill sends zero-length caches over the socket)."""
    ids = prompt(batch=1)
    root = shared_step_bundle(tmp_path_factory, policy)
    split = partition_step_for_tests(policy)
    assert load(root, trusted_key=TRUSTED).spec.state == split.state
    server = serve(GPUWorker(root / "gpu", backend="onnx"), f"unix:{tmp_path / 'w.sock'}")
    try:
        remote = connect(root, f"unix:{tmp_path / 'w.sock'}", trusted_key=TRUSTED, seed=STEP_SEED)
        full = count_full_inputs(remote)
        expected = generate(split, ids, max_new_tokens=6)
        assert torch.equal(generate(remote, ids, max_new_tokens=6), expected)
        calls = {s["calls"] for s in remote.runner.stats().values()}
        assert calls == {6}  # one call per stage per generated token: the cache is used
        if policy == "cmif":  # the clear cache crosses as its new positions only
            assert remote.runner.bytes_sent < 0.6 * full[0]
    finally:
        server.shutdown()


@pytest.mark.parametrize("policy", [CMIF_NO_RNM, "secureinfer", "slalom"])
def test_smollm2_answers_exactly_like_generate(policy):
    from partitioner.zoo import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    split = partition(step("smollm2-135m"), policy, seed=0)
    out = generate(split, ids, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)
    expected = hf_generate(built("smollm2-135m"), ids, 12, eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(out, expected)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_partition_leaves_the_captured_program_as_it_was_given():
    """The demo captures SmolLM2 once and partitions it under two policies (and tests share
    captures): a partition must not change the program, its weights or its dims, and a
    second partition of the same capture is the partition of a fresh one."""
    captured = capture_decoder(tiny_llama())
    graph = str(captured.program.graph)
    weights = {k: v.clone() for k, v in captured.program.state_dict.items()}
    dims, state = dict(captured.dim_names), dict(captured.state)
    first = partition(captured, "slalom", seed=2)
    partition(captured, "cmif", seed=2)
    partition(captured, "secureinfer", seed=2)
    assert str(captured.program.graph) == graph
    assert weights.keys() == captured.program.state_dict.keys()
    assert all(torch.equal(v, captured.program.state_dict[k]) for k, v in weights.items())
    assert (captured.dim_names, captured.state) == (dims, state)
    again = partition(captured, "slalom", seed=2)
    assert again.plan() == first.plan()
    ids = prompt(batch=1)
    assert torch.equal(
        generate(again, ids, max_new_tokens=4), generate(first, ids, max_new_tokens=4)
    )
    assert not any("teesplit" in node.meta for node in captured.program.graph.nodes)


def test_partition_tags_none_of_a_capture_it_has_nothing_to_rewrite_in():
    """GPT-2's heads are not grouped, so no attention rewrite copies its graph: the labels
    and placement tags (``public`` among them, which a later partition would read) must
    still go to partition's own copy, not into the caller's capture."""
    captured = capture(built("tiny-gpt2"), model_name="tiny-gpt2")
    for policy in ("cmif", "slalom", "all_enclave"):
        partition(captured, policy, seed=2)
        assert not any("teesplit" in node.meta for node in captured.program.graph.nodes)


@pytest.mark.parametrize(
    ("name", "policy"),
    [("tiny-gpt2", "slalom"), ("tiny-llama", "secureinfer")],  # no rewrite; SDPA decomposed
)
def test_partition_sets_every_tag_itself(name, policy):
    """Tags a program arrives with (an earlier partition's ``public``, say, when its
    ``source`` is partitioned again) are dropped, whether or not an attention rewrite copies
    the graph first: a weight this policy protects must not pass as public because another
    policy's base held it."""
    captured = capture(built(name), model_name=name)
    for node in captured.program.graph.nodes:
        node.meta["teesplit"] = {"public": True, "side": "gpu"}
    split = partition(captured, policy, seed=2)
    tags = [node.meta.get("teesplit", {}) for node in split.source.graph.nodes]
    assert not any(tag.get("public") for tag in tags)
    fresh = capture(built(name), model_name=name)
    assert split.plan() == partition(fresh, policy, seed=2).plan()


def test_many_layers_keep_their_cache_order_after_load(tmp_path, trusted_key=TRUSTED):
    """plan.json sorts its keys (past_10 before past_2): generation must follow the
    program's input order, not the order of the saved state map. (all_enclave: the order is
    the plan's, whichever side runs the stage, and an enclave stage needs no ONNX export.)"""
    model = tiny_llama(num_hidden_layers=6)
    split = partition(capture_decoder(model), "all_enclave")
    split.save(tmp_path, sign_key=SIGN_KEY)
    ids = prompt()
    expected = hf_generate(model, ids, 8, eos_token_id=None)
    assert torch.equal(
        generate(load(tmp_path, trusted_key=TRUSTED), ids, max_new_tokens=8), expected
    )


def test_a_decode_steps_mask_set_serves_any_context_length():
    """Under slalom the GPU's linear layers see (batch, 1, hidden) at every decode step: their
    pads do not depend on the cache length, so the pool keys sets by (batch, seq) alone and a
    set drawn ahead serves a step at any context, with no miss."""
    split = partition(step("tiny-llama"), "slalom", seed=3)
    executor = split.executor()
    pool = executor.pool
    assert pool.key({"batch": 1, "seq": 1, "past": 5}) == pool.key(
        {"batch": 1, "seq": 1, "past": 9}
    )
    pool.fill({"batch": 1, "seq": 1, "past": 0}, 2)
    model = built("tiny-llama")
    heads = model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    misses = pool.misses
    with torch.no_grad():
        for past in (5, 9):
            cache = [torch.randn(1, heads, past, dim) for _ in range(2 * layers)]
            executor(*args(torch.tensor([[7]]), cache))
    assert pool.misses == misses and pool.available({"batch": 1, "seq": 1, "past": 0}) == 0


def test_a_step_appends_to_the_cache_without_copying_what_it_was_given():
    """Each layer's keys and values are appended to once (``cat(past, new)``); seeding the
    cache by appending ``past`` to an empty tensor copied the whole cache every step."""
    captured = step("tiny-llama")
    graph = captured.program.graph
    cats = [  # along the positions (the rotary embedding's halves are joined along -1)
        n
        for n in graph.nodes
        if n.op == "call_function" and "cat" in str(n.target) and n.args[1:] == (-2,)
    ]
    layers = int(built("tiny-llama").config.num_hidden_layers)
    assert len(cats) == 2 * layers
    past = {n.name for n in graph.find_nodes(op="placeholder") if n.name.startswith("past")}
    assert {n.args[0][0].name for n in cats} == past  # each appends to its past directly
