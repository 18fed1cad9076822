"""Pre-LN Transformer blocks with a preallocated KV cache.

Written by hand because torch.nn.TransformerDecoder recomputes every past
position at each decoding step (no KV cache) and hides its attention behind
nn.MultiheadAttention, whose fused in_proj cannot be quantized layer by layer.
All projections here are plain nn.Linear so quantization sees them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout, self.cross = n_heads, dropout, cross
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values, computed once per image when decoding."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: Tensor, *, causal: bool = False, memory: Tensor | None = None,
                mem_kv: tuple[Tensor, Tensor] | None = None, cache: dict | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, t, d = x.shape
        p = self.dropout if self.training else 0.0
        if self.cross:
            q = self._heads(self.q(x))
            k, v = mem_kv if mem_kv is not None else self.memory_kv(memory)
            causal = False
        else:
            q, k, v = (self._heads(z) for z in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                # Write this step's keys/values into the preallocated buffers, attend to all so far.
                pos = cache["pos"]
                cache["k"][:, :, pos:pos + t] = k
                cache["v"][:, :, pos:pos + t] = v
                k, v = cache["k"][:, :, :pos + t], cache["v"][:, :, :pos + t]
                causal = causal and t > 1
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
            if causal:
                att = att.masked_fill(torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device)
                                      .triu(k.shape[2] - t + 1), float("-inf"))
            w = att.softmax(-1)
            y = F.dropout(w, p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        y = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return (y, w) if need_weights else y


class MLP(nn.Module):
    def __init__(self, d_model: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, mult * d_model)
        self.out = nn.Linear(mult * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.mlp = MLP(d_model, mlp_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.cross_attn = Attention(d_model, n_heads, dropout, cross=True)
        self.mlp = MLP(d_model, mlp_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, memory: Tensor | None = None, mem_kv=None, cache: dict | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = x + self.drop(self.self_attn(self.ln1(x), causal=True, cache=cache))
        c = self.cross_attn(self.ln2(x), memory=memory, mem_kv=mem_kv, need_weights=need_weights)
        c, w = c if need_weights else (c, None)
        x = x + self.drop(c)
        x = x + self.mlp(self.ln3(x))
        return (x, w) if need_weights else x
