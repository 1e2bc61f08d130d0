"""The baseline the benchmarks compare against: plain transformers `generate` of one prompt, greedy, on the same
checkpoint in float32 (what running the model without Chipi gives)."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from app.domain.generation import Prompt
from app.services.model import ModelService


def plain_generate(model: ModelService, prompt: Prompt, max_tokens: int) -> tuple[int, float]:
    """Tokens generated and seconds taken by `generate` alone (no streaming, no batching).

    It runs in a thread that ends with it: an OpenMP team left behind in this (long-lived) thread would slow down the
    decode engine's thread measured next to it (see app/services/own_thread.py)."""
    result: list[tuple[int, float]] = []
    worker = threading.Thread(target=lambda: result.append(_generate(model, prompt, max_tokens)))
    worker.start()
    worker.join()
    return result[0]


@functools.cache
def _plain_model(name: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def _generate(model: ModelService, prompt: Prompt, max_tokens: int) -> tuple[int, float]:
    plain = _plain_model(model.name)
    input_ids = torch.tensor([prompt.token_ids])
    started = time.perf_counter()
    with torch.inference_mode():
        output = plain.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0,
        )
    return output.shape[1] - input_ids.shape[1], time.perf_counter() - started
