"""INT4 weights in AutoAWQ's GEMM layout, so third-party AWQ checkpoints load as they are.

For a linear with weight W [N, K] (out, in) and group size G:
  qweight int32 [K, N/8]   eight 4-bit values per int32 along N, nibble i holding column 8c + ORDER[i]
  qzeros  int32 [K/G, N/8] the integer zero points, packed the same way
  scales  fp16  [K/G, N]
and W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n].
"""

from __future__ import annotations

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(i) for i in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[R, N] integers in 0..15 -> [R, N/8] int32 in the AutoAWQ nibble order."""
    if values.dim() != 2 or values.shape[1] % 8:
        raise ValueError(f"pack_int4 needs [R, N] with N a multiple of 8, got {list(values.shape)}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError("pack_int4: values outside 0..15")
    v = values.to(torch.int32).reshape(values.shape[0], -1, 8)[:, :, list(AWQ_PACK_ORDER)]
    return (v << _SHIFTS.to(v.device)).sum(dim=-1, dtype=torch.int32)  # disjoint bits: sum == or


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[R, N/8] int32 -> [R, N] int32 in 0..15 (inverse of pack_int4)."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 needs a 2-D int32 tensor, got {packed.dtype} {list(packed.shape)}")
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [R, N/8, 8] in pack order
    return nib[:, :, list(_UNPACK_ORDER)].reshape(packed.shape[0], -1)


def pack_awq(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
             ) -> dict[str, torch.Tensor]:
    """Quantize W [N, K] with per-group scales/zeros [N, K/G] (from awq.pseudo_quantize) into the
    AutoAWQ GEMM tensors {qweight, qzeros, scales}."""
    n, k = weight.shape
    if k % group_size or n % 8:
        raise ValueError(f"weight {list(weight.shape)} does not fit group {group_size} / pack of 8")
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    q = torch.clamp(torch.round(weight.float() / s) + z, 0, 15).to(torch.int32)
    return {
        "qweight": pack_int4(q.t().contiguous()),
        "qzeros": pack_int4(zeros.to(torch.int32).t().contiguous()),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> W [N, K] (nn.Linear's layout) in `dtype`."""
    q = unpack_int4(qweight).float()  # [K, N]
    z = unpack_int4(qzeros).float().repeat_interleave(group_size, dim=0)  # [K, N]
    s = scales.float().repeat_interleave(group_size, dim=0)
    if q.shape != s.shape or z.shape != s.shape:
        raise ValueError(f"AWQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                         f"scales {list(scales.shape)}, group {group_size}")
    return ((q - z) * s).t().contiguous().to(dtype)
