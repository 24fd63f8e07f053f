"""Enclave stages compiled ahead of time (``partitioner.aot``, ``enclave_runtime.compiled``).

What must hold: the lowered graphs (ring ops spelled in aten) compute what the eager kernels
compute, bit for bit; a compiled library refuses what the eager kernels refuse; a bundle's
libraries are loaded only if they are the ones ``plan.json`` lists.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from conftest import captured

from enclave_runtime.compiled import CompiledCall
from partitioner import ops
from partitioner.aot import compile_library, input_specs, lower
from partitioner.api import partition
from partitioner.bundle import AOT_INDEX, load_program
from partitioner.errors import ArtifactError, InputError, IntegrityError
from partitioner.plan import CompiledLibrary

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 128, 64]])


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


@pytest.fixture(scope="module")
def compiled_stage(tmp_path_factory):
    """One stage of the split (unmask, residual, RMSNorm, mask) compiled to a library."""
    split = slalom()
    calls = stage_calls(split)
    stage = next(
        s
        for s in split.stages
        if s.side == "enclave"
        and any(n.target == ops.OPS.ring_unmask_rows.default for n in s.module.graph.nodes)
        and any(n.target == ops.OPS.ring_mask_rows.default for n in s.module.graph.nodes)
        and not any("attention" in str(n.target) for n in s.module.graph.nodes)
    )
    lowered = lower(stage.module)
    path = tmp_path_factory.mktemp("aot") / f"{lowered.key}.so"
    compile_library(split, lowered, path)
    library = CompiledLibrary(
        str(path), tuple(lowered.constants), lowered.checks, input_specs(split, lowered)
    )
    call = CompiledCall(stage.name, library)
    return split, stage, call, calls


def test_a_compiled_stage_computes_the_eager_stage(compiled_stage):
    _, stage, call, calls = compiled_stage
    args, eager = calls[stage.name]
    outs = call(*args)
    assert len(outs) == len(eager)
    for got, want in zip(outs, eager, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.dtype == torch.int32:  # masked residues: exact
            assert torch.equal(got, want)
        else:  # a reduction may be summed in another order: the last bit may differ
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the library takes other sizes of its dynamic dims (here one position, as in decode)
    one = [
        a[:, -1:].contiguous() if a.dim() >= 2 and a.shape[1] == IDS.shape[1] else a for a in args
    ]
    direct = ops.direct_calls(stage.module)
    for got, want in zip(call(*one), direct(*one), strict=True):
        assert got.shape == want.shape


def test_a_compiled_stage_refuses_a_value_it_cannot_mask(compiled_stage):
    """A GPU that shifts the masked exponent column of its reply makes the unmasked value
    overflow to inf (and NaN after the non-linearity): the mask that follows must refuse it,
    compiled as eager, instead of sending the GPU a residue that stands for nothing."""
    _, stage, call, calls = compiled_stage
    args, _ = calls[stage.name]
    hostile = [a.clone() for a in args]
    reply = next(i for i, a in enumerate(hostile) if a.dtype == torch.int32)
    hostile[reply][..., -1] -= 2**30  # 2**-e becomes 2**(2**30 + ...): inf
    with pytest.raises(InputError):
        ops.direct_calls(stage.module)(*hostile)
    with pytest.raises(InputError, match="NaN or inf"):
        call(*hostile)


def test_a_compiled_stage_refuses_inputs_of_the_wrong_shape(compiled_stage):
    """Compiled code indexes memory by the sizes it is given: a GPU reply one position
    shorter than the correction it is unmasked with, or one column short, must be refused
    before the library reads it (eager ops raise on their own; compiled code would read
    past the end)."""
    _, stage, call, calls = compiled_stage
    args, _ = calls[stage.name]
    reply = next(i for i, a in enumerate(args) if a.dtype == torch.int32)
    # the last: a reply with no positions, which the library's own checks pass whatever
    # its sizes (a reviewer's finding: read as the full shape, SIGSEGV)
    for cut in (lambda t: t[:, :-1], lambda t: t[..., :-1], lambda t: t[0], lambda t: t[:, :0]):
        hostile = list(args)
        hostile[reply] = cut(args[reply]).contiguous()
        with pytest.raises(IntegrityError, match=f"enclave stage {stage.name} input"):
            call(*hostile)
    wrong_dtype = list(args)
    wrong_dtype[reply] = args[reply].to(torch.int64)
    with pytest.raises(IntegrityError):
        call(*wrong_dtype)


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
