"""write_kv: store this step's keys and values into the paged KV caches (vLLM's reshape_and_cache).

What it computes is `reference.write_kv`:
  k, v          [T, Hk, D]                          any float dtype; any token/head strides, D contiguous
                                                    (v arrives as a view of the fused qkv output)
  k/v_cache     [num_blocks, block_size, Hk, D]     float8_e4m3fn, or a float dtype
  slot_mapping  [T] int                             flat slot page * block_size + offset; < 0: skip (padding)
cache[slot // block_size, slot % block_size, h, :] = quantize(x[t, h, :]), where quantize is
fp8(clamp(x / scale, -448, 448)) (round to nearest even, as torch) for an FP8 cache and a plain cast
otherwise (the scales are then ignored, as in the reference).

Grid: (T, cdiv(Hk, BLOCK_H)); a program stores BLOCK_H heads of one token, for k and for v. The slot is
read on the device and a padding token's program returns: no host sync and no data-dependent shape,
so the launch can be captured in a CUDA graph. FP8 caches are written as bytes through uint8 views.
The device helpers `to_cache` and `store_heads` are shared with qk_norm_rope_write_kv.py.
"""

from __future__ import annotations

import torch

from qwentrt.quant.kv import FP8_E4M3_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ops.py dispatches to the reference
    triton = None

HAS_TRITON = triton is not None


if HAS_TRITON:

    @triton.jit
    def to_cache(x, scale, CACHE_TY: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        """x as the cache stores it: FP8 bytes of clamp(x / scale) (uint8: the cache's view), or a cast."""
        if FP8:
            # div_rn: the correctly rounded quotient, as torch's `x.float() / scale` (plain `/` is approximate)
            y = tl.math.div_rn(x.to(tl.float32), scale)
            y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
            return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            return x.to(CACHE_TY)

    @triton.jit
    def store_heads(x_ptr, cache_ptr, t, page, offset, heads, offs_d, mask, scale,
                    stride_xt, stride_xh, stride_cb, stride_co, stride_ch,
                    FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        x = tl.load(x_ptr + t * stride_xt + heads[:, None] * stride_xh + offs_d[None, :], mask=mask)
        dst = cache_ptr + page * stride_cb + offset * stride_co + heads[:, None] * stride_ch + offs_d[None, :]
        tl.store(dst, to_cache(x, scale, cache_ptr.dtype.element_ty, FP8, FP8_MAX), mask=mask)

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale, v_scale,
                         num_kv_heads, head_dim,
                         stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                         BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot < 0:  # padding token
            return
        page = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        t = t.to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (heads < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
        store_heads(k_ptr, k_cache_ptr, t, page, offset, heads, offs_d, mask, k_scale,
                     stride_kt, stride_kh, stride_kcb, stride_kco, stride_kch, FP8, FP8_MAX)
        store_heads(v_ptr, v_cache_ptr, t, page, offset, heads, offs_d, mask, v_scale,
                     stride_vt, stride_vh, stride_vcb, stride_vco, stride_vch, FP8, FP8_MAX)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """`reference.write_kv` with the Triton kernel (see the module doc); writes the caches in place."""
    if not HAS_TRITON:
        raise RuntimeError("write_kv's Triton kernel needs the triton package")
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = k_cache.shape[1]
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale),
                           num_kv_heads, head_dim,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                           BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8,
                           FP8_MAX=float(FP8_E4M3_MAX), num_warps=4)
