"""W4A16 at 1 token (lab, not a test): a "K in the thread" GEMV beside the production one. The production GEMV is
ALU-bound; read on the CPU (scripts/sass_lab.py, sm_90) it runs ~5.7 SASS instructions per nibble, of which ~2.4
are layout work: its [BLOCK_K, PN, 2, 4] accumulator puts the 8 nibbles of a word on 8 threads, so every word goes
through shared memory (STS + LDS.128) and x is loaded 2 bytes at a time by every thread.

This variant keeps each packed word's 8 columns in 8 separate [BLOCK_K, PN] accumulators in the loaded words' own
layout (no join, no 4-D tensor, 128-bit word loads), one FFMA per nibble, reduced over K once per group (ACC2D; the
first version reduced every chunk, FMUL + FADD trees), with 2^23 passed in a register (one LOP3 per nibble, not
two), the high half shifted by inline PTX (LLVM otherwise makes each high nibble a shift + bitfield extract) and
unmasked loads where the tiles divide N (EVEN_N). sass_lab.py: ~4.0 instructions per nibble (PN 128, BLOCK_K 8,
4 warps: 96 registers, no spills) against ~5.7; prediction on the H100: the 1-token linears ~1.35x faster where
ALU-bound (gate_up 21.6 -> ~16 us), if the loads (no software pipelining in an unrolled chunk loop) keep up. The
split-K sums go through the production GEMV's workspace and counters (the last program of a tile writes y).

    python3 scripts/device/gemv_kthread_lab.py        # H100: the 4b model's four linears at 1 token, best config each
    TRITON_INTERPRET=1 python3 scripts/device/gemv_kthread_lab.py check   # CPU: against the reference
    python3 scripts/sass_lab.py                       # CPU: its SASS per config (and --production)
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
from qwentrt.engine.kernels.w4a16 import awq_linear  # noqa: E402
from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace  # noqa: E402

sys.path.insert(0, "scripts/device")
from gemv_lab import random_awq  # noqa: E402  (fresh random AutoAWQ-layout weights)


@triton.jit
def _nib(w, SHIFT: tl.constexpr, magic):
    """The nibble at bits SHIFT..SHIFT+3 (SHIFT < 16) of w, as q * 16^(SHIFT / 4) in float32, exactly. magic is
    0x4B000000 (2^23) passed in as a value, not a literal: with two immediates (mask and magic) the compiler splits
    the AND-OR into two LOP3s (sass_lab.py), with one in a register it is one."""
    return ((w & (15 << SHIFT)) | magic).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_words(ptrs, mask, EVEN_N: tl.constexpr):
    """The packed words of a chunk; unmasked where the column tiles divide N (EVEN_N), so that the loads can be
    vectorized (a mask along the words breaks the contiguity Triton needs for 128-bit loads)."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask[None, :], other=0)


@triton.jit
def _high_half(w, ASM_HI: tl.constexpr):
    """w >> 16. As inline PTX (ASM_HI, the GPU) the shift is opaque to LLVM, which otherwise folds it into each of
    the four nibbles' masks as a bitfield extract (a shift and an SGXT per nibble, sass_lab.py); the interpreter
    runs no PTX."""
    if ASM_HI:
        return tl.inline_asm_elementwise("shr.u32 $0, $1, 16;", "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return w >> 16


@triton.jit
def _dot_col(xb, q):
    """sum over the chunk's rows of x * q: [BLOCK_K, PN] -> [PN]."""
    return tl.sum(xb * q, axis=0)


@triton.jit
def _epilogue(acc, xsum, qz, s_ptr, cols, mask, SHIFT: tl.constexpr, magic):
    """One column of each word: s * (sum x q - z * sum x), the 16^p of the magic number taken out."""
    unscale: tl.constexpr = 1.0 / (1 << SHIFT)
    z = _nib(qz, SHIFT, magic) * unscale
    s = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return s * (acc * unscale - z * xsum)


@triton.jit
def _kthread_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K,
                    stride_xm, stride_qw, stride_qz, stride_s, stride_ym, magic,
                    GROUP: tl.constexpr, PN: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
                    ACC2D: tl.constexpr = False, EVEN_N: tl.constexpr = False, ASM_HI: tl.constexpr = False):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    words = pid_n * PN + tl.arange(0, PN)
    mask = words < N // 8
    rk = tl.arange(0, BLOCK_K)
    # column of half h, nibble p of word c: 8c + 2p + h (AWQ's order)
    c0 = words * 8
    o0 = tl.zeros([PN], tl.float32)
    o1 = tl.zeros([PN], tl.float32)
    o2 = tl.zeros([PN], tl.float32)
    o3 = tl.zeros([PN], tl.float32)
    o4 = tl.zeros([PN], tl.float32)
    o5 = tl.zeros([PN], tl.float32)
    o6 = tl.zeros([PN], tl.float32)
    o7 = tl.zeros([PN], tl.float32)
    for gi in range(GROUPS_PER_PROG):
        g = pid_k * GROUPS_PER_PROG + gi
        if ACC2D:  # [BLOCK_K, PN] accumulators: one FFMA per nibble, one reduction over K per group
            a0 = tl.zeros([BLOCK_K, PN], tl.float32)
            a1 = tl.zeros([BLOCK_K, PN], tl.float32)
            a2 = tl.zeros([BLOCK_K, PN], tl.float32)
            a3 = tl.zeros([BLOCK_K, PN], tl.float32)
            a4 = tl.zeros([BLOCK_K, PN], tl.float32)
            a5 = tl.zeros([BLOCK_K, PN], tl.float32)
            a6 = tl.zeros([BLOCK_K, PN], tl.float32)
            a7 = tl.zeros([BLOCK_K, PN], tl.float32)
            xs = tl.zeros([BLOCK_K], tl.float32)
            for kk in tl.static_range(0, GROUP, BLOCK_K):
                offs_k = g * GROUP + kk + rk
                x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
                w = _load_words(qw_ptr + offs_k[:, None] * stride_qw + words[None, :], mask, EVEN_N)
                hi = _high_half(w, ASM_HI)
                xb = x[:, None]
                a0 += xb * _nib(w, 0, magic)
                a1 += xb * _nib(w, 4, magic)
                a2 += xb * _nib(w, 8, magic)
                a3 += xb * _nib(w, 12, magic)
                a4 += xb * _nib(hi, 0, magic)
                a5 += xb * _nib(hi, 4, magic)
                a6 += xb * _nib(hi, 8, magic)
                a7 += xb * _nib(hi, 12, magic)
                xs += x
            a0 = tl.sum(a0, axis=0)
            a1 = tl.sum(a1, axis=0)
            a2 = tl.sum(a2, axis=0)
            a3 = tl.sum(a3, axis=0)
            a4 = tl.sum(a4, axis=0)
            a5 = tl.sum(a5, axis=0)
            a6 = tl.sum(a6, axis=0)
            a7 = tl.sum(a7, axis=0)
        else:  # [PN] accumulators, each chunk's product reduced over K at once
            a0 = tl.zeros([PN], tl.float32)
            a1 = tl.zeros([PN], tl.float32)
            a2 = tl.zeros([PN], tl.float32)
            a3 = tl.zeros([PN], tl.float32)
            a4 = tl.zeros([PN], tl.float32)
            a5 = tl.zeros([PN], tl.float32)
            a6 = tl.zeros([PN], tl.float32)
            a7 = tl.zeros([PN], tl.float32)
            xs = tl.zeros([BLOCK_K], tl.float32)
            for kk in tl.static_range(0, GROUP, BLOCK_K):
                offs_k = g * GROUP + kk + rk
                x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
                w = _load_words(qw_ptr + offs_k[:, None] * stride_qw + words[None, :], mask, EVEN_N)
                hi = _high_half(w, ASM_HI)
                xb = x[:, None]
                a0 += _dot_col(xb, _nib(w, 0, magic))
                a1 += _dot_col(xb, _nib(w, 4, magic))
                a2 += _dot_col(xb, _nib(w, 8, magic))
                a3 += _dot_col(xb, _nib(w, 12, magic))
                a4 += _dot_col(xb, _nib(hi, 0, magic))
                a5 += _dot_col(xb, _nib(hi, 4, magic))
                a6 += _dot_col(xb, _nib(hi, 8, magic))
                a7 += _dot_col(xb, _nib(hi, 12, magic))
                xs += x
        xsum = tl.sum(xs, axis=0)
        qz = tl.load(qz_ptr + g * stride_qz + words, mask=mask, other=0)
        qzh = qz >> 16
        sg = s_ptr + g * stride_s
        o0 += _epilogue(a0, xsum, qz, sg, c0 + 0, mask, 0, magic)  # half 0: p = 0..3 -> columns 0, 2, 4, 6
        o1 += _epilogue(a1, xsum, qz, sg, c0 + 2, mask, 4, magic)
        o2 += _epilogue(a2, xsum, qz, sg, c0 + 4, mask, 8, magic)
        o3 += _epilogue(a3, xsum, qz, sg, c0 + 6, mask, 12, magic)
        o4 += _epilogue(a4, xsum, qzh, sg, c0 + 1, mask, 0, magic)  # half 1 -> columns 1, 3, 5, 7
        o5 += _epilogue(a5, xsum, qzh, sg, c0 + 3, mask, 4, magic)
        o6 += _epilogue(a6, xsum, qzh, sg, c0 + 5, mask, 8, magic)
        o7 += _epilogue(a7, xsum, qzh, sg, c0 + 7, mask, 12, magic)
    ws = ws_ptr + m * N + c0
    tl.atomic_add(ws + 0, o0, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 2, o1, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 4, o2, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 6, o3, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 1, o4, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 3, o5, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 5, o6, mask=mask, sem="relaxed")
    tl.atomic_add(ws + 7, o7, mask=mask, sem="relaxed")
    tile = m * tl.num_programs(1) + pid_n
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    if done == tl.num_programs(2) - 1:  # the last program of this tile: y = the sum, workspace back to zero
        cols = c0[:, None] + tl.arange(0, 8)[None, :]
        cmask = mask[:, None]
        zero = tl.zeros([PN, 8], tl.float32)
        total = tl.atomic_add(ws_ptr + m * N + cols, zero, mask=cmask, sem="relaxed")
        tl.store(y_ptr + m * stride_ym + cols, total.to(y_ptr.dtype.element_ty), mask=cmask)
        tl.store(ws_ptr + m * N + cols, zero, mask=cmask)
        tl.store(count_ptr + tile, 0)


def kthread_gemv(x, qweight, qzeros, scales, group, cfg):
    """x [M, K] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = scales.shape[1]
    groups = k // group
    per = cfg["GROUPS_PER_PROG"]
    assert k % group == 0 and groups % per == 0 and group % cfg["BLOCK_K"] == 0 and n % 8 == 0
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, counts = split_k_workspace(x.device)
    grid = (m, triton.cdiv(n // 8, cfg["PN"]), groups // per)
    _kthread_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, x.stride(0), qweight.stride(0),
                          qzeros.stride(0), scales.stride(0), out.stride(0), 0x4B000000, GROUP=group, PN=cfg["PN"],
                          BLOCK_K=cfg["BLOCK_K"], GROUPS_PER_PROG=per, ACC2D=cfg.get("ACC2D", False),
                          EVEN_N=(n // 8) % cfg["PN"] == 0, ASM_HI=x.is_cuda,
                          num_warps=cfg["num_warps"],
                          num_stages=cfg.get("num_stages", 2))
    return out


def check() -> None:
    """CPU (TRITON_INTERPRET=1), fp32: against reference.awq_linear on fresh inputs, a partial column tile."""
    torch.manual_seed(0)
    for (n, k, m), cfg in itertools.product([(256, 256, 1), (200, 384, 2)],
                                            [{"PN": 16, "BLOCK_K": 32, "GROUPS_PER_PROG": 1, "num_warps": 1},
                                             {"PN": 32, "BLOCK_K": 64, "GROUPS_PER_PROG": 3, "num_warps": 1},
                                             {"PN": 16, "BLOCK_K": 32, "GROUPS_PER_PROG": 1, "num_warps": 1,
                                              "ACC2D": True}]):
        w = random_awq(n, k, 128, "cpu", torch.float32)
        if k // 128 % cfg["GROUPS_PER_PROG"]:
            continue
        x = torch.randn(m, k)
        ref = reference.awq_linear(x.double(), *[t if t.dtype == torch.int32 else t.double() for t in w], 128)
        for _ in range(2):  # twice: the workspace and counters come back to zero
            got = kthread_gemv(x, *w, 128, cfg)
            err = float((got.double() - ref).norm() / ref.norm())
            print(f"N {n} K {k} M {m} {cfg}: rel err {err:.2e}")
            assert err < 1e-5, err
        ws, counts = split_k_workspace(x.device)
        assert not ws.any() and not counts.any()


def main() -> None:
    dev = torch.device("cuda")
    from qwentrt.engine.tuning import time_in_graph
    kernels = json.load(open("scripts/device/h100_kernels.json"))
    shapes = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
    group, copies = 128, 8  # 8 weight copies per shape: > 50 MB, out of L2
    # A focused set (each config compiles in ~10 s: its K loop is unrolled): the 2-D accumulators with 8-row chunks,
    # the shapes sass_lab.py counts at ~4.0 SASS instructions per nibble (production ~5.7). KTHREAD_CFGS (JSON list)
    # overrides it.
    cfgs = json.loads(os.environ["KTHREAD_CFGS"]) if os.environ.get("KTHREAD_CFGS") else [
        {"PN": pn, "BLOCK_K": 8, "GROUPS_PER_PROG": per, "num_warps": nw, "ACC2D": True}
        for (pn, nw), per in itertools.product(((64, 2), (128, 2), (128, 4)), (1, 2))]
    totals = {"production": 0.0, "kthread": 0.0}
    for name, (n, k) in shapes.items():
        ws = [random_awq(n, k, group, dev, torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = awq_linear(x, *ws[0], group, kernels).float()
        prod = time_in_graph(lambda: [awq_linear(x, *w, group, kernels) for w in ws], replays=20) / copies
        best, best_ms = None, float("inf")
        for c in cfgs:
            if (k // group) % c["GROUPS_PER_PROG"]:
                continue
            try:
                got = kthread_gemv(x, *ws[0], group, c).float()
                err = float((got - ref).norm() / ref.norm())
                if not err < 1e-2:
                    print(f"  {name} {c}: WRONG (rel err {err:.2e})", flush=True)
                    continue
                ms = time_in_graph(lambda: [kthread_gemv(x, *w, group, c) for w in ws], replays=20) / copies
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"  {name} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            print(f"  {name} {c}: {ms * 1e3:6.1f} us", flush=True)
            if ms < best_ms:
                best, best_ms = c, ms
        nbytes = n * k // 2 + (k // group) * n * 2.5
        totals["production"] += prod
        totals["kthread"] += best_ms
        print(f"{name:>7} {n}x{k}: production {prod * 1e3:6.1f} us ({nbytes / prod / 1e6:5.0f} GB/s), "
              f"K in the thread {best_ms * 1e3:6.1f} us ({nbytes / best_ms / 1e6:5.0f} GB/s) {best}", flush=True)
    print(f"== 36 layers' linears at 1 token: production {totals['production'] * 36:.3f} ms, "
          f"K in the thread {totals['kthread'] * 36:.3f} ms", flush=True)


if __name__ == "__main__":
    check() if sys.argv[1:2] == ["check"] else main()
