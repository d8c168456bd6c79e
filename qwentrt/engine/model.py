"""Qwen3 over the paged KV cache: fused QKV and gate/up projections (BF16 or INT4-AWQ), q/k RMSNorm,
RoPE, GQA, tied embeddings. One forward runs a flat batch of tokens from many sequences (prefill
chunks and decodes mixed); AttentionMetadata says which tokens belong to which sequence and where
their K/V go. Kernels come from qwentrt.engine.kernels (torch references on the CPU)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qwentrt.config import EngineConfig, Qwen3Config
from qwentrt.engine.kernels import ops
from qwentrt.engine.kernels.prefill_attention import PrefillBatch
from qwentrt.engine.kernels.w4a16_gemv import SplitKSums


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV slot (page * block_size + offset) each token's K/V goes to
    block_tables: torch.Tensor  # [B, max_pages] int32, page ids of each sequence (padded with 0)
    cu_seqlens_q: torch.Tensor  # [B + 1] token offsets of each sequence in the flat batch
    context_lens: torch.Tensor  # [B] tokens of context (cached + this step's) per sequence
    logits_indices: torch.Tensor  # [n] which rows of the output need logits (a sequence's last token)
    # Layout: the first num_decodes sequences have one query token each (a host int: no device reads);
    # every other sequence is in `prefill` (its spans, gathered-context slots, varlen offsets), None if none.
    num_decodes: int = 0
    prefill: PrefillBatch | None = None

    @functools.cached_property
    def decodes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_tables, cu_seqlens_q, context_lens) of the decodes alone: views made once per step (the
        first layer), not per layer."""
        d = self.num_decodes
        return self.block_tables[:d], self.cu_seqlens_q[:d + 1], self.context_lens[:d]


class Linear(nn.Module):
    """y = x @ W^T with W bf16 [N, K] or INT4 AWQ (qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]). An INT4
    weight is kept in the layout ops.pack_weight picks, its only copy: AutoAWQ's, or tile-major [tiles, K, PN]
    (`w4a16_gemv_tile_major`); K is qweight.shape[-2] either way."""

    def __init__(self, weight: torch.Tensor | None = None, qweight: torch.Tensor | None = None,
                 qzeros: torch.Tensor | None = None, scales: torch.Tensor | None = None, group_size: int = 128):
        super().__init__()
        self.group_size = group_size
        self.quantized = weight is None
        # the output may stay float32 split-K sums for the next kernel (ops.awq_linear): set where that kernel is
        # qk_norm_rope_write_kv, fused_add_rms_norm or silu_and_mul
        self.deferred = False
        if self.quantized:
            self.register_buffer("qweight", ops.pack_weight(qweight, scales, group_size))
            self.register_buffer("qzeros", qzeros)
            self.register_buffer("scales", scales)
        else:
            self.register_buffer("weight", weight)

    @property
    def out_features(self) -> int:
        return self.scales.shape[1] if self.quantized else self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return ops.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, self.deferred)
        return x @ self.weight.t()

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu_and_mul(gate_up)); INT4 at a few tokens on CUDA in one kernel."""
        if self.quantized:
            return ops.awq_linear_of_silu_mul(gate_up, self.qweight, self.qzeros, self.scales, self.group_size)
        return self(ops.silu_and_mul(gate_up))

    @classmethod
    def fused(cls, parts: list[dict[str, torch.Tensor]], group_size: int) -> "Linear":
        """Concatenate several linears' output features (q|k|v, gate|up) into one (parts: the checkpoint's
        tensors, AutoAWQ's layout; the concatenation is packed as the Linear keeps it, then dropped)."""
        if "weight" in parts[0]:
            return cls(weight=torch.cat([p["weight"] for p in parts], dim=0))
        return cls(qweight=torch.cat([p["qweight"] for p in parts], dim=1),
                   qzeros=torch.cat([p["qzeros"] for p in parts], dim=1),
                   scales=torch.cat([p["scales"] for p in parts], dim=1), group_size=group_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, tensors: dict[str, dict[str, torch.Tensor]], group_size: int):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = Linear.fused([tensors["self_attn.q_proj"], tensors["self_attn.k_proj"],
                                      tensors["self_attn.v_proj"]], group_size)
        self.o_proj = Linear(**tensors["self_attn.o_proj"], group_size=group_size)
        self.gate_up_proj = Linear.fused([tensors["mlp.gate_proj"], tensors["mlp.up_proj"]], group_size)
        self.down_proj = Linear(**tensors["mlp.down_proj"], group_size=group_size)
        # their outputs go to qk_norm_rope_write_kv / fused_add_rms_norm / silu_and_mul (down's, through
        # ops.awq_linear_of_silu_mul, to the next layer's fused_add_rms_norm)
        self.o_proj.deferred = self.gate_up_proj.deferred = True
        self.qkv_proj.deferred = ops.deferred_qkv()
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            self.register_buffer(name.split(".")[-1], tensors[name]["weight"])
        self.scale = cfg.head_dim ** -0.5

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float, v_scale: float,
                cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        eps = c.rms_norm_eps
        x, residual = ops.fused_add_rms_norm(hidden, residual, self.input_layernorm, eps)
        qkv = self.qkv_proj(x)
        sums_dtype = qkv.dtype if isinstance(qkv, SplitKSums) else None  # (deferred: float32 sums to finish)
        q, k, v = (qkv.sums if sums_dtype else qkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        t = x.shape[0]
        q = ops.qk_norm_rope_write_kv(q.view(t, c.num_attention_heads, c.head_dim),
                                      k.view(t, c.num_key_value_heads, c.head_dim),
                                      v.view(t, c.num_key_value_heads, c.head_dim), self.q_norm, self.k_norm, eps,
                                      meta.positions, cos_sin, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale,
                                      sums_dtype)
        attn = ops.attention(q, k_cache, v_cache, meta, self.scale, k_scale, v_scale)
        hidden = self.o_proj(attn.reshape(t, c.q_size))
        x, residual = ops.fused_add_rms_norm(hidden, residual, self.post_attention_layernorm, eps)
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x)), residual


class Qwen3Model(nn.Module):
    def __init__(self, engine: EngineConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_positions: int):
        """tensors: the engine's weights by name, consumed: a layer's entries leave the dict once its modules hold
        them, so the linears' concatenations and repacks (ops.pack_weight) hold a second copy of one layer at a
        time, not of the whole model."""
        super().__init__()
        cfg = engine.model
        self.cfg = cfg
        self.dtype = dtype
        g = engine.weights.group_size
        self.register_buffer("embed_tokens", tensors["model.embed_tokens.weight"].to(dtype))
        lm_head = tensors.get("lm_head.weight")
        self.register_buffer("lm_head", self.embed_tokens if lm_head is None else lm_head.to(dtype))
        self.register_buffer("norm", tensors["model.norm.weight"].to(dtype))
        ops.configure(engine.kernels)
        self.register_buffer("cos_sin", ops.rope_cos_sin_cache(max_positions, cfg.head_dim, cfg.rope_theta,
                                                               self.embed_tokens.device))
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            per: dict[str, dict[str, torch.Tensor]] = {}
            for name in [name for name in tensors if name.startswith(p)]:
                t = tensors.pop(name)
                module, _, kind = name[len(p):].rpartition(".")
                per.setdefault(module, {})[kind] = t if t.dtype in (torch.int32, torch.float16) else t.to(dtype)
            for parts in per.values():
                if "scales" in parts:
                    parts["scales"] = parts["scales"].to(dtype)
            layers.append(DecoderLayer(cfg, per, g))
        self.layers = nn.ModuleList(layers)
        kv = engine.kv_cache
        self.k_scales = kv.k_scales or [1.0] * cfg.num_hidden_layers
        self.v_scales = kv.v_scales or [1.0] * cfg.num_hidden_layers

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states of the tokens in meta.logits_indices, after the final norm: [n, hidden]."""
        hidden = self.embed_tokens[input_ids]
        residual = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            hidden, residual = layer(hidden, residual, meta, k_cache, v_cache, self.k_scales[i],
                                     self.v_scales[i], self.cos_sin)
        hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
        return hidden[meta.logits_indices]

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [n, V]; into `out` (float32 [n, V]) if given (the cast is the copy)."""
        logits = hidden @ self.lm_head.t()
        if out is None:
            return logits.float()
        return out.copy_(logits)


def load_model(engine_dir: str | Path, engine: EngineConfig, device: torch.device, dtype: torch.dtype,
               max_positions: int) -> Qwen3Model:
    path = Path(engine_dir) / engine.weights.file
    tensors = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return Qwen3Model(engine, tensors, dtype, max_positions)
