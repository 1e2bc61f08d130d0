"""Pure conversation rules: input checks, automatic titles, search terms, context-window trimming."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from app.domain.errors import InvalidInputError, TooLargeError

DEFAULT_TITLE = "New Conversation"
AUTO_TITLE_CHARS = 100

T = TypeVar("T")


def check_text(text: str, *, max_chars: int, field: str) -> str:
    """Text a user sends to be stored: longer than `max_chars` is 413; a NUL character (which PostgreSQL cannot
    store in text, and no typed text contains) is 400."""
    if len(text) > max_chars:
        raise TooLargeError(f"{field} is {len(text)} characters; the limit is {max_chars}", field=field)
    if "\x00" in text:
        raise InvalidInputError(f"{field} must not contain NUL characters", field=field)
    return text


def clean_prompt(text: str | None, *, max_chars: int, field: str = "content") -> str:
    """The prompt as it will be stored; empty (or blank) is 400, longer than `max_chars` is 413."""
    if text is None or not text.strip():
        raise InvalidInputError(f"{field} must not be empty", field=field)
    return check_text(text, max_chars=max_chars, field=field)


def clean_title(title: str | None, *, max_chars: int) -> str:
    """A user-given title: trimmed, not blank, not longer than `max_chars`."""
    if title is None or not title.strip():
        raise InvalidInputError("title must not be empty", field="title")
    return check_text(title.strip(), max_chars=max_chars, field="title")


def clean_system_prompt(text: str | None, *, max_chars: int) -> str | None:
    """A conversation's own system prompt: None when absent or blank, else checked like a prompt."""
    if text is None or not text.strip():
        return None
    return check_text(text, max_chars=max_chars, field="system_prompt")


@dataclass(frozen=True)
class ConversationLimits:
    """How much one conversation may hold: messages (every branch counted) and characters of text."""

    max_messages: int
    max_chars: int

    def check(self, messages: int, chars: int, *, field: str) -> None:
        """413 when a conversation would hold `messages` messages or `chars` characters after a write."""
        if messages > self.max_messages:
            raise TooLargeError(
                f"the conversation would hold {messages} messages; the limit is {self.max_messages}", field=field
            )
        if chars > self.max_chars:
            raise TooLargeError(
                f"the conversation would hold {chars} characters; the limit is {self.max_chars}", field=field
            )


def auto_title(first_message: str) -> str:
    """A title from the first user message: its first 100 characters on one line, '...' when cut."""
    text = " ".join(first_message.split())
    if len(text) <= AUTO_TITLE_CHARS:
        return text
    return text[:AUTO_TITLE_CHARS] + "..."


def trim_history(
    turns: Sequence[T], fits: Callable[[Sequence[T]], bool], can_start: Callable[[T], bool]
) -> Sequence[T]:
    """The longest suffix of `turns` that `fits` and begins with a turn that `can_start` (a user turn).

    The oldest turns are dropped first. The last turn (the new user message) is always kept; if even it alone
    does not fit, the prompt is too large. Fitting is monotonic in the number of turns, so a binary search over
    the possible starts needs only O(log n) calls to `fits`, each of which may run the chat template; the usual
    case, a whole history that fits, needs one.
    """
    starts = [index for index, turn in enumerate(turns) if can_start(turn)]
    if not starts or starts[-1] != len(turns) - 1:
        raise ValueError("the last turn must be one a conversation can start with")
    if fits(turns[starts[0] :]):
        return turns[starts[0] :]
    if len(starts) == 1 or not fits(turns[starts[-1] :]):
        raise TooLargeError("the message does not fit in the model's context window", field="content")
    lo, hi = 1, len(starts) - 1  # turns[starts[hi]:] fits and turns[starts[0]:] does not; find the smallest start
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(turns[starts[mid] :]):
            hi = mid
        else:
            lo = mid + 1
    return turns[starts[lo] :]


MODEL_TITLE_CHARS = 60
_TITLE_PREFIX = re.compile(r"^(?:title|conversation title|topic)\s*[:\-\u2013]\s*", re.IGNORECASE)
_TITLE_STRIP = "\"'`*#_[]() \t\u201c\u201d\u2018\u2019\u00ab\u00bb"  # quotes (typographic too), markup
_TITLE_END = ".,;:!-\u2013 "
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def clean_model_title(text: str) -> str | None:
    """A model's proposed title made fit to show: its first line and sentence, without quotes, markup or a
    `Title:` prefix, at most MODEL_TITLE_CHARS (cut at a word); None when nothing usable is left."""
    line = next((line for line in text.splitlines() if line.strip(_TITLE_STRIP)), "")
    line = _TITLE_PREFIX.sub("", line.strip(_TITLE_STRIP))
    line = _SENTENCE_END.split(line, maxsplit=1)[0]
    title = " ".join(line.split()).strip(_TITLE_STRIP).rstrip(_TITLE_END).strip(_TITLE_STRIP)
    if len(title) > MODEL_TITLE_CHARS:
        cut = title[: MODEL_TITLE_CHARS + 1].rsplit(" ", 1)[0] if " " in title[:MODEL_TITLE_CHARS] else ""
        title = (cut or title[:MODEL_TITLE_CHARS]).rstrip(_TITLE_END)
    if sum(char.isalnum() for char in title) < 2:
        return None
    return title


MAX_SEARCH_CHARS = 500
MAX_SEARCH_TERMS = 32
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; `_` separates words, as in both indexes


def search_terms(query: str) -> list[str]:
    """The words of a search query: every run of letters and digits, in order, without duplicates.

    Operators, quotes and punctuation are not syntax, just separators, so no input can break the database's query.
    Longer than MAX_SEARCH_CHARS or with more than MAX_SEARCH_TERMS words is a 400.
    """
    if len(query) > MAX_SEARCH_CHARS:
        raise InvalidInputError(f"q is {len(query)} characters; the limit is {MAX_SEARCH_CHARS}", field="q")
    terms = list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))
    if len(terms) > MAX_SEARCH_TERMS:
        raise InvalidInputError(f"q has {len(terms)} words; the limit is {MAX_SEARCH_TERMS}", field="q")
    return terms
