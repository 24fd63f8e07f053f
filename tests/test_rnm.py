"""Report-Noisy-Max: the tables, the sampler against the mechanism, and the ε claim."""

import math

import pytest
import torch
from conftest import built, captured
from scipy import stats

from enclave_runtime.randomness import CSPRNG
from partitioner import ops  # noqa: F401 - registers torch.ops.teesplit
from partitioner.api import partition
from partitioner.errors import ArtifactError
from partitioner.rnm_tables import RNMTables
from passes.rnm import exact_distribution

SPECIAL = (0, 1, 2)


@pytest.fixture(scope="module")
def tables() -> RNMTables:
    weight = built("tiny-llama").get_input_embeddings().weight
    return RNMTables.build(weight, k=8, epsilon=1.0, special_ids=SPECIAL)


def test_groups_partition_the_vocabulary(tables):
    vocab = tables.candidates.shape[0]
    seen: dict[int, tuple[int, ...]] = {}
    for token in range(vocab):
        group = tuple(tables.group_of(token))
        assert token in group
        if token in SPECIAL:
            assert group == (token,) and bool(tables.keep[token])
            continue
        assert 2 <= len(group) <= tables.k
        for member in group:  # same candidate set for every member: a fixed partition
            assert seen.setdefault(member, group) == group
        valid = tables.scores[token][: len(group)]
        assert float(valid.min()) == 0.0 and float(valid.max()) == 1.0  # min-max normalised
        assert torch.isinf(tables.scores[token][len(group) :]).all()
    assert set(seen) == set(range(vocab)) - set(SPECIAL)


def _sample(tables: RNMTables, token: int, n: int, seed: int, scale: float | None = None):
    ids = torch.full((n,), token, dtype=torch.int64)
    noise = CSPRNG(seed).laplace([n, tables.k], scale or tables.noise_scale)
    out = torch.ops.teesplit.rnm(ids, tables.candidates, tables.scores, tables.keep, noise)
    group = tables.group_of(token)
    counts = torch.tensor([int((out == c).sum()) for c in group])
    assert int(counts.sum()) == n  # nothing outside the group is ever emitted
    return counts


def test_sampler_matches_the_mechanism_definition(tables):
    """Chi-square of 20 000 draws of the real op against P[argmax(s + Lap(2/ε)) = c]."""
    token = next(t for t in range(3, 256) if len(tables.group_of(t)) == tables.k)
    counts = _sample(tables, token, 20_000, seed=1)
    probs = exact_distribution(tables.scores[token], tables.noise_scale)[: tables.k]
    expected = probs * counts.sum()
    assert float(expected.min()) > 5  # chi-square's validity condition
    result = stats.chisquare(counts.double().numpy(), expected.numpy())
    assert result.pvalue > 1e-3, (counts, expected)


def _worst_pair(tables: RNMTables, token: int) -> tuple[int, int, float]:
    group = tables.group_of(token)
    dist = {
        t: exact_distribution(tables.scores[t], tables.noise_scale)[: len(group)] for t in group
    }
    best = (group[0], group[1], -1.0)
    for a in group:
        for b in group:
            ratio = float((dist[a].log() - dist[b].log()).max())
            if ratio > best[2]:
                best = (a, b, ratio)
    return best


def test_the_exact_distribution_satisfies_epsilon_for_every_pair_in_a_group(tables):
    for token in (3, 50, 200):
        _, _, worst = _worst_pair(tables, token)
        assert worst <= tables.epsilon + 1e-6


def _empirical_violation(counts_a: torch.Tensor, counts_b: torch.Tensor, epsilon: float) -> float:
    """max over outputs of log(lower CI of P[c|a]) - log(upper CI of P[c|b]) (99.99 % each)."""
    n_a, n_b = int(counts_a.sum()), int(counts_b.sum())
    worst = -math.inf
    for ka, kb in zip(counts_a.tolist(), counts_b.tolist(), strict=True):
        if ka == 0:
            continue
        low = stats.beta.ppf(5e-5, ka, n_a - ka + 1)
        high = stats.beta.ppf(1 - 5e-5, kb + 1, n_b - kb) if kb < n_b else 1.0
        worst = max(worst, math.log(low) - math.log(high) - epsilon)
    return worst


def test_empirical_epsilon_check_holds_for_rnm_and_catches_too_little_noise(tables):
    """An independent, sampling-based check: conservative confidence bounds on the output
    probabilities of the worst pair of neighbours never exceed e^ε; the same check flags a
    mechanism with an eighth of the noise (so it can fail)."""
    token = next(t for t in range(3, 256) if len(tables.group_of(t)) == tables.k)
    a, b, _ = _worst_pair(tables, token)
    n = 40_000
    assert _empirical_violation(_sample(tables, a, n, 2), _sample(tables, b, n, 3), 1.0) <= 0
    weak = tables.noise_scale / 8
    bad = _empirical_violation(_sample(tables, a, n, 4, weak), _sample(tables, b, n, 5, weak), 1.0)
    assert bad > 0


def test_tables_save_and_load_and_a_bad_file_is_refused(tables, tmp_path):
    path = tmp_path / "rnm.safetensors"
    tables.save(path)
    loaded = RNMTables.load(path)
    assert torch.equal(loaded.candidates, tables.candidates)
    assert torch.equal(loaded.scores, tables.scores) and loaded.epsilon == tables.epsilon
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"cannot read RNM tables .*rnm\.safetensors"):
        RNMTables.load(path)


def test_cmif_sanitises_once_in_the_enclave_and_reports_the_request_epsilon():
    sp = partition(captured("tiny-llama"), "cmif", special_token_ids=SPECIAL, seed=5)
    site = sp.protection.rnm
    assert sp.stages[[s.name for s in sp.stages].index(site.stage)].side == "enclave"
    assert not [e for e in sp.edges if e.producer == "input" and e.consumer.startswith("gpu")]
    assert {e.protection for e in sp.cut_edges if e.direction == "enclave->gpu"} <= {"dp", "public"}
    ids = torch.tensor([[1, 40, 41, 42, 2, 90]])
    executor = sp.executor()
    with torch.no_grad():
        executor(input_ids=ids)
    sanitised = executor.last_request["sanitised_tokens"]
    assert sanitised[0, 0] == 1 and sanitised[0, 4] == 2  # special tokens pass through
    for orig, new in zip(ids[0].tolist(), sanitised[0].tolist(), strict=True):
        assert new in site.tables.group_of(orig)
    assert executor.last_request["epsilon"] == 4 * sp.policy.rnm.epsilon
    again = partition(captured("tiny-llama"), "cmif", special_token_ids=SPECIAL)
    assert again.protection.rnm.tables is site.tables  # built once per model and settings
