"""RNM groups against the attack of issue 16: the GPU inverts the embedding to the sanitised
token, takes its group and guesses the original with a unigram prior.

The attack is ``benchmarks/privacy/attack.py``; here it is checked against a brute-force Bayes
optimum (the production sampler, over the whole vocabulary), run against cosine groups (where
it recovers far more than the ε bound suggests) and against frequency-strata groups (where it
does not), and the plan is shown to say which groups it holds.
"""

import json
import math

import pytest
import torch
from conftest import built, captured

from benchmarks.privacy.attack import GroupAttack, custext_channel, rnm_channel, uniform_bound
from enclave_runtime.randomness import CSPRNG
from partitioner import ops  # noqa: F401 - registers torch.ops.teesplit
from partitioner.api import partition
from partitioner.errors import ArtifactError, PolicyError
from partitioner.protection import RNMSite
from partitioner.rnm_tables import RNMTables, TokenPrior
from partitioner.token_prior import corpus_prior, prior_from
from passes.rnm import exact_distribution


def _embedding(vocab: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def _log_uniform_prior(vocab: int, seed: int = 1) -> torch.Tensor:
    """Counts from 1 to 10^4, unrelated to the embedding: words of every frequency."""
    g = torch.Generator().manual_seed(seed)
    return torch.pow(10.0, 4 * torch.rand(vocab, generator=g, dtype=torch.float64))


def _text(prior: torch.Tensor, n: int, seed: int = 2) -> torch.Tensor:
    """Tokens drawn from the prior: the text the attacker's prior describes."""
    return torch.multinomial(
        prior, n, replacement=True, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("kept", [(), (3, 7)])
def test_the_attacks_bayes_guess_is_the_brute_force_optimum(kept):
    """Brute force: P(y | x) counted from the production op's outputs for every token of a
    tiny vocabulary, the posterior over *all* tokens (no groups assumed), its arg-max. With
    ``kept`` tokens passed through while still candidates of their group's others (the
    harness's "stopwords kept")."""
    vocab, k, epsilon, n = 12, 4, 3.0, 60_000
    tables = RNMTables.build(_embedding(vocab), k, epsilon)
    tables.keep[list(kept)] = True
    prior = torch.tensor([9, 1, 4, 2, 7, 3, 1, 6, 2, 5, 8, 1], dtype=torch.float64)
    attack = GroupAttack(tables, prior, range(vocab))
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)  # [x, y]
    for x in range(vocab):
        noise = CSPRNG(x).laplace([n, k], tables.noise_scale)
        out = torch.ops.teesplit.rnm(
            torch.full((n,), x), tables.candidates, tables.scores, tables.keep, noise
        )
        counts[x] = torch.bincount(out, minlength=vocab).to(torch.float64)
    channel = counts / n
    joint = prior[:, None] * channel  # [x, y] ∝ P(x, y)
    checked = 0
    for y in range(vocab):
        top2 = torch.topk(joint[:, y], 2)
        # a guess is decided when the runner-up trails by more than the sampling error
        err = 4 * math.sqrt(float(top2.values[0]) * float(prior.max()) / n)
        if float(top2.values[0] - top2.values[1]) > err:
            assert int(attack.bayes_guess[y]) == int(top2.indices[0]), y
            checked += 1
    assert checked >= vocab // 2
    # and the expected recovery is what the brute-force guesses score on the same channel
    text = torch.arange(vocab).repeat_interleave(prior.to(torch.int64))
    brute = joint.argmax(dim=0)
    expected_brute = float(
        sum(prior[x] * channel[x, brute == x].sum() for x in range(vocab)) / prior.sum()
    )
    assert attack.expected(text).bayes == pytest.approx(expected_brute, abs=0.02)


def test_the_integrated_channel_matches_the_reference_integration():
    tables = RNMTables.build(_embedding(30), 6, 1.0)
    group = tables.candidates[0][tables.candidates[0] >= 0]
    scores = tables.scores[group][:, : len(group)]
    fast = rnm_channel(tables.noise_scale)(scores)
    for i in range(len(scores)):
        reference = exact_distribution(scores[i], tables.noise_scale)[: len(group)]
        assert torch.allclose(fast[i], reference, atol=1e-5)
    soft = custext_channel(2.0)(scores)
    assert torch.allclose(soft.sum(dim=1), torch.ones(len(scores), dtype=torch.float64))


def test_cosine_groups_give_the_word_away_and_strata_groups_do_not():
    """The attack first: on cosine groups a skewed prior inside a group lets the Bayes guess
    recover far more than ``e^ε/(e^ε+K−1)``; strata groups hold it near that bound."""
    vocab, k, epsilon = 400, 10, 1.0
    embedding, prior = _embedding(vocab), _log_uniform_prior(vocab)
    text = _text(prior, 20_000)
    bound = uniform_bound(epsilon, k)
    cosine = RNMTables.build(embedding, k, epsilon)
    strata = RNMTables.build(embedding, k, epsilon, prior=TokenPrior("test", prior, 2.0))
    broken = GroupAttack(cosine, prior, text.tolist()).expected(text)
    held = GroupAttack(strata, prior, text.tolist()).expected(text)
    assert broken.bayes > 2 * bound  # the attack succeeds on the old groups
    assert held.bayes <= 1.5 * bound
    assert held.exact == pytest.approx(broken.exact, abs=0.02)  # the noise is the same
    assert cosine.grouping == {"method": "cosine"}
    assert strata.grouping["method"] == "strata" and strata.grouping["prior"] == "test"


def test_strata_groups_are_a_partition_of_near_equal_priors_and_still_epsilon_dp():
    vocab, k, ratio, special = 300, 8, 2.0, (0, 1)
    prior = _log_uniform_prior(vocab)
    tables = RNMTables.build(
        _embedding(vocab), k, 1.0, special, prior=TokenPrior("test", prior, ratio)
    )
    seen: dict[int, tuple[int, ...]] = {}
    order = torch.argsort(-prior[2:], stable=True) + 2
    rank = {int(t): r for r, t in enumerate(order)}
    for token in range(vocab):
        group = tuple(tables.group_of(token))
        if token in special:
            assert group == (token,) and bool(tables.keep[token])
            continue
        for member in group:
            assert seen.setdefault(member, group) == group
        counts = prior[list(group)]
        # every group lies in one stratum: its counts within the ratio, or (where k tokens
        # in a row exceed it: the most frequent words) k neighbours in frequency order
        ranks = sorted(rank[t] for t in group)
        if len(group) == k and ranks[-1] - ranks[0] == k - 1:
            continue
        assert float(counts.max() / counts.min()) <= ratio
    assert set(seen) == set(range(vocab)) - set(special)
    group = tables.group_of(5)
    probs = {
        t: exact_distribution(tables.scores[t], tables.noise_scale)[: len(group)] for t in group
    }
    for a in group:
        for b in group:
            assert float((probs[a] / probs[b]).max()) <= math.exp(1.0) * (1 + 1e-6)


def test_a_prior_of_the_wrong_size_or_values_is_refused():
    with pytest.raises(PolicyError, match="counts for a vocabulary of 50"):
        RNMTables.build(_embedding(50), 5, 1.0, prior=TokenPrior("short", torch.ones(49)))
    with pytest.raises(PolicyError, match="finite"):
        TokenPrior("nan", torch.tensor([1.0, float("nan")]))
    with pytest.raises(PolicyError, match="ratio"):
        TokenPrior("flat", torch.ones(3), ratio=1.0)


def test_corpus_and_file_priors_count_tokens_and_name_what_is_wrong(tmp_path):
    from partitioner.zoo import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    prior = corpus_prior(tokenizer, ["the film , the film", "a film"], "tiny")
    the, film = tokenizer.convert_tokens_to_ids(["the", "film"])
    assert prior.counts[film] == 3 and prior.counts[the] == 2 and prior.source == "corpus:tiny"
    with pytest.raises(PolicyError, match="outside the model's 1000 embedding rows"):
        corpus_prior(tokenizer, ["the film"], "tiny", vocab_size=1000)  # was dropped unsaid

    def negative(texts, add_special_tokens=False):  # a tokenizer giving an id below 0
        return {"input_ids": [[1, -3, 2] for _ in texts]}

    with pytest.raises(PolicyError, match="gives id -3, outside the model's 10 embedding"):
        corpus_prior(negative, ["the film"], "tiny", vocab_size=10)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the film\n")
    from_file = prior_from(str(corpus), tokenizer)
    assert from_file.source.startswith("corpus:corpus.txt@") and from_file.ratio == 8.0
    assert prior_from(str(corpus), tokenizer, ratio=3.0).ratio == 3.0
    with pytest.raises(PolicyError, match="ratio must be a number > 1"):
        prior_from(str(corpus), tokenizer, ratio=1.0)
    assert prior_from("none", tokenizer) is None
    with pytest.raises(PolicyError, match="no prior to build strata of"):
        prior_from("none", tokenizer, ratio=4.0)
    with pytest.raises(PolicyError, match=r"missing\.txt"):
        prior_from(str(tmp_path / "missing.txt"), tokenizer)
    corpus.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        prior_from(str(corpus), tokenizer)
    with pytest.raises(PolicyError, match="tokenizer"):
        prior_from("wordfreq", None)
    words = prior_from("wordfreq", tokenizer)
    assert words.ratio == 8.0
    rare = tokenizer.convert_tokens_to_ids("cinematography")
    assert words.counts[the] > 100 * words.counts[rare] > 0
    # punctuation, which wordfreq does not count, is as frequent as the words it rivals: a
    # comma in a group of rare tokens would be named by its group (81 % of SST-2's were)
    comma, stop, bang = tokenizer.convert_tokens_to_ids([",", ".", "!"])
    assert words.counts[the] / 2 < words.counts[comma] <= words.counts[the]
    assert words.counts[the] / 2 < words.counts[stop] <= words.counts[the]
    assert 0 < words.counts[bang] < words.counts[film] * 100


def test_the_plan_says_which_groups_it_holds_and_refuses_a_forged_record(tmp_path):
    model = built("tiny-llama")
    vocab = model.get_input_embeddings().weight.shape[0]
    prior = TokenPrior("test-corpus", _log_uniform_prior(vocab))
    split = partition(captured("tiny-llama"), "cmif", token_prior=prior, seed=0)
    site = split.spec.protection.rnm
    assert site.grouping == prior.describe()
    assert "frequency strata of the prior test-corpus" in split.report()
    plain = partition(captured("tiny-llama"), "cmif", seed=0).spec.protection.rnm
    assert plain.grouping == {"method": "cosine"}
    assert not torch.equal(site.tables.candidates, plain.tables.candidates)
    record = json.loads(json.dumps(site.to_dict()))
    assert RNMSite.from_dict(record).grouping == site.grouping
    old = {key: value for key, value in record.items() if key != "grouping"}
    assert RNMSite.from_dict(old).grouping == {"method": "cosine"}  # plans before issue 16
    for key, value in (("method", "kmeans"), ("prior_sha256", "zz"), ("ratio", 0.5)):
        forged = {**record, "grouping": {**record["grouping"], key: value}}
        with pytest.raises(ArtifactError, match=f"grouping.{key}"):
            RNMSite.from_dict(forged)


def test_the_santext_attack_is_the_brute_force_bayes_optimum():
    """SanText+ is no partition: the brute force builds its whole channel from the
    mechanism's own probabilities and takes the posterior's arg-max for every output."""
    from benchmarks.privacy.attack import SanTextAttack
    from benchmarks.privacy.mechanisms import SanTextPlus, Universe

    n, epsilon, p = 14, 3.0, 0.3
    embedding = _embedding(n, dim=4, seed=3)
    counts = torch.tensor([50, 40, 30, 9, 8, 7, 6, 5, 4, 3, 3, 2, 2, 1])
    universe = Universe(
        ids=torch.arange(n),
        embedding=embedding,
        counts=counts,
        local=torch.arange(n),
        tokens=[str(i) for i in range(n)],
    )
    mech = SanTextPlus(universe, epsilon, seed=0, w=0.6, p=p)
    prior = counts.to(torch.float64)
    attack = SanTextAttack(embedding, mech.sensitive, epsilon, p, prior, chunk=3)
    channel = torch.zeros(n, n, dtype=torch.float64)  # [x, y]
    q = mech.probabilities(torch.arange(n)).to(torch.float64)  # [x, sensitive rows]
    for x in range(n):
        resample = 1.0 if mech.sensitive[x] else p
        channel[x, mech.sensitive_rows] += resample * q[x]
        channel[x, x] += 1.0 - resample
    joint = prior[:, None] * channel
    brute = joint.argmax(dim=0)
    for y in torch.nonzero(mech.sensitive).flatten().tolist():
        top2 = torch.topk(joint[:, y], 2).values
        if float(top2[0] - top2[1]) > 1e-9 * float(top2[0]):
            assert int(attack.guess[y]) == int(brute[y]), y
    recovered = torch.tensor([float(channel[x, brute == x].sum()) for x in range(n)])
    assert torch.allclose(attack.p_bayes, recovered.to(torch.float64), atol=1e-6)


def test_no_token_is_left_alone_and_one_that_must_be_passes_through_for_free():
    """101 tokens in groups of 10 used to leave one token alone: RNM always emitted it and
    charged ε for noise that could not move it."""
    sizes = (RNMTables.build(_embedding(101), 10, 1.0).candidates >= 0).sum(dim=1)
    assert int(sizes.min()) >= 2
    odd = RNMTables.build(_embedding(7), 2, 1.0)  # groups of 2: one token must stay alone
    alone = (odd.candidates >= 0).sum(dim=1) == 1
    assert int(alone.sum()) == 1 and bool(odd.keep[alone].all())
    assert odd.request_epsilon(torch.arange(7)) == 6.0  # it spends no ε


@pytest.mark.parametrize("forgery", ["alone", "reordered", "listed_twice", "score_above_one"])
def test_tables_that_are_not_a_partition_are_refused_on_load(forgery, tmp_path):
    tables = RNMTables.build(_embedding(60), 6, 1.0, special_ids=(0,))
    c, s = tables.candidates.clone(), tables.scores.clone()
    group = tables.group_of(10)
    if forgery == "alone":  # token 10 its own group: always emitted as it is
        c[10], s[10] = -1, float("-inf")
        c[10, 0], s[10, 0] = 10, 1.0
    elif forgery == "reordered":  # a member lists the group in another order
        c[group[1], : len(group)] = torch.tensor(group[::-1])
    elif forgery == "listed_twice":
        c[group, 1] = group[0]
    else:
        s[10, 0] = 2.0
    forged = RNMTables(c, s, tables.keep, 1.0)
    forged.save(tmp_path / "rnm.safetensors")
    with pytest.raises(ArtifactError, match="not a group of a fixed partition"):
        RNMTables.load(tmp_path / "rnm.safetensors")
    tables.save(tmp_path / "good.safetensors")
    assert torch.equal(RNMTables.load(tmp_path / "good.safetensors").candidates, tables.candidates)


def test_the_wordfreq_prior_counts_tokenised_text_as_well_as_natural_text():
    """SST-2, like most NLP corpora, is Penn-Treebank tokenised: "it 's", "does n't", "``".
    Byte-level BPE gives those spellings their own ids (" '", " n"), which natural text
    never produces; a prior that counts only natural text put " '", one token in 60 of SST-2,
    among rare tokens, where its group named it."""
    import wordfreq

    from partitioner.token_prior import tokenised, wordfreq_prior
    from partitioner.zoo import smollm2_tokenizer

    words = ("it's", "doesn't", "film's", "n't", "the", "couldn't've", "players'", "o'clock",
             "o'brien's", "rock'n'roll")  # fmt: skip
    assert [tokenised(w) for w in words] == [
        "it 's", "does n't", "film 's", "n't", "the", "could n't 've", "players '", "o'clock",
        "o'brien 's", "rock'n'roll"]  # fmt: skip
    tokenizer = smollm2_tokenizer()
    counts = wordfreq_prior(tokenizer).counts
    (apostrophe,), (the,), (film,) = (tokenizer.encode(t) for t in (" '", " the", " film"))
    assert counts[the] / 20 < counts[apostrophe] < counts[the]  # " 's" is about 1 % of words
    assert counts[tokenizer.encode(" ``")[0]] > counts[film]
    # every spelling of a mark is counted: natural text's " (" and opening ' "' as well as
    # tokenised text's " )" and -rrb- (each a share of the Brown rate, 0.039 of "the")
    least = 0.039 * wordfreq.word_frequency("the", "en") / 4
    for text in (" (", ")", ' "', '"', " )", " -rrb-", " --"):
        assert all(counts[i] >= least for i in tokenizer.encode(text)), text


def test_inside_a_stratum_the_most_frequent_token_seeds_first_and_gets_its_nearest():
    """Greedy groups (where the swaps of ``_refine`` start) get worse as free tokens run out:
    the most frequent token of a stratum (most of the text) must pick first, not whichever
    token has the lowest id."""
    from partitioner.rnm_tables import _greedy, _strata

    vocab, k = 60, 5
    embedding = _embedding(vocab)
    prior = torch.ones(vocab, dtype=torch.float64)  # one stratum
    prior[41] = 1.5
    (stratum,) = _strata(torch.zeros(vocab, dtype=torch.bool), TokenPrior("t", prior, 2.0), k)
    unit = torch.nn.functional.normalize(embedding, dim=1)
    (group,) = [g for g in _greedy(unit, stratum, k) if 41 in g.tolist()]
    nearest = torch.topk(unit @ unit[41], k).indices
    assert sorted(group.tolist()) == sorted(nearest.tolist())


def test_no_token_is_left_alone_at_the_end_of_the_strata():
    """41 tokens of one stratum in groups of 20: cut into strata of whole groups, the last
    token would form a group of one and pass through in the clear, spending no ε."""
    vocab, k = 41, 20
    tables = RNMTables.build(
        _embedding(vocab), k, 1.0, prior=TokenPrior("flat", torch.ones(vocab, dtype=torch.float64))
    )
    sizes = sorted(len(tables.group_of(t)) for t in range(vocab))
    assert not bool(tables.keep.any()) and min(sizes) >= 2


def _objective(tables: RNMTables, embedding: torch.Tensor) -> float:
    """The groups' summed pairwise cosine similarity (each pair once per direction)."""
    unit = torch.nn.functional.normalize(embedding, dim=1)
    group = tables.candidates[:, 0]
    sums = torch.zeros(len(group), unit.shape[1]).index_add_(0, group, unit)
    return float((sums * sums).sum() - (unit * unit).sum())


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_no_swap_of_two_members_brings_the_groups_closer(seed, monkeypatch):
    """Greedy groups serve their seeds: the last groups of a stratum hold its leftovers, far
    apart, and RNM emits them. When the swaps stop by themselves, no swap of two tokens between
    two groups may raise the groups' summed cosine similarity (checked by brute force over
    every pair; five groups of one stratum, so that every token tries every other group). The
    sweeps are capped in production; here they run until they stop."""
    from partitioner import rnm_tables

    monkeypatch.setattr(rnm_tables, "_ROUNDS", 1000)
    vocab, k = 30, 6
    embedding = _embedding(vocab, seed=seed)
    flat = TokenPrior("flat", torch.ones(vocab, dtype=torch.float64))
    tables = RNMTables.build(embedding, k, 1.0, prior=flat)
    unit = torch.nn.functional.normalize(embedding, dim=1)
    group = tables.candidates[:, 0]  # each token's group, named by its first member
    sums = torch.zeros(vocab, unit.shape[1]).index_add_(0, group, unit)
    cos = unit @ unit.t()
    to_own = (unit * sums[group]).sum(dim=1)
    # swapping a ∈ A with b ∈ B: a·(C_B − C_A) + b·(C_A − C_B) + 2 − 2 a·b
    to_other = unit @ sums[group].t()  # [a, b] = a · C_{group of b}
    gain = to_other - to_own[:, None] + to_other.t() - to_own[None, :] + 2 - 2 * cos
    gain[group[:, None] == group[None, :]] = float("-inf")
    assert float(gain.max()) <= 1e-3, f"swap gains {float(gain.max()):.3f}"


def test_swaps_never_lower_the_groups_similarity_even_with_zero_rows(monkeypatch):
    """A zero embedding row (padding, unused ids) normalises to zero, not to a unit vector:
    a gain that assumes unit rows overstates a swap with it by 1 and makes swaps that lower
    the objective (and zero-for-zero swaps that never stop)."""
    from partitioner import rnm_tables

    vocab, k = 48, 4
    gen = torch.Generator().manual_seed(25)
    embedding = torch.randn(vocab, 8, generator=gen)
    embedding[torch.randperm(vocab, generator=gen)[:20]] = 0.0
    flat = TokenPrior("flat", torch.ones(vocab, dtype=torch.float64))
    refined = RNMTables.build(embedding, k, 1.0, prior=flat)
    monkeypatch.setattr(rnm_tables, "_ROUNDS", 0)
    greedy = RNMTables.build(embedding, k, 1.0, prior=flat)
    assert _objective(refined, embedding) >= _objective(greedy, embedding) - 1e-4


def test_the_token_left_alone_stays_the_one_greedy_left(monkeypatch):
    """With k = 2 and an odd stratum one token goes out alone (in the clear, ε = 0): the one
    the greedy pass leaves, whose seeds go most frequent first. The swaps must not trade
    another token, whatever its frequency, into that group of one."""
    from partitioner import rnm_tables

    vocab, k = 21, 2
    prior = TokenPrior("t", torch.linspace(2.0, 1.0, vocab, dtype=torch.float64), 4.0)
    for seed in range(6):
        refined = RNMTables.build(_embedding(vocab, seed=seed), k, 1.0, prior=prior)
        with monkeypatch.context() as m:
            m.setattr(rnm_tables, "_ROUNDS", 0)
            greedy = RNMTables.build(_embedding(vocab, seed=seed), k, 1.0, prior=prior)
        assert int(refined.keep.sum()) == 1 and torch.equal(refined.keep, greedy.keep), seed


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_priors_split_texts_as_the_tokenizers_own_call_does(name):
    """The priors encode through the fast tokenizer's backend (transformers' per-text
    conversion was most of wordfreq's time): the ids must be the tokenizer's own. MiniLM's
    tokenizer file turns truncation and padding on at 128, which its own call turns off."""
    from partitioner import zoo
    from partitioner.token_prior import _encoder

    tokenizer = getattr(zoo, f"{name}_tokenizer")()
    texts = ["the film , the film", " it 's", "", "caf\u00e9 -lrb- x -rrb-", "word " * 300]
    encoded = _encoder(tokenizer)(texts)
    assert encoded == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert len(encoded[-1]) >= 300 and 0 not in encoded[0]  # neither truncated nor padded
