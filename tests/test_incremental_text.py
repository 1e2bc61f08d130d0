"""Token-by-token text: the deltas a client concatenates are exactly the decoded reply."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from app.services.model import TextDelta, _IncrementalDecoder
from app.settings import DEFAULT_MODEL_DIR


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you?",
        "Café crème, naïve façade — and a snake: 🐍🐍 and 日本語のテキスト.",
        "Line one\nLine two\n\n  indented  code()\n",
    ],
)
def test_deltas_concatenate_to_the_decoded_text(text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas: list[str] = []

    def collect(item: object) -> None:
        assert isinstance(item, TextDelta)
        deltas.append(item.text)

    decoder = _IncrementalDecoder(tokenizer, collect)
    decoder.put(torch.tensor([[1, 2, 3]]))  # generate() hands over the prompt first; it is not part of the reply
    for token in ids:
        decoder.put(torch.tensor([token]))
    decoder.put(torch.tensor([tokenizer.convert_tokens_to_ids("<|im_end|>")]))  # a special token adds no text
    assert "".join(deltas) == text
    assert all(deltas) and "\ufffd" not in "".join(deltas)
