"""Cutting text into the pieces that are spoken one at a time: sentences, and long sentences at their clauses.

Speech is synthesized piece by piece so the first audio comes out long before the whole text is spoken, both for
a text given at once and for a reply whose text arrives token by token. A piece ends at `.`, `!`, `?` or `…`
followed by white space (so "3.14" and a full stop still waiting for the next token are not ends), or at a line
break. A would-be sentence that is only an abbreviation, an initial or a list number ("Dr.", "J.", "1.") is not
cut off on its own.
"""

from __future__ import annotations

import re

_CLOSERS = "\"')]\u201d\u2019"  # closing quotes and brackets that may follow a sentence's end
_SENTENCE_END = re.compile(rf"[.!?\u2026]+[{re.escape(_CLOSERS)}]*(?=\s)|\n")
_CLAUSE_END = re.compile(r"[,;:](?=\s)")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters or more: something to say besides numbers and initials
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "approx", "no"})
_MARKUP = re.compile(r"[*_#`~>|]+")  # markdown a chat model writes; a voice would read it out

# A piece this long takes Piper about 250 ms on two CPU cores; longer sentences are cut at their clauses.
MAX_PIECE_CHARS = 80


def _ends_sentence(candidate: str) -> bool:
    if not _WORD.search(candidate):
        return False
    words = candidate.rstrip().rstrip(_CLOSERS).split()
    last = words[-1].lower().rstrip(".") if words else ""
    return last not in _ABBREVIATIONS


class SentenceSplitter:
    """Feed text as it arrives; get back each sentence as soon as it is complete."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        sentences: list[str] = []
        start = 0
        for end in _SENTENCE_END.finditer(self._pending):
            candidate = self._pending[start : end.end()]
            if _ends_sentence(candidate):
                sentences.append(candidate.strip())
                start = end.end()
        self._pending = self._pending[start:]
        return [sentence for sentence in sentences if sentence]

    def flush(self) -> list[str]:
        """The rest of the text once no more is coming."""
        rest, self._pending = self._pending.strip(), ""
        return [rest] if any(c.isalnum() for c in rest) else []


def clauses(sentence: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """A sentence as pieces of at most `max_chars` where it has clause breaks (`,` `;` `:`) to cut at."""
    if len(sentence) <= max_chars:
        return [sentence]
    pieces: list[str] = []
    start = 0
    for end in _CLAUSE_END.finditer(sentence):
        pieces.append(sentence[start : end.end()].strip())
        start = end.end()
    pieces.append(sentence[start:].strip())
    merged: list[str] = []
    for piece in filter(None, pieces):
        if merged and len(merged[-1]) + 1 + len(piece) <= max_chars:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return merged


def speech_pieces(text: str) -> list[str]:
    """A whole text as the pieces it is spoken in, in order."""
    splitter = SentenceSplitter()
    sentences = splitter.feed(text) + splitter.flush()
    return [piece for sentence in sentences for piece in clauses(sentence)]


def speakable(text: str) -> str:
    """The text a voice should read: markdown marks dropped, white space collapsed; empty if nothing to say."""
    spoken = " ".join(_MARKUP.sub(" ", text).split())
    return spoken if any(c.isalnum() for c in spoken) else ""
