"""W4A16 GEMM over the AutoAWQ GEMM layout: y[M, N] = x[M, K] @ dequant(qweight)[K, N].

qweight int32 [K, N/8] holds eight 4-bit values per int32 along N; logical column 8c + j sits in
nibble (0, 4, 1, 5, 2, 6, 3, 7)[j] of packed column c (AutoAWQ's interleave). qzeros [K/G, N/8] the
same way, scales [K/G, N]. W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].

One Triton kernel covers the decode range: tiles of BLOCK_M x BLOCK_N outputs, the K loop split
SPLIT_K ways across programs, partial sums added atomically in a persistent float32 workspace whose
last-arriving split writes the output (one launch; see w4a16_gemv.py). Nibbles become floats through
the 2^23 magic number, not a conversion instruction; in bf16 on CUDA (the engine's case) by inline PTX
instead (`_dequant_bf16x8`): ~2 instructions per weight instead of ~8, which is what bounds this kernel
(H100, 64 tokens, 36 layers' linears: 5.14 -> 3.53 ms; docs/KERNEL_NOTES.md). For many tokens (prefill)
dequantize-then-cuBLAS is used above a token threshold from the engine's kernel configs (choose by
measurement; the defaults are in kernels/configs.py).
"""

from __future__ import annotations

import functools
import os

import torch

from qwentrt.engine.kernels import reference
from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, w4a16_gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU reference path needs no Triton
    triton = None


if triton is not None:

    # One packed int32 (8 nibbles, AutoAWQ order) -> 8 bf16 weights (q - z) * s. The bf16 magic number:
    # nibble | 0x4300 reads as the bf16 128 + q (exact), and AutoAWQ's interleave puts columns 2p and 2p + 1
    # in nibbles p and p + 4, so (word >> 4p) & 0x000F000F | 0x43004300 is the bf16x2 pair of columns
    # (2p, 2p + 1): one LOP3. Then (128 + q) - (128 + z) = q - z exactly (an FMA by 1), and (q - z) * s is
    # rounded once, as the float32 reference's cast to bf16 is (an FMA with -0). fma.rn.bf16x2 needs sm_80.
    # Operands: $0-$3 out (bf16x2), $4-$11 the word (repeated over its 8 columns), $12-$15 -(128 + z)
    # and $16-$19 the scales, bf16x2 each.
    _DEQUANT_BF16X8_PTX = tl.constexpr("""
    {
    .reg .b32 w, t, one, nzero;
    mov.b32 one, 0x3F803F80;
    mov.b32 nzero, 0x80008000;
    lop3.b32 t, $4, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, t, one, $12;
    fma.rn.bf16x2 $0, t, $16, nzero;
    shr.u32 w, $4, 4;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, t, one, $13;
    fma.rn.bf16x2 $1, t, $17, nzero;
    shr.u32 w, $4, 8;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, t, one, $14;
    fma.rn.bf16x2 $2, t, $18, nzero;
    shr.u32 w, $4, 12;
    lop3.b32 t, w, 0x000F000F, 0x43004300, 0xEA;
    fma.rn.bf16x2 t, t, one, $15;
    fma.rn.bf16x2 $3, t, $19, nzero;
    }
    """)
    _DEQUANT_BF16X8_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + "r," * 15 + "r")

    @triton.jit
    def _dequant_bf16x8(qw8, qz8, s, shifts):
        """[..., 8c + j] int32 (packed word c repeated over its 8 columns), the zeros' packed words likewise,
        bf16 scales -> the bf16 weights (q - z) * s (CUDA only: inline PTX)."""
        nz = (-128.0 - ((qz8 >> shifts) & 0xF).to(tl.float32)).to(tl.bfloat16)
        return tl.inline_asm_elementwise(_DEQUANT_BF16X8_PTX, _DEQUANT_BF16X8_CONSTRAINTS, [qw8, nz, s],
                                         dtype=tl.bfloat16, is_pure=True, pack=8)

    @triton.jit
    def _w4a16_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, M, N, K,
                      stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr = "ieee", BF16_PTX: tl.constexpr = False):
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
            qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :],
                         mask=mask_k[:, None] & mask_pn[None, :], other=0)
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)
            qw = tl.interleave(qw, qw)
            g = k0 // GROUP  # BLOCK_K divides GROUP: one group per K tile
            qz = tl.load(qz_ptr + g * stride_qz + packed_n, mask=mask_n, other=0)
            if BF16_PTX:
                s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0)
                w = _dequant_bf16x8(qw, tl.broadcast_to(qz[None, :], (BLOCK_K, BLOCK_N)),
                                    tl.broadcast_to(s[None, :], (BLOCK_K, BLOCK_N)), shifts[None, :])
            else:
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
                               GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BF16_PTX: tl.constexpr = False):
        """W^T [K, N] in w's dtype from the packed tensors: one [BLOCK_K, BLOCK_N] tile per program."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        j = offs_n % 8
        shifts = ((j % 2) * 4 + j // 2) * 4
        mask_k = offs_k < K
        mask_n = offs_n < N
        qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :],
                     mask=mask_k[:, None] & (offs_pn < tl.cdiv(N, 8))[None, :], other=0)
        qw = tl.interleave(qw, qw)
        qw = tl.interleave(qw, qw)
        qw = tl.interleave(qw, qw)
        g = offs_k // GROUP
        mask = mask_k[:, None] & mask_n[None, :]
        qz = tl.load(qz_ptr + g[:, None] * stride_qz + (offs_n // 8)[None, :], mask=mask, other=0)
        s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
        if BF16_PTX:
            w = _dequant_bf16x8(qw, qz, s, shifts[None, :])
        else:
            q = (((qw >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
            z = (((qz >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            w = (q - z) * s.to(tl.float32)
        tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _ptx_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0) and os.environ.get("QWENTRT_W4A16_PTX", "1") != "0"


def bf16_ptx(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the kernels dequantize with inline PTX (`_dequant_bf16x8`): bf16 activations and scales on a
    CUDA GPU of sm_80 or newer (QWENTRT_W4A16_PTX=0 turns it off, to compare). Elsewhere (fp16, fp32, the
    Triton interpreter on the CPU) the 2^23 float magic number does it, with the same results."""
    return x.is_cuda and x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and _ptx_capable(x.device)


# Best of five configs timed on the H100 (docs/KERNEL_NOTES.md); build-time tuning replaces it per shape.
DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) -> [M, N] in x's dtype, with the Triton kernel."""
    if triton is None:
        raise RuntimeError("the W4A16 Triton kernel needs the triton package")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    m, k = x.shape
    n = scales.shape[1]
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
    _w4a16_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, m, n, k, x.stride(0), qweight.stride(0),
                        qzeros.stride(0),
                        scales.stride(0), out.stride(0), GROUP=group_size, BLOCK_M=cfg["BLOCK_M"],
                        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
                        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BF16_PTX=bf16_ptx(x, scales),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W^T [K, N] in dtype (`reference.awq_dequantize` with one Triton kernel): for many tokens, where a
    cuBLAS matmul on the dequantized weight beats the W4A16 kernel. The packed tensors may be column
    slices (qweight[:, c0 // 8:c1 // 8], ...); `out`, if given, is a contiguous [K, N] tensor to fill."""
    if triton is None:
        raise RuntimeError("the W4A16 dequantize kernel needs the triton package")
    k, n = qweight.shape[0], scales.shape[1]
    w = torch.empty((k, n), dtype=dtype, device=qweight.device) if out is None else out
    block_k, block_n = 32, 128
    _awq_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, qzeros, scales, w, n, k, qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
        GROUP=group_size, BLOCK_K=block_k, BLOCK_N=block_n, BF16_PTX=bf16_ptx(w, scales), num_warps=4)
    return w


_chunk_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, chunk_mib: float = 0) -> torch.Tensor:
    """x @ dequant(W) for many tokens: dequantize, then cuBLAS. With chunk_mib > 0 the weight is dequantized
    a slice of columns at a time into one persistent buffer of about that size, each slice multiplied while
    it sits in L2, so the bf16 weight is neither written to nor read back from device memory (a whole
    dequantized weight is 4x the bytes of the packed one)."""
    k, n = qweight.shape[0], scales.shape[1]
    cols = int(chunk_mib * 2 ** 20) // (k * x.element_size()) // 128 * 128
    if chunk_mib <= 0 or cols >= n:
        return x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
    cols = max(cols, 128)
    key = (x.device, x.dtype)
    buf = _chunk_buffers.get(key)
    if buf is None or buf.numel() < k * cols:
        buf = _chunk_buffers[key] = torch.empty(max(k * cols, int(chunk_mib * 2 ** 20) // x.element_size()),
                                                dtype=x.dtype, device=x.device)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for c0 in range(0, n, cols):
        c1 = min(n, c0 + cols)
        w = awq_dequantize(qweight[:, c0 // 8:c1 // 8], qzeros[:, c0 // 8:c1 // 8], scales[:, c0:c1], group_size,
                           x.dtype, out=buf[:k * (c1 - c0)].view(k, c1 - c0))
        torch.mm(x, w, out=out[:, c0:c1])
    return out


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
               group_size: int, configs: dict | None = None) -> torch.Tensor:
    """The engine's W4A16 linear on CUDA: the Triton GEMM below `w4a16_prefill_min_tokens` tokens, the
    Triton dequantize + a cuBLAS matmul from there on; the torch reference on the CPU."""
    configs = configs or {}
    if x.device.type != "cuda" or triton is None:
        return reference.awq_linear(x, qweight, qzeros, scales, group_size)
    m = x.shape[0]
    if m >= configs.get("w4a16_prefill_min_tokens", 512):
        return dequant_matmul(x, qweight, qzeros, scales, group_size, configs.get("w4a16_dequant_chunk_mib", 0))
    n, k = scales.shape[1], qweight.shape[0]
    if m <= configs.get("w4a16_gemv_max_tokens", 0) and n % 8 == 0 and k % group_size == 0:
        gemv = configs.get("w4a16_gemv", {})
        return w4a16_gemv(x, qweight, qzeros, scales, group_size, gemv.get(f"{n}x{k}") or gemv.get("default"))
    return w4a16_gemm(x, qweight, qzeros, scales, group_size,
                      decode_config(configs, m, scales.shape[1], qweight.shape[0]))
