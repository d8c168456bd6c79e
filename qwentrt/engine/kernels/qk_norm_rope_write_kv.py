"""q/k RMSNorm + RoPE + the KV-cache write of one decoder layer's attention input, in one launch.

What it computes is `reference.qk_norm_rope_write_kv`, rounded as it is: `qk_norm_rope` (rope.py) of q and
k, then `write_kv` (kv_write.py) of the normed, roped k (rounded to its dtype first, as the composition
does) and of v. Only q comes back: attention (decode and prefill) reads K and V from the pages.
  q [T, H, D], k, v [T, Hk, D]     any token and head strides (views of the fused qkv output), D contiguous
  weights [D]; positions [T] int; cos_sin [max_pos, D] float32 (cos | sin)
  k/v_cache [num_blocks, block_size, Hk, D]  float8_e4m3fn (quantized with k/v_scale) or a float dtype
  slot_mapping [T] int             flat slot page * block_size + offset; < 0: skip (CUDA-graph padding)
  -> q_out [T, H, D] new, contiguous, in the promoted dtype of q_weight and q

Grid: (T, cdiv(H, BLOCK_H) + cdiv(Hk, BLOCK_H)). Along axis 1 the first programs take BLOCK_H heads of q
each (norm + RoPE -> q_out); the others take BLOCK_H KV heads: norm + RoPE of k and a copy of v, both
stored straight into the caches (nothing when the token's slot is < 0). Replaces two launches
(qk_norm_rope, write_kv) and the k round trip through memory. Slots and positions are read on the
device, launch parameters depend on shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from qwentrt.engine.kernels import pdl
from qwentrt.quant.kv import FP8_E4M3_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ops.py composes the references
    triton = None

HAS_TRITON = triton is not None


if HAS_TRITON:
    from qwentrt.engine.kernels.kv_write import store_heads, to_cache
    from qwentrt.engine.kernels.rope import load_cos_sin, norm_rope

    @triton.jit
    def _qk_norm_rope_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, q_weight_ptr, k_weight_ptr, q_out_ptr, positions_ptr, cos_sin_ptr,
        k_cache_ptr, v_cache_ptr, slot_mapping_ptr, eps, k_scale, v_scale,
        num_heads, num_kv_heads, head_dim, q_blocks,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh, stride_cs,
        stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr = False,
        X_SUMS: tl.constexpr = False,
    ):
        pdl.start(PDL)
        t = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        out_ty = q_out_ptr.dtype.element_ty  # k's normed dtype too (the wrapper checks)
        offs_half = tl.arange(0, BLOCK_HALF)
        if block < q_blocks:
            pos = tl.load(positions_ptr + t).to(tl.int64)
            cos, sin = load_cos_sin(cos_sin_ptr, pos, stride_cs, HALF, BLOCK_HALF)
            heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
            o1, o2, mask = norm_rope(q_ptr + t * stride_qt, q_weight_ptr, heads, num_heads, stride_qh, cos, sin,
                                     eps, out_ty, HALF, BLOCK_HALF, X_SUMS)
            dst = q_out_ptr + t * stride_qot + heads[:, None] * stride_qoh + offs_half[None, :]
            tl.store(dst, o1, mask=mask)
            tl.store(dst + HALF, o2, mask=mask)
        else:
            slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
            heads = (block - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            offs_d = tl.arange(0, BLOCK_D)
            mask_v = (heads < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
            v_src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :]
            if slot >= 0:  # else: a padding token, nothing to store
                page = slot // BLOCK_SIZE
                offset = slot % BLOCK_SIZE
                pos = tl.load(positions_ptr + t).to(tl.int64)
                cos, sin = load_cos_sin(cos_sin_ptr, pos, stride_cs, HALF, BLOCK_HALF)
                k1, k2, mask = norm_rope(k_ptr + t * stride_kt, k_weight_ptr, heads, num_kv_heads, stride_kh, cos,
                                         sin, eps, out_ty, HALF, BLOCK_HALF, X_SUMS)
                dst = k_cache_ptr + page * stride_kcb + offset * stride_kco + heads[:, None] * stride_kch
                cache_ty = k_cache_ptr.dtype.element_ty
                tl.store(dst + offs_half[None, :], to_cache(k1, k_scale, cache_ty, FP8, FP8_MAX), mask=mask)
                tl.store(dst + HALF + offs_half[None, :], to_cache(k2, k_scale, cache_ty, FP8, FP8_MAX), mask=mask)
                if X_SUMS:  # v as the GEMV would have stored it; its sums cleared (as norm_rope clears k's)
                    v = tl.load(v_src, mask=mask_v, other=0.0).to(out_ty)
                    tl.store(v_src, tl.zeros([BLOCK_H, BLOCK_D], tl.float32), mask=mask_v)
                    v_dst = (v_cache_ptr + page * stride_vcb + offset * stride_vco + heads[:, None] * stride_vch
                             + offs_d[None, :])
                    tl.store(v_dst, to_cache(v, v_scale, v_cache_ptr.dtype.element_ty, FP8, FP8_MAX), mask=mask_v)
                else:
                    store_heads(v_ptr, v_cache_ptr, t, page, offset, heads, offs_d, mask_v, v_scale,
                                stride_vt, stride_vh, stride_vcb, stride_vco, stride_vch, FP8, FP8_MAX)
            elif X_SUMS:  # a padding token's k and v sums are cleared all the same
                offs_k = tl.arange(0, BLOCK_HALF)
                mask_k = (heads < num_kv_heads)[:, None] & (offs_k < HALF)[None, :]
                k_src = k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_k[None, :]
                tl.store(k_src, tl.zeros([BLOCK_H, BLOCK_HALF], tl.float32), mask=mask_k)
                tl.store(k_src + HALF, tl.zeros([BLOCK_H, BLOCK_HALF], tl.float32), mask=mask_k)
                tl.store(v_src, tl.zeros([BLOCK_H, BLOCK_D], tl.float32), mask=mask_v)


def qk_norm_rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                          k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float,
                          v_scale: float, sums_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`reference.qk_norm_rope_write_kv` with the Triton kernel (see the module doc): the new q; the caches
    are written in place. sums_dtype: q, k, v are views of a GEMV's float32 split-K sums (w4a16_gemv.SplitKSums)
    that it would have stored in this dtype: read as that, and cleared."""
    if not HAS_TRITON:
        raise RuntimeError("qk_norm_rope_write_kv's Triton kernel needs the triton package")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    block_size = k_cache.shape[1]
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim) and head_dim % 2 == 0
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,) and positions.shape == (num_tokens,)
    assert slot_mapping.shape == (num_tokens,) and cos_sin.shape[1] == head_dim
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if sums_dtype is not None:
        assert q.dtype == k.dtype == v.dtype == torch.float32, "split-K sums are float32"
        assert torch.promote_types(q_weight.dtype, sums_dtype) == sums_dtype, "sums are rounded to the output dtype"
    in_dtype = q.dtype if sums_dtype is None else sums_dtype
    out_dtype = torch.promote_types(q_weight.dtype, in_dtype)
    assert torch.promote_types(k_weight.dtype, in_dtype) == out_dtype, "q and k are normed to one dtype"
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    q_weight, k_weight, cos_sin = q_weight.contiguous(), k_weight.contiguous(), cos_sin.contiguous()
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 512 // block_half))
    q_blocks = triton.cdiv(num_heads, block_h)
    grid = (num_tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))
    _qk_norm_rope_write_kv_kernel[grid](
        q, k, v, q_weight, k_weight, q_out, positions, cos_sin,
        k_cache, v_cache, slot_mapping, float(eps), float(k_scale), float(v_scale),
        num_heads, num_kv_heads, head_dim, q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK_HALF=block_half, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_H=block_h,
        BLOCK_SIZE=block_size, FP8=fp8, FP8_MAX=float(FP8_E4M3_MAX), X_SUMS=sums_dtype is not None, num_warps=4,
        **pdl.launch_kwargs(q.device),
    )
    return q_out
