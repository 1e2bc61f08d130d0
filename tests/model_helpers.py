"""Reading the served model directly, for tests that hold it to a reference."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from app.services.llama_forward import LlamaForward
from app.services.model import ModelService


def last_logits(service: ModelService, token_ids: list[int]) -> torch.Tensor:
    """The served model's next-token logits after `token_ids`, read in one forward pass."""
    input_ids = torch.tensor([token_ids])
    with torch.inference_mode():
        if isinstance(service.model, LlamaForward):
            logits: torch.Tensor = service.model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                position_ids=torch.arange(len(token_ids)).unsqueeze(0),
                cache=DynamicCache(),
            )
            return logits[0]
        return service.model(input_ids=input_ids).logits[0, -1]  # type: ignore[no-any-return]
