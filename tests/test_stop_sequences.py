"""Stop sequences found in text that arrives cut at any place."""

from __future__ import annotations

import itertools

from app.domain.stop_sequences import StopSequences

TEXT = "One, two, three. END of story, never shown."


def run(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    filter_ = StopSequences(stops)
    shown = "".join(filter_.feed(chunk) for chunk in chunks) + filter_.flush()
    return shown, filter_.hit


def test_text_before_the_stop_is_shown_whatever_the_cuts() -> None:
    for first, second in itertools.combinations(range(1, len(TEXT)), 2):
        shown, hit = run([TEXT[:first], TEXT[first:second], TEXT[second:]], ["END", "never"])
        assert (shown, hit) == ("One, two, three. ", True)


def test_the_earliest_of_several_stops_wins() -> None:
    assert run([TEXT], ["story", "two"]) == ("One, ", True)


def test_a_partial_match_that_never_completes_is_shown_at_the_end() -> None:
    assert run(["Hello EN", "D"], ["ENDING"]) == ("Hello END", False)


def test_no_stops_passes_everything() -> None:
    assert run(["a", "b"], []) == ("ab", False)
