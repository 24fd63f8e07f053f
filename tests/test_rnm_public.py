"""Public token classes (``rnm.public``, issue 15): tokens a policy makes public pass RNM
unchanged and spend no ε; the plan, the report and ``last_request`` say which classes."""

import dataclasses
import json

import pytest
import torch
from conftest import captured

from partitioner.api import partition
from partitioner.errors import PolicyError
from partitioner.policy import Policy, RNMConfig
from partitioner.protection import RNMSite
from partitioner.token_classes import public_tokens

SPECIAL = (0, 1, 2)
STOP = [40, 41, 42]


def _policy(public: tuple[str, ...], epsilon: float = 1.0) -> Policy:
    return dataclasses.replace(
        Policy.resolve("cmif"), name="cmif-public", rnm=RNMConfig(epsilon=epsilon, public=public)
    )


@pytest.mark.parametrize(
    ("public", "match"),
    [
        (("stopword",), "not a token class"),
        (("stopwords", "stopwords"), "twice"),
        ("stopwords", "a list"),
        ((3,), "not a token class"),
    ],
)
def test_a_bad_public_class_is_a_policy_error(public, match):
    with pytest.raises(PolicyError, match=match):
        RNMConfig(public=public)


def test_a_class_without_its_ids_is_refused_naming_it():
    with pytest.raises(PolicyError, match=r"names \['stopwords'\]"):
        partition(captured("tiny-llama"), _policy(("stopwords",)), special_token_ids=SPECIAL)
    with pytest.raises(PolicyError, match="does not name"):
        partition(
            captured("tiny-llama"),
            _policy(()),
            special_token_ids=SPECIAL,
            public_tokens={"punctuation": [3]},
        )


def test_public_tokens_pass_unchanged_and_spend_no_epsilon():
    # ε = 0.1: RNM replaces nearly every token it sanitises, so an unchanged public token is
    # the rule at work, not luck
    sp = partition(
        captured("tiny-llama"),
        _policy(("special", "stopwords"), epsilon=0.1),
        special_token_ids=SPECIAL,
        public_tokens={"stopwords": STOP},
        seed=5,
    )
    site = sp.protection.rnm
    assert site.public == {"special": len(SPECIAL), "stopwords": len(STOP)}
    assert "public token classes (passed unchanged, no ε): special (3 ids), stopwords (3 ids)" in (
        sp.report()
    )
    ids = torch.tensor([[1, 40, 90, 41, 91, 42, 92, 93]])
    executor = sp.executor()
    changed = 0
    for _ in range(20):
        with torch.no_grad():
            executor(input_ids=ids)
        out = executor.last_request["sanitised_tokens"][0]
        assert out[[0, 1, 3, 5]].tolist() == [1, 40, 41, 42]  # special and stopwords
        changed += int((out[[2, 4, 6, 7]] != ids[0, [2, 4, 6, 7]]).sum())
        assert executor.last_request["epsilon"] == pytest.approx(4 * 0.1)  # the 4 others
        assert executor.last_request["public_classes"] == ["special", "stopwords"]
    assert changed > 40  # the private positions were sanitised
    record = json.loads(json.dumps(site.to_dict()))
    assert RNMSite.from_dict(record).public == site.public


def test_the_default_passes_the_special_tokens_only():
    sp = partition(captured("tiny-llama"), "cmif", special_token_ids=SPECIAL, seed=5)
    assert sp.protection.rnm.public == {}
    assert "special only" in sp.report()
    executor = sp.executor()
    with torch.no_grad():
        executor(input_ids=torch.tensor([[1, 40, 41, 42]]))
    assert executor.last_request["epsilon"] == 3.0
    assert executor.last_request["public_classes"] == ["special"]


def test_classes_from_a_tokenizer_and_from_a_file(tmp_path):
    from partitioner.zoo import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    classes = public_tokens(tokenizer, ["stopwords", "punctuation"], special=[101, 102])
    stop, punct = set(classes["stopwords"]), set(classes["punctuation"])
    the, film, cont, dot, comma, unk = tokenizer.convert_tokens_to_ids(
        ["the", "film", "##the", ".", ",", "[UNK]"]
    )
    assert the in stop and film not in stop and cont not in stop
    assert {dot, comma} <= punct and the not in punct and unk not in punct
    assert public_tokens(tokenizer, ["special"], special=[101])["special"][0] == 0  # [PAD] too
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n7\n\n9\n")
    assert public_tokens(tokenizer, [str(ids)])[str(ids)] == [5, 7, 9]
    ids.write_text("5\nfive\n")
    with pytest.raises(PolicyError, match=r"ids\.txt:2"):
        public_tokens(tokenizer, [str(ids)])
    ids.write_text("99999999\n")
    with pytest.raises(PolicyError, match="outside the vocabulary"):
        public_tokens(tokenizer, [str(ids)])
