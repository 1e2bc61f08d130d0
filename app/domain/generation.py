"""What a language model is asked and what it answers, in plain types: no PyTorch, so that the web layer imports
them without loading the model's stack (it loads in the background, see app/services/readiness.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Token ids ready for the model, and how many of the offered turns survived trimming."""

    token_ids: list[int]
    turns_used: int


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None  # makes sampling repeatable
    # The least time between two text deltas after the first: the tokens of that span come as one delta, so the
    # event loop is woken once for them rather than once a token (0: each token's text as soon as it comes).
    delta_interval_seconds: float = 0.0


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class GenerationFinished:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


GenerationOutput = TextDelta | GenerationFinished
