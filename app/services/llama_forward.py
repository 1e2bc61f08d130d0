"""A lean forward pass for Llama-architecture models (the default SmolLM2 among them) on the CPU.

Decoding one token of a 135M-parameter model reads its weights once: a few milliseconds with 4-bit weights. Around
that, transformers' own forward runs about 900 PyTorch operations per step (masks, cache bookkeeping, rotary
embeddings as half-rotations, three projections where one would do), each with microseconds of dispatch, which
took as long as the products. This forward computes the same function with a third of the operations:
- the query, key and value projections are one matrix product, and so are the gate and up projections;
- the rows of the query and key weights are reordered at load so that each rotary pair of a head is adjacent, so
  that rotary embeddings are one complex multiplication (attention scores are unchanged: queries and keys are
  reordered alike, and the values not at all). Cached keys are in that order, which only this forward reads;
- attention is Chipi's kernels where they run: a decode step's, and with AVX-512 a prompt pass's without padding
  (each new token over the cache and the new tokens up to its own, `prompt_attention`); elsewhere PyTorch's fused
  scaled-dot-product attention over the grouped key/value heads, with a mask only where one is needed (padding or
  a causal prompt after cached columns);
- keys and values may be kept in float16 (keep_keys_values_in, CHIPI_KV_CACHE_DTYPE): Chipi's kernels read them as
  they are, PyTorch's attention converted to float32.

It takes what the decode engine gives transformers' forward (token ids, the attention mask over the cache's columns,
position ids, a cache whose `update` appends keys and values: kv_cache.RoomCache, or a transformers Cache) and returns
the logits of each row's last token. Its linear layers are the precision's (app/services/cpu_layers.py).

A decode step of a model whose every product is in blocks, on the engine's cache with room to write into
(kv_cache.SpareRoomLayer), runs all its layers in one call of Chipi's kernels (`decode_layers`): the same operations,
without the Python and dispatch between them, which on a slow 2-core machine took as long as the products.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional

from app.services import kernels
from app.services.cpu_layers import FLOAT32_ROWS, BlockLinear, LayerMaker
from app.services.kv_cache import RoomCache, SpareRoomLayer, spare_room_cache

# Model types whose decoder layers are exactly transformers' LlamaDecoderLayer arithmetic (RMSNorm, rotary
# embeddings on full heads, grouped-query attention, SiLU-gated MLP).
SUPPORTED_MODEL_TYPES = {"llama"}


def supports(model: Any) -> bool:
    """True for a model this forward computes exactly like transformers does."""
    config = model.config
    rope_type = str(getattr(model.model.rotary_emb, "rope_type", "default"))
    return (
        config.model_type in SUPPORTED_MODEL_TYPES
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and model.dtype == torch.float32
        # rotary frequencies fixed at load: not the kinds transformers recomputes as the sequence grows
        and "dynamic" not in rope_type
        and rope_type != "longrope"
    )


LINEAR_PARTS = ("qkv", "output", "gate_up", "down")  # each decoder layer's linear layers, by attribute name


class DecoderLayer(nn.Module):
    """One decoder layer: its four (fused) linear layers and its two norms' weights."""

    def __init__(
        self,
        qkv: nn.Module,
        output: nn.Module,
        gate_up: nn.Module,
        down: nn.Module,
        attention_norm: torch.Tensor,
        mlp_norm: torch.Tensor,
    ) -> None:
        super().__init__()
        self.qkv, self.output, self.gate_up, self.down = qkv, output, gate_up, down
        self.attention_norm = attention_norm
        self.mlp_norm = mlp_norm


def _fused_layer(name: str, layer: Any, heads: int, kv_heads: int, head_dim: int, make: LayerMaker) -> DecoderLayer:
    """A transformers Llama decoder layer with its projections fused (and q, k reordered for complex rotary)."""
    attention, mlp = layer.self_attn, layer.mlp
    pairs = _rotary_pairs(head_dim)
    query = attention.q_proj.weight.detach().view(heads, head_dim, -1)[:, pairs].flatten(0, 1)
    key = attention.k_proj.weight.detach().view(kv_heads, head_dim, -1)[:, pairs].flatten(0, 1)
    qkv = torch.cat([query, key, attention.v_proj.weight.detach()])
    gate_up = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
    return DecoderLayer(
        qkv=make(f"{name}.qkv", _linear(qkv)),
        output=make(f"{name}.output", _linear(attention.o_proj.weight.detach())),
        gate_up=make(f"{name}.gate_up", _linear(gate_up)),
        down=make(f"{name}.down", _linear(mlp.down_proj.weight.detach())),
        attention_norm=layer.input_layernorm.weight,
        mlp_norm=layer.post_attention_layernorm.weight,
    )


class LlamaForward(nn.Module):
    """The lean forward of a Llama model: built from a transformers model (`from_transformers`), or from the
    layers of one converted earlier (app/services/converted.py)."""

    def __init__(
        self,
        config: Any,
        generation_config: Any,
        *,
        embed: nn.Embedding,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head: nn.Module,
        inv_freq: torch.Tensor,
        rotary_scaling: float,
    ) -> None:
        super().__init__()
        self.config = config
        self.generation_config = generation_config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.decoder_layers = layers  # the same modules, typed
        self.norm = norm
        self.lm_head = lm_head
        # What transformers' rotary embedding computes, this model's scaling (if any) included.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rotary_scaling = rotary_scaling
        # The norm weights in the order the forward applies them: each layer's two, then the final one.
        self._norms = [norm for layer in layers for norm in (layer.attention_norm, layer.mlp_norm)] + [norm]
        # Chipi's kernels fuse the RMSNorm, the gated activation (a dozen PyTorch operations each) and a decode
        # step's attention into one operation each.
        self._fused = kernels.available()
        self._step = _decode_step_tensors(layers) if self._fused else None
        # A prompt pass's attention by Chipi's kernel: at turn 10 of a conversation (18 tokens over 1,288 columns,
        # float16 cache) 1.5-1.7x faster than PyTorch's with the float32 copy of the keys and values and the mask it
        # needs.
        self._prompt_kernel = (
            self._fused and self.head_dim % 16 == 0 and bool(torch.ops.chipi.prompt_attention_supported())
        )
        self.cache_dtype = self.dtype  # what new caches keep keys and values in (keep_keys_values_in)

    @classmethod
    def from_transformers(cls, model: Any, make: LayerMaker) -> LlamaForward:
        """Built from (and replacing) a transformers model's weights. `make` turns each fused linear layer into the
        one to run (cpu_layers.float32_layers: packed or quantized) as it is built, so that the float32 copies made
        by fusing never exist for the whole model at once."""
        config = model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        decoder = model.model
        return cls(
            config,
            model.generation_config,
            embed=decoder.embed_tokens,
            layers=[
                _fused_layer(f"layers.{index}", layer, heads, kv_heads, head_dim, make)
                for index, layer in enumerate(decoder.layers)
            ],
            norm=decoder.norm.weight,
            lm_head=make("lm_head", _linear(model.lm_head.weight.detach())),
            inv_freq=decoder.rotary_emb.inv_freq.float().clone(),
            rotary_scaling=float(decoder.rotary_emb.attention_scaling),
        )

    def keep_keys_values_in(self, setting: str) -> None:
        """CHIPI_KV_CACHE_DTYPE. `float16` halves the bytes of the keys and values, which a decode step's attention
        reads in full (in a long conversation, more than the weights) and the prefix cache keeps; where Chipi's
        kernels attend, which read float16 directly. Elsewhere the cache keeps the model's dtype."""
        self.cache_dtype = torch.float16 if setting == "float16" and self._fused else self.dtype

    def new_cache(self) -> RoomCache:
        """An empty cache for one row, in `cache_dtype`, with room to write a prompt's keys and values into."""
        empty = self.norm.new_empty(1, self.kv_heads, 0, self.head_dim, dtype=self.cache_dtype)
        return spare_room_cache([(empty, empty)] * len(self.decoder_layers))

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """The logits of each row's last token, `[rows, vocab]`, having appended every token's keys and values."""
        rows, tokens = input_ids.shape
        hidden = self.embed(input_ids)
        angles = position_ids.unsqueeze(-1).float() * self.inv_freq  # [rows, tokens, head_dim / 2]
        rotation = torch.polar(torch.full_like(angles, self.rotary_scaling), angles).unsqueeze(1)
        mask = _attention_mask(attention_mask, tokens, offset_causal=self._prompt_kernel)
        if tokens == 1 and self._step is not None and all(isinstance(layer, SpareRoomLayer) for layer in cache.layers):
            padding = None if mask is None else attention_mask
            return self.lm_head(self._decode_layers(hidden, rotation, padding, cache.layers)[:, -1])  # type: ignore[no-any-return]
        split = [(self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim]
        norms = self._norms
        normed = self._add_rms_norm(hidden, None, norms[0])
        for index, layer in enumerate(self.decoder_layers):
            qkv = layer.qkv(normed)
            query_key, value = qkv.split(split, dim=-1)
            # [rows, heads + kv_heads, tokens, head_dim / 2] complex pairs, rotated to their positions
            pairs = torch.view_as_complex(
                query_key.view(rows, tokens, self.heads + self.kv_heads, self.head_dim // 2, 2).transpose(1, 2)
            )
            rotated = torch.view_as_real(pairs * rotation).flatten(-2)
            query, key = torch.split(rotated, [self.heads, self.kv_heads], dim=1)
            value = value.view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache.update(key, value, index)
            normed = self._add_rms_norm(
                hidden, layer.output(self._attend(query, keys, values, attention_mask, mask)), norms[2 * index + 1]
            )
            normed = self._add_rms_norm(hidden, layer.down(self._gated(layer.gate_up(normed))), norms[2 * index + 2])
        last = normed[:, -1]
        logits: torch.Tensor = self.lm_head(last)
        return logits

    def _decode_layers(
        self, hidden: torch.Tensor, rotation: torch.Tensor, padding: torch.Tensor | None, layers: list[SpareRoomLayer]
    ) -> torch.Tensor:
        """The final norm of a decode step's residual stream, every layer run by `decode_layers`, which writes each
        layer's new key and value into the cache's room."""
        assert self._step is not None
        weights, bits, activation_bits = self._step
        length = layers[0].length
        rooms = [layer.reserve(1) for layer in layers]
        normed = torch.ops.chipi.decode_layers(
            hidden,
            weights,
            bits,
            [keys for keys, _ in rooms],
            [values for _, values in rooms],
            length,
            torch.view_as_real(rotation[:, 0, 0]),  # [rows, head_dim / 2, 2]: (cos, sin) times the scaling
            padding,
            self.norm,
            self.heads,
            self.kv_heads,
            self.eps,
            self.head_dim**-0.5,
            FLOAT32_ROWS,
            activation_bits,
        )
        for layer in layers:
            layer.advance(1)
        return normed  # type: ignore[no-any-return]

    def _add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """Add `delta` to the residual stream `hidden` in place (a residual connection), and return its RMSNorm."""
        if self._fused:
            if delta is None:
                return torch.ops.chipi.rms_norm(hidden, weight, self.eps)  # type: ignore[no-any-return]
            return torch.ops.chipi.add_rms_norm(hidden, delta, weight, self.eps)  # type: ignore[no-any-return]
        if delta is not None:
            hidden.add_(delta)
        return functional.rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)

    def _attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Grouped-query attention of the new tokens over the cache, `[rows, tokens, heads * head_dim]`."""
        rows, _, tokens, _ = query.shape
        if self._fused and tokens == 1:  # a decode step; mask is None when no row has padding
            padding = None if mask is None else attention_mask
            return torch.ops.chipi.decode_attention(  # type: ignore[no-any-return]
                query, keys, values, padding, self.head_dim**-0.5
            )
        if self._prompt_kernel and mask is None:  # new tokens without padding, after the cached columns (if any)
            return torch.ops.chipi.prompt_attention(query, keys, values, self.head_dim**-0.5)  # type: ignore[no-any-return]
        if keys.dtype != query.dtype:  # a float16 cache (keep_keys_values_in), read by float32 products
            keys, values = keys.to(query.dtype), values.to(query.dtype)
        if mask is not None or tokens == 1:  # without a mask, one token sees every column
            attended = functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
        else:
            # Causal without a mask, which scaled dot-product attention computes in under half the time of the
            # masked product (it skips the hidden half: a 1,674-token prompt took 39 instead of 87 ms a layer). Its
            # causal rule is for a square problem, so the cached columns get queries too, zeros, whose answers are
            # dropped: cheaper than the masked product while they are no more than the new tokens (_attention_mask).
            cached = keys.shape[2] - tokens
            if cached:
                query = torch.cat([query.new_zeros(rows, query.shape[1], cached, query.shape[3]), query], dim=2)
            attended = functional.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
            attended = attended[:, :, cached:]
        return attended.transpose(1, 2).reshape(rows, tokens, -1)

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, from the gate and up projections' joint output."""
        if self._fused:
            return torch.ops.chipi.silu_mul(gate_up)  # type: ignore[no-any-return]
        gate, up = gate_up.chunk(2, dim=-1)
        return functional.silu(gate) * up


def _decode_step_tensors(layers: list[DecoderLayer]) -> tuple[list[torch.Tensor], list[int], int] | None:
    """decode_layers' weights (per layer: each product's blocks and scales, then the two norms), the products' bits,
    and what the 4-bit products in panels round activations to (the layers' own setting); None unless every product
    is in blocks, without a bias."""
    weights: list[torch.Tensor] = []
    bits: list[int] = []
    activation_bits = 16
    for layer in layers:
        products = [getattr(layer, part) for part in LINEAR_PARTS]
        if not all(isinstance(product, BlockLinear) and product.bias is None for product in products):
            return None
        for product in products:
            weights += [product.data, product.scales]
            bits.append(product.bits)
            activation_bits = min(activation_bits, product.activation_bits)
        weights += [layer.attention_norm, layer.mlp_norm]
    return weights, bits, activation_bits


def _attention_mask(attention_mask: torch.Tensor, tokens: int, *, offset_causal: bool) -> torch.Tensor | None:
    """Which cached columns each new token may attend to, `[rows, 1, tokens, columns]`, or None where no padding
    leaves a plain rule `_attend` applies without a mask: one new token per row sees every column (the usual decode
    step), and new tokens are causal (each sees the cached columns, itself and the new tokens before it): after any
    number of cached columns with `offset_causal` (Chipi's prompt_attention), else where they are at least as many
    as the columns cached before them."""
    columns = attention_mask.shape[1]
    if (tokens == 1 or offset_causal or 2 * tokens >= columns) and bool(attention_mask.all()):
        return None
    # The new tokens are the last `tokens` columns; token i sees the columns up to its own.
    causal = torch.ones(tokens, columns, dtype=torch.bool, device=attention_mask.device).tril(columns - tokens)
    return (attention_mask.bool()[:, None, None, :] & causal).contiguous()


def _rotary_pairs(head_dim: int) -> torch.Tensor:
    """The order of a head's dimensions that puts each rotary pair (i, i + head_dim / 2) side by side."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer
