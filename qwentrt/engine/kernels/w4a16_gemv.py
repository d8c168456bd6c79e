"""W4A16 GEMV for the decode range (a few tokens): y[M, N] = x[M, K] @ dequant(qweight)[K, N], AutoAWQ
GEMM layout (see w4a16.py), without tensor cores.

One program per (row m, tile of BLOCK_N columns, K split). The packed tile [BLOCK_K, BLOCK_N / 8] is loaded
once, densely, and unpacked in registers as [BLOCK_K, BLOCK_N / 8, 8] (logical column 8c + j is nibble
(0, 4, 1, 5, 2, 6, 3, 7)[j] of packed column c), so no data moves between threads. A nibble becomes a float
without a conversion instruction: (q | 0x4B000000) read as float32 is 2^23 + q, and subtracting
2^23 + z (the zero point) gives q - z exactly. Within a quantization group the scale is factored out:
sum_k x_k (q_kn - z_n) s_n = s_n * sum_k x_k (q_kn - z_n), one multiply per column and group.

Split-K partial sums go to a float32 workspace with atomic adds; the last split of each tile to finish
(an atomic counter per tile) writes the output in x's dtype and puts the workspace and its counter back
to zero, so a call is one launch: no memset, no cast kernel. The workspace and counters persist per
device (zero between calls), which also makes the kernel CUDA-graph safe.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAGIC = 0x4B000000  # float32 bits of 2^23
MAGIC_F = 8388608.0

if triton is not None:

    @triton.jit
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K,
                           stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
                           GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PN: tl.constexpr = BLOCK_N // 8
        offs_pn = pid_n * PN + tl.arange(0, PN)
        j = tl.arange(0, 8)
        shifts = ((j % 2) * 4 + j // 2) * 4  # bit offset of logical column j's nibble
        cols = offs_pn[:, None] * 8 + j[None, :]  # [PN, 8] logical columns
        mask_pn = offs_pn < N // 8
        mask_cols = mask_pn[:, None]
        acc = tl.zeros((PN, 8), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)  # K is a multiple of BLOCK_K
            qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + offs_pn[None, :], mask=mask_pn[None, :], other=0)
            q = ((qw[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
            g = k0 // GROUP  # BLOCK_K divides GROUP: the tile is inside one group
            qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
            zf = (((qz[:, None] >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            w = q.to(tl.float32, bitcast=True) - zf[None, :, :]  # q - z, exact
            part = tl.sum(x[:, None, None] * w, axis=0)  # [PN, 8]
            s = tl.load(s_ptr + g * stride_s + cols, mask=mask_cols, other=0.0).to(tl.float32)
            acc += part * s
        y_ptrs = y_ptr + m * stride_ym + cols
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_cols)
        else:
            ws_ptrs = ws_ptr + m * N + cols
            tl.atomic_add(ws_ptrs, acc, mask=mask_cols, sem="relaxed")
            tile = m * tl.num_programs(1) + pid_n
            tl.debug_barrier()  # every thread's adds are issued before the count goes up
            # acq_rel: this program's partial sums are visible before the count, and the last one sees all
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if done == SPLIT_K - 1:
                # read through the atomic unit (L2): the sum of every split; then leave zeros for the next call
                total = tl.atomic_add(ws_ptrs, tl.zeros((PN, 8), dtype=tl.float32), mask=mask_cols, sem="relaxed")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask_cols)
                tl.store(ws_ptrs, tl.zeros((PN, 8), dtype=tl.float32), mask=mask_cols)
                tl.store(count_ptr + tile, 0)


DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 3}
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
WORKSPACE_FLOATS = 1 << 22  # 16 MiB: M * N of the largest call (e.g. 16 tokens x 262,144 columns)
MAX_TILES = 1 << 16


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Persistent zeroed float32 workspace and tile counters (the kernel leaves them zero)."""
    if device not in _workspaces:
        _workspaces[device] = (torch.zeros(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                               torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
    return _workspaces[device]


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. Meant for M of 1 to a few: each row is its own program."""
    if triton is None:
        raise RuntimeError("the W4A16 GEMV kernel needs the triton package")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    m, k = x.shape
    n = scales.shape[1]
    block_k = min(cfg["BLOCK_K"], group_size)
    if group_size % block_k or k % block_k:
        raise ValueError(f"W4A16 GEMV: BLOCK_K {block_k} must divide the group size {group_size} and K {k}")
    if n % 8:
        raise ValueError(f"W4A16 GEMV: N ({n}) must be a multiple of 8")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = cfg["SPLIT_K"]
    grid = (m, triton.cdiv(n, cfg["BLOCK_N"]), split)
    ws, counts = _workspace(x.device)
    if split > 1 and (m * n > ws.numel() or grid[0] * grid[1] > counts.numel()):
        raise ValueError(f"W4A16 GEMV: {m} x {n} outputs exceed the split-K workspace; use SPLIT_K 1")
    _w4a16_gemv_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, x.stride(0), qweight.stride(0),
                             qzeros.stride(0), scales.stride(0), out.stride(0), GROUP=group_size,
                             BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split, num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out
