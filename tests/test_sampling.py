"""Sampling's steps are transformers' logits processors, so a sampled reply is drawn from `generate`'s distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from app.services.sampling import Sampler, keep_top_p, next_tokens, penalize_repetition

VOCAB = 500


def scores(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, VOCAB, generator=generator) * 4


def seen(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, 40), generator=generator)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_transformers(penalty: float) -> None:
    for seed in range(5):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen(seed), scores(seed))
        assert torch.equal(penalize_repetition(scores(seed), seen(seed), penalty), expected)


def test_ids_past_the_output_vocabulary_are_not_penalized() -> None:
    ids = torch.tensor([[3, VOCAB + 7]])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(ids, scores(0))
    assert torch.equal(penalize_repetition(scores(0), ids, 1.5), expected)


def possible(sampler: Sampler, logits: torch.Tensor) -> list[int]:
    """The ids `sampler` can draw next, in id order."""
    ids, probabilities = sampler.distribution(logits, [])
    return sorted(ids[probabilities > 0].tolist())


@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB + 10])
def test_top_k_leaves_what_transformers_leaves_possible(top_k: int) -> None:
    for seed in range(5):
        expected = TopKLogitsWarper(top_k)(seen(seed), scores(seed))[0].isfinite().nonzero().squeeze(1)
        assert possible(Sampler(1.0, 1.0, top_k, None, None), scores(seed)[0]) == expected.tolist()


def test_top_k_keeps_ties_with_the_kth() -> None:
    tied = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.0, -1.0])
    assert possible(Sampler(1.0, 1.0, 3, None, None), tied) == [1, 2, 3, 4]
    flat = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert possible(Sampler(1.0, 1.0, 2, None, None), flat) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 1.0])
def test_top_p_is_transformers(top_p: float) -> None:
    for seed in range(5):
        expected = TopPLogitsWarper(top_p)(seen(seed), scores(seed))
        assert torch.equal(keep_top_p(scores(seed), [top_p]), expected)


def generate_probabilities(
    logits: torch.Tensor, history: list[int], temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The next token's probabilities over the whole vocabulary as transformers' processors make them."""
    processed = logits.unsqueeze(0)
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(temperature),
        TopKLogitsWarper(top_k),
        TopPLogitsWarper(top_p),
    ):
        processed = processor(torch.tensor([history]), processed)
    return torch.softmax(processed, dim=-1)[0]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 50, 0.9), (0.2, 50, 0.9), (1.5, 20, 0.5), (0.7, 0, 0.9)]
)
def test_the_sampled_distribution_is_generates(temperature: float, top_k: int, top_p: float) -> None:
    """The sampler draws among its candidates only; they carry every bit of transformers' probability, alike."""
    for seed in range(5):
        logits, history = scores(seed)[0], seen(seed)[0].tolist()
        expected = generate_probabilities(logits, history, temperature, top_k or VOCAB, top_p)
        ids, probabilities = Sampler(temperature, top_p, top_k, 1.2, None).distribution(logits, history)
        assert sorted(ids[probabilities > 0].tolist()) == expected.nonzero().squeeze(1).tolist()
        torch.testing.assert_close(probabilities, expected[ids], rtol=1e-5, atol=1e-7)


def test_sampled_tokens_follow_the_distribution_and_a_seed_repeats_them() -> None:
    logits, history = scores(3)[0] / 3, seen(3)[0].tolist()  # flatter: a dozen likely tokens
    expected = generate_probabilities(logits, history, 1.0, 50, 0.95)
    sampler = Sampler(1.0, 0.95, 50, 1.2, torch.Generator().manual_seed(7))
    draws = [sampler.next_token(logits, history) for _ in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=VOCAB) / len(draws)
    assert expected[frequencies > 0].min() > 0  # nothing impossible is drawn
    assert (frequencies - expected).abs().max() < 0.025  # a few standard errors of 4,000 draws
    again = Sampler(1.0, 0.95, 50, 1.2, torch.Generator().manual_seed(7))
    assert [again.next_token(logits, history) for _ in range(200)] == draws[:200]


def test_greedy_takes_the_highest_score_after_the_penalty() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert Sampler(0.0, 1.0, 50, None, None).next_token(logits, [1]) == 1
    penalized = Sampler(0.0, 1.0, 50, 1.1, None)
    assert penalized.next_token(logits, [1]) == 2  # 3.0 / 1.1 < 2.9


def test_a_batch_samples_each_row_by_its_own_settings() -> None:
    """Greedy, penalized, seeded and unseeded rows sampled together get what each gets alone."""
    logits = torch.cat([scores(seed) for seed in range(4)])
    histories = [seen(seed)[0].tolist() for seed in range(4)]

    def samplers() -> list[Sampler]:
        return [
            Sampler(0.0, 1.0, 50, None, None),
            Sampler(0.0, 1.0, 50, 1.3, None),
            Sampler(0.7, 0.9, 50, 1.2, torch.Generator().manual_seed(5)),
            Sampler(0.3, 0.5, 10, None, torch.Generator().manual_seed(6)),
        ]

    alone = [sampler.next_token(logits[i], histories[i]) for i, sampler in enumerate(samplers())]
    assert next_tokens(samplers(), logits, lambda i: histories[i]) == alone
    assert alone[0] == int(logits[0].argmax())


def test_a_seed_draws_the_same_ids_from_scores_a_rounding_apart() -> None:
    """A prompt read from the prefix cache gives scores a rounding away from one read whole, which can sort nearly
    equal candidates the other way round: the same seed must still draw the same reply."""
    base = torch.full((VOCAB,), -5.0)
    base[100:140] = 2.0
    nudged = [base + torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 1e-6 for seed in (1, 2)]
    assert not torch.equal(nudged[0][100:140].argsort(), nudged[1][100:140].argsort())
    draws = []
    for scores_ in nudged:
        sampler = Sampler(0.7, 1.0, 50, None, torch.Generator().manual_seed(11))
        draws.append([sampler.next_token(scores_, []) for _ in range(200)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 20  # among the 40 near-equal ids
