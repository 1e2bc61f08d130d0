"""Splitting `<think>...</think>` from a reply that arrives cut at any place."""

from __future__ import annotations

import itertools

import pytest

from app.domain.reasoning import Piece, ReasoningSplitter

REPLY = "<think>\nThe user asks 2+2. a < b and <th is not a tag.\n</think>\n\nThe answer is 4 <b>bold</b>."
REASONING = "\nThe user asks 2+2. a < b and <th is not a tag.\n"
CONTENT = "The answer is 4 <b>bold</b>."


def split(chunks: list[str]) -> list[Piece]:
    splitter = ReasoningSplitter()
    pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)]
    return pieces + splitter.flush()


def assert_split(pieces: list[Piece], reasoning: str, content: str) -> None:
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == reasoning
    assert "".join(p.text for p in pieces if p.kind == "content") == content
    kinds = [p.kind for p in pieces if p.kind in ("think_start", "think_end")]
    assert kinds == (["think_start", "think_end"] if reasoning else [])
    if reasoning:  # all reasoning sits between the tags, all content after
        start, end = (i for i, p in enumerate(pieces) if p.kind in ("think_start", "think_end"))
        assert all(p.kind == "reasoning" for p in pieces[start + 1 : end])
        assert all(p.kind == "content" for p in pieces[end + 1 :])


def test_whole_reply_in_one_piece() -> None:
    assert_split(split([REPLY]), REASONING, CONTENT)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_fixed_size_pieces(size: int) -> None:
    assert_split(split([REPLY[i : i + size] for i in range(0, len(REPLY), size)]), REASONING, CONTENT)


def test_every_pair_of_cut_points() -> None:
    # cutting the reply at any two places covers every way a tag can straddle pieces
    for first, second in itertools.combinations(range(1, len(REPLY)), 2):
        chunks = [REPLY[:first], REPLY[first:second], REPLY[second:]]
        assert_split(split(chunks), REASONING, CONTENT)


def test_token_by_token_with_a_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    from app.settings import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(REPLY, add_special_tokens=False)
    deltas, sent = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if not text.endswith("\ufffd"):
            deltas.append(text[len(sent) :])
            sent = text
    assert "".join(deltas) == REPLY
    assert_split(split(deltas), REASONING, CONTENT)


def test_a_reply_without_reasoning_is_all_content() -> None:
    assert_split(split(["Hello", " <", "think", "ing of you"]), "", "Hello <thinking of you")


def test_a_cut_tag_at_the_very_end_is_kept_as_text() -> None:
    assert_split(split(["Sure <thi"]), "", "Sure <thi")


def test_reasoning_cut_off_before_its_closing_tag() -> None:
    pieces = split(["<think>still thinking</thi"])
    assert [p.kind for p in pieces] == ["think_start", "reasoning", "reasoning"]
    assert "".join(p.text for p in pieces if p.kind == "reasoning") == "still thinking</thi"
