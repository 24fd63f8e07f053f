"""Sampling the next token in the enclave: temperature and nucleus (top-p), from a CSPRNG.

Reads ``[batch, vocab]`` logits (what the decoder step returns for the last position) and
draws one token per row. The draw's uniform number comes from the enclave's
:class:`~enclave_runtime.randomness.CSPRNG` (AES-CTR), never from torch's global generator,
which other code in the process may seed. Without a seed the generator is keyed from the OS;
a client's ``seed`` keys it from that seed (domain-separated from every other use of a seed),
so the same request with the same seed draws the same tokens: the seed decides only this
request's sampling, never a mask or RNM noise.

Temperature 0 is greedy (the arg-max), with no randomness drawn. A sampled token is as public
to the GPU as a greedy one: it is a function of logits the GPU computed and of randomness that
carries nothing about the prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from enclave_runtime.randomness import CSPRNG


def sampling_rng(seed: int | None) -> CSPRNG:
    """The generator for one request's draws: OS-keyed, or keyed from the client's seed."""
    if seed is None:
        return CSPRNG()
    return CSPRNG(f"openai-sampling-seed:{seed}")


class Sampler:
    """``choose`` for :func:`~enclave_runtime.generation.decode_steps`: logits -> tokens.

    ``temperature`` in ``[0, 2]`` (0: greedy); ``top_p`` in ``(0, 1]`` keeps the smallest set
    of most likely tokens whose probability reaches ``top_p`` (always at least one).
    """

    def __init__(self, temperature: float, top_p: float, rng: CSPRNG) -> None:
        if not (isinstance(temperature, (int, float)) and 0 <= temperature <= 2):
            raise ValueError(f"temperature must be in [0, 2], got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.rng = rng

    def _uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 draws on [0, 1), 53 random bits each."""
        raw = np.frombuffer(self.rng.bytes(8 * n), dtype=np.uint64)
        return torch.from_numpy((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        # float64 so that a low temperature's large logits neither overflow nor tie
        probs = torch.softmax(logits.to(torch.float64) / self.temperature, dim=-1)
        # stable: equal probabilities keep their id order, so a seeded draw is reproducible
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        if self.top_p < 1:
            before = ranked.cumsum(-1) - ranked  # mass of the more likely tokens
            ranked = torch.where(before < self.top_p, ranked, torch.zeros_like(ranked))
        kept = (ranked > 0).sum(-1, keepdim=True).clamp(min=1)
        cumulative = ranked.cumsum(-1)
        target = self._uniform(logits.shape[0])[:, None] * cumulative[:, -1:]
        index = torch.searchsorted(cumulative, target, right=True)
        # rounding may put the draw at the very top: the last kept token, never a dropped one
        index = torch.minimum(index, kept - 1)
        return order.gather(-1, index).squeeze(-1)
