"""A traceable LLaMA-family decoder with HuggingFace parameter names.

The forward is written for torch.fx: the KV cache is plain tensors in and out, the attention mask
is a 2-D padding mask plus the causal rule, and `Attention`, `MLP`, `RMSNorm` and `RotaryEmbedding`
are the leaf modules (see `cqil.model.trace`). Numerics follow transformers' eager LLaMA
(fp32 RMSNorm, fp32 softmax) so that logits match it to ~1e-6 in fp32.

Calling convention of `CausalLM.forward`::

    input_ids       [B, T] int64
    attention_mask  [B, P+T] int64, 1 = real token, 0 = padding (left padding is fine)
    position_ids    [B, T] int64
    past_key_values tuple of 2L tensors: (layer 0 key, layer 0 value, layer 1 key, ...),
                    each [B, kv_heads, P, head_dim]; P may be 0
    -> (logits [B, T, V], presents: tuple of 2L tensors [B, kv_heads, P+T, head_dim])

Not covered: sliding-window attention, dynamic NTK beyond the compiled length (frequencies are
fixed at build time, which equals transformers for sequences up to max_position_embeddings).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cqil.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, max_seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies for the config's rope type (default, linear, dynamic, llama3)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    scaling = cfg.rope_scaling
    kind = cfg.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    if kind == "dynamic":
        seq_len = max(max_seq_len or 0, cfg.max_position_embeddings)
        factor = scaling["factor"]
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """position_ids [B, T] -> fp32 (cos, sin) [B, T, head_dim], shared by every layer.

    Depends on position_ids alone, so every segment of a partitioned model can recompute it.
    """

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache(Protocol):
    """Where one layer's keys and values live, when not in the past/present tensors themselves."""

    def update(self, past_key, past_value, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's rotated k, v [B, kvh, T, hd]; return the keys/values to attend over."""


class Attention(nn.Module):
    """Self-attention with an explicit KV cache: returns (output, present_key, present_value).

    By default the cache is the tensors themselves: present = past ++ new (what the ONNX export
    sees). A runtime may give the module a `kv_cache` object instead (e.g. preallocated buffers
    written in place); it is a plain attribute, invisible to tracing and to the state dict.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, past_key, past_value):
        q, k, v = self.project(x, cos, sin)
        if self.kv_cache is None:
            key, value = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)  # [B, kvh, P+T, hd]
        else:
            key, value = self.kv_cache.update(past_key, past_value, k, v)
        return self.attend(q, key, value, mask), key, value

    def project(self, x, cos, sin):
        """q [B, nh, T, hd] and the new k, v [B, kvh, T, hd], rotated."""
        B, T = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def attend(self, q, key, value, mask):
        B, T = q.shape[0], q.shape[2]
        k_all, v_all = self._repeat_kv(key), self._repeat_kv(value)  # [B, nh, S, hd]
        scores = torch.matmul(q, k_all.transpose(2, 3)) * (self.head_dim ** -0.5)  # [B, nh, T, S]
        # mask and softmax in fp32: in fp16, score + finfo(fp16).min can round to -inf, and a fully
        # masked (padding) row would then turn into NaN and leak into real tokens through V
        probs = F.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v_all).transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _repeat_kv(self, t):
        rep = self.num_heads // self.num_kv_heads
        if rep == 1:
            return t
        B, S = t.shape[0], t.shape[2]
        # expand + reshape (as transformers' repeat_kv) exports to plain ONNX Expand/Reshape
        return t[:, :, None].expand(B, self.num_kv_heads, rep, S, self.head_dim).reshape(
            B, self.num_heads, S, self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Traced through (not a leaf), so the CQIL pass sees its residual additions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_key, past_value):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key, past_value)
        h = x + attn[0]
        out = h + self.mlp(self.post_attention_layernorm(h))
        return out, attn[1], attn[2]


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(attention_mask, position_ids, dtype):
    """Additive mask [B, 1, T, P+T]: key j is visible to query i iff j <= P+i and key j is not padding.

    Built from attention_mask and position_ids' shape only, so any segment can recompute it.
    """
    query_len = position_ids.shape[1]
    total = attention_mask.shape[1]
    past = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device) + past
    k_pos = torch.arange(total, device=attention_mask.device)
    visible = (k_pos[None, :] <= q_pos[:, None])[None, None, :, :] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


class CausalLM(nn.Module):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM with HF parameter names."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.rotary_emb = RotaryEmbedding(rope_inv_freq(cfg, max_seq_len))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rotary_emb(position_ids)
        # The dtype must be concrete while tracing (finfo of a proxy is impossible).
        mask = causal_mask(attention_mask, position_ids, next(self.parameters()).dtype)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, key, value = layer(x, cos, sin, mask, past_key_values[2 * i], past_key_values[2 * i + 1])
            presents += [key, value]
        logits = self.lm_head(self.model.norm(x))  # [B, T, V]
        return logits, tuple(presents)

    def empty_cache(self, batch: int, dtype=None, device=None) -> tuple:
        """Past tensors of length 0, for a prefill."""
        cfg = self.config
        p = next(self.parameters())
        shape = (batch, cfg.num_kv_heads, 0, cfg.head_dim)
        return tuple(torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device)
                     for _ in range(2 * cfg.num_layers))
