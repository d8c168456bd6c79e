"""GEMV lab kernel v5 (H100 lab): nibbles become floats without shifts. A nibble at bits 4p of a 16-bit half,
OR-ed into the float 2^23, reads as 2^23 + q * 16^p; subtracting 2^23 leaves q * 16^p exactly, and x is
pre-scaled by 16^-p (exact). Per nibble: one LOP3, one FADD, one FFMA. The zero point leaves the inner loop:
sum_k x (q - z) s = s (sum_k x q - z sum_k x). Products accumulate elementwise within a group; one reduction
over rows per group."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwentrt.engine.kernels.w4a16_gemv import _workspace


@triton.jit
def _gemv_v5(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K, SPLIT_K,
             stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
             GROUP: tl.constexpr, PN: tl.constexpr, BK: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_pn = pid_n * PN + tl.arange(0, PN)
    mask = offs_pn < N // 8
    rk = tl.arange(0, BK)
    h = tl.arange(0, 2)
    p = tl.arange(0, 4)
    masks = 15 << (4 * p)  # nibble p of a 16-bit half
    inv = tl.exp2(-4.0 * p.to(tl.float32))  # 16^-p, exact
    # half h, nibble p of packed column c is AWQ position 4h + p = logical column 8c + 2p + h
    cols = offs_pn[:, None, None] * 8 + 2 * p[None, None, :] + h[None, :, None]  # [PN, 2, 4]
    cmask = mask[:, None, None]
    n_groups = K // GROUP
    g0 = pid_k * n_groups // SPLIT_K
    g1 = (pid_k + 1) * n_groups // SPLIT_K
    out = tl.zeros([PN, 2, 4], tl.float32)
    for g in range(g0, g1):
        acc = tl.zeros([BK, PN, 2, 4], tl.float32)
        xs = tl.zeros([BK], tl.float32)
        for kk in tl.static_range(0, GROUP, BK):
            offs_k = g * GROUP + kk + rk
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
            qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :], mask=mask[None, :], other=0)
            hv = tl.join(qw, qw >> 16)  # [BK, PN, 2]
            f = ((hv[:, :, :, None] & masks[None, None, None, :]) | 0x4B000000).to(tl.float32, bitcast=True)
            x4 = x[:, None] * inv[None, :]  # [BK, 4]
            acc += x4[:, None, None, :] * (f - 8388608.0)
            xs += x
        part = tl.sum(acc, axis=0)  # [PN, 2, 4]
        xsum = tl.sum(xs, axis=0)
        qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask, other=0)
        zh = tl.join(qz, qz >> 16)
        z = ((((zh[:, :, None] & masks[None, None, :]) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0)
             * inv[None, None, :])
        s = tl.load(s_ptr + g * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
        out += s * (part - z * xsum)
    y_ptrs = y_ptr + m * stride_ym + cols
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=cmask)
    else:
        ws_ptrs = ws_ptr + m * N + cols
        tl.atomic_add(ws_ptrs, out, mask=cmask, sem="relaxed")
        tile = m * tl.num_programs(1) + pid_n
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros([PN, 2, 4], dtype=tl.float32), mask=cmask, sem="relaxed")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=cmask)
            tl.store(ws_ptrs, tl.zeros([PN, 2, 4], dtype=tl.float32), mask=cmask)
            tl.store(count_ptr + tile, 0)


def gemv_v5(x, qweight, qzeros, scales, group, cfg):
    m, k = x.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pn, split = cfg["PN"], cfg["SPLIT_K"]
    grid = (m, triton.cdiv(n // 8, pn), split)
    ws, counts = _workspace(x.device)
    return _gemv_v5[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, split, x.stride(0), qweight.stride(0),
                          qzeros.stride(0), scales.stride(0), out.stride(0), GROUP=group, PN=pn, BK=cfg["BK"],
                          num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2)), out
