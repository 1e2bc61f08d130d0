"""Picking a reply's next token from the model's logits: greedy, or drawn the way transformers' `generate` draws.

Sampling applies the same steps in the same order as `generate`'s logits processors (repetition penalty, then
temperature, top-k and top-p), with the same arithmetic, so that a sampled reply comes from the same distribution
as a `generate` call's; tests/test_sampling.py holds each step to transformers' own processor. They are written here
so that serving does not import transformers.

Top-p and the draw run on the top-k candidates only (a few dozen ids) instead of the whole vocabulary: every other id
is impossible after top-k, so the distribution is the same, but sorting and drawing over the default model's 49,152
ids took 1.7 ms a token per reply on the 2-core machine (a third of a one-reply decode step, more than an 8-reply
step's model for 8 replies), the candidates' 0.13 ms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# `generate` falls back to top_k=50 when sampling and neither the user nor the model's generation config chose one.
GENERATE_DEFAULT_TOP_K = 50


def penalize_repetition(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """`scores` `[rows, vocab]` with each row's seen tokens made less likely (`penalty` > 1) or more (< 1), once
    each: a positive score divided by `penalty`, a negative one multiplied."""
    seen_ids = seen_ids.clamp(max=scores.shape[-1])  # ids past the output vocabulary land on a column dropped below
    padded = torch.nn.functional.pad(scores, (0, 1))
    picked = padded.gather(1, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, seen_ids, picked)[..., : scores.shape[-1]]


def top_k_candidates(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ids of the `top_k` highest of `scores` `[vocab]` (ties with the k-th included), in id order: the ids that
    stay possible after transformers' top-k."""
    top_k = min(max(top_k, 1), scores.shape[-1])
    return (scores >= torch.topk(scores, top_k).values[-1]).nonzero().squeeze(1)


def keep_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Only the most likely tokens whose probabilities add up to `top_p` stay possible (at least the likeliest)."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    dropped = cumulative <= (1 - top_p)
    dropped[..., -1:] = False
    return scores.masked_fill(dropped.scatter(1, order, dropped), -float("inf"))


class Sampler:
    """Picks one row's next token with that request's settings (temperature 0 is greedy)."""

    def __init__(
        self,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float | None,
        generator: torch.Generator | None,
    ) -> None:
        self.generator = generator  # a seeded request draws from its own generator, others from torch's global one
        self.repetition_penalty = repetition_penalty if repetition_penalty not in (None, 1.0) else None
        self.greedy = temperature <= 0
        self.temperature = temperature if not self.greedy and temperature != 1.0 else None
        self.top_k = top_k if not self.greedy and top_k > 0 else None
        self.top_p = max(top_p, 0.0) if not self.greedy and top_p < 1.0 else None

    @property
    def plain_argmax(self) -> bool:
        """True when the next token is just the highest logit, so a whole batch can share one argmax."""
        return self.greedy and self.repetition_penalty is None

    def next_token(self, logits: torch.Tensor, seen_ids: Sequence[int]) -> int:
        """`logits` is this row's `[vocab]` scores; `seen_ids` the prompt and the reply so far."""
        scores = self._penalized(logits, seen_ids)
        if self.greedy:
            return int(scores.argmax().item())
        ids, probabilities = self._distribution(scores)
        choice = int(torch.multinomial(probabilities, num_samples=1, generator=self.generator).item())
        return choice if ids is None else int(ids[choice].item())

    def distribution(self, logits: torch.Tensor, seen_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids a sampled next token can be and their probabilities; what `next_token` draws from."""
        ids, probabilities = self._distribution(self._penalized(logits, seen_ids))
        return (torch.arange(len(probabilities)) if ids is None else ids), probabilities

    def _penalized(self, logits: torch.Tensor, seen_ids: Sequence[int]) -> torch.Tensor:
        scores = logits.float()
        if self.repetition_penalty is None:
            return scores
        seen = torch.tensor([seen_ids], device=logits.device)
        return penalize_repetition(scores.unsqueeze(0), seen, self.repetition_penalty)[0]

    def _distribution(self, scores: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(candidate ids, or None for the whole vocabulary; their probabilities) after temperature, top-k, top-p."""
        if self.temperature is not None:
            scores = scores / self.temperature
        ids = None if self.top_k is None else top_k_candidates(scores, self.top_k)
        candidates = scores.unsqueeze(0) if ids is None else scores[ids].unsqueeze(0)
        if self.top_p is not None:
            # the same ids survive as among the whole vocabulary's: the others, impossible, add nothing to the sums
            candidates = keep_top_p(candidates, self.top_p)
        return ids, torch.softmax(candidates[0], dim=-1)
