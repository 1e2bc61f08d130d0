"""Token-by-token text: the deltas a client concatenates are exactly the decoded reply."""

from __future__ import annotations

import pytest

from app.services.model import _IncrementalDecoder
from app.services.tokenizer import load_tokenizer
from app.settings import DEFAULT_MODEL_DIR


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you?",
        "Café crème, naïve façade — and a snake: 🐍🐍 and 日本語のテキスト.",
        "Line one\nLine two\n\n  indented  code()\n",
        "A long reply, decoded a window at a time: déjà vu, 🐍 and 日本語. " * 40,
    ],
)
def test_deltas_concatenate_to_the_decoded_text(text: str) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(text)
    decoder = _IncrementalDecoder(tokenizer)  # fed only the reply's ids: the prompt is never part of it
    deltas = [decoder.feed([token]) for token in ids]
    deltas.append(decoder.feed([tokenizer.vocabulary()["<|im_end|>"]]))  # a special token adds no text
    deltas = [delta for delta in deltas if delta]  # "" means no new text yet: the stream sends nothing then
    assert "".join(deltas) == text
    assert all(deltas) and "\ufffd" not in "".join(deltas)
    # A consumer that fell behind feeds several ids at once and gets the same text.
    assert _IncrementalDecoder(tokenizer).feed(ids) == text
