"""Split a streamed reply into reasoning and content at `<think>` / `</think>` (Qwen3-style reasoning models).

Text arrives in arbitrary pieces: a tag may be cut anywhere (`<th` + `ink>`), so a piece that ends with the start
of a tag is held back until the next piece says whether it is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

PieceKind = Literal["content", "reasoning", "think_start", "think_end"]


@dataclass(frozen=True)
class Piece:
    kind: PieceKind
    text: str


def partial_suffix_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (what must wait for more text)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ReasoningSplitter:
    """Feed text deltas in order; get back content, reasoning and the tag boundaries, in order.

    Whitespace right after `</think>` (models put a blank line there) is not part of the content.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._thinking = False
        self._after_close = False

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        pieces: list[Piece] = []
        while self._pending:
            tag = CLOSE_TAG if self._thinking else OPEN_TAG
            index = self._pending.find(tag)
            if index >= 0:
                self._emit(pieces, self._pending[:index])
                self._pending = self._pending[index + len(tag) :]
                pieces.append(Piece("think_end" if self._thinking else "think_start", tag))
                self._after_close = self._thinking
                self._thinking = not self._thinking
                continue
            held = partial_suffix_length(self._pending, tag)
            self._emit(pieces, self._pending[: len(self._pending) - held])
            self._pending = self._pending[len(self._pending) - held :]
            break
        return pieces

    def flush(self) -> list[Piece]:
        """The held-back rest, at the end of the reply (a cut tag that never completed is plain text)."""
        pieces: list[Piece] = []
        self._emit(pieces, self._pending)
        self._pending = ""
        return pieces

    def _emit(self, pieces: list[Piece], text: str) -> None:
        if self._after_close and not self._thinking:
            text = text.lstrip()
            if text:
                self._after_close = False
        if text:
            pieces.append(Piece("reasoning" if self._thinking else "content", text))
