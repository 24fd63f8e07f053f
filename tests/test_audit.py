"""The audit passes on every model and preset, and fails on each kind of leak."""

import pytest
import torch
from conftest import MODELS, PRESET_NAMES, captured

import passes.protect
from partitioner.api import partition
from partitioner.errors import AuditError
from passes.audit import audit


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_audit_passes_on_every_model_and_preset(name, preset):
    sp = partition(captured(name), preset)
    report = audit(sp, verbose=False)
    assert not report.violations
    assert len(report.rows) == len(sp.cut_edges) + sum(
        e.consumer == "output" and e.producer.startswith("gpu") and not e.crossing for e in sp.edges
    )
    secret = [r for r in report.rows if r.direction == "enclave->gpu" and r.secrets != "-"]
    if sp.policy.masking != "none":
        assert all(r.protection == sp.policy.masking for r in secret)
    elif sp.policy.rnm is not None:
        assert all(r.secrets == "dp" and r.protection == "dp" for r in secret)


def test_audit_prints_a_table_of_edges(capsys):
    audit(partition(captured("tiny-llama"), "secureinfer"))
    out = capsys.readouterr().out
    assert "audit of tiny-llama under 'secureinfer'" in out
    assert "depends on" in out and "exact" in out and "unmask" in out


def _first_masked(sp):
    stage = next(s for s in sp.stages if s.masked_outputs)
    return stage, stage.masked_outputs[0]


def test_a_missing_mask_is_a_leak():
    sp = partition(captured("tiny-llama"), "secureinfer")
    stage, value = _first_masked(sp)
    out = next(iter(stage.module.graph.find_nodes(op="output")))
    results = list(out.args[0])
    index = len(stage.outputs) + stage.masked_outputs.index(value)
    results[index] = results[index].args[0]  # send the plaintext instead of mask(x, r)
    out.args = (tuple(results),)
    with pytest.raises(AuditError, match=f"edge {value} .* to the GPU without a mask"):
        audit(sp, verbose=False)


def test_a_missing_unmask_is_caught():
    sp = partition(captured("tiny-llama"), "secureinfer")
    stage = next(s for s in sp.stages if any(k == "delta" for k, _ in s.extra_inputs))
    value = next(v for k, v in stage.extra_inputs if k == "delta")
    unmask = stage.module.graph.find_nodes(
        op="call_function", target=torch.ops.teesplit.ring_unmask.default
    )[0]
    # the residues go on as if they were the value: what a forgotten unmask would do
    cast = stage.module.graph.call_function(torch.ops.aten._to_copy.default, (unmask.args[0],))
    cast.meta = dict(unmask.meta)
    unmask.append(cast)
    unmask.replace_all_uses_with(cast)
    with pytest.raises(AuditError, match=f"edge {value} .* masked value that is never unmasked"):
        audit(sp, verbose=False)


def test_a_protected_weight_on_the_gpu_is_caught():
    sp = partition(captured("tiny-llama"), "secureinfer")
    gpu = next(s for s in sp.stages if s.side == "gpu")
    gpu.params.append("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(AuditError, match=f"GPU stage {gpu.name} holds protected parameters"):
        audit(sp, verbose=False)


def test_tokens_without_rnm_are_a_leak():
    sp = partition(captured("tiny-llama"), "cmif")
    stage = next(s for s in sp.stages if s.name == sp.protection.rnm.stage)
    rnm = stage.module.graph.find_nodes(op="call_function", target=torch.ops.teesplit.rnm.default)[
        0
    ]
    rnm.replace_all_uses_with(rnm.args[0])
    stage.module.graph.erase_node(rnm)
    with pytest.raises(AuditError, match="no RNM op sanitises it"):
        audit(sp, verbose=False)


def test_a_gpu_stage_without_its_freivalds_check_is_caught():
    sp = partition(captured("tiny-llama"), "slalom")
    name = next(iter(sp.protection.freivalds))
    del sp.protection.freivalds[name]
    with pytest.raises(AuditError, match=f"GPU stage {name} has no Freivalds check"):
        audit(sp, verbose=False)


def test_partition_runs_the_audit(monkeypatch):
    monkeypatch.setattr(passes.protect, "protection_of", lambda tags, masking: "public")
    with pytest.raises(AuditError, match="without a mask"):
        partition(captured("tiny-llama"), "secureinfer")
