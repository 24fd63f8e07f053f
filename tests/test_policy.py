import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert Policy.preset("slalom").masking == "exact"
    assert Policy.preset("all_enclave").enclave == ALL_LABELS
    assert Policy.preset("all_gpu").gpu == ALL_LABELS


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        Policy.preset("cmif").masking = "exact"


def test_yaml_file_with_preset_base(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("preset: slalom\nmin_gpu_block: 3\n")
    policy = Policy.from_file(path)
    assert policy.min_gpu_block == 3 and policy.masking == "exact"
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
        (
            {"protects": ["input"], "gpu": ["attention"], "masking": "none"},
            "nothing would protect",
        ),
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


# -- hostile policies (issue 10): every bad value is a PolicyError naming the key -------------

HOSTILE = [
    ({"preset": "cmif", "rnm": {"epsilon": float("inf")}}, "rnm.epsilon must be a finite"),
    ({"preset": "cmif", "rnm": {"epsilon": float("nan")}}, "rnm.epsilon must be a finite"),
    ({"preset": "cmif", "rnm": {"epsilon": True}}, "rnm.epsilon must be a finite"),
    ({"preset": "cmif", "rnm": {"candidates": True}}, "rnm.candidates must be an integer"),
    ({"preset": "secureinfer", "mask_scale": 1e308}, "mask_scale must be a number"),
    ({"preset": "secureinfer", "mask_scale": float("nan")}, "mask_scale must be a number"),
    ({"enclave": 5}, "enclave must be a list of labels"),
    ({"enclave": [None]}, "unknown labels"),
    ({"protects": [1]}, "protects must list strings"),
    ({"min_gpu_block": True}, "min_gpu_block must be an integer"),
    ({"preset": 3}, "preset must be a preset name"),
    ({"rnm": "x"}, "rnm must be a mapping"),
    ({"name": 5}, "name must be a non-empty string"),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE)
def test_hostile_values_are_refused(data, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(data)


def test_a_non_utf8_policy_file_is_a_policy_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfe enclave: [embedding]")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.from_file(path)


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["preset", "name", "enclave", "gpu", "protects", "masking", "rnm", "integrity",
     "min_gpu_block", "on_unmaskable", "mask_scale", "bogus"]
)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=6) | _json)
def test_fuzzed_policies_give_a_policy_or_a_policy_error(data):
    try:
        policy = Policy.from_dict(data)
    except PolicyError:
        return
    assert Policy.from_dict(policy.to_dict()) == policy
