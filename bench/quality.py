"""Answer quality per precision: greedy replies to a fixed prompt set, compared with float32's.

    python -m bench.quality [--dtypes float32,bfloat16,float16] [--max-tokens 128]

For each precision (CHIPI_DTYPE) it loads the model, answers every prompt greedily through the same engine the
server uses, and prints, next to float32's answer: how many leading tokens agree, and how repetitive the answer is
(the share of its 4-grams that are repeats; a degenerate loop like "1.1.1.1" scores near 1). The replies themselves
go to `--out` (default artifacts/quality.md) so a person can read them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import threading
from pathlib import Path

from app.assets import ensure_default_model
from app.services.model import ChatTurn, GenerationFinished, GenerationParams, ModelService, TextDelta
from app.settings import Settings

PROMPTS = [
    "Give me three tips for sleeping better.",
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "How do I make a cup of tea?",
    "What is photosynthesis?",
    "List three uses of a paperclip.",
    "Summarise the story of Cinderella in three sentences.",
]


def repeated_share(token_ids: list[int], n: int = 4) -> float:
    """The share of an answer's n-grams that already occurred earlier in it."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


async def answer(model: ModelService, text: str, max_tokens: int) -> tuple[str, list[int]]:
    prompt = model.build_prompt(None, [ChatTurn("user", text)], max_tokens)
    reply = ""
    async for output in model.stream(prompt, GenerationParams(max_tokens, 0.0, 1.0), threading.Event()):
        if isinstance(output, TextDelta):
            reply += output.text
        elif isinstance(output, GenerationFinished):
            break
    return reply, model.tokenizer(reply, add_special_tokens=False)["input_ids"]


async def answers(settings: Settings, max_tokens: int) -> list[tuple[str, list[int]]]:
    model = ModelService.load(settings)
    try:
        return [await answer(model, text, max_tokens) for text in PROMPTS]
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("artifacts/quality.md"))
    args = parser.parse_args()
    settings = Settings.from_env()
    ensure_default_model(settings)
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32":
        dtypes.insert(0, "float32")
    results = {
        dtype: asyncio.run(answers(dataclasses.replace(settings, dtype=dtype, prefix_cache_mb=0), args.max_tokens))
        for dtype in dtypes
    }
    reference = results["float32"]
    print(f"\nGreedy answers, up to {args.max_tokens} tokens: tokens agreeing with float32 / repeated 4-grams")
    print(f"  {'prompt':42}" + "".join(f"  {dtype:>14}" for dtype in dtypes))
    for index, text in enumerate(PROMPTS):
        cells = ""
        for dtype in dtypes:
            _, ids = results[dtype][index]
            cells += f"  {common_prefix(ids, reference[index][1]):>4}/{len(ids):<4} {repeated_share(ids):>4.0%}"
        print(f"  {text[:42]:42}{cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for index, text in enumerate(PROMPTS):
            out.write(f"## {text}\n\n")
            for dtype in dtypes:
                out.write(f"**{dtype}**\n\n{results[dtype][index][0].strip()}\n\n")
    print(f"  the answers: {args.out}")


if __name__ == "__main__":
    main()
