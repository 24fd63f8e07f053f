"""The audit's search by value for parts of protected parameters (``passes.copies``).

Its hashing can miss a copy by chance; these measure how often, on copies noisier than int8
quantisation, and check that what it calls a copy is one: unrelated rows are never reported,
nor a protected row that a public weight has too.
"""

from __future__ import annotations

import torch

from passes.copies import COPY_CORRELATION, copies_on_gpu


def noisy_copy(rows: torch.Tensor, correlation: float, gen: torch.Generator) -> torch.Tensor:
    """An affine copy of each row (random scale, sign and offset) plus noise that leaves it
    ``correlation`` correlated with the row."""
    centred = rows - rows.mean(1, keepdim=True)
    noise = torch.randn(rows.shape, generator=gen)
    noise -= noise.mean(1, keepdim=True)
    noise *= centred.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    noisy = correlation * centred + (1 - correlation**2) ** 0.5 * noise
    scale = torch.randn(rows.shape[0], 1, generator=gen) * 50
    return noisy * scale + torch.randn(rows.shape[0], 1, generator=gen)


def reported(stolen: list[torch.Tensor], secret: torch.Tensor, public=()) -> int:
    stages = [("gpu_0", [(f"t{i}", t) for i, t in enumerate(stolen)])]
    return len(copies_on_gpu(stages, [("secret", secret)], list(public)))


def test_nearly_every_single_row_copy_is_found_even_noisier_than_int8():
    gen = torch.Generator().manual_seed(0)
    secret = torch.randn(400, 64, generator=gen)
    # one protected row per GPU tensor: each found or missed on its own
    for correlation, least in ((0.995, 0.98), (0.9999, 1.0)):
        copies = noisy_copy(secret, correlation, gen)
        found = sum(reported([row.clone()], secret) for row in copies[:200])
        assert found >= least * 200, (correlation, found)


def test_unrelated_rows_and_copies_below_the_threshold_are_not_reported():
    gen = torch.Generator().manual_seed(1)
    secret = torch.randn(300, 64, generator=gen)
    assert reported([torch.randn(2000, 64, generator=gen)], secret) == 0
    assert reported([noisy_copy(secret, COPY_CORRELATION - 0.02, gen)], secret) == 0


def test_a_protected_row_a_public_weight_has_too_is_not_a_copy():
    """A trainable token's row left as its base's: the GPU holding the public row learns
    nothing the public base does not say. Another row of the same parameter still is."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(50, 64, generator=gen)
    # two trained tokens' rows: one left as the base's, one the fine-tune changed
    secret = torch.stack([base[3], base[9] + torch.randn(64, generator=gen)])
    public = [("embed", base)]
    assert reported([base.clone()], secret, public) == 0
    assert reported([base.clone()], secret) == 1  # without the public weight: a copy
    assert reported([secret[1:].clone()], secret, public) == 1


def test_a_fine_tuned_row_beside_its_public_base_row_is_still_a_copy():
    """A fine-tuned row is ~0.995 correlated with its base's: excusing every protected row
    that close to a public one hid trained rows stacked under the public weight (a review's
    finding). A held row is excused only where a public row is at least as close to it."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(50, 64, generator=gen)
    trained = base[:4] + 0.1 * torch.randn(4, 64, generator=gen)
    public = [("embed", base)]
    assert reported([torch.cat([base, trained])], trained, public) == 1
    assert reported([trained.flatten().clone()], trained, public) == 1
    # the public base quantised, as the GPU holds it honestly: closer to the base than to
    # the fine-tune, so not a copy
    quantised = torch.round(base / base.abs().amax(1, keepdim=True) * 127).to(torch.int8)
    assert reported([quantised], trained, public) == 0


def test_nothing_held_nothing_computed():
    """The audit of a split whose GPU holds no weight (secureinfer) built an index of every
    protected row anyway: 5.9 s and 7.2 GB for SmolLM2 (a review's finding)."""
    huge = torch.randn(4, 1 << 20)  # would need 4 GiB of hyperplanes for its width
    assert copies_on_gpu([("gpu_0", [])], [("secret", huge)], []) == []
    assert reported([torch.randn(3, 5)], huge) == 0  # a held tensor, but no width in common
