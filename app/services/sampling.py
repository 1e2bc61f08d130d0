"""Picking a reply's next token from the model's logits: greedy, or drawn the way transformers' `generate` draws.

Sampling applies the same steps in the same order as `generate`'s logits processors (repetition penalty, then
temperature, top-k and top-p), with the same arithmetic, so that a sampled reply comes from the same distribution
as a `generate` call's; tests/test_sampling.py holds each step to transformers' own processor. They are written here
so that serving does not import transformers.

Top-p and the draw run on each row's top-k candidates only (a few dozen ids) instead of the whole vocabulary: every
other id is impossible after top-k, so the distribution is the same, but sorting and drawing over the default model's
49,152 ids took 1.7 ms a token per reply on the 2-core machine (a third of a one-reply decode step; for 8 replies
more than their step's model). A decode step's rows are sampled together (`next_tokens`), a few operations for all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def keep_top_p(scores: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Only the most likely tokens whose probabilities add up to `top_p[row]` stay possible in each row of `scores`
    `[rows, ids]` (at least the likeliest)."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    # 1 - top_p in Python's double precision, as transformers computes it, then rounded to the scores' float32
    dropped = cumulative <= torch.tensor([[1 - p] for p in top_p], dtype=cumulative.dtype, device=cumulative.device)
    dropped[..., -1:] = False
    return scores.masked_fill(dropped.scatter(1, order, dropped), -float("inf"))


class Sampler:
    """One request's sampling settings (temperature 0 is greedy) and its generator."""

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

    def next_token(self, logits: torch.Tensor, seen_ids: Sequence[int]) -> int:
        """`logits` is this row's `[vocab]` scores; `seen_ids` the prompt and the reply so far."""
        return next_tokens([self], logits.unsqueeze(0), lambda _: seen_ids)[0]

    def distribution(self, logits: torch.Tensor, seen_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids a sampled next token can be and their probabilities (zero for some): what `next_token` draws
        from."""
        ids, probabilities = _candidates([self], _penalized([self], logits.unsqueeze(0), lambda _: seen_ids))
        return ids[0], probabilities[0]


def next_tokens(
    samplers: Sequence[Sampler], logits: torch.Tensor, seen_ids: Callable[[int], Sequence[int]]
) -> list[int]:
    """Each row's next token from `logits` `[rows, vocab]`, row i by `samplers[i]`; `seen_ids(i)` is row i's prompt
    and reply so far (asked only of rows with a repetition penalty)."""
    scores = _penalized(samplers, logits, seen_ids)
    sampled = [i for i, sampler in enumerate(samplers) if not sampler.greedy]
    if len(sampled) < len(samplers):
        tokens: list[int] = scores.argmax(dim=-1).tolist()
    else:
        tokens = [0] * len(samplers)
    if not sampled:
        return tokens
    rows = [samplers[i] for i in sampled]
    ids, probabilities = _candidates(rows, scores if len(sampled) == len(samplers) else scores[sampled])
    choices = _draw(rows, ids, probabilities)
    for i, token in zip(sampled, ids.gather(1, choices).squeeze(1).tolist(), strict=True):
        tokens[i] = token
    return tokens


def _penalized(
    samplers: Sequence[Sampler], logits: torch.Tensor, seen_ids: Callable[[int], Sequence[int]]
) -> torch.Tensor:
    """`logits` as float32 scores, with each row's repetition penalty applied (a copy where there is one)."""
    scores = logits.float()
    penalized = [i for i, sampler in enumerate(samplers) if sampler.repetition_penalty is not None]
    if penalized:
        scores = scores.clone()
    for i in penalized:
        seen = torch.tensor([seen_ids(i)], device=logits.device)
        scores[i] = penalize_repetition(scores[i : i + 1], seen, samplers[i].repetition_penalty)[0]  # type: ignore[arg-type]
    return scores


def _candidates(samplers: Sequence[Sampler], scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled row's candidate ids `[rows, width]` and their probabilities after temperature, top-k (the ids
    whose score is at least the k-th highest, ties included; all of them without a top-k) and top-p: ids past a
    row's own candidates have probability zero."""
    vocab = scores.shape[-1]
    # Python numbers where every row has the same (the usual batch): fewer operations, each of which costs several
    # microseconds on caches the model's step has just flushed.
    temperatures = [sampler.temperature or 1.0 for sampler in samplers]  # x / 1.0 is x
    if set(temperatures) != {1.0}:  # a column of them divides each row into the same floats as its own number
        same = len(set(temperatures)) == 1
        scores = scores / (temperatures[0] if same else torch.tensor([[t] for t in temperatures], device=scores.device))
    top_k = [min(max(sampler.top_k or vocab, 1), vocab) for sampler in samplers]
    # The widest row's k highest and one more (sorted, highest first), which tells whether a row's k-th has ties
    # past it; those (rare) need every score compared with the k-th.
    width = min(max(top_k) + 1, vocab)
    values, ids = torch.topk(scores, width)
    kth_and_next = values.gather(1, torch.tensor([[k - 1, min(k, width - 1)] for k in top_k], device=scores.device))
    ties = kth_and_next[:, 0] == kth_and_next[:, 1]
    if any(k == width for k in top_k):  # a row whose k is the whole vocabulary has no next score
        ties &= torch.tensor([k < width for k in top_k], device=scores.device)
    if bool(ties.any()):
        counts = (scores >= kth_and_next[:, :1]).sum(dim=1)
        width = max(width, int(counts.max()))
        values, ids = torch.topk(scores, width)
        values = values.masked_fill(torch.arange(width, device=scores.device) >= counts[:, None], -float("inf"))
    elif len(set(top_k)) == 1:  # the k highest of every row
        values, ids = values[:, : top_k[0]], ids[:, : top_k[0]]
    else:
        limits = torch.tensor([[k] for k in top_k], device=scores.device)
        values = values.masked_fill(torch.arange(width, device=scores.device) >= limits, -float("inf"))
    if any(sampler.top_p is not None for sampler in samplers):
        # A row without top-p keeps every candidate as top_p=1 does: only ids of probability zero are dropped.
        values = keep_top_p(values, [1.0 if sampler.top_p is None else sampler.top_p for sampler in samplers])
    return ids, torch.softmax(values, dim=-1)


def _draw(samplers: Sequence[Sampler], ids: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """One draw per row among its candidates `ids` `[rows, width]`: the candidate of the highest probability over
    an exponential number of its own (which picks each with its probability), as torch.multinomial draws one sample.

    Each id's number comes from the id and one key per row and token drawn from the row's generator (torch's global
    one for the unseeded rows), not from the candidate's place: scores a rounding apart (a prompt read from the prefix
    cache instead of whole) can sort nearly equal candidates the other way round, and a seeded reply must not change
    with that; it changes only where two candidates' ratios are that close."""
    keys = torch.empty(len(samplers), 1, dtype=torch.long)
    unseeded = [i for i, sampler in enumerate(samplers) if sampler.generator is None]
    if unseeded:
        keys[unseeded] = torch.randint(0, 2**62, (len(unseeded), 1))
    for i, sampler in enumerate(samplers):
        if sampler.generator is not None:
            keys[i] = torch.randint(0, 2**62, (1,), generator=sampler.generator)
    exponential = -torch.log(_uniform(keys, ids))
    return (probabilities.double() / exponential).argmax(dim=1, keepdim=True)


# splitmix64's constants, as signed 64-bit integers (torch's int64 products wrap around as unsigned ones do)
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX = (0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)


def _uniform(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A number in (0, 1) for each id and its row's key, uniformly spread: splitmix64's output for key + id."""
    z = keys + ids * _GOLDEN_GAMMA
    z = (z ^ _shift_right(z, 30)) * _MIX[0]
    z = (z ^ _shift_right(z, 27)) * _MIX[1]
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 0.5) / 2**53


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical (unsigned) right shift of int64 values; torch's `>>` copies the sign bit in."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
