"""The linear layers a model runs on the CPU, chosen for its precision (the README's Benchmark has the figures).

Decoding reads every weight once per step, so on a CPU it is bound by how fast the matrix kernels stream weights
from memory, and which kernel runs matters as much as the precision:
- float32: oneDNN's matrix multiply on weights reordered once, at load, into its blocked layout. MKL's kernels,
  which `F.linear` calls, are slow for the 2-7 rows of a small decode batch (the output layer: 10 ms for one row,
  25 ms for two, 18 ms for four); oneDNN's take 4-7 ms for 1 to 8 rows. Same results to float rounding.
- float16: float16 kernels for the few rows of a decode step; float32 for the many rows of a prompt.
- int8 (opt-in): torch.ao dynamic quantization.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch

# Matrix products of at least this many rows (reading a prompt) run in float32 under CHIPI_DTYPE=float16 on the CPU.
FLOAT32_ROWS = 16


def prepare_for_cpu(model: Any, *, quantize: str) -> Any:
    """`model` with the linear layers that run fastest on this CPU for its precision."""
    if quantize == "int8":
        return _quantize_int8(model)
    if model.dtype == torch.float16:
        _replace_linears(model, Float16Linear)
    elif model.dtype == torch.float32 and onednn_packs_linears():
        _replace_linears(model, PackedLinear)
        _own_remaining_parameters(model)
    return model


def onednn_packs_linears() -> bool:
    """oneDNN's packed float32 linear layers are available (the ops PyTorch's own compiler uses for them) on an x86
    CPU, where they were measured; elsewhere the plain layers stay."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    ops = all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    return bool(available) and ops and platform.machine().lower() in {"x86_64", "amd64"}


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


def _replace_linears(model: torch.nn.Module, layer: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, layer(child))


def _own_remaining_parameters(model: torch.nn.Module) -> None:
    """Copy the parameters left (embeddings, norms) out of the memory-mapped checkpoint, so that the mapping, whose
    pages the packing read, is released: without this the process keeps the whole file resident next to the packed
    weights (about 400 MB more for the default model)."""
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()


def _quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantization (torch.ao): every Linear layer's weights become int8, one scale per output channel,
    and each matrix multiply quantizes its input on the fly, so decoding reads a quarter of float32's bytes."""
    # torch.ao.quantization is deprecated in favour of the torchao package, but it is in every torch the project
    # allows (<2.14); its warnings would be printed on every start.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True
        )
