"""Sampling's steps are transformers' logits processors, so a sampled reply is drawn as `generate` draws it."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from app.services.sampling import Sampler, keep_top_k, keep_top_p, penalize_repetition

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


@pytest.mark.parametrize("top_k", [1, 5, 50, VOCAB + 10])
def test_top_k_is_transformers(top_k: int) -> None:
    for seed in range(5):
        expected = TopKLogitsWarper(top_k)(seen(seed), scores(seed))
        assert torch.equal(keep_top_k(scores(seed), top_k), expected)


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 1.0])
def test_top_p_is_transformers(top_p: float) -> None:
    for seed in range(5):
        expected = TopPLogitsWarper(top_p)(seen(seed), scores(seed))
        assert torch.equal(keep_top_p(scores(seed), top_p), expected)


def test_a_sampled_token_is_drawn_from_generates_distribution() -> None:
    """With the same generator state, the token drawn is the one drawn from transformers' processed scores."""
    logits = scores(1)[0]
    history = seen(1)[0].tolist()
    processors = [
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(50),
        TopPLogitsWarper(0.9),
    ]
    for draw in range(20):
        expected_scores = logits.unsqueeze(0)
        for processor in processors:
            expected_scores = processor(torch.tensor([history]), expected_scores)
        expected = torch.multinomial(
            torch.softmax(expected_scores, dim=-1), 1, generator=torch.Generator().manual_seed(draw)
        )
        sampler = Sampler(0.7, 0.9, 50, 1.2, torch.Generator().manual_seed(draw))
        assert sampler.next_token(logits, history) == int(expected.item())


def test_greedy_takes_the_highest_score_after_the_penalty() -> None:
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert Sampler(0.0, 1.0, 50, None, None).plain_argmax
    assert Sampler(0.0, 1.0, 50, None, None).next_token(logits, [1]) == 1
    penalized = Sampler(0.0, 1.0, 50, 1.1, None)
    assert not penalized.plain_argmax
    assert penalized.next_token(logits, [1]) == 2  # 3.0 / 1.1 < 2.9
