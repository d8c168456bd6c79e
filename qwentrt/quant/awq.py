"""Activation-aware weight quantization (AWQ, Lin et al. 2023), W4 with zero point, group 128.

For each group of linears that share an input (q/k/v after input_layernorm; gate/up after
post_attention_layernorm; down after up), a per-input-channel scale s is searched on a grid: the
linears' weights are multiplied by s before rounding and the previous op is divided by s, which is
exact in full precision and moves quantization error away from the channels with large activations.
The loss is the output error of the whole block the group feeds (the attention block for q/k/v,
the MLP for gate/up). Then each linear's per-group clipping range is searched (not q/k, whose
errors are amplified by the attention scores). Identity scales and no clipping are candidates, so
on the calibration data AWQ never does worse than round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def pseudo_quantize(w: torch.Tensor, group_size: int, bits: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric quantization per group along the input dim.
    w [N, K] -> (dequantized w [N, K] in w's dtype, scales [N, K/G] float32, zeros [N, K/G] float32)."""
    n, k = w.shape
    g = w.float().reshape(-1, group_size)
    max_val = g.amax(dim=1, keepdim=True)
    min_val = g.amin(dim=1, keepdim=True)
    max_int = 2**bits - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, max_int)
    deq = ((q - zeros) * scales).reshape(n, k).to(w.dtype)
    return deq, scales.reshape(n, -1), zeros.reshape(n, -1)


def channel_mean_abs(x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Mean |x| per input channel over all tokens, x [T, K] -> [K] float32 (chunked for memory)."""
    total = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += x[i:i + chunk].float().abs().sum(0)
    return total / max(1, x.shape[0])


def weight_mean_normalized(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group: how large each input channel's weights are."""
    w = torch.cat([l.weight.detach().float() for l in linears], dim=0)
    shape = w.shape
    g = w.abs().reshape(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(shape).mean(0)


@dataclass
class ScaleResult:
    scales: torch.Tensor  # [K] float32; weights *= scales, previous op /= scales
    ratio: float  # grid point chosen (-1: identity, plain round-to-nearest)
    loss: float
    loss_rtn: float


@torch.no_grad()
def search_scales(linears: list[nn.Linear], x: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor],
                  group_size: int, n_grid: int = 20, duo_scaling: bool = True) -> ScaleResult:
    """Grid-search the AWQ input-channel scales for `linears` (all fed by x [B, T, K] or [T, K]);
    the loss is the MSE of `block(x)` (the module the group feeds) against its full-precision output."""
    reference = block(x).float()
    x_mean = channel_mean_abs(x.reshape(-1, x.shape[-1]))
    w_mean = weight_mean_normalized(linears, group_size)
    originals = [l.weight.detach().clone() for l in linears]

    def loss_for(scales: torch.Tensor | None) -> float:
        for lin, w in zip(linears, originals):
            if scales is None:
                lin.weight.copy_(pseudo_quantize(w, group_size)[0])
            else:
                s = scales.to(w.dtype).view(1, -1)
                lin.weight.copy_(pseudo_quantize(w.float() * scales.view(1, -1), group_size)[0].to(w.dtype) / s)
        out = block(x).float()
        return float((reference - out).pow(2).mean())

    try:
        loss_rtn = loss_for(None)
        best = ScaleResult(torch.ones_like(x_mean), -1.0, loss_rtn, loss_rtn)
        for i in range(n_grid):
            ratio = i / n_grid
            if duo_scaling:
                scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            else:
                scales = x_mean.pow(ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales[~torch.isfinite(scales)] = 1.0
            loss = loss_for(scales)
            if loss < best.loss:
                best = ScaleResult(scales.clone(), ratio, loss, loss_rtn)
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best


@torch.no_grad()
def apply_scales(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor,
                 features: list[torch.Tensor] | None = None) -> None:
    """Fold `scales` in: previous op (an RMSNorm's weight, or a linear's output rows) /= s, the
    linears' input columns *= s, and the recorded input features /= s (for the clip search)."""
    s = scales.float()
    if isinstance(prev, nn.Linear):
        prev.weight.copy_((prev.weight.float() / s.view(-1, 1)).to(prev.weight.dtype))
    else:
        prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s.view(1, -1)).to(lin.weight.dtype))
    for f in features or []:
        f.div_(s.to(f.dtype).view(1, -1))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_sample_tokens: int = 512) -> torch.Tensor:
    """Per output row and group, the clipping bound max|w| * (1 - i/n_grid), i < max_shrink * n_grid,
    minimizing that group's partial output error on sampled tokens. Returns max_val [N, K/G]."""
    n, k = weight.shape
    x = x.reshape(-1, k)
    x = x[:: max(1, x.shape[0] // n_sample_tokens)][:n_sample_tokens]
    xg = x.reshape(1, x.shape[0], k // group_size, group_size).to(weight.dtype)
    w_all = weight.reshape(n, 1, k // group_size, group_size)
    batch = 256 if n % 256 == 0 else 64 if n % 64 == 0 else n
    # Bound the [batch, tokens, K] temporaries to ~1 GiB.
    while batch > 8 and batch * xg.shape[1] * k * weight.element_size() > (1 << 30) and n % (batch // 2) == 0:
        batch //= 2
    best_all = []
    for b in range(0, n, batch):
        w = w_all[b:b + batch]
        org_max = w.abs().amax(dim=-1, keepdim=True)  # [batch, 1, groups, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"), dtype=torch.float32)
        ref = (xg * w).sum(dim=-1)  # [batch, tokens, groups]
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q = pseudo_quantize(torch.clamp(w, -max_val, max_val).reshape(-1, k), group_size)[0]
            out = (xg * q.reshape(w.shape)).sum(dim=-1)
            err = (out - ref).float().pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        best_all.append(best_max.reshape(w.shape[0], -1))
    return torch.cat(best_all, dim=0)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    n, k = linear.weight.shape
    w = linear.weight.reshape(n, -1, group_size)
    m = max_val.to(w.dtype).unsqueeze(-1)
    linear.weight.copy_(torch.clamp(w, -m, m).reshape(n, k))


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    if x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)], dim=0)


@torch.no_grad()
def awq_decoder_layer(layer: nn.Module, feats, cos: torch.Tensor, sin: torch.Tensor, batch: int,
                      group_size: int, n_grid: int = 20, sample_chunk: int = 16,
                      token_chunk: int = 16384) -> dict[str, list[float]]:
    """Search and fold AWQ scales, then clipping, into one dense Qwen3 DecoderLayer (in place).
    `feats` are its LayerFeatures over `batch` samples; they are rescaled as the scales are folded.
    Returns {group: [chosen ratio, loss, round-to-nearest loss]}."""
    attn, mlp = layer.self_attn, layer.mlp
    stats: dict[str, list[float]] = {}
    seq = feats.attn_in.shape[0] // batch

    def attn_block(a: torch.Tensor) -> torch.Tensor:
        return _chunked(lambda t: attn(t, cos, sin), a.view(batch, seq, -1), sample_chunk)

    groups = [("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], feats.attn_in, attn_block)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # MHA only: v and o line up per channel
        groups.append(("o", attn.v_proj, [attn.o_proj], feats.o_in,
                       lambda t: _chunked(attn.o_proj, t, token_chunk)))
    groups += [
        ("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], feats.mlp_in,
         lambda t: _chunked(mlp, t, token_chunk)),
        ("down", mlp.up_proj, [mlp.down_proj], feats.down_in, lambda t: _chunked(mlp.down_proj, t, token_chunk)),
    ]
    for name, prev, linears, x, block in groups:
        res = search_scales(linears, x, block, group_size, n_grid)
        apply_scales(prev, linears, res.scales, [x])
        stats[name] = [res.ratio, res.loss, res.loss_rtn]
    clip_inputs = [(attn.v_proj, feats.attn_in), (attn.o_proj, feats.o_in), (mlp.gate_proj, feats.mlp_in),
                   (mlp.up_proj, feats.mlp_in), (mlp.down_proj, feats.down_in)]
    for lin, x in clip_inputs:
        apply_clip(lin, search_clip(lin.weight, x, group_size, n_grid), group_size)
    return stats
