"""The SST-2 privacy harness: the three mechanisms' definitions, and an end-to-end smoke run
on a tiny hand-made corpus (no accuracy asserted; the real data is read only by the benchmark).
"""

import functools
import json
import math

import pytest
import torch
from conftest import built

from benchmarks.privacy import sst2
from benchmarks.privacy.mechanisms import RNM, CusTextPlus, SanTextPlus, Universe, groups

SENTENCES = [
    "a charming and often affecting journey",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding",
    "it 's slow -- very , very slow",
    "a sometimes tedious film",
    "the movie is a disaster from start to finish",
    "one of the greatest family-oriented , fantasy-adventure movies ever",
    "there is nothing funny in this every-joke-has been-told-a thousand-times-before movie",
]


@functools.cache
def universe() -> Universe:
    from partitioner.zoo import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    ids = tokenizer(SENTENCES, add_special_tokens=False)["input_ids"]
    embedding = built("minilm").embeddings.word_embeddings.weight
    vocab = tokenizer.convert_ids_to_tokens(list(range(embedding.shape[0])))
    return Universe.from_corpus(ids, embedding, vocab)


def corpus_ids() -> torch.Tensor:
    return universe().ids.repeat(50)  # every token of the universe, many times


def test_rnm_and_custext_stay_in_the_input_tokens_group():
    u = universe()
    tables = groups(u)
    x = corpus_ids()
    for mech in (RNM(u, 1.0, 0, tables), CusTextPlus(u, 1.0, 0, tables, set())):
        out = mech.sanitise(x)
        for token, new in zip(x.tolist()[:400], out.tolist()[:400], strict=True):
            group = {int(u.ids[c]) for c in tables.group_of(int(u.local[token]))}
            assert new in group, (mech.name, token, new)
        assert (out != x).any()


def test_custext_and_rnm_plus_keep_stopwords():
    u = universe()
    stop = {"and", "the", "a", "is"}
    tables = groups(u)
    for mech in (CusTextPlus(u, 0.5, 0, tables, stop), RNM(u, 0.5, 0, tables, keep=stop)):
        out = mech.sanitise(corpus_ids())
        changed = 0
        for token, new in zip(corpus_ids().tolist(), out.tolist(), strict=True):
            if u.tokens[int(u.local[token])] in stop:
                assert new == token, mech.name
            changed += new != token
        assert changed > 0


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_custext_is_epsilon_dp_within_a_group(epsilon):
    """max over outputs y and members x, x' of P(y|x) / P(y|x') <= e^ε, computed exactly."""
    u = universe()
    tables = groups(u)
    group = tables.group_of(0)
    weights = torch.exp(epsilon * tables.scores[group] / 2).double()
    probs = weights / weights.sum(-1, keepdim=True)  # rows: inputs x; columns: slot of y
    # slot j of row i names candidates[i][j]: reorder every row by output token
    by_token = torch.stack(
        [probs[i][torch.argsort(tables.candidates[x][: len(group)])] for i, x in enumerate(group)]
    )
    ratio = (by_token.max(0).values / by_token.min(0).values).max().item()
    assert ratio <= math.exp(epsilon) * (1 + 1e-9)
    assert ratio > 1.0


def test_santext_replaces_with_sensitive_tokens():
    u = universe()
    mech = SanTextPlus(u, 1.0, 0, w=0.9, p=0.3)
    x = corpus_ids()
    out = mech.sanitise(x)
    sensitive_ids = set(u.ids[mech.sensitive_rows].tolist())
    changed = out != x
    assert set(out[changed].tolist()) <= sensitive_ids
    frequent = ~mech.sensitive[u.local[x]]
    kept = (out[frequent] == x[frequent]).float().mean().item()
    assert 0.6 < kept < 0.8  # non-sensitive tokens are resampled with probability p = 0.3
    assert len(sensitive_ids) == int(0.9 * len(u))


def test_harness_runs_end_to_end(tmp_path):
    data = tmp_path / "sst2"
    data.mkdir()
    rows = "".join(f"{s} \t{i % 2}\n" for i, s in enumerate(SENTENCES * 3))
    (data / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (data / "dev.tsv").write_text("sentence\tlabel\n" + rows[: rows.index("\n", 200) + 1])
    out = tmp_path / "out"
    sst2.main(
        [
            "--data",
            str(data),
            "--train-size",
            "20",
            "--epsilons",
            "1",
            "2",
            "--seeds",
            "0",
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "sst2.json").read_text())
    assert {r["mechanism"] for r in results["runs"]} == set(sst2.MECHANISMS)
    assert all(0.0 <= r["replaced"] <= 1.0 for r in results["runs"])
    assert (out / "sst2.png").read_bytes().startswith(b"\x89PNG")
    assert "non-private" in (out / "sst2.md").read_text()


def test_harness_names_a_bad_file(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nfoo\t1\n")
    with pytest.raises(SystemExit, match=r"train\.tsv has header"):
        sst2.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")])
