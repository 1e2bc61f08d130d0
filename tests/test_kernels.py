"""Chipi's CPU kernels (app/services/kernels) against PyTorch's own arithmetic on the same numbers."""

from __future__ import annotations

import pytest
import torch

from app.services import cpu_layers, kernels
from app.services.cpu_layers import BlockLinear, Blocks, quantize_blocks

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no kernels here: {kernels.unavailable_reason()}")


def on_grid(out_features: int, in_features: int, bits: int) -> torch.Tensor:
    """Weights that blocks of `bits` hold exactly, as those dequantized from a GGUF file are."""
    torch.manual_seed(bits)
    blocks = (out_features, in_features // 32, 32)
    if bits == 4:
        q = torch.randint(0, 16, blocks).float()
        q[..., 0], q[..., 1] = 0, 15  # each block spans its whole range, as llama.cpp's quantizer makes it
        scale = (torch.rand(blocks[:2]) * 0.01 + 1e-3).half().float().unsqueeze(-1)
        minimum = (-torch.rand(blocks[:2]) * 0.1).half().float().unsqueeze(-1)
        weights = q * scale + minimum
    else:
        q = torch.randint(-127, 128, blocks).float()
        q[..., 0] = 127
        weights = q * (torch.rand(blocks[:2]) * 0.01 + 1e-3).half().float().unsqueeze(-1)
    return weights.reshape(out_features, in_features)


# Layers of a multiple of 8 outputs go into panels of 8 columns (8-bit ones where the CPU has AVX-512 VNNI); 204
# stays in rows.
OUT_FEATURES = [200, 204]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 40, 300])
@pytest.mark.parametrize("in_features", [576, 544])  # 18 and 17 blocks (an odd last one, alone in its pair)
@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_block_layers_multiply_like_float32_on_the_same_weights(
    bits: int, rows: int, in_features: int, out_features: int
) -> None:
    weight = on_grid(out_features, in_features, bits)
    blocks = quantize_blocks(weight, bits)
    assert blocks.exact
    layer = BlockLinear(blocks)
    assert layer.panels == (out_features % 8 == 0 and (bits == 4 or torch.ops.chipi.q8_panels_supported()))
    assert torch.equal(layer.dequantized(), weight)
    data, scales = layer.blocks()  # back in rows, whatever the layer's layout
    assert torch.equal(data, blocks.data) and torch.equal(scales, blocks.scales)
    from_file = BlockLinear(Blocks(bits, *layer.stored(), exact=True))  # what a converted model's file gives back
    assert torch.equal(from_file.data, layer.data) and torch.equal(from_file.scales, layer.scales)
    x = torch.randn(rows, in_features)
    expected = x @ weight.t()
    # a few rows take the block kernel, which rounds each block of activations to 16 bits; 40 and 300 (a prompt) the
    # same with AVX-512 VNNI and weights in panels, float32 products on dequantized tiles elsewhere
    assert torch.allclose(layer(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_takes_blocks_in_either_layout(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted model's file keeps blocks in panels; a CPU that multiplies them in rows (8-bit ones without
    AVX-512 VNNI) rearranges them as they load, and the other way round."""
    weight = on_grid(200, 576, bits)
    stored = BlockLinear(quantize_blocks(weight, bits)).stored()
    assert stored[0].dim() == 3  # in panels, whatever this CPU multiplies them in
    x = torch.randn(3, 576)
    expected = x @ weight.t()
    for panels in (False, True) if bits == 4 or torch.ops.chipi.q8_panels_supported() else (False,):
        monkeypatch.setattr(cpu_layers, "multiplied_in_panels", lambda bits, out, panels=panels: panels)
        for blocks in (Blocks(bits, *stored, exact=True), quantize_blocks(weight, bits)):
            layer = BlockLinear(blocks)
            assert layer.panels == panels == (layer.data.dim() == 3)
            assert torch.equal(layer.dequantized(), weight)
            assert torch.allclose(layer(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize(("bits", "activation_bits"), [(4, 16), (4, 8), (8, 16)])
@pytest.mark.parametrize("in_features", [576, 544])
@pytest.mark.parametrize("out_features", OUT_FEATURES)
def test_a_row_multiplies_the_same_alone_or_beside_others(
    bits: int, activation_bits: int, in_features: int, out_features: int
) -> None:
    """Replies decoded together share the products; each must get exactly what it would alone."""
    layer = BlockLinear(quantize_blocks(on_grid(out_features, in_features, bits), bits), None, activation_bits)
    x = torch.randn(12, in_features) * torch.logspace(-2, 2, 12).unsqueeze(-1)  # rows of very different sizes
    together = layer(x)
    for rows in (slice(0, 1), slice(5, 6), slice(0, 4), slice(3, 11), slice(4, 12)):
        assert torch.equal(layer(x[rows]), together[rows])


@pytest.mark.skipif(not kernels.available(), reason="Chipi's CPU kernels are not built here")
@pytest.mark.parametrize("rows", [16, 18, 40, 64, 128])
@pytest.mark.parametrize(("out_features", "in_features"), [(3072, 576), (576, 1536), (200, 544)])
def test_a_prompt_multiplies_each_row_as_a_decode_step_does(rows: int, out_features: int, in_features: int) -> None:
    """A short prompt's rows (16 and more: up to 128 with AVX2 alone, any number with AVX-512 VNNI; 16 at a time by
    AMX tiles where the CPU has them, the rest as a decode step's) get the same exact integer sums and float
    operations as a decode step's single row."""
    layer = BlockLinear(quantize_blocks(on_grid(out_features, in_features, 4), 4))
    x = torch.randn(rows, in_features) * torch.logspace(-2, 2, rows).unsqueeze(-1)
    assert torch.equal(layer(x), torch.cat([layer(x[row : row + 1]) for row in range(rows)]))


def rounded_to_8_bits(x: torch.Tensor) -> torch.Tensor:
    """Each block of 32 values rounded to 8-bit integers times the block's scale (its largest magnitude / 127)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.where(scale > 0, blocks / scale, 0).round() * scale).reshape(x.shape)


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("in_features", [576, 544])
def test_8_bit_activations_are_rounded_per_block_and_the_rest_is_exact(rows: int, in_features: int) -> None:
    """CHIPI_ACTIVATION_BITS=8: a 4-bit layer (in panels) rounds each block of activations to 8 bits; the products
    of those with the weights' levels are exact integers, and the mins' term takes the float activations."""
    weight = on_grid(200, in_features, 4)
    layer = BlockLinear(quantize_blocks(weight, 4), None, activation_bits=8)
    assert layer.panels
    mins = weight.reshape(200, -1, 32).amin(-1, keepdim=True).expand(-1, -1, 32).reshape(weight.shape)
    x = torch.randn(rows, in_features)
    expected = rounded_to_8_bits(x) @ (weight - mins).t() + x @ mins.t()
    assert torch.allclose(layer(x), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("rows", [cpu_layers.FLOAT32_ROWS, 40])
def test_a_prompt_is_read_with_16_bit_activations_whatever_the_setting(rows: int) -> None:
    """CHIPI_ACTIVATION_BITS=8 rounds a decode step's activations; the rows of a prompt keep their 16-bit ones."""
    weight = on_grid(200, 576, 4)
    x = torch.randn(rows, 576)
    expected = x @ weight.t()
    layer = BlockLinear(quantize_blocks(weight, 4), None, activation_bits=8)
    assert torch.allclose(layer(x), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    assert not torch.allclose(layer(x[:3]), expected[:3], atol=1e-4 * float(expected.abs().max()), rtol=0)


def test_weights_off_the_grid_are_not_called_exact() -> None:
    assert not quantize_blocks(torch.randn(64, 64), 4).exact
    assert not quantize_blocks(torch.randn(64, 64), 8).exact
    assert quantize_blocks(torch.randn(64, 64), 4, only_exact=True) is None
    assert quantize_blocks(on_grid(64, 64, 4), 4, only_exact=True) is not None


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_is_scaled_dot_product_attention(padded: bool, cache_dtype: torch.dtype) -> None:
    """Over a float32 or a float16 cache (CHIPI_KV_CACHE_DTYPE), read as the float32 values it holds."""
    rows, heads, kv_heads, length, head_dim = 3, 9, 3, 75, 64
    query = torch.randn(rows, heads + kv_heads, 1, head_dim)[:, :heads]  # a view, as in the model
    room = torch.randn(rows, kv_heads, length + 16, head_dim, dtype=cache_dtype)
    keys, values = room[:, :, :length], torch.randn_like(room)[:, :, :length]
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        mask[1, :20], mask[2, :1] = 0, 0
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.float(), values.float(), attn_mask=mask.bool()[:, None, None, :], enable_gqa=True
    )
    got = torch.ops.chipi.decode_attention(query, keys, values, mask if padded else None, head_dim**-0.5)
    assert torch.allclose(got, expected.transpose(1, 2).reshape(rows, 1, -1), atol=1e-5)


@pytest.mark.skipif(
    not kernels.available() or not torch.ops.chipi.prompt_attention_supported(), reason="prompt_attention needs AVX-512"
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "tokens", "columns", "head_dim"),
    [
        (1, 9, 3, 18, 1288, 64),  # a turn's message after a long conversation, as the default model reads it
        (1, 9, 3, 64, 700, 64),  # a pass of a long message after its first 636 tokens
        (1, 9, 3, 13, 13, 64),  # a prompt with nothing cached: plainly causal
        (1, 9, 3, 2, 9, 64),  # fewer query rows than a vector's 16 lanes
        (2, 4, 2, 7, 30, 32),
        (1, 6, 6, 5, 11, 16),  # one query head per key/value head
    ],
)
def test_prompt_attention_is_causal_scaled_dot_product_attention(
    rows: int, heads: int, kv_heads: int, tokens: int, columns: int, head_dim: int, cache_dtype: torch.dtype
) -> None:
    """The new tokens are the cache's last columns: each sees every column before them and the new ones up to its
    own, over a float32 or a float16 cache read as the float32 values it holds."""
    torch.manual_seed(tokens)
    query = torch.randn(rows, heads + kv_heads, tokens, head_dim)[:, :heads]  # a view, as in the model
    room = torch.randn(rows, kv_heads, columns + 16, head_dim, dtype=cache_dtype)
    keys, values = room[:, :, :columns], torch.randn_like(room)[:, :, :columns]
    causal = torch.ones(tokens, columns, dtype=torch.bool).tril(columns - tokens)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.float(), values.float(), attn_mask=causal, enable_gqa=True
    )
    got = torch.ops.chipi.prompt_attention(query, keys, values, head_dim**-0.5)
    assert torch.allclose(got, expected.transpose(1, 2).reshape(rows, tokens, -1), atol=1e-5)


def test_fused_norm_and_gate_match_pytorch() -> None:
    hidden, delta, weight = torch.randn(2, 5, 576), torch.randn(2, 5, 576), torch.randn(576)
    expected_hidden = hidden + delta
    expected = torch.nn.functional.rms_norm(expected_hidden, (576,), weight, 1e-5)
    assert torch.allclose(torch.ops.chipi.add_rms_norm(hidden, delta, weight, 1e-5), expected, atol=1e-5)
    assert torch.allclose(hidden, expected_hidden)  # the residual stream was updated in place
    gate_up = torch.randn(3, 2 * 1536)
    expected_gated = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.allclose(torch.ops.chipi.silu_mul(gate_up), expected_gated, atol=1e-6)
