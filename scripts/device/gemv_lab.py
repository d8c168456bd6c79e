"""W4A16 at 1-4 tokens on the GPU (lab, not a test): the production GEMV (ALU-bound: ~5.4 instructions per nibble,
docs/KERNEL_NOTES.md) beside a "swap A/B" tensor-core variant that keeps the dequantized weights as the MMA's A
operand: y^T [N, M] = W^T [N, K] @ x^T [K, M], the output columns on the MMA's M side (64-256 of them, so Hopper's
wgmma shapes fit) and the 1-4 tokens padded to 16 on its N side, instead of 1 token padded to 16 rows on M. The
weights are dequantized by the GEMM's inline-PTX bf16 path (~2 instructions per weight) on CUDA, by the float magic
number elsewhere (the interpreter); partial sums go to a zeroed float32 buffer by atomic adds (a lab shortcut: the
production kernels' last-split write is left out, the buffer's memset is in the timed graph).

    python3 scripts/device/gemv_lab.py            # H100: the 4b model's four linears at 1, 2 and 4 tokens (GEMV_M=1: at 1)
    TRITON_INTERPRET=1 python3 scripts/device/gemv_lab.py check   # CPU: the variant against the reference
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from qwentrt.engine.kernels import reference  # noqa: E402
from qwentrt.engine.kernels.w4a16 import (_dequant_bf16, _scale_pairs, _scales_arg, _zero_pairs, awq_linear,  # noqa: E402
                                          awq_linear_silu_mul, bf16_ptx)
from qwentrt.engine.kernels.activation import silu_and_mul  # noqa: E402


@triton.jit
def _swap_ab_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_qw, stride_qz, stride_s,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    SPLIT_K: tl.constexpr, BF16_PTX: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_pn = offs_pn < N // 8
    mask_m = offs_m < M
    j = offs_n % 8
    shifts = ((j % 2) * 4 + j // 2) * 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :], other=0.0)
        qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :], mask=mask_pn[None, :], other=0)
        g = k0 // GROUP
        if BF16_PTX:
            qzw = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
            z0, z1, z2, z3 = _zero_pairs(qzw[None, :])
            s0, s1, s2, s3 = _scale_pairs(s_ptr + g * stride_s, offs_pn, mask_pn)
            w = _dequant_bf16(qw, z0, z1, z2, z3, s0[None, :], s1[None, :], s2[None, :], s3[None, :])
        else:
            qw8 = tl.interleave(qw, qw)
            qw8 = tl.interleave(qw8, qw8)
            qw8 = tl.interleave(qw8, qw8)
            q = (((qw8 >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            qz = tl.load(qz_ptr + g * stride_qz + offs_n // 8, mask=mask_n, other=0)
            z = (((qz >> shifts) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = ((q - z[None, :]) * s[None, :]).to(xt.dtype)
        acc += tl.dot(tl.trans(w), xt)  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]: the weights on the MMA's M side
    tl.atomic_add(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc, mask=mask_n[:, None] & mask_m[None, :],
                  sem="relaxed")


def swap_ab(x, qweight, qzeros, scales, group, cfg, out=None):
    """x [M, K] (M <= 16) -> float32 [M, N] (atomic adds into `out`, zeroed here)."""
    m, k = x.shape
    n = scales.shape[1]
    assert group % cfg["BLOCK_K"] == 0 and m <= 16, "a K tile stays inside one quantization group; M <= 16"
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if out is None else out.zero_()
    ptx = bf16_ptx(x, scales)
    s_arg, stride_s = _scales_arg(scales, ptx)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _swap_ab_kernel[grid](x, qweight, qzeros, s_arg, out, m, n, k, x.stride(0), qweight.stride(0), qzeros.stride(0),
                          stride_s, GROUP=group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=16,
                          SPLIT_K=cfg["SPLIT_K"], BF16_PTX=ptx, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return out


def random_awq(n, k, group, device, dtype):
    """Fresh random AutoAWQ-layout weights (never zeros)."""
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(k // group, n, device=device) * 0.02 + 0.001).to(dtype)
    return qweight, qzeros, scales


def check() -> None:
    """CPU (TRITON_INTERPRET=1), fp32: the variant against reference.awq_linear on fresh inputs, partial tiles."""
    torch.manual_seed(0)
    for (n, k, m), cfg in itertools.product([(256, 256, 1), (192, 384, 3), (64, 128, 16)],
                                            [{"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 2},
                                             {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}]):
        w = random_awq(n, k, 64, "cpu", torch.float32)
        x = torch.randn(m, k)
        ref = reference.awq_linear(x.double(), *[t if t.dtype == torch.int32 else t.double() for t in w], 64)
        got = swap_ab(x, *w, 64, cfg)
        err = float((got.double() - ref).norm() / ref.norm())
        print(f"N {n} K {k} M {m} {cfg}: rel err {err:.2e}")
        assert err < 1e-4, err


def main() -> None:
    dev = torch.device("cuda")
    from qwentrt.engine.tuning import time_in_graph
    kernels = json.load(open("scripts/device/h100_kernels.json"))
    shapes = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
    group, copies = 128, 8  # 8 weight copies per shape: > 50 MB of L2 for the small ones too
    cfgs = [{"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": w, "num_stages": st}
            for bn, sk, w, st in itertools.product((64, 128, 256), (2, 4, 8), (4,), (3, 4))]
    for m in [int(v) for v in os.environ.get("GEMV_M", "1,2,4").split(",")]:
        totals = {"production": 0.0, "swap_ab": 0.0}
        for name, (n, k) in shapes.items():
            ws = [random_awq(n, k, group, dev, torch.bfloat16) for _ in range(copies)]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = awq_linear(x, *ws[0], group, kernels).float()
            prod = time_in_graph(lambda: [awq_linear(x, *w, group, kernels) for w in ws], replays=20) / copies
            best, best_ms = None, float("inf")
            outs = [torch.zeros(m, n, device=dev) for _ in ws]
            for c in cfgs:
                try:
                    got = swap_ab(x, *ws[0], group, c)
                    err = float((got - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        print(f"  {name} M={m} {c}: WRONG (rel err {err:.2e})", flush=True)
                        continue
                    ms = time_in_graph(lambda: [swap_ab(x, *w, group, c, o) for w, o in zip(ws, outs)],
                                       replays=20) / copies
                except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                    print(f"  {name} M={m} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                if ms < best_ms:
                    best, best_ms = c, ms
            nbytes = n * k // 2 + (k // group) * n * 2.5
            totals["production"] += prod
            totals["swap_ab"] += best_ms
            print(f"M={m} {name:>7} {n}x{k}: production {prod * 1e3:6.1f} us ({nbytes / prod / 1e6:5.0f} GB/s), "
                  f"swap A/B {best_ms * 1e3:6.1f} us ({nbytes / best_ms / 1e6:5.0f} GB/s) {best}", flush=True)
        # the down projection with its SiLU-mul: two launches (silu_and_mul, GEMV) against the fused GEMV
        n, k = shapes["down"]
        ws = [random_awq(n, k, group, dev, torch.bfloat16) for _ in range(copies)]
        gate_up = torch.randn(m, 2 * k, device=dev, dtype=torch.bfloat16)
        two = time_in_graph(lambda: [awq_linear(silu_and_mul(gate_up), *w, group, kernels) for w in ws],
                            replays=20) / copies
        fused = time_in_graph(lambda: [awq_linear_silu_mul(gate_up, *w, group, kernels) for w in ws],
                              replays=20) / copies
        print(f"M={m} down with SiLU-mul: two launches {two * 1e3:6.1f} us, fused {fused * 1e3:6.1f} us "
              f"(36 layers: {36 * (two - fused) * 1e3:+.0f} us saved)", flush=True)
        print(f"== M={m}: 36 layers' linears: production {totals['production'] * 36:.3f} ms, "
              f"swap A/B {totals['swap_ab'] * 36:.3f} ms", flush=True)


if __name__ == "__main__":
    check() if sys.argv[1:2] == ["check"] else main()
