"""W4A16 GEMM over the AutoAWQ GEMM layout: y[M, N] = x[M, K] @ dequant(qweight)[K, N].

qweight int32 [K, N/8] holds eight 4-bit values per int32 along N; logical column 8c + j sits in
nibble (0, 4, 1, 5, 2, 6, 3, 7)[j] of packed column c (AutoAWQ's interleave). qzeros [K/G, N/8] the
same way, scales [K/G, N]. W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]. Every kernel here also reads
qweight tile-major, [tiles, K, PN] (w4a16_gemv.tile_major: PN packed columns a tile, the last one zero-padded), the
layout the engine keeps instead of AutoAWQ's where `w4a16_gemv_tile_major` is on (one copy: the GEMV reads it at its
BLOCK_N = 8 PN, the GEMM and the dequantization at theirs). K is qweight.shape[-2] in either layout.

One Triton kernel covers the decode range: tiles of BLOCK_M x BLOCK_N outputs, the K loop split
SPLIT_K ways across programs, partial sums added atomically in a persistent float32 workspace whose
last-arriving split writes the output (one launch; see w4a16_gemv.py). Nibbles become floats through
the 2^23 magic number, not a conversion instruction; in bf16 on CUDA (the engine's case) by inline PTX
instead (`_dequant_bf16`): ~2 instructions per weight instead of ~8, which is what bounds this kernel
(H100, 64 tokens, 36 layers' linears: 5.14 -> 3.53 ms; docs/KERNEL_NOTES.md). For many tokens (prefill)
dequantize-then-cuBLAS is used above a token threshold from the engine's kernel configs (choose by
measurement; the defaults are in kernels/configs.py).
"""

from __future__ import annotations

import functools
import os

import torch

from qwentrt.engine.kernels import reference
from qwentrt.engine.kernels.reference import awq_layout  # noqa: F401  (re-exported: untiles a tile-major weight)
from qwentrt.engine.kernels.reference import check_qweight, groups_k
from qwentrt.engine.kernels.w4a16_gemv import DEFAULT_CONFIG as GEMV_DEFAULT_CONFIG
from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, w4a16_gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU reference path needs no Triton
    triton = None


if triton is not None:

    # One packed int32 (8 nibbles, AutoAWQ order) -> 8 bf16 weights (q - z) * s, as 4 bf16x2 registers. The
    # bf16 magic number: nibble | 0x4300 reads as the bf16 128 + q (exact); AutoAWQ's interleave puts
    # columns 2p and 2p + 1 in nibbles p and p + 4, so (word >> 4p) & 0x000F000F | 0x43004300 is the bf16x2
    # pair (128 + q) of columns (2p, 2p + 1): one LOP3. Then (128 + q) - (128 + z) = q - z exactly (an FMA by
    # -1), and (q - z) * s rounded once, as the float32 reference's cast to bf16 is (an FMA with -0).
    # fma.rn.bf16x2 needs sm_80. Elementwise over packed words (each instance reads one word): Triton's
    # `pack` is not used, so no result depends on how the compiler lays elements out over threads.
    _ZERO_PAIRS_PTX = tl.constexpr("""
    {
    .reg .b32 w;
    lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
    shr.u32 w, $4, 4;
    lop3.b32 $1, w, 0x000F000F, 0x43004300, 0xEA;
    shr.u32 w, $4, 8;
    lop3.b32 $2, w, 0x000F000F, 0x43004300, 0xEA;
    shr.u32 w, $4, 12;
    lop3.b32 $3, w, 0x000F000F, 0x43004300, 0xEA;
    }
    """)
    _DEQUANT_PTX = tl.constexpr("""
    {
    .reg .b32 w, t, mone, nzero;
    mov.b32 mone, 0xBF80BF80;
    mov.b32 nzero, 0x80008000;
    lop3.b32 t, $4, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, $5, mone, t;
    fma.rn.bf16x2 $0, t, $9, nzero;
    shr.u32 w, $4, 4;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, $6, mone, t;
    fma.rn.bf16x2 $1, t, $10, nzero;
    shr.u32 w, $4, 8;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, $7, mone, t;
    fma.rn.bf16x2 $2, t, $11, nzero;
    shr.u32 w, $4, 12;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, $8, mone, t;
    fma.rn.bf16x2 $3, t, $12, nzero;
    }
    """)
    _I32X4 = tl.constexpr((tl.int32, tl.int32, tl.int32, tl.int32))

    @triton.jit
    def _zero_pairs(qz):
        """Packed zero-point words -> 4 int32 tensors: the bf16x2 pairs (128 + z) of columns (2p, 2p + 1)."""
        return tl.inline_asm_elementwise(_ZERO_PAIRS_PTX, "=r,=r,=r,=r,r", [qz], dtype=_I32X4, is_pure=True, pack=1)

    @triton.jit
    def _scale_pairs(s_ptr, offs_pn, mask_pn):
        """bf16 scales read as int32 (s_ptr points at one group's row, viewed as int32) -> 4 [PN] int32
        tensors: the bf16x2 pairs of columns (8c + 2p, 8c + 2p + 1)."""
        PN: tl.constexpr = offs_pn.shape[0]
        s = tl.load(s_ptr + offs_pn[:, None] * 4 + tl.arange(0, 4)[None, :], mask=mask_pn[:, None], other=0)
        even, odd = tl.split(tl.reshape(s, (PN, 2, 2)))  # p in (0, 2) and (1, 3)
        s0, s2 = tl.split(even)
        s1, s3 = tl.split(odd)
        return s0, s1, s2, s3

    @triton.jit
    def _bf16_halves(r):
        """int32 holding a bf16x2 pair -> [..., 2] bf16 (low half first)."""
        lo = (r & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.join(lo, hi)

    @triton.jit
    def _dequant_bf16(qw, z0, z1, z2, z3, s0, s1, s2, s3):
        """qw [R, PN] packed int32 and the zero / scale pairs (broadcastable to it) -> W [R, 8 PN] in bf16,
        column 8c + j of packed column c in natural order (CUDA only: inline PTX)."""
        R: tl.constexpr = qw.shape[0]
        PN: tl.constexpr = qw.shape[1]
        r0, r1, r2, r3 = tl.inline_asm_elementwise(
            _DEQUANT_PTX, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [qw, z0, z1, z2, z3, s0, s1, s2, s3], dtype=_I32X4,
            is_pure=True, pack=1)
        r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [R, PN, 2, 2]: flattened, pair p = 2i + j is r_p
        return tl.reshape(_bf16_halves(r), (R, PN * 8))  # column 2p + h

    @triton.jit
    def _word_offsets(offs_k, offs_pn, stride_qw, stride_qt, TILE_PN: tl.constexpr):
        """[BLOCK_K, PN] offsets of the packed words of rows offs_k, packed columns offs_pn. TILE_PN 0: AutoAWQ's
        [K, N/8], k * stride_qw + w (what the kernels compiled before tile-major weights); else tile-major
        [tiles, K, TILE_PN] (w4a16_gemv.tile_major), (w // TILE_PN) * stride_qt + k * stride_qw + w % TILE_PN, a
        constexpr power of two in practice (a shift and a mask), any BLOCK_N of the kernel against any tile width."""
        if TILE_PN == 0:
            offs = offs_k[:, None] * stride_qw + offs_pn[None, :]
        else:
            offs = offs_k[:, None] * stride_qw + ((offs_pn // TILE_PN) * stride_qt + offs_pn % TILE_PN)[None, :]
        return offs

    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, M, N, K,
                      stride_xm, stride_qw, stride_qz, stride_s, stride_ym, stride_qt,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr = "ieee", BF16_PTX: tl.constexpr = False,
                      TILE_PN: tl.constexpr = 0):
        """TILE_PN, stride_qt: qweight's layout (`_word_offsets`: 0 for AutoAWQ's, stride_qt then unused)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = offs_n % 8
        shifts = ((j % 2) * 4 + j // 2) * 4  # nibble of logical column j, in bits
        packed_n = offs_n // 8
        # The packed tile is loaded densely ([BLOCK_K, BLOCK_N / 8], coalesced) and widened by repeating
        # each int32 eight times along N (three interleaves), instead of gathering it 8 times over.
        offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        mask_pn = offs_pn < tl.cdiv(N, 8)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            qw_packed = tl.load(qw_ptr + _word_offsets(offs_k, offs_pn, stride_qw, stride_qt, TILE_PN),
                                mask=mask_k[:, None] & mask_pn[None, :], other=0)  # (tile-major: padding masked too)
            g = k0 // GROUP  # BLOCK_K divides GROUP: one group per K tile
            if BF16_PTX:  # s_ptr: the scales viewed as int32 (bf16 pairs); stride_s in int32s
                qzw = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
                z0, z1, z2, z3 = _zero_pairs(qzw[None, :])
                s0, s1, s2, s3 = _scale_pairs(s_ptr + g * stride_s, offs_pn, mask_pn)
                w = _dequant_bf16(qw_packed, z0, z1, z2, z3, s0[None, :], s1[None, :], s2[None, :], s3[None, :])
            else:
                qw = tl.interleave(qw_packed, qw_packed)
                qw = tl.interleave(qw, qw)
                qw = tl.interleave(qw, qw)
                qz = tl.load(qz_ptr + g * stride_qz + packed_n, mask=mask_n, other=0)
                # nibble -> float without a conversion instruction: (q | 0x4B000000) is the float 2^23 + q
                q = (((qw >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                z = (((qz >> shifts) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
                s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                w = ((q - z[None, :]) * s[None, :]).to(x.dtype)  # (2^23 + q) - (2^23 + z) = q - z exactly
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            # as in w4a16_gemv.py: float32 partials in a persistent workspace; the last split of the tile
            # (an arrival counter) writes y in its dtype and leaves workspace and counter at zero
            ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            tile = pid_m * tl.num_programs(1) + pid_n
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if done == SPLIT_K - 1:
                total = tl.atomic_add(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask,
                                      sem="relaxed")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.store(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask)
                tl.store(count_ptr + tile, 0)


    @triton.jit
    def _awq_dequantize_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, stride_qw, stride_qz, stride_s, stride_w,
                               stride_qt, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BF16_PTX: tl.constexpr = False, TILE_PN: tl.constexpr = 0):
        """W^T [K, N] in w's dtype from the packed tensors: one [BLOCK_K, BLOCK_N] tile per program (BLOCK_K
        divides the group: one group per tile). TILE_PN, stride_qt: qweight's layout (`_word_offsets`)."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        mask_k = offs_k < K
        mask_n = offs_n < N
        mask_pn = offs_pn < tl.cdiv(N, 8)
        mask = mask_k[:, None] & mask_n[None, :]
        qw = tl.load(qw_ptr + _word_offsets(offs_k, offs_pn, stride_qw, stride_qt, TILE_PN),
                     mask=mask_k[:, None] & mask_pn[None, :], other=0)
        g = pid_k * BLOCK_K // GROUP
        if BF16_PTX:  # s_ptr: the scales viewed as int32 (bf16 pairs); stride_s in int32s
            qzw = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
            z0, z1, z2, z3 = _zero_pairs(qzw[None, :])
            s0, s1, s2, s3 = _scale_pairs(s_ptr + g * stride_s, offs_pn, mask_pn)
            w = _dequant_bf16(qw, z0, z1, z2, z3, s0[None, :], s1[None, :], s2[None, :], s3[None, :])
        else:
            j = offs_n % 8
            shifts = ((j % 2) * 4 + j // 2) * 4
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)
            q = (((qw >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
            qz = tl.load(qz_ptr + g * stride_qz + offs_n // 8, mask=mask_n, other=0)
            z = (((qz >> shifts) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _ptx_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0) and os.environ.get("QWENTRT_W4A16_PTX", "1") != "0"


def bf16_ptx(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the kernels dequantize with inline PTX (`_dequant_bf16`): bf16 activations and scales on a
    CUDA GPU of sm_80 or newer (QWENTRT_W4A16_PTX=0 turns it off, to compare). Elsewhere (fp16, fp32, the
    Triton interpreter on the CPU) the 2^23 float magic number does it, with the same results."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and scales.shape[1] % 8 == 0
            and scales.stride(1) == 1 and scales.stride(0) % 2 == 0 and _ptx_capable(x.device))


def _scales_arg(scales: torch.Tensor, ptx: bool) -> tuple[torch.Tensor, int]:
    """The scales as the kernels take them: read as int32 bf16 pairs on the PTX path (stride in int32s)."""
    if ptx:
        return scales.view(torch.int32), scales.stride(0) // 2
    return scales, scales.stride(0)


def _layout_args(qweight: torch.Tensor, n: int, k: int, k_from: str) -> tuple[int, int, int]:
    """(stride_qw, stride_qt, TILE_PN): qweight's layout as the kernels take it (`_word_offsets`), after
    `reference.check_qweight`. AutoAWQ's: TILE_PN 0, the kernels as before tile-major weights."""
    check_qweight(qweight, n, k, k_from)
    if qweight.dim() == 3:
        return qweight.stride(1), qweight.stride(0), qweight.shape[2]
    return qweight.stride(0), 0, 0


# Best of five configs timed on the H100 (docs/KERNEL_NOTES.md); build-time tuning replaces it per shape.
DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) -> [M, N] in x's dtype, with the Triton kernel. qweight: AutoAWQ's [K, N/8] or
    tile-major [tiles, K, PN] (w4a16_gemv.tile_major, of any tile width)."""
    if triton is None:
        raise RuntimeError("the W4A16 Triton kernel needs the triton package")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    m, k = x.shape
    n = scales.shape[1]
    stride_qw, stride_qt, tile_pn = _layout_args(qweight, n, k, "x has")
    if group_size % cfg["BLOCK_K"]:
        cfg["BLOCK_K"] = group_size  # a K tile must stay inside one group
    x = x.contiguous()
    split = cfg["SPLIT_K"]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    ws, counts = split_k_workspace(x.device)
    if split > 1 and (m * n > ws.numel() or grid[0] * grid[1] > counts.numel()):
        split = 1  # more outputs than the split-K workspace holds: the grid is large enough without a split
        grid = grid[:2] + (1,)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ptx = bf16_ptx(x, scales)
    s_arg, stride_s = _scales_arg(scales, ptx)
    _w4a16_kernel[grid](x, qweight, qzeros, s_arg, out, ws, counts, m, n, k, x.stride(0), stride_qw,
                        qzeros.stride(0), stride_s, out.stride(0), stride_qt, GROUP=group_size, BLOCK_M=cfg["BLOCK_M"],
                        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
                        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BF16_PTX=ptx, TILE_PN=tile_pn,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in dtype (`reference.awq_dequantize` with one Triton kernel): for many tokens, where a
    cuBLAS matmul on the dequantized weight beats the W4A16 kernel. qweight: AutoAWQ's [K, N/8] or tile-major
    [tiles, K, PN] (w4a16_gemv.tile_major)."""
    if triton is None:
        raise RuntimeError("the W4A16 dequantize kernel needs the triton package")
    k, n = qweight.shape[-2], scales.shape[1]
    stride_qw, stride_qt, tile_pn = _layout_args(qweight, n, *groups_k(scales, group_size))
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_k, block_n = min(32, group_size), 128
    ptx = bf16_ptx(w, scales)
    s_arg, stride_s = _scales_arg(scales, ptx)
    _awq_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, qzeros, s_arg, w, n, k, stride_qw, qzeros.stride(0), stride_s, w.stride(0), stride_qt,
        GROUP=group_size, BLOCK_K=block_k, BLOCK_N=block_n, BF16_PTX=ptx, TILE_PN=tile_pn, num_warps=4)
    return w


def decode_config(configs: dict, m: int, n: int, k: int) -> dict | None:
    """The W4A16 GEMM config for m tokens of an [n, k] linear: the smallest token bucket ("16", "32", ...)
    holding m (else the largest), then the shape's entry "NxK" (else the bucket's "default")."""
    table = configs.get("w4a16_decode", {})
    buckets = sorted(int(b) for b in table if b.isdigit())
    if not buckets:
        return table.get("default")
    entry = table[str(next((b for b in buckets if m <= b), buckets[-1]))]
    if "BLOCK_M" in entry:
        return entry
    return entry.get(f"{n}x{k}") or entry.get("default")


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, configs: dict | None = None, deferred: bool = False):
    """The engine's W4A16 linear on CUDA: the GEMV up to `w4a16_gemv_max_tokens`, the Triton GEMM below
    `w4a16_prefill_min_tokens` tokens, the Triton dequantize + a cuBLAS matmul from there on; the torch reference on
    the CPU. qweight: AutoAWQ's [K, N/8] or tile-major [tiles, K, PN] (`w4a16_gemv_tile_major`, ops.pack_weight):
    every path reads either. deferred: the caller's consumer takes a SplitKSums (w4a16_gemv.py), returned where the
    GEMV runs split and the engine's configs say `w4a16_gemv_deferred: true`."""
    configs = configs or {}
    if x.device.type != "cuda" or triton is None:
        return reference.awq_linear(x, qweight, qzeros, scales, group_size)
    m = x.shape[0]
    if m >= configs.get("w4a16_prefill_min_tokens", 512):
        return x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
    n, k = scales.shape[1], qweight.shape[-2]  # (K: qweight's rows in either layout)
    gemv = gemv_config(configs, m, n, k, group_size)
    if gemv is not None:
        return w4a16_gemv(x, qweight, qzeros, scales, group_size, at_tile_width(gemv, qweight),
                          deferred=deferred and configs.get("w4a16_gemv_deferred", False))
    return w4a16_gemm(x, qweight, qzeros, scales, group_size, decode_config(configs, m, n, k))


def at_tile_width(gemv: dict, qweight: torch.Tensor) -> dict:
    """The GEMV config for qweight: as it is for AutoAWQ's layout; for a tile-major weight, at its tile width
    (BLOCK_N = 8 PN, which the GEMV reads it at). ops.pack_weight tiles a weight at its shape's GEMV BLOCK_N, so
    this changes nothing unless the engine's configs changed after the weights were packed. The persistent GEMV
    ("stream", w4a16_gemv_stream.py) reads tile-major weights only: over AutoAWQ's layout the split-K GEMV's
    default config runs instead."""
    if gemv.get("LAYOUT") == "stream" and qweight.dim() == 2:
        return dict(GEMV_DEFAULT_CONFIG)
    if qweight.dim() == 3 and gemv.get("BLOCK_N", GEMV_DEFAULT_CONFIG["BLOCK_N"]) != 8 * qweight.shape[2]:
        return dict(gemv, BLOCK_N=8 * qweight.shape[2])
    return gemv


def gemv_deferred_wanted(configs: dict) -> bool:
    """The engine's kernel configs decide (`w4a16_gemv_deferred`); QWENTRT_GEMV_DEFERRED=1 / 0 overrides (A/B).
    Read once, when the engine configures its kernels (ops.configure), not on every call."""
    env = os.environ.get("QWENTRT_GEMV_DEFERRED")
    return env != "0" if env is not None else bool(configs.get("w4a16_gemv_deferred", False))


def gemv_tile_major_wanted(configs: dict) -> bool:
    """Experimental (`w4a16_gemv_tile_major`, QWENTRT_GEMV_TILE_MAJOR=1 / 0): the model keeps each INT4 weight the
    GEMV runs tile-major (w4a16_gemv.tile_major at the GEMV's BLOCK_N for the shape: a program's rows contiguous)
    instead of in AutoAWQ's layout, its only copy (the GEMM and the dequantization read it too; ops.pack_weight).
    Off by default until measured on a GPU."""
    env = os.environ.get("QWENTRT_GEMV_TILE_MAJOR")
    return env != "0" if env is not None else bool(configs.get("w4a16_gemv_tile_major", False))


def gemv_config(configs: dict, m: int, n: int, k: int, group_size: int) -> dict | None:
    """The GEMV's config where awq_linear takes the GEMV for m tokens of an [n, k] linear (up to
    `w4a16_gemv_max_tokens`: configs.py's defaults, or the tuner's), else None."""
    if m <= configs.get("w4a16_gemv_max_tokens", 0) and m < configs.get("w4a16_prefill_min_tokens", 512) \
            and n % 8 == 0 and k % group_size == 0:
        gemv = configs.get("w4a16_gemv", {})
        return gemv.get(f"{n}x{k}") or gemv.get("default") or {}
    return None


def awq_linear_silu_mul(gate_up: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        group_size: int, configs: dict | None = None) -> torch.Tensor | None:
    """awq_linear(silu_and_mul(gate_up)) in one launch where awq_linear would take the GEMV: the GEMV computes
    the SiLU-mul as it loads its input (w4a16_gemv.py, SILU_MUL; the same result bit for bit). Opt-in with
    `w4a16_gemv_silu_mul: true` in the kernel configs: on the H100 the fused launch is slower than the pair
    (15.4 against 14.1 us for the down projection at 1 token, KERNEL_NOTES session 9), since every column tile
    recomputes the product. None where it does not apply (not opted in, the CPU, more tokens): run the two."""
    configs = configs or {}
    if gate_up.device.type != "cuda" or triton is None or not configs.get("w4a16_gemv_silu_mul", False):
        return None
    n, k = scales.shape[1], qweight.shape[-2]  # (K: qweight's rows in either layout)
    if gate_up.shape[-1] != 2 * k:
        return None
    gemv = gemv_config(configs, gate_up.shape[0], n, k, group_size)
    if gemv is None:
        return None
    return w4a16_gemv(gate_up, qweight, qzeros, scales, group_size, at_tile_width(gemv, qweight), silu_mul=True)
