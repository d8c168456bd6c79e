"""W4A16 GEMM for 16 to 512 tokens on the H100 (lab, not a test): where does the batched linear's time go, and
what beats dequantize + cuBLAS? For each of the 4b model's linear shapes and token counts, under CUDA graphs
over L2-defeating weight copies (tuning.time_in_graph):

- `deq+cublas`: the engine's path from w4a16_prefill_min_tokens on (awq_dequantize, then x @ W^T);
- `cublas-bf16`: cuBLAS on an already dequantized bf16 weight (what a free dequantization would leave);
- `gemm`: the production Triton GEMM (qwentrt.engine.kernels.w4a16) over a sweep of tiles, large BLOCK_M included;
- `gemm-asm`: the same kernel with each packed int32 turned into eight bf16 weights by inline PTX: the
  bf16 magic number (nibble | 0x4300 reads as 128 + q, AutoAWQ's interleave puts columns 2p and 2p+1 in
  one bf16x2 register after a shift by 4p), the zero point subtracted and the scale applied as bf16x2
  FMAs: ~2 instructions per weight instead of ~8.
Correctness of each variant is checked against the fp32 reference first. Prints one line per (M, shape,
variant): best microseconds and config; then totals per M over the four linears (x36 = one step's linears).
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
import triton.language as tl

from qwentrt.engine.kernels import reference
from qwentrt.engine.kernels.w4a16 import awq_dequantize, dequant_matmul, w4a16_gemm
from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace
from qwentrt.engine.tuning import _random_weights, time_in_graph

_ASM = tl.constexpr("""
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
_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + "r," * 15 + "r")  # 8 bf16 out; 8 int32, 8 + 8 bf16 in


@triton.jit
def _dequant_bf16_asm(qw8, nz, s):
    """[.., 8c+j] int32 (each packed word repeated over its 8 columns), -(128 + z) and s in bf16 -> W in bf16."""
    return tl.inline_asm_elementwise(_ASM, _CONSTRAINTS, [qw8, nz, s], dtype=tl.bfloat16,
                                     is_pure=True, pack=8)


@triton.jit
def _gemm_asm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, M, N, K,
                     stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = offs_n % 8
    shifts = ((j % 2) * 4 + j // 2) * 4
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :])
        qw = tl.interleave(qw, qw)
        qw = tl.interleave(qw, qw)
        qw = tl.interleave(qw, qw)
        g = k0 // GROUP
        qz = tl.load(qz_ptr + g * stride_qz + offs_n // 8)
        nz = (-128.0 - ((qz >> shifts) & 0xF).to(tl.float32)).to(tl.bfloat16)
        s = tl.load(s_ptr + g * stride_s + offs_n)
        w = _dequant_bf16_asm(qw, tl.broadcast_to(nz[None, :], (BLOCK_K, BLOCK_N)),
                              tl.broadcast_to(s[None, :], (BLOCK_K, BLOCK_N)))
        acc += tl.dot(x, w)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tile = pid_m * tl.num_programs(1) + pid_n
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask, sem="relaxed")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=mask)
            tl.store(count_ptr + tile, 0)


def gemm_asm(x, qweight, qzeros, scales, group, cfg):
    m, k = x.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, counts = split_k_workspace(x.device)
    split = cfg["SPLIT_K"]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _gemm_asm_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, m, n, k, x.stride(0), qweight.stride(0),
                           qzeros.stride(0), scales.stride(0), out.stride(0), GROUP=group, BLOCK_M=cfg["BLOCK_M"],
                           BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128, SPLIT_K=split, num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"])
    return out


def configs(m: int):
    out = []
    for bm, bn, sk, w, st in itertools.product((16, 64, 128, 256), (64, 128, 256), (1, 2, 4), (4, 8), (3, 4)):
        if bm > max(16, m) or bm < min(m, 64) or (bm == 256 and bn == 256) or (bm == 16 and w == 8):
            continue
        if sk > 1 and m >= 256:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": w, "num_stages": st})
    return out


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "gemm,chunks"
    dev = torch.device("cuda")
    shapes = {"6144x2560": (6144, 2560), "2560x4096": (2560, 4096), "19456x2560": (19456, 2560),
              "2560x9728": (2560, 9728)}  # the 4b model's qkv, o, gate_up, down
    group = 128
    failed: set[str] = set()
    if "gemm" in what:  # the production GEMM (PTX dequantize in bf16) over a tile sweep
        for m in (16, 32, 128):
            total = {}
            for key, (n, k) in shapes.items():
                ws = _random_weights(n, k, group, dev)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                best, best_ms = None, float("inf")
                for c in configs(m):
                    try:
                        ms = time_in_graph(lambda: [w4a16_gemm(x, *w, group, c) for w in ws], replays=5) / len(ws)
                    except Exception as e:  # noqa: BLE001
                        if "OutOfResources" not in type(e).__name__ and "gemm" not in failed:
                            failed.add("gemm")
                            print(f"  gemm {c}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    if ms < best_ms:
                        best, best_ms = c, ms
                deq = time_in_graph(lambda: [x @ awq_dequantize(*w, group, x.dtype) for w in ws[:4]]) / 4
                total["gemm"] = total.get("gemm", 0) + best_ms
                total["deq"] = total.get("deq", 0) + deq
                print(f"M={m:4} {key:>11} gemm(ptx) {best_ms * 1e3:7.1f} us {best}  deq+cublas {deq * 1e3:7.1f} us",
                      flush=True)
            print(f"== M={m}: 36 layers: gemm(ptx) {total['gemm'] * 36:.2f} ms, deq+cublas {total['deq'] * 36:.2f} ms",
                  flush=True)
    if "chunks" in what:  # dequantize + cuBLAS, whole or through L2-sized column slices
        for m in (128, 256, 512, 2048):
            total = {}
            for key, (n, k) in shapes.items():
                ws = _random_weights(n, k, group, dev)[:8]
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                line = []
                for mib in (0, 4, 8, 16, 32):
                    ms = time_in_graph(lambda: [dequant_matmul(x, *w, group, mib) for w in ws]) / len(ws)
                    total[mib] = total.get(mib, 0) + ms
                    line.append(f"{mib}MiB {ms * 1e3:6.1f}")
                print(f"M={m:4} {key:>11} deq+cublas " + "  ".join(line) + " us", flush=True)
            print(f"== M={m}: 36 layers: " + "  ".join(f"{mib}MiB {t * 36:.2f} ms" for mib, t in total.items()),
                  flush=True)


if __name__ == "__main__":
    main()
