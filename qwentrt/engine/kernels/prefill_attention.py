"""Prefill / extend attention over the paged KV cache: the query tokens of each prefill sequence of a step
(a whole prompt, or a chunk of it after cached prefix pages) attend causally to that sequence's whole
context, for all of the step's prefill sequences in one call.

The contexts of all the sequences are gathered from the pages in one indexing op per cache (a flat slot per
context token, built on the host once per step: PrefillBatch), FP8 converted to the compute dtype (exact:
the K scale is folded into the softmax scale, the V scale applied to the gathered values), and then:
- on CUDA in bf16 / fp16, where torch has it: one FlashAttention varlen call for every sequence
  (torch.nn.attention.varlen.varlen_attn, cu_seq_q / cu_seq_k; GQA natively, no K/V repeat), made as the aten
  op it wraps where that probes right (less host time a call);
- otherwise (the CPU, fp32, an older torch): scaled_dot_product_attention per sequence with enable_gqa.
The causal mask is aligned to the bottom right: query i of n_q sits at context position ctx - n_q + i
(FlashAttention's causal convention when n_q < ctx). Everything the host needs (spans, maxima) is host
integers, so nothing here reads device values on the host (no stream sync).

What it must compute is `reference.paged_attention` restricted to these sequences.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:  # torch >= 2.10 (its signature changed in 2.11 and 2.12: see _varlen_kwargs)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # an older torch: SDPA per sequence
    _varlen_attn = None


@dataclass
class PrefillBatch:
    """The prefill sequences of a step (those after the decodes in the flat batch), for `prefill_attention`.
    Host integers: `spans` = (first query token, end query token, first context row, end context row) per
    sequence (query tokens index the flat batch, context rows the gathered context), `max_q` / `max_k` the
    longest query and context. Device tensors: `kv_slots` [sum ctx] long, the flat cache slot (page *
    block_size + offset) of every context token, sequence after sequence; `cu_seq_q` / `cu_seq_k` [n + 1]
    int32, cumulative query tokens (from spans[0][0]) and context tokens."""
    spans: list[tuple[int, int, int, int]]
    kv_slots: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int

    @property
    def q_start(self) -> int:
        return self.spans[0][0]

    @property
    def q_end(self) -> int:
        return self.spans[-1][1]


@dataclass
class PrefillLayout:
    """A PrefillBatch's host side (numpy int64), as `prefill_layout` computes it; the runner uploads its arrays
    with the step's other inputs. positions / slots: those of the prefill's query tokens (in flat-batch order)."""
    spans: list[tuple[int, int, int, int]]
    positions: np.ndarray
    slots: np.ndarray
    kv_slots: np.ndarray
    cu_seq_q: np.ndarray
    cu_seq_k: np.ndarray
    max_q: int
    max_k: int

    def to(self, device: torch.device) -> PrefillBatch:
        """A PrefillBatch with its own upload (the runner shares one upload with the step's other inputs)."""
        cu = torch.from_numpy(np.concatenate([self.cu_seq_q, self.cu_seq_k])).to(device=device, dtype=torch.int32)
        n = len(self.cu_seq_q)
        return PrefillBatch(self.spans, torch.from_numpy(self.kv_slots).to(device), cu[:n], cu[n:], self.max_q,
                            self.max_k)


def prefill_layout(tables: np.ndarray, q_bounds: list[int], context_lens: list[int], block_size: int
                   ) -> PrefillLayout:
    """Host layout of prefill sequences: tables [n, >= pages] integer block tables (rows past a sequence's
    pages are ignored), q_bounds [n + 1] their query tokens' offsets in the flat batch, context_lens [n]
    (cached + this step's tokens: the new ones are each sequence's last). Vectorized per sequence (numpy)."""
    n = len(context_lens)
    offs = np.arange(block_size, dtype=np.int64)
    kv, spans = [], []
    k0 = 0
    for i in range(n):
        ctx = context_lens[i]
        n_q = q_bounds[i + 1] - q_bounds[i]
        if not 0 < n_q <= ctx:
            raise ValueError(f"prefill sequence {i}: {n_q} query tokens for a context of {ctx} (need 0 < n_q <= ctx)")
        pages = tables[i, :-(-ctx // block_size)].astype(np.int64)
        kv.append((pages[:, None] * block_size + offs).ravel()[:ctx])
        spans.append((q_bounds[i], q_bounds[i + 1], k0, k0 + ctx))
        k0 += ctx
    kv_slots = np.concatenate(kv)
    # the query tokens are each context's last n_q: their positions and slots come from the same rows
    take = np.concatenate([np.arange(k1 - (q1 - q0), k1) for q0, q1, _, k1 in spans])
    starts = np.repeat(np.asarray([k0 for _, _, k0, _ in spans], dtype=np.int64),
                       [q1 - q0 for q0, q1, _, _ in spans])
    cu_q = np.asarray(q_bounds, dtype=np.int64) - q_bounds[0]
    cu_k = np.zeros(n + 1, dtype=np.int64)
    cu_k[1:] = np.cumsum(context_lens)
    return PrefillLayout(spans, take - starts, kv_slots[take], kv_slots, cu_q, cu_k, int(np.diff(cu_q).max()),
                         int(max(context_lens)))


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """[len(slots), Hk, D] in dtype: the cache rows at the flat slots; FP8 times `scale` (None: unscaled)."""
    fp8 = cache.dtype == torch.float8_e4m3fn
    flat = (cache.view(torch.uint8) if fp8 else cache).flatten(0, 1)  # (indexing float8 is not on every device)
    rows = flat.index_select(0, slots)
    if not fp8:
        return rows.to(dtype)
    rows = rows.view(torch.float8_e4m3fn).to(dtype)  # exact: every e4m3 value is a bf16 / fp16 / fp32 value
    return rows if scale is None else rows.mul_(scale)  # one rounding, as reference.dequantize_kv


def _varlen_kwargs(fn) -> tuple[dict | None, bool]:
    """The causal / GQA keywords of the installed varlen_attn (torch 2.10: is_causal, no scale; later:
    window_size and scale; 2.12+: also enable_gqa; without it GQA is left to the kernel, which the probe
    checks), None without one; and whether it takes a softmax scale."""
    if fn is None:
        return None, False
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kw = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kw = {"is_causal": True}
    else:
        return None, False
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw, "scale" in params


_VARLEN_KW, _VARLEN_SCALE = _varlen_kwargs(_varlen_attn)
VARLEN_DTYPES = (torch.bfloat16, torch.float16)


def _flash_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor,
                  max_q: int, max_k: int, scale: float | None = None) -> torch.Tensor:
    """The FlashAttention varlen forward that varlen_attn wraps, called as an aten op: varlen_attn is a custom op
    with an autograd wrapper and allocates an RNG state per call (~0.1 ms of host time a call on the H100's
    host, 3-4 ms of a 36-layer prefill). Causal (bottom right), GQA natively, no dropout."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


def _probe(fn, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
           kwargs: dict) -> None:
    """Raise unless fn (a varlen call) matches SDPA with GQA and a bottom-right causal mask on a small random
    case (a whole prompt, then a chunk after a cached prefix)."""
    g = torch.Generator(device=device).manual_seed(0)
    lens_q, lens_k = [5, 17], [5, 40]
    q = torch.randn(sum(lens_q), num_heads, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(sum(lens_k), num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(sum(lens_k), num_kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    cu_q, cu_k = [0, 5, 22], [0, 5, 45]
    out = fn(q, k, v, torch.tensor(cu_q, device=device, dtype=torch.int32),
             torch.tensor(cu_k, device=device, dtype=torch.int32), 17, 40, **kwargs)
    err = 0.0
    for i in range(2):
        qb = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None].float()
        kb = k[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None].float()
        vb = v[cu_k[i]:cu_k[i + 1]].transpose(0, 1)[None].float()
        ref = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(lens_q[i], lens_k[i]),
                                             enable_gqa=True)[0].transpose(0, 1)
        err = max(err, float((out[cu_q[i]:cu_q[i + 1]].float() - ref).abs().max()))
    if err > 5e-2:
        raise RuntimeError(f"its output differs from SDPA's by {err:.3g} (max abs) on a random case")


@functools.lru_cache(maxsize=None)
def varlen_available(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
                     ) -> bool:
    """Can this device run varlen_attn for these shapes, with GQA and a bottom-right causal mask? Probed once
    per shape (a small random case against SDPA: this reads the device once, at the first prefill or when
    the runner starts); False (with a warning that says why) sends prefills to SDPA per sequence."""
    if _VARLEN_KW is None or device.type != "cuda" or dtype not in VARLEN_DTYPES:
        return False
    try:
        _probe(_varlen_attn, device, dtype, num_heads, num_kv_heads, head_dim, _VARLEN_KW)
        return True
    except Exception as e:  # no kernel for this GPU / dtype / head_dim, GQA refused, another mask convention
        warnings.warn(f"prefill attention: torch's varlen_attn is not used on {device} ({type(e).__name__}: "
                      f"{e}); SDPA runs per sequence instead (slower prefill, same results)", stacklevel=2)
        return False


@functools.lru_cache(maxsize=None)
def flash_direct_available(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                           head_dim: int) -> bool:
    """Where varlen_attn runs: can its FlashAttention op be called directly (`_flash_direct`)? Probed once per
    shape like varlen_available; False (a torch without the op, another signature, a cuDNN-only device) keeps
    the public varlen_attn, silently: the results are the same."""
    if not USE_FLASH_DIRECT or device.type != "cuda" or dtype not in VARLEN_DTYPES:
        return False
    try:
        _probe(_flash_direct, device, dtype, num_heads, num_kv_heads, head_dim, {})
        return True
    except Exception:  # noqa: BLE001 (any failure: the public call stays)
        return False


USE_FLASH_DIRECT = os.environ.get("QWENTRT_FLASH_DIRECT", "1") != "0"  # 0: always the public varlen_attn (A/B)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PrefillBatch,
                      scale: float, k_scale: float, v_scale: float) -> torch.Tensor:
    """q [T, H, D] (the prefill sequences' tokens are rows batch.q_start:batch.q_end); caches [num_blocks,
    block_size, Hk, D], FP8 (value = stored * scale) or q's dtype (scales ignored). -> [q_end - q_start, H,
    D] in q's dtype: attention of those rows."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    num_heads, head_dim = q.shape[1], q.shape[2]
    varlen = varlen_available(q.device, q.dtype, num_heads, k_cache.shape[2], head_dim) and (
        _VARLEN_SCALE or scale == head_dim ** -0.5)  # (torch 2.10's takes no scale: its default must do)
    fold = fp8 and (_VARLEN_SCALE or not varlen)  # K's FP8 scale folded into the softmax scale
    sm_scale = scale * k_scale if fold else scale
    k = _gather(k_cache, batch.kv_slots, q.dtype, None if fold else k_scale)
    v = _gather(v_cache, batch.kv_slots, q.dtype, v_scale)
    qp = q[batch.q_start:batch.q_end]
    if varlen:
        if flash_direct_available(q.device, q.dtype, num_heads, k_cache.shape[2], head_dim):
            return _flash_direct(qp, k, v, batch.cu_seq_q, batch.cu_seq_k, batch.max_q, batch.max_k, scale=sm_scale)
        kw = dict(_VARLEN_KW, scale=sm_scale) if _VARLEN_SCALE else _VARLEN_KW
        return _varlen_attn(qp, k, v, batch.cu_seq_q, batch.cu_seq_k, batch.max_q, batch.max_k, **kw)
    if len(batch.spans) == 1 and batch.spans[0][1] - batch.spans[0][0] == batch.max_k:  # one whole prompt
        return _sdpa(qp, k, v, sm_scale)
    out = torch.empty_like(qp)
    base = batch.q_start
    for q0, q1, k0, k1 in batch.spans:
        out[q0 - base:q1 - base] = _sdpa(q[q0:q1], k[k0:k1], v[k0:k1], sm_scale)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [n_q, H, D], k/v [ctx, Hk, D] -> [n_q, H, D], causal aligned to the bottom right."""
    n_q, ctx = q.shape[0], k.shape[0]
    qb, kb, vb = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[1]
    if n_q == ctx:
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(n_q, ctx), scale=scale,
                                           enable_gqa=gqa)
    return o[0].transpose(0, 1)
