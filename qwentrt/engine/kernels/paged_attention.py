"""Paged attention for decode steps: an OpenAI-Triton split-KV ("flash-decoding") kernel.

What it computes is `reference.paged_attention` for the case where every sequence of the batch has
exactly one new query token (T == B, cu_seqlens_q == arange(B + 1)): the token attends to the whole
context of its sequence, the new token itself being the context's last (already written to the cache).

Layout (vLLM's conventions, as the reference):
  q             [B, H, D]                             bf16 / fp16 / fp32 (one token per sequence)
  k/v_cache     [num_blocks, block_size, Hk, D]       float8_e4m3fn (value = fp8 * k/v_scale) or q's
                                                      dtype (scales ignored)
  block_tables  [B, max_pages] int32                  page ids of each sequence, in context order
  context_lens  [B]                                   tokens of context per sequence (0 gives zeros)
  out           [B, H, D]                             q's dtype
GQA: query head h reads KV head h // groups, groups = H // Hk.

Algorithm. The context of a sequence is cut into partitions of `partition_size` tokens. One launch, one
program per (sequence, KV head, partition): it loads the `groups` query heads that share that KV head as
a [GROUPS_PAD, D] tile (padded to 16 rows so that tl.dot can use tensor cores; the padding rows are zero
and never stored), then walks its partition TILE_N tokens at a time (a tile spans one or several pages,
or part of one: each token's page id is read from block_tables, its row in the page is
token % block_size). The K and V tiles [TILE_N, D] are loaded once for the whole group (FP8 is loaded
as bytes and bit-cast to float8e4nv in registers), scores = q @ K^T, and an online softmax in fp32 keeps
a running max m, a running sum l and an unnormalized accumulator acc = sum_t exp(s_t - m) v_t.
The k_scale of FP8 keys is folded into the softmax scale and the v_scale applied once at the end;
fp8 -> bf16/fp16 is exact, so the tensor-core dots see the exact cached values.
FP8 caches with a bf16 q compute in fp16 (`compute_f16`; QWENTRT_ATTN_F16=0 turns it off): e4m3 -> fp16
is one conversion instruction per pair (cvt.rn.f16x2.e4m3x2) where e4m3 -> bf16 takes several, and that
conversion, not memory, bounded the kernel at large batches (H100, 512 sequences of 1-2k tokens: 1.82 ->
2.47 TB/s; docs/KERNEL_NOTES.md). q is clamped to fp16's range (a no-op for real queries), and p in [0, 1]
keeps more mantissa in fp16 than in bf16, so the result is at least as exact.
When the sequence's context fits in one partition (always, when the block table's width does) the
program writes out = acc / l directly. Otherwise each partition holding tokens writes its partial
(m, l, acc), then counts itself in with an atomic add (acq_rel, after a barrier: its partials are visible
before its count) on a counter per (sequence, KV head); the one that arrives last combines the partials
of the sequence's live partitions for its `groups` heads, M = max_p m_p,
out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, and sets the counter back to zero. So a decode
step's attention is one launch per layer (no reduce kernel): the counters persist per device (zero
between launches); the partials need no initialization (only written ones are read) and come from the
caching allocator per call, as any other scratch (under a CUDA graph: the graph's pool).
(Scores are kept in base 2: s * log2(e), so exp2 is used throughout.)
"""

from __future__ import annotations

import functools
import math
import os

import torch

from qwentrt.engine.kernels import pdl, reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the dispatcher falls back to the reference.
    triton = None

HAS_TRITON = triton is not None

_LOG2E = 1.4426950408889634
_MIN_DOT_ROWS = 16  # tl.dot needs M >= 16: the query heads of a group are padded to this many rows
TILE_BYTES = 16384  # default tile: 16 KiB of K (and of V) per loop step
# FP8 caches: dots in fp16 (see the module doc; H100, 512 sequences: 861 -> 633 us per layer, KERNEL_NOTES session 6).
# QWENTRT_ATTN_F16=0 keeps the bf16 dots.
ATTN_F16 = os.environ.get("QWENTRT_ATTN_F16", "1") != "0"
# QWENTRT_ATTN_DYNAMIC=1: launches of fewer (sequence, KV head) pairs than SMs (batch 1 to ~16 on an H100) size
# their partitions from each sequence's context in the kernel, down to one tile of DYNAMIC_TILE_TOKENS (see
# `paged_attention_decode`). Off by default: checked on the H100, but at a 150-token context a layer's decode
# attention went from 6.62 to 6.53 us only (docs/KERNEL_NOTES.md, session 12), so its latency is not the tiles one
# program walks; QWENTRT_ATTN_DYN_TILE sets the tile (labs).
ATTN_DYNAMIC = os.environ.get("QWENTRT_ATTN_DYNAMIC", "0") == "1"
DYNAMIC_TILE_TOKENS = int(os.environ.get("QWENTRT_ATTN_DYN_TILE", "64"))


def auto_partition_size(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split-KV partition for a launch, from shapes only (the same choice under a CUDA graph): no split
    when batch * Hk programs already fill the GPU (>= 12 per SM); else enough partitions for ~8 programs
    per SM if every sequence were max_context long, in partitions of 256 to 1024 tokens (small ones
    keep batches of mixed context lengths, where many partitions are empty, busy and balanced)."""
    if batch * num_kv_heads >= 12 * num_sms:
        return max(256, 1 << (max_context - 1).bit_length())  # one partition
    want_partitions = -(-8 * num_sms // (batch * num_kv_heads))
    size = 1 << max(0, -(-max_context // want_partitions) - 1).bit_length()  # next power of two
    return min(max(size, 256), 1024)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def _default_num_stages(device: torch.device) -> int:
    """3 on Hopper (measured best there); 2 elsewhere: 3 stages of 128-token FP8 K and V tiles take 96 KiB
    of shared memory, at the limit of an sm_89 block. QWENTRT_ATTN_STAGES overrides (labs: at batch 1 a partition
    is 1-3 tiles, where the pipeline's prologue may cost more than it hides)."""
    if os.environ.get("QWENTRT_ATTN_STAGES"):
        return int(os.environ["QWENTRT_ATTN_STAGES"])
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 3
    return 2


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Scratch allocation (partials); a function of its own so that tests can poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


MAX_COUNTERS = 1 << 16  # (sequence, KV head) pairs of one split-KV launch
_counter_buffers: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """Persistent zeroed int32 arrival counters, one per (sequence, KV head) of a launch; the kernel leaves
    them zero. Made by the first call, which must not be inside a CUDA-graph capture (the capture's warm-up
    call makes them)."""
    if device not in _counter_buffers:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_attention_decode: call it once before capturing a CUDA graph")
        _counter_buffers[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counter_buffers[device]


if HAS_TRITON:

    @triton.jit
    def _store_out(out_ptr, seq, heads, head_ok, offs_d, acc, l_i, v_scale, stride_ob, stride_oh):
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # empty context: acc is 0, out is 0 (as the reference)
        out = acc * (v_scale / l_safe)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

    @triton.jit
    def _reduce_partitions(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, seq, kv_head, n_parts, v_scale,
                           stride_ob, stride_oh, num_heads, num_partitions,
                           GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                           PARTITIONS_PAD: tl.constexpr, CHUNK: tl.constexpr):
        """out of the GROUPS query heads of (seq, kv_head) from the partials of its n_parts partitions:
        M = max_p m_p, out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p. The acc partials are read CHUNK
        partitions at a time as one [GROUPS_P2, CHUNK, D] load (a loop of one load a partition waits for each:
        an L2 round trip per partition). Loads bypass L1 (.cg): the partials were written by other programs."""
        offs_r = tl.arange(0, GROUPS_P2)
        offs_p = tl.arange(0, PARTITIONS_PAD)
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_r < GROUPS
        heads = kv_head * GROUPS + offs_r
        rows = (seq * num_heads + heads) * num_partitions  # partials are [B, H, P(, D)]
        live = row_ok[:, None] & (offs_p < n_parts)[None, :]
        m = tl.load(part_m_ptr + rows[:, None] + offs_p[None, :], mask=live, other=float("-inf"),
                    cache_modifier=".cg")
        l = tl.load(part_l_ptr + rows[:, None] + offs_p[None, :], mask=live, other=0.0, cache_modifier=".cg")
        m_max = tl.where(row_ok, tl.max(m, axis=1), 0.0)  # finite: every live partition holds a token
        denom = tl.sum(tl.where(live, tl.exp2(m - m_max[:, None]), 0.0) * l, axis=1)
        acc = tl.zeros([GROUPS_P2, HEAD_DIM], dtype=tl.float32)
        for p0 in range(0, n_parts, CHUNK):
            parts = p0 + offs_c
            ok = row_ok[:, None] & (parts < n_parts)[None, :]  # [G, C]
            idx = rows[:, None] + parts[None, :]
            m_c = tl.load(part_m_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
            w_c = tl.where(ok, tl.exp2(m_c - m_max[:, None]), 0.0)
            a_c = tl.load(part_acc_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None],
                          other=0.0, cache_modifier=".cg")  # [G, C, D]
            acc += tl.sum(w_c[:, :, None] * a_c, axis=1)
        out = acc * (v_scale / tl.where(row_ok, denom, 1.0))[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, counters_ptr,
        qk_scale, v_scale,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_bt,
        stride_ob, stride_oh,
        num_heads, num_kv_heads, num_partitions,
        GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, GROUPS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
        PARTITIONS_PAD: tl.constexpr, KV_FP8: tl.constexpr, SINGLE_PARTITION: tl.constexpr,
        DOT_PRECISION: tl.constexpr, COMPUTE_F16: tl.constexpr = False, PDL: tl.constexpr = False,
        DYNAMIC: tl.constexpr = False, CHUNK: tl.constexpr = 16,
    ):
        """One (sequence, KV head, partition): online softmax over the partition's pages; the partition of
        the sequence to finish last reduces them all. qk_scale = softmax scale * k_scale * log2(e)."""
        pdl.start(PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)

        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        offs_g = tl.arange(0, GROUPS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, TILE_N)
        head_ok = offs_g < GROUPS
        heads = kv_head * GROUPS + offs_g  # the query heads sharing this KV head

        if DYNAMIC:  # partitions shrink with the context (to one tile), so a short one still spreads over programs
            psize = tl.maximum(tl.cdiv(tl.cdiv(ctx, num_partitions), TILE_N), 1) * TILE_N
        else:
            psize = PARTITION_SIZE
        start = part * psize
        if start >= ctx:  # nothing of this sequence here
            if part == 0:  # an empty context (a padding row): zeros, as the reference
                tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         tl.zeros([GROUPS_PAD, HEAD_DIM], dtype=out_ptr.dtype.element_ty), mask=head_ok[:, None])
            return
        end = tl.minimum(start + psize, ctx)
        n_parts = tl.cdiv(ctx, psize)  # partitions holding tokens: the reduction reads these

        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=head_ok[:, None], other=0.0)  # [GROUPS_PAD, D]
        if COMPUTE_F16:  # the dots in fp16: e4m3 -> fp16 is one cvt per pair (see the module doc)
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

        m_i = tl.full([GROUPS_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUPS_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUPS_PAD, HEAD_DIM], dtype=tl.float32)

        table = block_tables_ptr + seq * stride_bt
        for tile_start in range(start, end, TILE_N):
            tok = tile_start + offs_n  # context positions of this tile
            tok_ok = tok < end  # the last tile may run past the context (or the partition)
            page = tl.load(table + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)  # page of each token
            slot = tok % BLOCK_SIZE
            k_offs = (page * stride_kb + slot * stride_kt)[:, None] + kv_head * stride_kh + offs_d[None, :]
            v_offs = (page * stride_vb + slot * stride_vt)[:, None] + kv_head * stride_vh + offs_d[None, :]
            k = tl.load(k_ptr + k_offs, mask=tok_ok[:, None], other=0)  # [TILE_N, D]
            v = tl.load(v_ptr + v_offs, mask=tok_ok[:, None], other=0)
            if KV_FP8:  # the caches come as uint8 views: reinterpret the bytes as e4m3fn
                k = k.to(tl.float8e4nv, bitcast=True)
                v = v.to(tl.float8e4nv, bitcast=True)
            k = k.to(q.dtype)
            v = v.to(q.dtype)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUPS_PAD, TILE_N]
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds >= 1 valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if SINGLE_PARTITION:
            _store_out(out_ptr, seq, heads, head_ok, offs_d, acc, l_i, v_scale, stride_ob, stride_oh)
        else:
            if n_parts == 1:  # a short context: this program holds all of it
                _store_out(out_ptr, seq, heads, head_ok, offs_d, acc, l_i, v_scale, stride_ob, stride_oh)
            else:
                row = (seq * num_heads + heads) * num_partitions + part
                tl.store(part_m_ptr + row, m_i, mask=head_ok)
                tl.store(part_l_ptr + row, l_i, mask=head_ok)
                tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_ok[:, None])
                tl.debug_barrier()  # every thread's partials are issued before the count goes up
                # acq_rel: this program's partials are visible before its count; the last one sees them all
                counter = counters_ptr + seq * num_kv_heads + kv_head
                done = tl.atomic_add(counter, 1, sem="acq_rel")
                if done == n_parts - 1:
                    _reduce_partitions(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, seq, kv_head, n_parts,
                                       v_scale, stride_ob, stride_oh, num_heads, num_partitions,
                                       GROUPS, GROUPS_P2, HEAD_DIM, PARTITIONS_PAD, CHUNK)
                    tl.store(counter, 0)  # zero again for the next launch


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: float, v_scale: float, partition_size: int | None = 512, *,
                           out: torch.Tensor | None = None, tile_tokens: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None,
                           compute_f16: bool | None = None, dynamic: bool | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence: q [B, H, D] -> [B, H, D] (see the module doc).
    partition_size: tokens per split-KV partition, a multiple of tile_tokens (None: auto_partition_size);
    one partition (no partials) when it covers the block table's width.
    tile_tokens: context tokens per loop step, a power of two >= 16 (default: 16 KiB of K per step, 128
    tokens of FP8 at head_dim 128; less where partition_size needs it).
    num_stages: software-pipelining depth of the loop (default: 3 on Hopper, 2 elsewhere).
    compute_f16: dots in fp16 (default: for FP8 caches with a bf16 q, unless $QWENTRT_ATTN_F16=0).
    dynamic: partition_size is the largest partition, and each sequence's are cdiv(context, partitions) tokens
    rounded up to whole tiles, so a short context is split as finely as a long one (fixed partitions leave a
    384-token context of a batch-1 step in 2 of 128 partitions: 16 programs for 132 SMs, each walking its tiles
    one after the other). Default (with $QWENTRT_ATTN_DYNAMIC=1): when batch * KV heads is below the SM count (and
    not one partition), with tiles of DYNAMIC_TILE_TOKENS unless tile_tokens says otherwise.
    out: optional [B, H, D] buffer to write into."""
    if not HAS_TRITON:
        raise RuntimeError("paged_attention_decode needs triton")
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert context_lens.shape == (batch,) and block_tables.shape[0] == batch, "one query token per sequence"
    assert num_heads % num_kv_heads == 0, "GQA needs H to be a multiple of Hk"
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert head_dim in (64, 128) and k_cache.shape[-1] == head_dim, "head_dim 64 or 128 (the tested ones)"
    assert block_size & (block_size - 1) == 0, "block_size: a power of two"
    max_context = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = auto_partition_size(batch, num_kv_heads, max_context, _num_sms(q.device))
    if dynamic is None:
        dynamic = (ATTN_DYNAMIC and batch * num_kv_heads < _num_sms(q.device)
                   and partition_size < max_context)
    if tile_tokens is None:
        tile_tokens = math.gcd(partition_size, TILE_BYTES // (head_dim * k_cache.element_size()))
        if dynamic:
            tile_tokens = math.gcd(partition_size, DYNAMIC_TILE_TOKENS)
    if num_stages is None:
        num_stages = _default_num_stages(q.device)
    assert tile_tokens >= 16 and tile_tokens & (tile_tokens - 1) == 0, "tile_tokens: a power of two >= 16"
    assert partition_size % tile_tokens == 0, "a partition is a whole number of tiles"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1

    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if kv_fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    else:  # unquantized caches hold the values themselves: the reference ignores the scales
        assert k_cache.dtype == q.dtype, "an unquantized cache is kept in the compute dtype"
        k_scale = v_scale = 1.0
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1

    if compute_f16 is None:
        compute_f16 = kv_fp8 and q.dtype == torch.bfloat16 and ATTN_F16
    elif compute_f16 and not kv_fp8:
        raise ValueError("compute_f16 is for FP8 caches (a bf16 cache's values may not fit fp16)")
    groups = num_heads // num_kv_heads
    num_partitions = max(1, triton.cdiv(max_context, partition_size))
    single = num_partitions == 1
    counters = _counters(q.device)
    if single:  # the kernel does not touch the partials: pass any fp32 tensor
        part_m = part_l = part_acc = out.new_empty(1, dtype=torch.float32)
    else:
        assert batch * num_kv_heads <= counters.numel(), "more (sequence, KV head) pairs than split-KV counters"
        part_m = _alloc((batch, num_heads, num_partitions), torch.float32, q.device)
        part_l = _alloc((batch, num_heads, num_partitions), torch.float32, q.device)
        part_acc = _alloc((batch, num_heads, num_partitions, head_dim), torch.float32, q.device)

    _decode_kernel[(batch, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_m, part_l, part_acc, counters,
        float(scale) * float(k_scale) * _LOG2E, float(v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_heads, num_kv_heads, num_partitions,
        GROUPS=groups, GROUPS_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(groups)),
        GROUPS_P2=triton.next_power_of_2(groups), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE_N=tile_tokens, PARTITION_SIZE=partition_size,
        PARTITIONS_PAD=triton.next_power_of_2(num_partitions), KV_FP8=kv_fp8, SINGLE_PARTITION=single,
        DYNAMIC=bool(dynamic) and not single,
        CHUNK=min(triton.next_power_of_2(num_partitions), max(2, 64 // triton.next_power_of_2(groups)), 16),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 and not compute_f16 else "tf32",  # (unused by 16-bit dots)
        COMPUTE_F16=bool(compute_f16), num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs(q.device),
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float, k_scale: float,
                    v_scale: float, *, partition_size: int | None = None) -> torch.Tensor:
    """`reference.paged_attention`'s signature and result. An all-decode batch on CUDA runs the Triton
    kernel; anything else (prefill, mixed batches, the CPU) runs the reference for now.

    All-decode is read from the shapes alone (T == B: no device-to-host sync, CUDA-graph friendly),
    which holds because every scheduled sequence has at least one new token, so T == B means one each."""
    if HAS_TRITON and q.is_cuda and q.shape[0] == context_lens.shape[0]:
        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                      partition_size=partition_size)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                     k_scale, v_scale)
