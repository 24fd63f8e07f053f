"""Grouped-query attention reads the shared KV heads instead of repeated copies
(``passes.gqa.share_kv_heads``), and computes the same function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from partitioner.api import partition
from partitioner.generation import DecoderStep, cache_shape, capture_decoder
from passes.gqa import share_kv_heads
from tests.models import tiny_llama

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _repeats_read_by_attention(graph: torch.fx.Graph) -> list[str]:
    """SDPA operands made by an ``expand`` (through a reshape): a copy of the KV heads."""
    found = []
    for node in graph.find_nodes(op="call_function", target=SDPA):
        for operand in node.args[1:3]:
            if (
                operand.target is torch.ops.aten.reshape.default
                and getattr(operand.args[0], "target", None) is torch.ops.aten.expand.default
            ):
                found.append(f"{node.name}:{operand.name}")
    return found


def _decode_call(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    heads, head_dim = cache_shape(model)
    layers = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=gen)
    whole = torch.zeros(1, 1, dtype=torch.long)
    empty = [torch.zeros(1, heads, 0, head_dim) for _ in range(2 * layers)]
    with torch.no_grad():
        past = list(DecoderStep(model)(ids, whole, empty)[1:])
    return (torch.tensor([[5]]), whole, past)


def test_a_gqa_decoder_step_reads_its_kv_heads_without_repeating_them():
    """tiny-llama has 4 query heads on 2 KV heads: the captured step repeats each KV head
    (transformers' ``repeat_kv``) before attention; the split's attention reads them as they
    are, and the step's logits and cache equal the model's."""
    model = tiny_llama()
    captured = capture_decoder(model)
    assert _repeats_read_by_attention(captured.program.graph)  # the capture repeats them
    split = partition(captured, "all_enclave")
    assert _repeats_read_by_attention(split.source.graph) == []
    sdpa = list(split.source.graph.find_nodes(op="call_function", target=SDPA))
    assert sdpa and all(n.kwargs.get("enable_gqa") for n in sdpa)
    call = _decode_call(model)
    with torch.no_grad():
        want = DecoderStep(model)(*call)
        got = split.executor()(*call)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_slalom_split_keeps_the_rewrite_and_the_model_function():
    model = tiny_llama()
    split = partition(capture_decoder(model), "slalom")
    enclave = [s for s in split.stages if s.side == "enclave"]
    assert not any(_repeats_read_by_attention(s.module.graph) for s in enclave)
    call = _decode_call(model)
    with torch.no_grad():
        want = DecoderStep(model)(*call)[0]
        got = split.executor(seed=1)(*call)[0]
    # exact masking quantises the linear layers: the arg-max, and logits close
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


class _Tiled(torch.nn.Module):
    """KV heads tiled (head j reads KV head j % 2), not repeated in place: another function,
    which ``enable_gqa`` (head j reads j // 2) would change."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = k.shape
        k4 = k[:, None].expand(b, 2, h, n, d).reshape(b, 2 * h, n, d)
        v4 = v[:, None].expand(b, 2, h, n, d).reshape(b, 2 * h, n, d)
        return F.scaled_dot_product_attention(q, k4, v4)


class _Repeated(torch.nn.Module):
    """``repeat_kv`` for the key, whose copy is also returned: SDPA reads the source, the copy
    stays for the other reader."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        b, h, n, d = k.shape
        k4 = k[:, :, None].expand(b, h, 2, n, d).reshape(b, 2 * h, n, d)
        v4 = v[:, :, None].expand(b, h, 2, n, d).reshape(b, 2 * h, n, d)
        return F.scaled_dot_product_attention(q, k4, v4), k4 * 2


def _args() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    return (
        torch.randn(1, 4, 3, 8, generator=gen),
        torch.randn(1, 2, 5, 8, generator=gen),
        torch.randn(1, 2, 5, 8, generator=gen),
    )


def test_a_tiled_repeat_is_another_function_and_is_left_alone():
    program = torch.export.export(_Tiled(), _args())
    assert share_kv_heads(program) is program


def test_a_repeat_read_elsewhere_stays_for_its_other_reader():
    module = _Repeated()
    program = torch.export.export(module, _args())
    rewritten = share_kv_heads(program)
    assert rewritten is not program
    assert _repeats_read_by_attention(rewritten.graph) == []
    expands = rewritten.graph.find_nodes(op="call_function", target=torch.ops.aten.expand.default)
    assert len(list(expands)) == 1  # the key's copy, returned doubled; the value's is gone
    args = _args()
    for got, want in zip(rewritten.module()(*args), module(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _OneQueryHead(torch.nn.Module):
    """One query head broadcast over the repeated KV heads (SDPA broadcasts batch-like dims):
    the output has the repeated heads' count, which ``enable_gqa`` would not give."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = k.shape
        k4 = k[:, :, None].expand(b, h, 4, n, d).reshape(b, 4 * h, n, d)
        v4 = v[:, :, None].expand(b, h, 4, n, d).reshape(b, 4 * h, n, d)
        return F.scaled_dot_product_attention(q, k4, v4)


class _KeyIsValue(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, h, n, d = k.shape
        k4 = k[:, :, None].expand(b, h, 2, n, d).reshape(b, 2 * h, n, d)
        return F.scaled_dot_product_attention(q, k4, k4)


def test_a_query_that_broadcasts_over_the_heads_is_left_alone():
    """A reviewer's case: q with one head; rewritten, the output lost its heads."""
    gen = torch.Generator().manual_seed(5)
    args = (torch.randn(1, 1, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen))
    args = (args[0], args[1], torch.randn(1, 1, 3, 8, generator=gen))
    program = torch.export.export(_OneQueryHead(), args)
    assert share_kv_heads(program) is program


def test_key_and_value_from_one_repeat_are_rewritten_once():
    """A reviewer's case: ``sdpa(q, r, r)`` erased the shared repeat twice (AttributeError)."""
    gen = torch.Generator().manual_seed(6)
    args = (torch.randn(1, 4, 3, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen))
    module = _KeyIsValue()
    rewritten = share_kv_heads(torch.export.export(module, args))
    assert _repeats_read_by_attention(rewritten.graph) == []
    torch.testing.assert_close(rewritten.module()(*args), module(*args), rtol=1e-6, atol=1e-6)


def test_grouped_attention_is_counted_with_shapes_every_torch_release_takes(monkeypatch):
    """The cost model counts a grouped-query attention as each query head reading its group's
    keys and values (what torch 2.13's ``sdpa_flop_count`` gives). Releases before it refuse
    grouped shapes (found on a GPU host with torch 2.11: partitioning failed), so the counter
    is handed equal heads: here it is made to refuse others, as those releases do."""
    from partitioner import shapes as shapes_module

    original = shapes_module.sdpa_flop_count
    seen = []

    def strict(q, k, v):
        assert q[-3] == k[-3] == v[-3], "query/key/value shapes are incompatible"
        seen.append(original(q, k, v))
        return seen[-1]

    monkeypatch.setattr(shapes_module, "sdpa_flop_count", strict)
    model = tiny_llama()
    split = partition(capture_decoder(model), "all_enclave")
    layers = model.config.num_hidden_layers
    assert len(seen) == layers and all(count > 0 for count in seen)
    assert len(list(split.source.graph.find_nodes(op="call_function", target=SDPA))) == layers
