"""Persistent ("stream") W4A16 GEMV for one to a few tokens: y[M, N] = x[M, K] @ dequant(qweight)[K, N] over
tile-major weights (w4a16_gemv.tile_major: [tiles, K, BLOCK_N / 8], each tile's rows contiguous), the split-K sums
left float32 in the workspace for the next kernel (w4a16_gemv.SplitKSums, "deferred").

Why another grid: the split-K GEMV (w4a16_gemv.py) launches one program per (tile, group), 320-1,520 programs
for Qwen3-4B's linears, in 1-3 partial waves of ~8 one-warp programs an SM; at one token it reaches ~1.3 TB/s of
the H100's 3.35 (docs/KERNEL_NOTES.md). Here the grid is a fixed number of programs a row (PER_SM x the SM
count: one wave, no partial last wave), and the work is cut into items of ROWS rows of one tile (ROWS divides the
quantization group), numbered tile after tile, so that item i's words start at i x ROWS x BLOCK_N / 16 bytes: the
whole weight is one contiguous run of memory, and program p streams the contiguous span of items [p I / P,
(p + 1) I / P). It keeps a tile's partial sums in registers across its items and adds them to the workspace once
per tile it touches (a span crosses one or two tile boundaries), relaxed atomics and no counter: the consumer
(residual-add + RMSNorm, SiLU-mul, q/k-norm + RoPE + KV write) reads and clears the sums.

The arithmetic is the words / window kernel's (w4a16_gemv._words_step and the per-group column finish), so the
results are the split-K GEMV's up to summation order. STAGES > 0 runs the item loop as a software pipeline
(tl.range num_stages: the next items' words copied to shared memory while this one is reduced); 0 leaves the
overlap to the other programs on the SM.
"""

from __future__ import annotations

import functools

import torch

from qwentrt.engine.kernels.w4a16_gemv import MAGIC_2_23, SplitKSums, split_k_workspace

try:
    import triton
    import triton.language as tl

    from qwentrt.engine.kernels.w4a16_gemv import _finish_group, _words_step
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _item(o0, o1, o2, o3, o4, o5, o6, o7, x_row, qt, r, tile_words, mask, magic, qz_ptr, s_ptr, stride_qz,
              stride_s, words, GROUP: tl.constexpr, PN: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
              ASM: tl.constexpr, WINDOW: tl.constexpr):
        """Rows r ROWS .. r ROWS + ROWS - 1 of one tile (qt: its first word; words: its packed columns) added to
        the 8 columns of each word (o0..o7, [PN] each): s (sum x q - z sum x) over the rows (one group's scale and
        zero: ROWS divides GROUP)."""
        rk = tl.arange(0, BLOCK_K)
        a0 = tl.zeros([BLOCK_K, PN], tl.float32)
        a1 = tl.zeros([BLOCK_K, PN], tl.float32)
        a2 = tl.zeros([BLOCK_K, PN], tl.float32)
        a3 = tl.zeros([BLOCK_K, PN], tl.float32)
        a4 = tl.zeros([BLOCK_K, PN], tl.float32)
        a5 = tl.zeros([BLOCK_K, PN], tl.float32)
        a6 = tl.zeros([BLOCK_K, PN], tl.float32)
        a7 = tl.zeros([BLOCK_K, PN], tl.float32)
        xs = tl.zeros([BLOCK_K], tl.float32)
        for kk in tl.static_range(0, ROWS, BLOCK_K):
            a0, a1, a2, a3, a4, a5, a6, a7, xs = _words_step(
                x_row, qt, r * ROWS + kk + rk, tile_words, mask, PN, magic,
                a0, a1, a2, a3, a4, a5, a6, a7, xs, True, ASM, WINDOW)  # (tile-major is padded: unmasked loads)
        g = r * ROWS // GROUP
        return _finish_group(o0, o1, o2, o3, o4, o5, o6, o7, a0, a1, a2, a3, a4, a5, a6, a7, xs,
                             qz_ptr + g * stride_qz, s_ptr + g * stride_s, words, mask,
                             magic, ASM, WINDOW)

    @triton.jit
    def _w4a16_gemv_stream_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, ws_ptr, N, K, ITEMS, stride_xm, stride_qz,
                                  stride_s, magic, GROUP: tl.constexpr, PN: tl.constexpr, BLOCK_K: tl.constexpr,
                                  ROWS: tl.constexpr, ASM: tl.constexpr, WINDOW: tl.constexpr,
                                  STAGES: tl.constexpr):
        m = tl.program_id(0)
        pid = tl.program_id(1)
        programs = tl.num_programs(1)
        per_tile = K // ROWS  # items a tile
        i0 = pid * ITEMS // programs  # this program's span of items (never empty: programs <= ITEMS)
        i1 = (pid + 1) * ITEMS // programs
        tile_words = tl.arange(0, PN)
        x_row = x_ptr + m * stride_xm
        for t in range(i0 // per_tile, (i1 - 1) // per_tile + 1):  # the one to three tiles the span touches
            words = t * PN + tile_words
            mask = words < N // 8
            c0 = words * 8  # column of half h, nibble p of a word: 8c + 2p + h (AWQ's order)
            qt = qw_ptr + t * K * PN  # the tile's words, [K, PN] contiguous
            r0 = tl.maximum(i0, t * per_tile) - t * per_tile
            r1 = tl.minimum(i1, (t + 1) * per_tile) - t * per_tile
            o0 = tl.zeros([PN], tl.float32)
            o1 = tl.zeros([PN], tl.float32)
            o2 = tl.zeros([PN], tl.float32)
            o3 = tl.zeros([PN], tl.float32)
            o4 = tl.zeros([PN], tl.float32)
            o5 = tl.zeros([PN], tl.float32)
            o6 = tl.zeros([PN], tl.float32)
            o7 = tl.zeros([PN], tl.float32)
            if STAGES == 0:
                for r in range(r0, r1):
                    o0, o1, o2, o3, o4, o5, o6, o7 = _item(
                        o0, o1, o2, o3, o4, o5, o6, o7, x_row, qt, r, tile_words, mask, magic, qz_ptr, s_ptr,
                        stride_qz, stride_s, words, GROUP, PN, BLOCK_K, ROWS, ASM, WINDOW)
            else:
                for r in tl.range(r0, r1, num_stages=STAGES):
                    o0, o1, o2, o3, o4, o5, o6, o7 = _item(
                        o0, o1, o2, o3, o4, o5, o6, o7, x_row, qt, r, tile_words, mask, magic, qz_ptr, s_ptr,
                        stride_qz, stride_s, words, GROUP, PN, BLOCK_K, ROWS, ASM, WINDOW)
            # each word's 8 columns side by side in column order (as the words kernel's epilogue)
            out = tl.reshape(tl.join(tl.join(tl.join(o0, o2), tl.join(o1, o3)),
                                     tl.join(tl.join(o4, o6), tl.join(o5, o7))), [PN, 8])
            cols = c0[:, None] + tl.arange(0, 8)[None, :]
            tl.atomic_add(ws_ptr + m * N + cols, out, mask=mask[:, None], sem="relaxed")


# PER_SM programs an SM (one wave), items of ROWS rows (the H100's best for Qwen3-4B; session 13); BLOCK_N must be the
# tile-major weight's
DEFAULT_CONFIG = {"BLOCK_N": 256, "BLOCK_K": 8, "ROWS": 64, "PER_SM": 12, "num_warps": 1, "STAGES": 0,
                  "WINDOW": True}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # (the interpreter: any count; tests pass PROGRAMS)
    return torch.cuda.get_device_properties(device).multi_processor_count


def w4a16_gemv_stream(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      group_size: int, config: dict | None = None) -> SplitKSums:
    """x [M, K] -> the [M, N] float32 sums in the split-K workspace (a SplitKSums for the next kernel to round and
    clear). qweight: tile-major [tiles, K, BLOCK_N / 8] (w4a16_gemv.tile_major with this config's BLOCK_N).
    config: BLOCK_N, BLOCK_K (rows a step), ROWS (rows an item; divides the group), PER_SM (programs a row and SM;
    PROGRAMS, if given, is the count itself), num_warps, STAGES, WINDOW (the window dequantization, else words)."""
    if triton is None:
        raise RuntimeError("the W4A16 stream GEMV needs the triton package")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    m, k = x.shape
    n = scales.shape[1]
    pn, count = cfg["BLOCK_N"] // 8, cfg.get("PROGRAMS") or cfg["PER_SM"]
    if pn < 1 or pn & (pn - 1) or cfg["BLOCK_K"] < 1 or cfg["BLOCK_K"] & (cfg["BLOCK_K"] - 1) or count < 1:
        raise ValueError(f"W4A16 stream GEMV: BLOCK_N ({cfg['BLOCK_N']}) must be 8 times a power of two, BLOCK_K "
                         f"({cfg['BLOCK_K']}) a power of two, PER_SM / PROGRAMS at least 1; got {config}")
    tiles = -(-n // 8 // pn)
    if qweight.dim() != 3 or tuple(qweight.shape) != (tiles, k, pn) or not qweight.is_contiguous():
        raise ValueError(f"W4A16 stream GEMV: the weight must be tile-major [{tiles}, K={k}, {pn}] and contiguous, "
                         f"got {tuple(qweight.shape)}: repack it with tile_major(qweight, {cfg['BLOCK_N']})")
    rows, block_k = cfg["ROWS"], min(cfg["BLOCK_K"], cfg["ROWS"])
    if group_size % rows or rows % block_k or k % group_size or n % 8:
        raise ValueError(f"W4A16 stream GEMV: BLOCK_K ({block_k}) must divide ROWS ({rows}), ROWS the group size "
                         f"({group_size}), the group size K ({k}); N ({n}) must be a multiple of 8")
    items = tiles * (k // rows)
    programs = min(items, cfg.get("PROGRAMS") or count * _sm_count(x.device))
    ws, _ = split_k_workspace(x.device)
    if m * n > ws.numel():
        raise ValueError(f"W4A16 stream GEMV: {m} x {n} outputs exceed the split-K workspace")
    if x.stride(-1) != 1:
        x = x.contiguous()
    _w4a16_gemv_stream_kernel[(m, programs)](
        x, qweight, qzeros, scales, ws, n, k, items, x.stride(0), qzeros.stride(0), scales.stride(0), MAGIC_2_23,
        GROUP=group_size, PN=pn, BLOCK_K=block_k, ROWS=rows, ASM=x.is_cuda, WINDOW=bool(cfg["WINDOW"]),
        STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
    return SplitKSums(ws[:m * n].view(m, n), x.dtype)
