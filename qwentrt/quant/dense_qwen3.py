"""A plain dense Qwen3 decoder layer with HF's module names, for calibration: it runs full causal
attention over whole samples (no KV cache) and exposes the inputs of every linear, which AWQ needs.
The serving model (engine/model.py) runs over the paged KV cache; tests hold both to HF transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwentrt.config import Qwen3Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


KVObserver = Callable[[torch.Tensor, torch.Tensor], None]


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.kv_observer: KVObserver | None = None

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] (already normed) -> attention output before o_proj [B, T, q_size]."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_norm(self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, c.q_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(x, cos, sin))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(x))


@dataclass
class LayerFeatures:
    """Inputs of each linear over the calibration tokens, [tokens, features] each."""

    attn_in: torch.Tensor  # input of q/k/v (after input_layernorm)
    o_in: torch.Tensor
    mlp_in: torch.Tensor  # input of gate/up (after post_attention_layernorm)
    down_in: torch.Tensor


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_with_features(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                              ) -> tuple[torch.Tensor, LayerFeatures]:
        a_in = self.input_layernorm(x)
        o_in = self.self_attn.attend(a_in, cos, sin)
        h = x + self.self_attn.o_proj(o_in)
        m_in = self.post_attention_layernorm(h)
        d_in = self.mlp.act(m_in)
        out = h + self.mlp.down_proj(d_in)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        return out, LayerFeatures(flat(a_in), flat(o_in), flat(m_in), flat(d_in))

    def load(self, tensors: dict[str, torch.Tensor]) -> "DecoderLayer":
        """Load from {name relative to the layer (HF names): tensor}."""
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise KeyError(f"layer tensors do not match: missing {missing}, unexpected {unexpected}")
        return self
