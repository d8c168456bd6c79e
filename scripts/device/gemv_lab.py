"""GEMV lab (H100): the current W4A16 GEMV against candidate kernels, 4 linear shapes of Qwen3-4B, 1 token,
under CUDA graphs over L2-defeating weight copies. Prints us per linear and GB/s, best per shape.

    python3 scripts/device/gemv_lab.py [quick]
"""

from __future__ import annotations

import itertools
import sys
import time

import torch
import triton
import triton.language as tl

from qwentrt.engine.kernels import reference
from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv, _workspace
from qwentrt.engine.tuning import _random_weights, time_in_graph

MAGIC = 0x4B000000
MAGIC_F = 8388608.0


@triton.jit
def _nib(qw, P: tl.constexpr):
    """Nibble position P of every int32 as an exact float32 (q), via the 2^23 magic number."""
    return (((qw >> (4 * P)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_wide(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K, SPLIT_K,
               stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
               GROUP: tl.constexpr, PN: tl.constexpr, BK: tl.constexpr):
    """Threads along packed columns (16 B each), K rows in-thread: the per-nibble sums need no data exchange.
    Split s owns a contiguous run of groups; sum_k x (q - z) s = s * (sum_k x q - z * sum_k x)."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_pn = pid_n * PN + tl.arange(0, PN)
    mask = offs_pn < N // 8
    rk = tl.arange(0, BK)
    n_groups = K // GROUP
    g0 = pid_k * n_groups // SPLIT_K
    g1 = (pid_k + 1) * n_groups // SPLIT_K
    a0 = tl.zeros([PN], tl.float32)
    a1 = tl.zeros([PN], tl.float32)
    a2 = tl.zeros([PN], tl.float32)
    a3 = tl.zeros([PN], tl.float32)
    a4 = tl.zeros([PN], tl.float32)
    a5 = tl.zeros([PN], tl.float32)
    a6 = tl.zeros([PN], tl.float32)
    a7 = tl.zeros([PN], tl.float32)
    for g in range(g0, g1):
        p0 = tl.zeros([PN], tl.float32)
        p1 = tl.zeros([PN], tl.float32)
        p2 = tl.zeros([PN], tl.float32)
        p3 = tl.zeros([PN], tl.float32)
        p4 = tl.zeros([PN], tl.float32)
        p5 = tl.zeros([PN], tl.float32)
        p6 = tl.zeros([PN], tl.float32)
        p7 = tl.zeros([PN], tl.float32)
        xs = tl.zeros([BK], tl.float32)
        for kk in tl.static_range(0, GROUP, BK):
            offs_k = g * GROUP + kk + rk
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
            qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :], mask=mask[None, :], other=0)
            xb = x[:, None]
            xs += x
            p0 += tl.sum(xb * _nib(qw, 0), axis=0)
            p1 += tl.sum(xb * _nib(qw, 1), axis=0)
            p2 += tl.sum(xb * _nib(qw, 2), axis=0)
            p3 += tl.sum(xb * _nib(qw, 3), axis=0)
            p4 += tl.sum(xb * _nib(qw, 4), axis=0)
            p5 += tl.sum(xb * _nib(qw, 5), axis=0)
            p6 += tl.sum(xb * _nib(qw, 6), axis=0)
            p7 += tl.sum(xb * _nib(qw, 7), axis=0)
        xsum = tl.sum(xs, axis=0)
        qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask, other=0)
        srow = s_ptr + g * stride_s + offs_pn * 8
        # nibble position p holds logical column (0, 2, 4, 6, 1, 3, 5, 7)[p] (AWQ order)
        a0 += (p0 - _nib(qz, 0) * xsum) * tl.load(srow + 0, mask=mask, other=0.0).to(tl.float32)
        a1 += (p1 - _nib(qz, 1) * xsum) * tl.load(srow + 2, mask=mask, other=0.0).to(tl.float32)
        a2 += (p2 - _nib(qz, 2) * xsum) * tl.load(srow + 4, mask=mask, other=0.0).to(tl.float32)
        a3 += (p3 - _nib(qz, 3) * xsum) * tl.load(srow + 6, mask=mask, other=0.0).to(tl.float32)
        a4 += (p4 - _nib(qz, 4) * xsum) * tl.load(srow + 1, mask=mask, other=0.0).to(tl.float32)
        a5 += (p5 - _nib(qz, 5) * xsum) * tl.load(srow + 3, mask=mask, other=0.0).to(tl.float32)
        a6 += (p6 - _nib(qz, 6) * xsum) * tl.load(srow + 5, mask=mask, other=0.0).to(tl.float32)
        a7 += (p7 - _nib(qz, 7) * xsum) * tl.load(srow + 7, mask=mask, other=0.0).to(tl.float32)
    # [PN, 8] in logical column order
    acc = tl.join(tl.join(tl.join(a0, a2), tl.join(a1, a3)), tl.join(tl.join(a4, a6), tl.join(a5, a7)))
    acc = tl.reshape(acc, [PN, 8])
    cols = offs_pn[:, None] * 8 + tl.arange(0, 8)[None, :]
    cmask = mask[:, None]
    y_ptrs = y_ptr + m * stride_ym + cols
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=cmask)
    else:
        ws_ptrs = ws_ptr + m * N + cols
        tl.atomic_add(ws_ptrs, acc, mask=cmask, sem="relaxed")
        tile = m * tl.num_programs(1) + pid_n
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros((PN, 8), dtype=tl.float32), mask=cmask, sem="relaxed")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=cmask)
            tl.store(ws_ptrs, tl.zeros((PN, 8), dtype=tl.float32), mask=cmask)
            tl.store(count_ptr + tile, 0)


def gemv_wide(x, qweight, qzeros, scales, group, cfg):
    m, k = x.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pn, split = cfg["PN"], cfg["SPLIT_K"]
    grid = (m, triton.cdiv(n // 8, pn), split)
    ws, counts = _workspace(x.device)
    _gemv_wide[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, split, x.stride(0), qweight.stride(0),
                     qzeros.stride(0), scales.stride(0), out.stride(0), GROUP=group, PN=pn, BK=cfg["BK"],
                     num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2))
    return out


SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
CURRENT = {"6144x2560": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3),
           "2560x4096": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=16, num_warps=4, num_stages=3),
           "19456x2560": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3),
           "2560x9728": dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=16, num_warps=4, num_stages=3)}


def wide_candidates(quick: bool):
    out = []
    for (pn, warps), bk, split in itertools.product(
            [(64, 1), (128, 1), (128, 2), (256, 2), (512, 4)],
            (16, 32), (2, 4, 5, 8, 10, 16, 20)):
        if quick and (bk != 16 or split not in (4, 10, 16) or pn == 512):
            continue
        out.append({"PN": pn, "BK": bk, "SPLIT_K": split, "num_warps": warps})
    return out


def main():
    quick = "quick" in sys.argv[1:]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    group = 128
    total_cur = total_best = 0.0
    for name, (n, k) in SHAPES.items():
        key = f"{n}x{k}"
        ws = _random_weights(n, k, group, dev)
        nbytes = k * n // 2 + (k // group) * n * 2 + (k // group) * n // 2
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        # correctness of the new kernel against the reference, first copy
        ref = reference.awq_linear(x.float(), ws[0][0], ws[0][1], ws[0][2].float(), group)
        t0 = time.time()
        cur = time_in_graph(lambda: [w4a16_gemv(x, *w, group, CURRENT[key]) for w in ws]) / len(ws)
        res = []
        for c in wide_candidates(quick):
            if k // group < c["SPLIT_K"]:
                continue
            try:
                y = gemv_wide(x, *ws[0], group, c).float()
                err = ((y - ref).norm() / ref.norm()).item()
                if err > 2e-2:
                    print(f"  {name} {c}: WRONG rel err {err:.3g}")
                    continue
                ms = time_in_graph(lambda: [gemv_wide(x, *w, group, c) for w in ws]) / len(ws)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {c}: {type(e).__name__}: {str(e)[:120]}")
                continue
            res.append((ms, c, err))
            print(f"    {name} {ms * 1e3:6.1f} us {c} [{time.time() - t0:.0f}s]", flush=True)
        res.sort(key=lambda r: r[0])
        best = res[0]
        total_cur += cur
        total_best += best[0]
        print(f"{name:8s} {key:>11}: current {cur * 1e3:6.1f} us ({nbytes / cur / 1e9:5.0f} GB/s) | wide best "
              f"{best[0] * 1e3:6.1f} us ({nbytes / best[0] / 1e9:5.0f} GB/s) {best[1]} err {best[2]:.2g}  "
              f"[{time.time() - t0:.0f}s]")
        for ms, c, _ in res[1:6]:
            print(f"            {ms * 1e3:6.1f} us {c}")
        del ws
        torch.cuda.empty_cache()
    print(f"4 linears: current {total_cur * 1e3:.1f} us, wide {total_best * 1e3:.1f} us; 36 layers: "
          f"{36 * total_cur:.3f} ms -> {36 * total_best:.3f} ms")


if __name__ == "__main__":
    main()
