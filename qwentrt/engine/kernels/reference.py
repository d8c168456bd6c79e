"""Torch reference kernels: the definition of what every fast kernel must compute, and the path the
engine takes on the CPU. Shapes follow vLLM's conventions: tokens are flattened across the batch
([T, ...]); a batch of sequences is described by cu_seqlens_q, context_lens and block_tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwentrt.quant.kv import FP8_E4M3_MAX
from qwentrt.quant.pack import unpack_int4


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (rms_norm(residual), residual). With residual None, residual = x."""
    residual = x if residual is None else residual + x
    return rms_norm(residual, weight, eps), residual


def rope_cos_sin_cache(max_positions: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (rotate-half convention, as HF Qwen3) at positions [T]."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [T, H, D] and k [T, Hk, D], then RoPE."""
    q = apply_rope(rms_norm(q, q_weight, eps), positions, cos_sin)
    k = apply_rope(rms_norm(k, k_weight, eps), positions, cos_sin)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def check_qweight(qweight: torch.Tensor, n: int, k: int | None = None, k_from: str = "the input has") -> None:
    """A ValueError a person can act on unless qweight is an INT4 weight of n columns: AutoAWQ's [K, N/8] or tile-major
    [tiles, K, PN] (w4a16_gemv.tile_major: PN packed columns a tile, the last one zero-padded, contiguous), of k rows
    where the caller knows K (k_from: whose K, "x has"). Every W4A16 entry point checks its weight with this."""
    words = -(-n // 8)
    if qweight.dim() == 2:
        if qweight.shape[1] != words:
            raise ValueError(f"W4A16: qweight {tuple(qweight.shape)} is not AutoAWQ's [K, N/8] for N = {n} (the "
                             f"scales' columns): {words} packed columns expected")
    elif qweight.dim() == 3:
        tiles, _, pn = qweight.shape
        need = -(-words // max(pn, 1))
        if pn < 1 or tiles != need:
            raise ValueError(f"W4A16: a tile-major qweight {tuple(qweight.shape)} (tiles of {pn} packed columns) does "
                             f"not hold N = {n} (the scales' columns, {words} packed): it needs {need} tiles; repack "
                             f"the AWQ weight with w4a16_gemv.tile_major(qweight, BLOCK_N)")
        if not qweight.is_contiguous():
            raise ValueError(f"W4A16: a tile-major qweight must be contiguous (strides {qweight.stride()}, shape "
                             f"{tuple(qweight.shape)}); w4a16_gemv.tile_major returns it so, as .contiguous() does")
    else:
        raise ValueError(f"W4A16: qweight must be AutoAWQ's [K, N/8] or tile-major [tiles, K, PN] "
                         f"(w4a16_gemv.tile_major), got shape {tuple(qweight.shape)}")
    if k is not None and qweight.shape[-2] != k:
        raise ValueError(f"W4A16: qweight {tuple(qweight.shape)} has K = {qweight.shape[-2]} rows, but {k_from} K = "
                         f"{k}")


def groups_k(scales: torch.Tensor, group_size: int) -> tuple[int, str]:
    """(K, whose K) as the scales' groups say, for check_qweight."""
    return scales.shape[0] * group_size, f"the scales ({scales.shape[0]} groups of {group_size}) say"


def awq_layout(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """qweight in AutoAWQ's layout [K, N/8]: itself, or a tile-major one (w4a16_gemv.tile_major) untiled (a copy;
    n, the columns, drops the last tile's padding)."""
    check_qweight(qweight, n)
    if qweight.dim() == 2:
        return qweight
    tiles, k, pn = qweight.shape
    return qweight.permute(1, 0, 2).reshape(k, tiles * pn)[:, :-(-n // 8)]


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> W^T [K, N] in dtype (the matmul's right operand). qweight may be tile-major
    (w4a16_gemv.tile_major): untiled first."""
    check_qweight(qweight, scales.shape[1], *groups_k(scales, group_size))
    q = unpack_int4(awq_layout(qweight, scales.shape[1]))
    z = unpack_int4(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((q - z).to(torch.float32) * s).to(dtype)


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """W4A16: x [T, K] @ dequant(W) [K, N]."""
    return x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == torch.float8_e4m3fn:
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Store k, v [T, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at flat slots
    (block * block_size + offset); slot -1 means skip (padding)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        flat = _raw(cache).view(-1, *cache.shape[2:])
        flat[slots] = _raw(quantize_kv(x[valid], scale, cache.dtype))


def qk_norm_rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                          k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float,
                          v_scale: float) -> torch.Tensor:
    """qk_norm_rope of q and k, then write_kv of the new k and v; -> the new q (attention reads K/V from
    the pages)."""
    q, k = qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def _raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as bytes: indexing and index_put are not implemented for float8 on every device."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    out = _raw(cache)[pages]
    return out.view(cache.dtype) if cache.dtype == torch.float8_e4m3fn else out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, k_scale: float,
                    v_scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its whole context in the paged cache.
    q [T, H, D]; sequence b owns q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], its context (cached + new
    tokens, already written) has context_lens[b] tokens, the new ones being its last. -> [T, H, D]."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    hk = k_cache.shape[2]
    for b in range(context_lens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n_q, ctx = end - start, int(context_lens[b])
        if n_q == 0:
            continue
        n_blocks = (ctx + block_size - 1) // block_size
        pages = block_tables[b, :n_blocks]
        k = dequantize_kv(_gather_pages(k_cache, pages).reshape(-1, hk, k_cache.shape[-1])[:ctx], k_scale,
                          torch.float32)
        v = dequantize_kv(_gather_pages(v_cache, pages).reshape(-1, hk, v_cache.shape[-1])[:ctx], v_scale,
                          torch.float32)
        qb = q[start:end].float().transpose(0, 1)  # [H, n_q, D]
        groups = q.shape[1] // hk
        k = k.transpose(0, 1).repeat_interleave(groups, dim=0)  # [H, ctx, D]
        v = v.transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = (qb @ k.transpose(1, 2)) * scale  # [H, n_q, ctx]
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out
