import json

import pytest

from partitioner.errors import PolicyError
from partitioner.label_set import ALL_LABELS, Label
from partitioner.policy import PRESETS, Policy, RNMConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name, tmp_path):
    policy = Policy.preset(name)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert Policy.from_file(path) == policy


def test_preset_contents_follow_design():
    assert Policy.preset("cmif").enclave == {Label.EMBEDDING}
    assert Policy.preset("cmif").rnm == RNMConfig(epsilon=1.0, candidates=20)
    si = Policy.preset("secureinfer")
    assert {
        Label.NONLINEAR,
        Label.NORM,
        Label.ATTENTION_PROJECTION,
        Label.FFN,
        Label.LORA,
    } <= si.enclave
    assert si.protects == {"input", "model"}
    assert Policy.preset("slalom").masking == "field"
    assert Policy.preset("all_enclave").enclave == ALL_LABELS
    assert Policy.preset("all_gpu").gpu == ALL_LABELS


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        Policy.preset("cmif").masking = "field"


def test_yaml_file_with_preset_base(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("preset: slalom\nmin_gpu_block: 3\n")
    policy = Policy.from_file(path)
    assert policy.min_gpu_block == 3 and policy.masking == "field"
    assert Policy.resolve(path) == policy


def test_custom_label_sets():
    policy = Policy(enclave=["embedding", "norm"], gpu=["ffn"])
    assert policy.pinned_side(Label.NORM) == "enclave"
    assert policy.pinned_side(Label.FFN) == "gpu"
    assert policy.pinned_side(Label.SHAPE) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"enclave": ["embeding"]}, "unknown labels ['embeding']"),
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"enclave": ["norm"], "gpu": ["norm"]}, "pinned to both"),
        ({"protects": ["weights"]}, "protects names ['weights']"),
        ({"masking": "xor"}, "masking='xor'"),
        ({"integrity": "sha"}, "integrity='sha'"),
        ({"min_gpu_block": 0}, "min_gpu_block"),
        ({"protects": ["model"], "gpu": ["ffn"]}, "weight-bearing labels ['ffn']"),
        ({"rnm": {"epsilon": 1.0}, "protects": ["input"]}, "'embedding' is not pinned"),
        ({"rnm": {"epsilon": -1}, "enclave": ["embedding"], "protects": ["input"]}, "epsilon"),
        (
            {"rnm": {"eps": 1}, "enclave": ["embedding"], "protects": ["input"]},
            "unknown keys ['eps']",
        ),
        ({"protects": ["input"], "gpu": ["attention"]}, "nothing would protect"),
        ({"enclave": "norm"}, "must be a list"),
        ({"preset": "tee"}, "unknown preset 'tee'"),
    ],
)
def test_bad_policies_name_the_fault(data, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_dict(data)


def test_bad_policy_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: cmif\nbogus: 1\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml.*unknown keys \['bogus'\]"):
        Policy.from_file(path)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PolicyError, match=r"cannot parse policy file .*broken\.json"):
        Policy.from_file(broken)


def test_resolve_rejects_unknown_names():
    with pytest.raises(PolicyError, match="neither a Policy"):
        Policy.resolve("fastest")
