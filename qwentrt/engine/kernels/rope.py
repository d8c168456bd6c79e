"""Qwen3's per-head q/k RMSNorm followed by rotary embeddings, both tensors in one launch.

What it computes is `reference.qk_norm_rope`, rounded as it is. For each token t and head h of q (and
the same for k with k's weight):
  y      = weight * round(x * rsqrt(mean(x^2) + eps))     x = q[t, h, :], rounded to q's dtype, then the
                                                          product in the promoted dtype of weight and q
  out    = rotate-half RoPE of y at positions[t]          (y1, y2 = halves of y; c, s = cos_sin[pos])
           [y1 * c - y2 * s, y2 * c + y1 * s]             in float32, rounded to y's dtype
Layout: q [T, H, D], k [T, Hk, D] with any token and head strides (views of the fused qkv output:
row stride q_size + 2 * kv_size), D contiguous; weights [D]; positions [T] int; cos_sin [max_pos, D]
float32 (cos in the first half, sin in the second). Outputs are new contiguous [T, H, D], [T, Hk, D].

Grid: (T, cdiv(H, BLOCK_H) + cdiv(Hk, BLOCK_H)); a program takes BLOCK_H heads of one token, of q for
the first cdiv(H, BLOCK_H) programs along axis 1 and of k for the rest, each head as its two halves
[BLOCK_H, D/2] (so the rotation pairs registers, no shuffles). Math in float32; the position is read on
the device, launch parameters depend on shapes only (CUDA-graph safe). The device helpers `load_cos_sin`
and `norm_rope` are shared with qk_norm_rope_write_kv.py.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ops.py dispatches to the reference
    triton = None

HAS_TRITON = triton is not None


if HAS_TRITON:

    @triton.jit
    def load_cos_sin(cos_sin_ptr, pos, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """cos, sin [1, BLOCK_HALF] float32 of one position (zeros past HALF)."""
        offs = tl.arange(0, BLOCK_HALF)
        mask_d = offs < HALF
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        return cos, sin

    @triton.jit
    def norm_rope(x_ptr, w_ptr, heads, num_heads, stride_h, cos, sin, eps, OUT_TY: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, X_SUMS: tl.constexpr = False):
        """RMSNorm + RoPE of the heads `heads` [BLOCK_H] of one token (x_ptr at the token), rounded as the
        reference: -> (first halves, second halves) [BLOCK_H, BLOCK_HALF] in OUT_TY, and their mask.
        X_SUMS: x is a GEMV's float32 split-K sums (w4a16_gemv.SplitKSums): rounded to OUT_TY as the GEMV would
        have stored them, and zeros stored back (same layout as the loads: each thread clears what it read)."""
        offs = tl.arange(0, BLOCK_HALF)
        mask_d = offs < HALF
        mask = (heads < num_heads)[:, None] & mask_d[None, :]
        src = x_ptr + heads[:, None] * stride_h + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        if X_SUMS:
            x1 = x1.to(OUT_TY)
            x2 = x2.to(OUT_TY)
            tl.store(src, tl.zeros([heads.shape[0], BLOCK_HALF], tl.float32), mask=mask)
            tl.store(src + HALF, tl.zeros([heads.shape[0], BLOCK_HALF], tl.float32), mask=mask)
            in_ty = OUT_TY
        else:
            in_ty = x_ptr.dtype.element_ty
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        # rms_norm as the reference rounds it: normalized -> x's dtype, times the weight -> the output dtype
        y1 = ((x1 * rstd).to(in_ty).to(tl.float32) * w1).to(OUT_TY).to(tl.float32)
        y2 = ((x2 * rstd).to(in_ty).to(tl.float32) * w2).to(OUT_TY).to(tl.float32)
        return (y1 * cos - y2 * sin).to(OUT_TY), (y2 * cos + y1 * sin).to(OUT_TY), mask

    @triton.jit
    def _norm_rope_heads(x_ptr, w_ptr, out_ptr, head0, num_heads, stride_h, stride_oh, cos, sin, eps,
                         HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """RMSNorm + RoPE of heads head0 .. head0 + BLOCK_H of one token (x_ptr, out_ptr at the token)."""
        heads = head0 + tl.arange(0, BLOCK_H)
        o1, o2, mask = norm_rope(x_ptr, w_ptr, heads, num_heads, stride_h, cos, sin, eps,
                                 out_ptr.dtype.element_ty, HALF, BLOCK_HALF)
        dst = out_ptr + heads[:, None] * stride_oh + tl.arange(0, BLOCK_HALF)[None, :]
        tl.store(dst, o1, mask=mask)
        tl.store(dst + HALF, o2, mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, q_out_ptr, k_out_ptr, positions_ptr,
                             cos_sin_ptr, eps, num_heads, num_kv_heads, q_blocks,
                             stride_qt, stride_qh, stride_kt, stride_kh,
                             stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        pos = tl.load(positions_ptr + t).to(tl.int64)
        cos, sin = load_cos_sin(cos_sin_ptr, pos, stride_cs, HALF, BLOCK_HALF)
        if block < q_blocks:
            _norm_rope_heads(q_ptr + t * stride_qt, q_weight_ptr, q_out_ptr + t * stride_qot, block * BLOCK_H,
                             num_heads, stride_qh, stride_qoh, cos, sin, eps, HALF, BLOCK_HALF, BLOCK_H)
        else:
            _norm_rope_heads(k_ptr + t * stride_kt, k_weight_ptr, k_out_ptr + t * stride_kot,
                             (block - q_blocks) * BLOCK_H, num_kv_heads, stride_kh, stride_koh, cos, sin, eps,
                             HALF, BLOCK_HALF, BLOCK_H)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.qk_norm_rope` with the Triton kernel (see the module doc): new (q, k)."""
    if not HAS_TRITON:
        raise RuntimeError("qk_norm_rope's Triton kernel needs the triton package")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and head_dim % 2 == 0
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,) and positions.shape == (num_tokens,)
    assert cos_sin.shape[1] == head_dim
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_weight, k_weight, cos_sin = q_weight.contiguous(), k_weight.contiguous(), cos_sin.contiguous()
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q_weight.dtype, q.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k_weight.dtype, k.dtype), device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 512 // block_half))
    q_blocks = triton.cdiv(num_heads, block_h)
    grid = (num_tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))
    _qk_norm_rope_kernel[grid](q, k, q_weight, k_weight, q_out, k_out, positions, cos_sin, float(eps),
                               num_heads, num_kv_heads, q_blocks,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                               q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
                               HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, num_warps=4)
    return q_out, k_out
