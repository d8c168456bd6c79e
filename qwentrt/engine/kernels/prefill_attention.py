"""Prefill / extend attention over the paged KV cache: the query tokens of one sequence (a whole prompt,
or a chunk of it after cached prefix pages) attend causally to the sequence's whole context.

The context's pages are gathered into a dense [ctx, Hk, D] tensor (FP8 dequantized to the compute
dtype), and torch's scaled_dot_product_attention does the rest (FlashAttention / memory-efficient
kernels on CUDA, the math kernel on the CPU). The causal mask is aligned to the bottom right: query i of
n_q sits at context position ctx - n_q + i. Sequences are given by host integers (from the runner's
host-side batch), so nothing here reads device values on the host.

What it must compute is `reference.paged_attention` restricted to these sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from qwentrt.engine.kernels.reference import dequantize_kv


def _gather_context(cache: torch.Tensor, pages: torch.Tensor, ctx: int, scale: float, dtype: torch.dtype
                    ) -> torch.Tensor:
    """[ctx, Hk, D] in dtype: the first ctx tokens held by `pages`."""
    raw = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
    dense = raw[pages].flatten(0, 1)[:ctx]
    if cache.dtype == torch.float8_e4m3fn:
        dense = dense.view(torch.float8_e4m3fn)
    return dequantize_kv(dense, scale, dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      spans: list[tuple[int, int, int, int]], scale: float, k_scale: float, v_scale: float,
                      out: torch.Tensor) -> None:
    """q [T, H, D]; spans: (row of block_tables, first query token, end query token, context length) per
    sequence. Writes out[first:end] for each span."""
    block_size = k_cache.shape[1]
    groups = q.shape[1] // k_cache.shape[2]
    for row, start, end, ctx in spans:
        n_q = end - start
        pages = block_tables[row, :(ctx + block_size - 1) // block_size]
        k = _gather_context(k_cache, pages, ctx, k_scale, q.dtype).transpose(0, 1)  # [Hk, ctx, D]
        v = _gather_context(v_cache, pages, ctx, v_scale, q.dtype).transpose(0, 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=0)
            v = v.repeat_interleave(groups, dim=0)
        qb = q[start:end].transpose(0, 1)  # [H, n_q, D]
        if n_q == ctx:
            o = F.scaled_dot_product_attention(qb[None], k[None], v[None], is_causal=True, scale=scale)
        else:
            mask = causal_lower_right(n_q, ctx)
            o = F.scaled_dot_product_attention(qb[None], k[None], v[None], attn_mask=mask, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
