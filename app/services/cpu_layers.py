"""The linear layers a model runs on the CPU, chosen for its precision (the README's Benchmark has the figures).

Decoding reads every weight once per step, so on a CPU it is bound by how many bytes the matrix kernels stream from
memory, and which kernel runs matters as much as the precision:
- blocks of 4 or 8 bits (CHIPI_QUANTIZE): weights in llama.cpp's Q4_1 / Q8_0 layout, 32 weights per block with a
  float16 scale (and min), multiplied by Chipi's kernels (app/services/kernels) at 5 and 8.5 bits per weight. The
  default model comes from such a file, so `auto` runs it on its very weights at a sixth of float32's bytes;
- float32: oneDNN's matrix multiply on weights reordered once, at load, into its blocked layout. MKL's kernels,
  which `F.linear` calls, are slow for the 2-7 rows of a small decode batch (the output layer: 10 ms for one row,
  25 ms for two, 18 ms for four); oneDNN's take 4-7 ms for 1 to 8 rows. Same results to float rounding;
- float16: float16 kernels for the few rows of a decode step; float32 for the many rows of a prompt.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import torch

from app.domain.errors import ModelUnavailableError
from app.services import kernels

logger = logging.getLogger(__name__)

# Matrix products of at least this many rows (reading a prompt) run as float32 matrix products: under
# CHIPI_DTYPE=float16, float16's are several times slower there. Block layers read them with 16-bit activations
# whatever CHIPI_ACTIVATION_BITS says: by the panels' integer products with AVX-512 VNNI (3-4x faster than float32
# ones there), and with AVX2 alone up to 128 rows (1.07-1.58x faster); else by float32 products on dequantized tiles
# of the weights (kernels: quantized_linear).
FLOAT32_ROWS = 16
BLOCK = 32  # weights per block, along the input dimension
PANEL = 8  # output rows per panel (quantized.cpp)
# A weight counts as on a block's grid when it is within this share of one quantization step of it: weights
# dequantized from a GGUF file are on it up to float rounding, others are up to half a step off.
_GRID_TOLERANCE = 1e-3


def prepare_for_cpu(model: Any, *, quantize: str) -> Any:
    """`model` with the linear layers that run fastest on this CPU for its precision and CHIPI_QUANTIZE."""
    if model.dtype == torch.float16:
        _replace_linears(model, lambda name, linear: Float16Linear(linear))
    elif model.dtype == torch.float32:
        _replace_linears(model, float32_layers(quantize))
        own_remaining_parameters(model)
    return model


LayerMaker = Callable[[str, torch.nn.Linear], torch.nn.Module]  # (the layer's name, its Linear) -> its replacement


def float32_layers(quantize: str, activation_bits: int = 16) -> LayerMaker:
    """The layer each float32 Linear becomes under `quantize` (auto, none, int8 or int4); 4-bit layers round their
    activations to `activation_bits` (see BlockLinear)."""
    reason = kernels.unavailable_reason() if quantize != "none" else None
    if reason is not None:
        if quantize != "auto":
            raise ModelUnavailableError(f"CHIPI_QUANTIZE={quantize} needs Chipi's CPU kernels, but {reason}")
        logger.info("weights stay float32: Chipi's quantized CPU kernels are not used, as %s", reason)
    float32 = PackedLinear if onednn_packs_linears() else (lambda linear: linear)

    def layer(name: str, linear: torch.nn.Linear) -> torch.nn.Module:
        if quantize == "none" or reason is not None:
            return float32(linear)
        output_layer = name.split(".")[-1] == "lm_head"
        if quantize == "int8" or (quantize == "int4" and output_layer):  # llama.cpp's Q4 files keep it at 8 bits
            return BlockLinear(quantize_blocks(linear.weight, 8), linear.bias)
        if quantize == "int4":
            return BlockLinear(quantize_blocks(linear.weight, 4), linear.bias, activation_bits)
        for bits in (4, 8):  # auto: the fewest bits that hold these weights exactly
            blocks = quantize_blocks(linear.weight, bits, only_exact=True)
            if blocks is not None:
                return BlockLinear(blocks, linear.bias, activation_bits)
        return float32(linear)

    return layer


def onednn_packs_linears() -> bool:
    """oneDNN's packed float32 linear layers are available (the ops PyTorch's own compiler uses for them) on an x86
    CPU, where they were measured; elsewhere the plain layers stay."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    ops = all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    return bool(available) and ops and platform.machine().lower() in {"x86_64", "amd64"}


@dataclass(frozen=True)
class Blocks:
    """A weight matrix `[out, in]` in blocks of 32 weights along `in`, in rows (what quantize_blocks makes) or in
    panels of 8 output rows (what a layer keeps and a converted model's file stores; quantized.cpp documents both)."""

    bits: int
    # rows: uint8 [out, in / 2] for 4 bits, [out, in] for 8; panels: [out / 8, in / 32, 128 or 256]
    data: torch.Tensor
    # rows: float16 [out, 2, in / 32] (each row's scales, then its mins) for 4 bits, [out, in / 32] for 8;
    # panels: [out / 8, in / 32, 16 or 8]
    scales: torch.Tensor
    exact: bool  # every weight was on its block's grid: nothing was lost

    @property
    def in_panels(self) -> bool:
        return self.data.dim() == 3

    @property
    def shape(self) -> tuple[int, int]:
        """`[out, in]`."""
        if self.in_panels:
            return self.data.shape[0] * PANEL, self.data.shape[1] * BLOCK
        return self.data.shape[0], self.data.shape[1] * (2 if self.bits == 4 else 1)


# Rows quantized at a time: the float temporaries of a whole output layer (49152 x 576) would add ~0.5 GB to the
# load's peak memory.
_QUANTIZE_ROWS = 2048


@overload
def quantize_blocks(weight: torch.Tensor, bits: int) -> Blocks: ...
@overload
def quantize_blocks(weight: torch.Tensor, bits: int, *, only_exact: bool) -> Blocks | None: ...
def quantize_blocks(weight: torch.Tensor, bits: int, *, only_exact: bool = False) -> Blocks | None:
    """`weight` in llama.cpp's Q4_1 (bits=4: scale * q + min, q in 0..15) or Q8_0 (bits=8: scale * q, q in
    -127..127) blocks; weights that were dequantized from such blocks come back exactly. With `only_exact`, None as
    soon as a chunk of rows is off the grid (the rest is not quantized for nothing)."""
    chunks = []
    for rows in torch.split(weight.detach(), _QUANTIZE_ROWS):
        chunks.append(_quantize_rows(rows, bits))
        if only_exact and not chunks[-1].exact:
            return None
    return Blocks(
        bits,
        torch.cat([chunk.data for chunk in chunks]),
        torch.cat([chunk.scales for chunk in chunks]),
        all(chunk.exact for chunk in chunks),
    )


def _quantize_rows(weight: torch.Tensor, bits: int) -> Blocks:
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // BLOCK, BLOCK)
    if bits == 4:
        low, high = groups.amin(-1), groups.amax(-1)
        scale, minimum = ((high - low) / 15).half(), low.half()
        offset = minimum.float().unsqueeze(-1)
        levels = (0, 15)
    else:
        scale, minimum = (groups.abs().amax(-1) / 127).half(), None
        offset = torch.zeros(())
        levels = (-127, 127)
    step = scale.float().unsqueeze(-1).clamp(min=torch.finfo(torch.float32).tiny)
    exact_q = (groups - offset) / step
    q = exact_q.round().clamp(*levels)
    exact = bool(((exact_q - q).abs() <= _GRID_TOLERANCE).all())
    if bits == 4:
        nibbles = q.to(torch.uint8)
        data = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).reshape(out_features, in_features // 2)
        assert minimum is not None
        scales = torch.stack([scale, minimum], dim=1)
    else:
        data = q.to(torch.int8).view(torch.uint8).reshape(out_features, in_features)
        scales = scale
    return Blocks(bits, data.contiguous(), scales.contiguous(), exact)


def multiplied_in_panels(bits: int, out_features: int) -> bool:
    """Whether a layer's blocks are multiplied in panels of 8 output columns here (see quantized.cpp), which only a
    layer of a multiple of 8 outputs fills: 4-bit ones everywhere, 8-bit ones where the CPU has AVX-512 VNNI (the
    only kernel for them)."""
    return out_features % PANEL == 0 and (bits == 4 or bool(torch.ops.chipi.q8_panels_supported()))


class BlockLinear(torch.nn.Module):
    """A float32 Linear layer whose weights are kept in blocks of 4 or 8 bits and multiplied by Chipi's kernels.

    A few rows (decoding) go through the block kernel, which reads the blocks directly; many rows (a prompt) through
    float32 matrix products on tiles of the weights dequantized in the CPU's cache, which is faster there.

    The block kernel rounds each block of 32 activations to 16-bit integers (a relative error under 2e-5). With
    `activation_bits=8` (CHIPI_ACTIVATION_BITS), 4-bit layers round them to 8 bits instead, as llama.cpp does: faster
    for several concurrent rows, but answers part from float32's sooner.
    """

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None = None, activation_bits: int = 16) -> None:
        super().__init__()
        self.bits = blocks.bits
        self.out_features, self.in_features = blocks.shape
        data, scales = blocks.data, blocks.scales
        self.panels = multiplied_in_panels(self.bits, self.out_features)
        self.activation_bits = activation_bits if self.panels and self.bits == 4 else 16
        if self.panels != blocks.in_panels:  # blocks that come in the other layout are rearranged (a copy)
            data, scales = self._panels_op("to" if self.panels else "from")(data, scales)
        self.data: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)
        self.bias = bias

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' data and scales as `quantize_blocks` lays them out, in rows."""
        if self.panels:
            return self._panels_op("from")(self.data, self.scales)  # type: ignore[no-any-return]
        return self.data, self.scales

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' data and scales as a converted model's file keeps them: in panels wherever a layer's outputs
        fill them (whatever this CPU multiplies them in), so that a layer loads them without a copy."""
        if self.out_features % PANEL == 0 and not self.panels:
            return self._panels_op("to")(self.data, self.scales)  # type: ignore[no-any-return]
        return self.data, self.scales

    def _panels_op(self, direction: str) -> Any:
        """torch.ops.chipi.q{4,8}_{to,from}_panels for this layer's bits."""
        return getattr(torch.ops.chipi, f"q{self.bits}_{direction}_panels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.bits == 4:
            y: torch.Tensor = torch.ops.chipi.q4_linear(
                rows, self.data, self.scales, FLOAT32_ROWS, self.activation_bits
            )
        else:
            y = torch.ops.chipi.q8_linear(rows, self.data, self.scales, FLOAT32_ROWS)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weights `[out, in]` the blocks hold."""
        if self.bits == 4:
            return torch.ops.chipi.q4_dequantize(self.data, self.scales)  # type: ignore[no-any-return]
        return torch.ops.chipi.q8_dequantize(self.data, self.scales)  # type: ignore[no-any-return]


class PackedLinear(torch.nn.Module):
    """A float32 Linear layer whose weight oneDNN reordered once into the layout its matrix multiply reads fastest.

    The reordered weight replaces the original (it is opaque: it is only ever multiplied). A weight tied to the
    embeddings keeps its plain copy there, for looking tokens up.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # oneDNN takes a matrix; the model passes [batch, tokens, features]
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class Float16Linear(torch.nn.Module):
    """A Linear layer with float16 weights for the CPU: a product of a few rows (decoding) runs in float16, where the
    CPU's float16 matrix-vector kernels read half of float32's bytes; one of FLOAT32_ROWS rows or more (reading a
    prompt) runs in float32, as float16 matrix products of many rows are several times slower on the CPU."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: a weight tied to the embeddings stays tied
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() < FLOAT32_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _replace_linears(model: torch.nn.Module, layer: LayerMaker) -> None:
    for module_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, layer(f"{module_name}.{name}" if module_name else name, child))


def own_remaining_parameters(model: torch.nn.Module) -> None:
    """Copy the parameters left (embeddings, norms) out of the memory-mapped checkpoint, so that the mapping, whose
    pages the packing read, is released: without this the process keeps the whole file resident next to the packed
    weights (about 400 MB more for the default model)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
