"""Where does the W4A16 GEMV's time go? (H100 lab, not a test.) For each linear shape at 1 token, under CUDA
graphs over L2-defeating copies: the tuned kernel; the same tiling with the ALU work removed (load-only); the
same with the weights read from one small L2-resident copy (ALU-bound); a config sweep of single-pass tiles
(GemLite-like: one [BK, BN] tile per program, split-K = K / BK). Plus a SASS instruction histogram."""

from __future__ import annotations

import collections
import re
import sys
import time

import torch
import triton
import triton.language as tl

from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv, _workspace
from qwentrt.engine.tuning import _random_weights, time_in_graph


@triton.jit
def _probe_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  MODE: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PN: tl.constexpr = BLOCK_N // 8
    offs_pn = pid_n * PN + tl.arange(0, PN)
    j = tl.arange(0, 8)
    shifts = ((j % 2) * 4 + j // 2) * 4
    cols = offs_pn[:, None] * 8 + j[None, :]
    mask_pn = offs_pn < N // 8
    acc = tl.zeros((PN, 8), dtype=tl.float32)
    iacc = tl.zeros((BLOCK_K, PN), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows = offs_k
        if MODE == 2:
            rows = offs_k % 128  # one small, cache-resident slice of the weights: ALU-bound
        qw = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_pn[None, :], mask=mask_pn[None, :], other=0)
        if MODE == 1:
            iacc ^= qw  # load-only
        else:
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
            q = ((qw[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
            g = k0 // GROUP
            qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
            zf = (((qz[:, None] >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            w = q.to(tl.float32, bitcast=True) - zf[None, :, :]
            part = tl.sum(x[:, None, None] * w, axis=0)
            s = tl.load(s_ptr + g * stride_s + cols, mask=mask_pn[:, None], other=0.0).to(tl.float32)
            acc += part * s
    if MODE == 1:
        acc += tl.sum(iacc, axis=0).to(tl.float32)[:, None]
    tl.store(y_ptr + m * stride_ym + pid_k * N + cols, acc.to(y_ptr.dtype.element_ty), mask=mask_pn[:, None])


def probe(x, qw, qz, s, group, cfg, mode):
    m, k = x.shape
    n = s.shape[1]
    out = torch.empty((cfg["SPLIT_K"], n), dtype=x.dtype, device=x.device)
    grid = (m, triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    return _probe_kernel[grid](x, qw, qz, s, out, n, k, x.stride(0), qw.stride(0), qz.stride(0), s.stride(0),
                               out.stride(0), GROUP=group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                               SPLIT_K=cfg["SPLIT_K"], MODE=mode, num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])


def sass_histogram(compiled) -> str:
    try:
        sass = compiled.asm["sass"]
    except Exception as e:  # noqa: BLE001
        return f"(no sass: {e})"
    ops = collections.Counter()
    for line in sass.splitlines():
        mt = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if mt:
            ops[mt.group(2)] += 1
    return " ".join(f"{k}:{v}" for k, v in ops.most_common(22))


SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
TUNED = {"6144x2560": 8, "2560x4096": 16, "19456x2560": 8, "2560x9728": 16}


def main():
    dev = torch.device("cuda")
    group = 128
    for name, (n, k) in SHAPES.items():
        key = f"{n}x{k}"
        ws = _random_weights(n, k, group, dev)
        nbytes = k * n // 2
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        cfg = dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=TUNED[key], num_warps=4, num_stages=3)
        t = time_in_graph(lambda: [w4a16_gemv(x, *w, group, cfg) for w in ws]) / len(ws)
        line = [f"{name:8s} tuned {t * 1e3:6.1f} us ({nbytes / t / 1e9:4.0f} GB/s)"]
        for mode, label in ((0, "probe"), (1, "load-only"), (2, "alu-only")):
            tp = time_in_graph(lambda: [probe(x, *w, group, cfg, mode) for w in ws]) / len(ws)
            line.append(f"{label} {tp * 1e3:6.1f}")
        print(" | ".join(line), flush=True)
        if name == "gate_up":
            print("  SASS tuned-config probe:", sass_histogram(probe(x, *ws[0], group, cfg, 0)), flush=True)
        # single-pass and small-tile sweep of the production kernel
        res = []
        for bn, bk, warps in [(64, 32, 1), (128, 32, 1), (128, 32, 2), (256, 32, 2), (256, 16, 2), (256, 32, 4),
                              (512, 16, 4), (512, 32, 4), (128, 64, 2), (256, 64, 4), (64, 64, 1), (128, 128, 4)]:
            for split in sorted({k // bk, k // bk // 2, k // bk // 4, 8, 16}):
                if split < 1 or split > k // bk:
                    continue
                c = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=2)
                try:
                    tc = time_in_graph(lambda: [w4a16_gemv(x, *w, group, c) for w in ws]) / len(ws)
                except Exception as e:  # noqa: BLE001
                    print("   fail", c, str(e)[:80])
                    continue
                res.append((tc, c))
        res.sort(key=lambda r: r[0])
        for tc, c in res[:5]:
            print(f"    {tc * 1e3:6.1f} us ({nbytes / tc / 1e9:4.0f} GB/s) {c}", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
