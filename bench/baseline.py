"""The baseline the benchmarks compare against: a bare `model.generate` of one prompt, greedy."""

from __future__ import annotations

import threading
import time

import torch

from app.services.model import ModelService, Prompt


def plain_generate(model: ModelService, prompt: Prompt, max_tokens: int) -> tuple[int, float]:
    """Tokens generated and seconds taken by `model.generate` alone (no streaming, no batching).

    It runs in a thread that ends with it: an OpenMP team left behind in this (long-lived) thread would slow down the
    decode engine's thread measured next to it (see app/services/own_thread.py)."""
    result: list[tuple[int, float]] = []
    worker = threading.Thread(target=lambda: result.append(_generate(model, prompt, max_tokens)))
    worker.start()
    worker.join()
    return result[0]


def _generate(model: ModelService, prompt: Prompt, max_tokens: int) -> tuple[int, float]:
    input_ids = torch.tensor([prompt.token_ids], device=model.model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0,
        )
    return output.shape[1] - input_ids.shape[1], time.perf_counter() - started
