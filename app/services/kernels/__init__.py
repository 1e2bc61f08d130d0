"""Chipi's own CPU kernels (quantized.cpp), compiled once per machine and loaded as torch.ops.chipi.*.

PyTorch's weight-only int4/int8 kernels are vectorized for AVX-512 only: on an AVX2 CPU they ran 10-25x slower than
float32. These are AVX2 kernels for llama.cpp-style blocks of 32 weights (see quantized.cpp), with AVX-512 VNNI
products, a prompt pass's attention by AVX-512 and a prompt's products by AMX tiles where the CPU has them (chosen at
run time). They are compiled with
the machine's C++ compiler by PyTorch's extension builder the first time a model loads (about 20 s), into
`chipi-kernels/` inside the Python environment (e.g. `.venv/chipi-kernels`: one build per checkout's venv, so that
two checkouts on a machine do not rebuild over each other), and loaded from there after.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quantized.cpp")
_NEEDED_FLAGS = {"avx2", "fma", "f16c"}


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None once they are loaded (compiling them first if needed)."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"they are written for x86-64 CPUs, not {platform.machine()}"
    missing = _NEEDED_FLAGS - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) is installed to build them"
    # The builder runs `ninja` from PATH; the ninja package installs it next to this Python, which a server started
    # as .venv/bin/chipi does not have on its PATH.
    scripts = sysconfig.get_path("scripts")
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])
    from torch.utils import cpp_extension

    started = time.perf_counter()
    try:
        cpp_extension.load(
            name="chipi_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            build_directory=_build_directory(),
        )
    except Exception as exc:  # a failed build must not stop the server: the float32 layers still work
        logger.warning("could not build Chipi's CPU kernels: %s", exc)
        return f"building them failed ({exc})"
    logger.info("Chipi's CPU kernels ready in %.1fs", time.perf_counter() - started)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _build_directory() -> str | None:
    """`chipi-kernels/` in this Python environment, or None (PyTorch's own cache) where it cannot be written."""
    folder = Path(sys.prefix) / "chipi-kernels"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return str(folder) if os.access(folder, os.W_OK) else None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # No /proc (not Linux): trust PyTorch's own dispatch level, which implies all three.
    return _NEEDED_FLAGS if torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"} else set()
