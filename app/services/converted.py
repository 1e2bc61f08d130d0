"""Converted models: a model's lean forward in blocks, written once next to it and loaded directly at later starts.

Building the lean forward (app/services/llama_forward.py) from a checkpoint reads its float32 weights through
transformers, fuses the projections and finds each layer's blocks: most of a start's time. What it makes is written
to `chipi-<CHIPI_QUANTIZE>.safetensors` in the model's folder, with a fingerprint of the checkpoint's files and of
the settings it was made under; a start with the same ones reads that file (a fifth of the checkpoint's bytes for
the default model) and skips transformers' loading. A stale, unreadable or unwritable file only costs the slow way.
The file is memory-mapped and its blocks are in the layout the layers multiply them in, so that they are used where
they lie: rearranging 81 MB of blocks at each start had kept both copies resident (+155 MB).

Only a forward whose every linear layer is in blocks is written: float32 layers would copy the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from app.services import kernels
from app.services.cpu_layers import BlockLinear, Blocks
from app.services.llama_forward import LINEAR_PARTS, DecoderLayer, LlamaForward
from app.settings import Settings

logger = logging.getLogger(__name__)

# The layout of this file and of the blocks in it; changing either must change this, making earlier files stale.
FORMAT = "3"  # 3: blocks in panels wherever a layer fills them (BlockLinear.stored)
# The checkpoint's files whose names, sizes and modification times the fingerprint covers.
_CHECKPOINT_SUFFIXES = {".safetensors", ".bin", ".json"}


class ConvertedModel:
    """Where the converted forward of the model in `folder` lives under `settings`, and reading and writing it."""

    def __init__(self, folder: Path, settings: Settings) -> None:
        self.path = folder / f"chipi-{settings.quantize}.safetensors"
        self.folder = folder
        self.activation_bits = settings.activation_bits  # not in the file: how its 4-bit layers multiply
        self.fingerprint = _fingerprint(folder, settings, exclude=self.path)

    @classmethod
    def for_settings(cls, source: str, settings: Settings, dtype: torch.dtype) -> ConvertedModel | None:
        """None where the lean forward is not made of blocks: a hub id (no folder), CHIPI_QUANTIZE=none, a GPU,
        weights (`dtype`, CHIPI_DTYPE resolved) other than float32, no kernels."""
        folder = Path(source)
        on_cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
        if (
            not folder.is_dir()
            or settings.quantize == "none"
            or not on_cpu
            or dtype != torch.float32
            or not kernels.available()
        ):
            return None
        return cls(folder, settings)

    def load(self) -> LlamaForward | None:
        """The forward written earlier for these files and settings; None if there is none (or it is stale)."""
        try:
            with safe_open(self.path, framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("fingerprint") != self.fingerprint:
                    logger.info("%s was made from other files or settings; converting again", self.path)
                    return None
                tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
            return _forward_from(tensors, metadata, self.folder, self.activation_bits)
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            logger.warning("could not read %s (%r); converting again", self.path, exc)
            return None

    def save(self, forward: LlamaForward) -> None:
        """Write `forward` if all its linear layers are in blocks; a folder that cannot be written is only logged."""
        tensors, bits = _tensors_of(forward)
        if tensors is None:
            return
        metadata = {
            "fingerprint": self.fingerprint,
            "bits": json.dumps(bits),
            "rotary_scaling": repr(forward.rotary_scaling),
            # The model's config as its class resolved it (defaults included): read back without transformers.
            "config": forward.config.to_json_string(use_diff=False),
        }
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            save_file(tensors, partial, metadata=metadata)
            partial.replace(self.path)  # appears whole or not at all, also to a server starting meanwhile
        except OSError as exc:
            partial.unlink(missing_ok=True)
            logger.warning("could not write %s (%s); the next start converts the model again", self.path, exc)
            return
        logger.info("wrote the converted model to %s", self.path)


def _fingerprint(folder: Path, settings: Settings, *, exclude: Path) -> str:
    files = sorted(
        path
        for path in folder.iterdir()
        if path.suffix in _CHECKPOINT_SUFFIXES and not path.name.startswith(("chipi-", ".")) and path != exclude
    )
    parts = [FORMAT, settings.quantize]
    parts += [f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _linear_layers(forward: LlamaForward) -> dict[str, nn.Module]:
    layers = {
        f"layers.{index}.{part}": getattr(layer, part)
        for index, layer in enumerate(forward.decoder_layers)
        for part in LINEAR_PARTS
    }
    return {**layers, "lm_head": forward.lm_head}


def _tensors_of(forward: LlamaForward) -> tuple[dict[str, torch.Tensor] | None, dict[str, int]]:
    tensors: dict[str, torch.Tensor] = {}
    bits: dict[str, int] = {}
    for name, layer in _linear_layers(forward).items():
        if not isinstance(layer, BlockLinear) or layer.bias is not None:
            return None, {}
        tensors[f"{name}.data"], tensors[f"{name}.scales"] = layer.stored()
        bits[name] = layer.bits
    for index, layer in enumerate(forward.decoder_layers):
        tensors[f"layers.{index}.attention_norm"] = layer.attention_norm.detach()
        tensors[f"layers.{index}.mlp_norm"] = layer.mlp_norm.detach()
    tensors["norm"] = forward.norm.detach()
    tensors["embed"] = forward.embed.weight.detach()
    tensors["inv_freq"] = forward.inv_freq
    return {name: tensor.contiguous() for name, tensor in tensors.items()}, bits


@dataclass(frozen=True)
class GenerationDefaults:
    """What serving reads of a model's generation config (transformers' GenerationConfig): its generation_config.json,
    or without one the model's config, which older checkpoints kept these in."""

    eos_token_id: int | list[int] | None
    top_k: int | None
    repetition_penalty: float | None

    @classmethod
    def read(cls, folder: Path, config: Any) -> GenerationDefaults:
        path = folder / "generation_config.json"
        values = json.loads(path.read_text()) if path.is_file() else vars(config)
        return cls(values.get("eos_token_id"), values.get("top_k"), values.get("repetition_penalty"))


def _forward_from(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], folder: Path, activation_bits: int
) -> LlamaForward:
    config = SimpleNamespace(**json.loads(metadata["config"]))
    generation_config = GenerationDefaults.read(folder, config)
    bits = json.loads(metadata["bits"])

    def block(name: str) -> BlockLinear:
        # exact: these blocks are the weights now (whatever rounding made them happened at the conversion)
        blocks = Blocks(bits[name], tensors[f"{name}.data"], tensors[f"{name}.scales"], exact=True)
        return BlockLinear(blocks, activation_bits=activation_bits)

    def weight(name: str) -> nn.Parameter:
        return nn.Parameter(tensors[name], requires_grad=False)

    layers = [
        DecoderLayer(
            **{part: block(f"layers.{index}.{part}") for part in LINEAR_PARTS},
            attention_norm=weight(f"layers.{index}.attention_norm"),
            mlp_norm=weight(f"layers.{index}.mlp_norm"),
        )
        for index in range(config.num_hidden_layers)
    ]
    return LlamaForward(
        config,
        generation_config,
        embed=nn.Embedding.from_pretrained(tensors["embed"], freeze=True),  # type: ignore[no-untyped-call]
        layers=layers,
        norm=weight("norm"),
        lm_head=block("lm_head"),
        inv_freq=tensors["inv_freq"],
        rotary_scaling=float(metadata["rotary_scaling"]),
    )
