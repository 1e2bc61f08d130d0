"""The pure rules, where they live: titles, prompt checks, context trimming."""

from __future__ import annotations

import pytest

from app.domain.errors import InvalidInputError, TooLargeError
from app.domain.rules import auto_title, clean_prompt, clean_title, trim_history


def test_auto_title_keeps_short_messages_whole_on_one_line() -> None:
    assert auto_title("  Plan a trip\nto Lisbon ") == "Plan a trip to Lisbon"


def test_auto_title_cuts_at_100_characters_with_an_ellipsis() -> None:
    title = auto_title("x" * 150)
    assert title == "x" * 100 + "..."


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None])
def test_blank_prompts_are_invalid(prompt: str | None) -> None:
    with pytest.raises(InvalidInputError):
        clean_prompt(prompt, max_chars=10)


def test_prompts_over_the_limit_are_too_large_and_at_the_limit_fine() -> None:
    assert clean_prompt("a" * 10, max_chars=10) == "a" * 10
    with pytest.raises(TooLargeError):
        clean_prompt("a" * 11, max_chars=10)


def test_titles_are_trimmed_and_bounded() -> None:
    assert clean_title("  Trip  ", max_chars=10) == "Trip"
    with pytest.raises(InvalidInputError):
        clean_title(" ", max_chars=10)
    with pytest.raises(TooLargeError):
        clean_title("a" * 11, max_chars=10)


def _roles(turns: list[tuple[str, int]]) -> list[str]:
    return [role for role, _ in turns]


def test_trim_history_drops_the_oldest_turns_and_starts_at_a_user_turn() -> None:
    turns = [("user", 10), ("assistant", 10), ("user", 10), ("assistant", 10), ("user", 10)]
    calls: list[int] = []

    def fits(candidate: object) -> bool:
        calls.append(1)
        return sum(size for _, size in candidate) <= 35  # type: ignore[attr-defined]

    kept = trim_history(turns, fits, can_start=lambda turn: turn[0] == "user")
    assert _roles(list(kept)) == ["user", "assistant", "user"]
    assert len(calls) <= 3  # a binary search, not one call per turn


def test_trim_history_keeps_everything_that_fits_after_one_try() -> None:
    turns = [("user", 1), ("assistant", 1), ("user", 1)]
    tried: list[object] = []

    def fits(candidate: object) -> bool:
        tried.append(candidate)
        return True

    assert list(trim_history(turns, fits, can_start=lambda t: t[0] == "user")) == turns
    assert len(tried) == 1  # the chat template runs once for a conversation that fits whole


def test_trim_history_refuses_a_last_turn_that_cannot_fit() -> None:
    with pytest.raises(TooLargeError):
        trim_history([("user", 100)], lambda c: False, can_start=lambda t: t[0] == "user")
