"""Answer quality per precision and quantization: greedy replies to a fixed prompt set, compared with float32's.

    python -m bench.quality [--variants float32,auto,auto-kv32,auto-a8,int8,int4,bfloat16,float16] [--max-tokens 128]

For each variant (a CHIPI_DTYPE, or a CHIPI_QUANTIZE of float32 weights: `auto`, `int8`, `int4`; `auto-a8` is `auto`
with CHIPI_ACTIVATION_BITS=8, `auto-kv32` `auto` with CHIPI_KV_CACHE_DTYPE=float32) it loads the model,
answers every prompt greedily through the same engine the server uses, and prints, next to unquantized float32's
answer: how many leading tokens agree, and how repetitive the answer is (the share of its 4-grams that are repeats; a
degenerate loop like "1.1.1.1" scores near 1). The replies themselves go to `--out` (default artifacts/quality.md) so
a person can read them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import threading
from pathlib import Path

from app.assets import ensure_default_model
from app.domain.generation import ChatTurn, GenerationFinished, GenerationParams, TextDelta
from app.services.model import ModelService
from app.settings import Settings

# Each variant as the settings that give it (CHIPI_DTYPE, CHIPI_QUANTIZE, CHIPI_ACTIVATION_BITS,
# CHIPI_KV_CACHE_DTYPE); the first is the reference, float32 throughout.
VARIANTS = {
    "float32": ("float32", "none", 16, "float32"),
    "auto": ("float32", "auto", 16, "float16"),
    "auto-kv32": ("float32", "auto", 16, "float32"),
    "auto-a8": ("float32", "auto", 8, "float16"),
    "int8": ("float32", "int8", 16, "float16"),
    "int4": ("float32", "int4", 16, "float16"),
    "bfloat16": ("bfloat16", "none", 16, "float16"),
    "float16": ("float16", "none", 16, "float16"),
}

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
    return reply, model.tokenizer.encode(reply)


async def answers(settings: Settings, max_tokens: int) -> list[tuple[str, list[int]]]:
    model = ModelService.load(settings)
    try:
        return [await answer(model, text, max_tokens) for text in PROMPTS]
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("artifacts/quality.md"))
    args = parser.parse_args()
    settings = Settings.from_env()
    ensure_default_model(settings)
    variants = ["float32", *[name for name in args.variants.split(",") if name != "float32"]]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    results = {}
    for name in variants:
        dtype, quantize, activation_bits, kv_cache_dtype = VARIANTS[name]
        variant = dataclasses.replace(
            settings,
            dtype=dtype,
            quantize=quantize,
            activation_bits=activation_bits,
            kv_cache_dtype=kv_cache_dtype,
            prefix_cache_mb=0,
        )
        results[name] = asyncio.run(answers(variant, args.max_tokens))
    reference = results["float32"]
    print(
        f"\nGreedy answers, up to {args.max_tokens} tokens: tokens agreeing with unquantized float32 / repeated 4-grams"
    )
    print(f"  {'prompt':42}" + "".join(f"  {name:>14}" for name in variants))
    for index, text in enumerate(PROMPTS):
        cells = ""
        for name in variants:
            _, ids = results[name][index]
            cells += f"  {common_prefix(ids, reference[index][1]):>4}/{len(ids):<4} {repeated_share(ids):>4.0%}"
        print(f"  {text[:42]:42}{cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for index, text in enumerate(PROMPTS):
            out.write(f"## {text}\n\n")
            for name in variants:
                out.write(f"**{name}**\n\n{results[name][index][0].strip()}\n\n")
    print(f"  the answers: {args.out}")


if __name__ == "__main__":
    main()
