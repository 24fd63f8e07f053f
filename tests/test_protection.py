"""Masks, unmasks, corrections, exact ring arithmetic, the pool and Freivalds checks."""

import dataclasses
import math
import threading

import pytest
import torch
from conftest import captured, eager, model_output
from torch.nn.attention import SDPBackend, sdpa_kernel

from enclave_runtime import ring_gemm
from enclave_runtime.randomness import CSPRNG
from partitioner import ops
from partitioner.api import partition
from partitioner.errors import IntegrityError, PartitionError, PolicyError
from partitioner.policy import Policy
from passes.exact import LINEAR_BOUND, quantised_reference
from passes.linearity import AFFINE, NONLINEAR, PRODUCT, analyse, build_correction

# -- randomness ------------------------------------------------------------------------------


def test_csprng_seeded_streams_repeat_and_os_streams_do_not():
    assert torch.equal(CSPRNG(5).uniform([64], -1, 1), CSPRNG(5).uniform([64], -1, 1))
    assert not torch.equal(CSPRNG().uniform([64], -1, 1), CSPRNG().uniform([64], -1, 1))
    rng = CSPRNG(5)
    assert not torch.equal(rng.uniform([64], -1, 1), rng.uniform([64], -1, 1))  # never reused


def test_csprng_ignores_torchs_global_generator():
    torch.manual_seed(0)
    a = CSPRNG().uniform([8], 0, 1)
    torch.manual_seed(0)
    b = CSPRNG().uniform([8], 0, 1)
    assert not torch.equal(a, b)


def test_ring_pads_are_uniform_residues():
    pads = CSPRNG(1).ring([200_000], torch.int32)
    assert pads.dtype == torch.int32
    counts = torch.bincount((pads.to(torch.int64) & 0xFFFFFFFF) >> 28, minlength=16).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 45.0  # 15 degrees of freedom: p < 1e-4 beyond this


def test_laplace_has_the_asked_scale():
    draws = CSPRNG(2).laplace([200_000], 2.0)
    assert abs(float(draws.mean())) < 0.03
    assert abs(float(draws.abs().mean()) - 2.0) < 0.03  # E|X| = b


# -- ops -------------------------------------------------------------------------------------


def test_ops_round_trip_and_survive_export():
    x, r = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(torch.ops.teesplit.unmask(torch.ops.teesplit.mask(x, r), r), x)
    q = torch.ops.teesplit.ring_mask(x, CSPRNG(0).ring([3, 5], torch.int32), 14, 2**20)
    assert q.dtype == torch.int32

    class Masker(torch.nn.Module):
        def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.ops.teesplit.unmask(torch.ops.teesplit.mask(x, r) * 2, r * 2)

    ep = torch.export.export(Masker(), (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"teesplit.mask.default", "teesplit.unmask.default"} <= targets
    torch.testing.assert_close(ep.module()(x, r), x * 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_ring_mask_unmask_is_exact_on_the_fixed_point_grid(dtype):
    x = torch.randint(-(2**20), 2**20, (4, 7)).double() / 2**14
    pad = CSPRNG(3).ring([4, 7], dtype)
    hidden = torch.ops.teesplit.ring_mask(x.float(), pad, 14, 2**30)
    back = torch.ops.teesplit.ring_unmask(hidden, pad, torch.tensor(2.0**-14, dtype=torch.float64))
    assert hidden.dtype == dtype and torch.equal(back, x.float())


def test_ring_mask_clamps_at_its_limit():
    x = torch.tensor([1e9, -1e9, 0.5])
    zero = torch.zeros(3, dtype=torch.int32)
    assert torch.ops.teesplit.ring_mask(x, zero, 4, 100).tolist() == [100, -100, 8]


# -- linearity -------------------------------------------------------------------------------


WEIGHT, BIAS = torch.randn(6, 4), torch.randn(6)


def _graph(fn):
    """An aten-level stage graph (as the split produces) with placeholders ``x`` and ``y``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x, y: fn(x, y), tracing_mode="real")(torch.randn(3, 4), torch.randn(3, 4))
    for ph, name in zip(gm.graph.find_nodes(op="placeholder"), "xy", strict=True):
        ph.name = ph.target = name
    gm.recompile()
    result = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    return gm, [result.name]


AFFINE_STAGES = {
    "linear+bias": lambda x, y: torch.nn.functional.linear(x, WEIGHT, BIAS),
    "views+cat": lambda x, y: torch.cat([x.t().reshape(2, 6), y.reshape(2, 6)], 0) * 3.0,
    "sum+neg": lambda x, y: -(x + y).sum(0) - 1.5,
    "matmul-const": lambda x, y: (x - y) @ WEIGHT.t(),
}


@pytest.mark.parametrize("case", sorted(AFFINE_STAGES))
def test_affine_stage_correction_is_precomputable_and_exact(case):
    gm, outputs = _graph(AFFINE_STAGES[case])
    analysis = analyse(gm, ["x", "y"])
    assert set(analysis.kinds.values()) == {AFFINE}
    corr = build_correction("s", gm, outputs, ["x", "y"], analysis=analysis)
    assert corr.precomputable and corr.primal_inputs == []
    x, y, rx, ry = (torch.randn(3, 4) for _ in range(4))
    masked = gm(x + rx, y + ry)
    (delta,) = corr.module(*({"x": rx, "y": ry}[n] for n in corr.delta_inputs))
    torch.testing.assert_close(masked - delta, gm(x, y), rtol=1e-5, atol=1e-5)


def test_products_of_activations_need_the_plaintext_and_nonlinear_ops_have_no_correction():
    product, outputs = _graph(lambda x, y: (x * 2.0) @ y.t())
    analysis = analyse(product, ["x", "y"])
    assert analysis.products == [next(n for n, k in analysis.kinds.items() if k == PRODUCT)]
    corr = build_correction("s", product, outputs, ["x", "y"], analysis=analysis)
    assert not corr.precomputable and sorted(corr.primal_inputs) == ["x", "y"]
    x, y, rx, ry = (torch.randn(3, 4) for _ in range(4))
    (delta,) = corr.module(rx, ry, *(x if n == "x" else y for n in corr.primal_inputs))
    torch.testing.assert_close(product(x + rx, y + ry) - delta, product(x, y), rtol=1e-5, atol=1e-5)
    softmax, _ = _graph(lambda x, y: torch.softmax(x, -1) + y)
    assert NONLINEAR in analyse(softmax, ["x"]).kinds.values()
    assert set(analyse(softmax, ["y"]).kinds.values()) == {AFFINE}  # softmax of a public x


# -- presets: the GPU sees only masked values --------------------------------------------------


def _record_gpu_inputs(sp):
    seen = {}
    for stage in sp.stages:
        if stage.side == "gpu":
            inner = stage.module

            def spy(*args, _inner=inner, _stage=stage):
                seen.update(zip(_stage.inputs, args, strict=True))
                return _inner(*args)

            stage.module = spy
    return seen


@pytest.mark.parametrize("preset", ["secureinfer", "slalom"])
def test_gpu_stages_see_only_masked_values(preset):
    sp = partition(captured("tiny-llama"), preset, seed=11)
    plain = sp.without_protection()
    seen_masked = _record_gpu_inputs(sp)
    seen_plain = _record_gpu_inputs(plain)
    ids = torch.randint(3, 250, (1, 9))
    with torch.no_grad():
        sp(input_ids=ids)
        plain(input_ids=ids)
    masked_values = set(sp.protection.masked)
    assert masked_values and masked_values <= set(seen_masked)
    for name in masked_values:
        hidden, clear = seen_masked[name], seen_plain[name]
        exact = sp.protection.exact
        assert hidden.dtype == getattr(torch, exact.ring[name])
        if name in exact.row_limit:  # row-scaled: the values, then each row's exponent
            q, e = ops.quantize_rows(clear, exact.row_limit[name])
            plain_int = torch.cat([q, e[..., None]], dim=-1)
        else:
            plain_int = ops.quantize(clear, exact.frac_bits[name], exact.limit[name])
        assert hidden.shape == plain_int.shape
        # every element moved by its pad
        assert int((hidden.to(torch.int64) - plain_int).abs().min()) > 0
    assert all(
        e.protection in ("additive", "exact")
        for e in sp.cut_edges
        if e.direction == "enclave->gpu" and sp.taint[e.name]
    )


def test_fresh_pads_per_request_and_the_pool_hands_each_set_out_once():
    sp = partition(captured("tiny-llama"), "secureinfer", seed=4)
    seen = _record_gpu_inputs(sp)
    ids = torch.randint(3, 250, (1, 9))
    with torch.no_grad():
        first = model_output(sp(input_ids=ids))
        hidden_first = {k: v.clone() for k, v in seen.items()}
        second = model_output(sp(input_ids=ids))
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)
    name = next(iter(sp.protection.masked))
    assert not torch.equal(hidden_first[name], seen[name])
    executor = sp.executor()
    binding = executor.binding({"input_ids": ids})
    executor.pool.fill(binding, 2)
    assert executor.pool.available(binding) == 2
    misses = executor.pool.misses
    a, b = executor.pool.take(binding), executor.pool.take(binding)
    assert executor.pool.available(binding) == 0 and executor.pool.misses == misses
    assert not torch.equal(a.pads[name], b.pads[name])
    executor.pool.take(binding)
    assert executor.pool.misses == misses + 1


def test_a_batch_of_mask_sets_gets_the_corrections_each_set_would_get_alone():
    """fill() computes the corrections of many sets as one GEMM per layer: W·[r_1 … r_n]."""
    sp = partition(captured("tiny-llama"), "slalom", seed=5)
    executor = sp.executor()
    pool = executor.pool
    binding = {"batch": 1, "seq": 7}
    sets = pool.draw_many(binding, 5)
    assert any(pool._batchable(stage) for stage in sp.protection.pooled)
    # the batchable corrections ran as int8 GEMMs (enclave_runtime.ring_gemm), checked below
    # against each set's own float64 correction
    assert all(
        isinstance(pool._prepared(stage), ring_gemm.PackedCorrection)
        for stage in sp.protection.pooled
        if pool._batchable(stage)
    )
    for m in sets:
        for stage in sp.protection.pooled:
            corr = sp.protection.corrections[stage]
            inputs = [m.pads.get(n, m.deltas.get(n)) for n in corr.delta_inputs]
            alone = corr.module(*inputs)
            for name, value in zip(corr.delta_outputs, alone, strict=True):
                assert torch.equal(m.deltas[name], value), (stage, name)
    ids = torch.randint(3, 250, (1, 7))
    stop = pool.refill_in_background(binding, keep=3, batch=2)
    try:
        for _ in range(50):
            if pool.available(binding) >= 3:
                break
            threading.Event().wait(0.1)
        misses = pool.misses
        with torch.no_grad():
            out = model_output(executor(input_ids=ids))
        assert pool.misses == misses and pool.rate > 0
    finally:
        stop.set()
    with torch.no_grad():
        assert torch.equal(out, model_output(quantised_reference(sp)(input_ids=ids)))


def test_precomputed_corrections_make_the_online_cost_one_add_and_one_subtract():
    sp = partition(captured("tiny-llama"), Policy.preset("slalom", masking="additive"), seed=1)
    prot = sp.protection
    assert prot.pooled == list(prot.corrections)  # every slalom GPU stage is affine
    assert all(c["enclave_online_mflop"] == 0 for c in prot.cost.values())
    for stage in sp.stages:
        if stage.side == "enclave":
            ops_used = [n.target for n in stage.module.graph.nodes if n.op == "call_function"]
            assert ops_used.count(torch.ops.teesplit.mask.default) == len(stage.masked_outputs)
            unmasks = [x for x in stage.extra_inputs if x[0] == "delta"]
            assert ops_used.count(torch.ops.teesplit.unmask.default) == len(unmasks)


# -- products of two activations ---------------------------------------------------------------


def test_unmaskable_products_are_refused_by_default_naming_the_edge():
    policy = Policy.preset("secureinfer", on_unmaskable="error")
    with pytest.raises(
        PartitionError,
        match=r"GPU stage gpu_\d+ receives masked edge \w+ "
        r"\(enclave_\d+ -> gpu_\d+\), but matmul\w* cannot run on masked data",
    ):
        partition(captured("tiny-llama"), policy)


def test_on_unmaskable_enclave_moves_the_products_into_the_enclave():
    sp = partition(captured("tiny-llama"), Policy.preset("secureinfer", on_unmaskable="enclave"))
    assert not [
        n
        for s in sp.stages
        if s.side == "gpu"
        for n in s.nodes
        if sp.labels[n] == "attention" and "matmul" in n
    ]
    moved = [w for w in sp.placement.why.values() if w.startswith("on_unmaskable='enclave'")]
    assert moved
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(model_output(sp(input_ids=ids)), eager("tiny-llama", ids))


def test_cross_terms_state_their_enclave_cost_in_the_plan():
    sp = partition(captured("tiny-llama"), "secureinfer")
    corrections = sp.plan()["protection"]["corrections"]
    pv = [c for c in corrections.values() if c["products"] and len(c["delta_inputs"]) == 2]
    assert pv, corrections
    for cost in pv:  # softmax·V alone: the enclave pays exactly two products of the same size
        assert not cost["precomputed"]
        assert math.isclose(cost["enclave_online_mflop"], 2 * cost["gpu_mflop"], rel_tol=1e-9)
    assert "cross terms: the enclave computes" in sp.report()


# -- exact masking -------------------------------------------------------------------------------


def test_exact_edges_cross_as_int32_and_no_layer_can_wrap():
    sp = partition(captured("tiny-llama"), "slalom", seed=2)
    masked = [e for e in sp.cut_edges if e.protection in ("exact", "unmask")]
    assert masked and all(e.dtype == "int32" for e in masked)
    exact = sp.protection.exact
    assert sp.plan()["protection"]["exact"]["row_scaled"] == exact.row_limit
    checked = 0
    # every layer: the float64 GEMM is exact (2**31 * max|w| * fan_in <= 2**53), and the
    # integers cannot wrap Z_{2^32}: ||q_row|| * max ||w_row|| <= 2**30 for row-scaled inputs
    # (Cauchy-Schwarz), the clamp limit times max ||w_row||_1 <= 2**30 otherwise, with the
    # quantised bias below 2**30
    for stage in sp.stages:
        if stage.side == "gpu":
            for node in stage.module.graph.find_nodes(
                op="call_function", target=torch.ops.teesplit.ring_linear.default
            ):
                w = getattr(stage.module, node.args[1].target).to(torch.int64)
                assert 2**31 * int(w.abs().max()) * w.shape[1] <= 2**53
                source = node.args[0].name
                if source in exact.row_limit:
                    norm = float(w.pow(2).sum(1).max()) ** 0.5
                    assert exact.row_limit[source] * norm <= LINEAR_BOUND
                else:
                    l1 = int(w.abs().sum(1).max())
                    assert exact.limit[source] * l1 <= LINEAR_BOUND
                if node.args[2] is not None:
                    assert int(getattr(stage.module, node.args[2].target).abs().max()) < 2**30
                checked += 1
    assert checked


def test_exact_masking_refuses_an_op_it_cannot_compute_exactly():
    policy = Policy(
        name="bad-exact",
        enclave=["embedding", "norm", "lm_head"],
        gpu=["nonlinear", "ffn"],
        protects=["input"],
        masking="exact",
    )
    with pytest.raises(PartitionError, match=r"masking='exact': GPU stage gpu_\d+ runs \w+"):
        partition(captured("tiny-llama"), policy)
    moved = partition(captured("tiny-llama"), dataclasses.replace(policy, on_unmaskable="enclave"))
    assert [w for w in moved.placement.why.values() if "masking='exact'" in w]
    ids = torch.randint(3, 250, (1, 6))
    with torch.no_grad():
        assert torch.equal(
            moved(input_ids=ids).logits, quantised_reference(moved)(input_ids=ids).logits
        )


# -- integrity -------------------------------------------------------------------------------


def _corrupt_first_gpu_stage(sp, amount):
    stage = next(s for s in sp.stages if s.side == "gpu")
    inner = stage.module

    def corrupted(*args):
        outs = [o.clone() for o in inner(*args)]
        outs[0].view(-1)[3] += amount
        return tuple(outs)

    stage.module = corrupted
    return stage.name


@pytest.mark.parametrize("masking", ["exact", "additive"])
def test_freivalds_catches_a_gpu_that_returns_wrong_values(masking):
    policy = Policy.preset("slalom", masking=masking)
    sp = partition(captured("tiny-llama"), policy, seed=9)
    ids = torch.randint(3, 250, (1, 9))
    with torch.no_grad():
        sp(input_ids=ids)  # clean results pass
        name = _corrupt_first_gpu_stage(sp, 1 if masking == "exact" else 0.5)
        with pytest.raises(IntegrityError, match=f"GPU stage {name} returned results that fail"):
            sp(input_ids=ids)


def test_freivalds_refuses_stages_it_cannot_check():
    policy = Policy.preset("secureinfer", integrity="freivalds")
    with pytest.raises(PartitionError, match="integrity='freivalds' cannot check GPU stage"):
        partition(captured("tiny-llama"), policy)


# -- policy keys -------------------------------------------------------------------------------


def test_protection_policy_keys_are_validated():
    with pytest.raises(PolicyError, match="on_unmaskable='ignore'"):
        Policy(on_unmaskable="ignore")
    with pytest.raises(PolicyError, match="mask_scale must be a number in"):
        Policy(mask_scale=0)


# -- planning at scale -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["cmif", "slalom"])
def test_meta_device_models_get_a_protected_plan(preset):
    from partitioner.zoo import llama2_7b_meta

    sp = partition(llama2_7b_meta(1), preset)
    protection = sp.plan()["protection"]
    if preset == "cmif":
        assert protection["rnm"]["candidates"] == 20 and protection["rnm"]["special_tokens"] is None
    else:
        assert protection["exact"]["row_scaled"] and protection["masked_values"]


@pytest.mark.parametrize(
    ("masking", "poison"),
    [("additive", float("nan")), ("additive", float("inf")), ("exact", "int64")],
)
def test_freivalds_refuses_values_its_arithmetic_cannot_vouch_for(masking, poison):
    """A NaN made the float tolerance NaN and the comparison false: the result passed and the
    GPU chose the next token. Residues of the wrong ring are no residues."""
    policy = Policy.preset("slalom", masking=masking)
    sp = partition(captured("tiny-llama"), policy, seed=9)
    stage = next(s for s in sp.stages if s.side == "gpu")
    inner = stage.module

    def poisoned(*args):
        outs = [o.clone() for o in inner(*args)]
        if poison == "int64":
            outs[0] = outs[0].to(torch.int64)
        else:
            outs[0].view(-1)[3] = poison
        return tuple(outs)

    stage.module = poisoned
    with torch.no_grad(), pytest.raises(IntegrityError, match=f"GPU stage {stage.name} output 0"):
        sp(input_ids=torch.randint(3, 250, (1, 9)))


def test_float_masks_of_a_bfloat16_model_are_drawn():
    """A reviewer's regression: the pool made numpy views of every pad, and numpy has no
    bfloat16, so every draw for a bf16 model under float masks raised ``TypeError``."""
    from models import BUILDERS

    from partitioner.capturing import capture

    model = BUILDERS["tiny-llama"]().to(torch.bfloat16)
    ids = torch.zeros(1, 8, dtype=torch.long)
    policy = Policy.preset("slalom", masking="additive", integrity="none")
    split = partition(capture(model, model_name="tiny-llama"), policy, (ids,))
    assert "bfloat16" in {d for _, d in split.spec.protection.masked.values()}
    with torch.no_grad():
        out = split.executor(seed=1)(ids)
    assert out[0].dtype == torch.bfloat16 and bool(torch.isfinite(out[0].float()).all())
