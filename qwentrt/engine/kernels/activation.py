"""SwiGLU of the MLP (vLLM's silu_and_mul): x [T, 2I] = (gate | up) -> silu(gate) * up [T, I].

What it computes is `reference.silu_and_mul`, rounded as it is: silu(g) = g / (1 + exp(-g)) in float32,
rounded to x's dtype, then times up (float32 product rounded to x's dtype).
Layout: x rows may be strided (the last dim contiguous); out [T, I] new, x's dtype.

Grid: (T, cdiv(I, BLOCK)); a program takes BLOCK columns of one row. Launch parameters depend on shapes
only (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from qwentrt.engine.kernels import pdl
from qwentrt.engine.kernels.w4a16_gemv import SplitKSums

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ops.py dispatches to the reference
    triton = None

HAS_TRITON = triton is not None
BLOCK = 1024


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr,
                             PDL: tl.constexpr = False, X_SUMS: tl.constexpr = False):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        ty = out_ptr.dtype.element_ty  # x's dtype (or, for a GEMV's float32 sums, the dtype it would have stored)
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        if X_SUMS:  # rounded as the GEMV would have stored them; the workspace cleared
            gate = gate.to(ty)
            up = up.to(ty)
            tl.store(x_ptr + row * stride_x + cols, tl.zeros([BLOCK], tl.float32), mask=mask)
            tl.store(x_ptr + row * stride_x + inter + cols, tl.zeros([BLOCK], tl.float32), mask=mask)
        gate = gate.to(tl.float32)
        up = up.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`reference.silu_and_mul` with the Triton kernel: [..., 2I] -> [..., I]."""
    if not HAS_TRITON:
        raise RuntimeError("silu_and_mul's Triton kernel needs the triton package")
    dtype = x.dtype
    sums = isinstance(x, SplitKSums)  # a GEMV's float32 split-K sums, read and cleared
    if sums:
        x = x.sums
    shape = x.shape
    assert shape[-1] % 2 == 0
    inter = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], inter), dtype=dtype, device=x.device)
    if x2.shape[0] and inter:
        grid = (x2.shape[0], triton.cdiv(inter, BLOCK))
        _silu_and_mul_kernel[grid](x2, out, inter, x2.stride(0), out.stride(0), BLOCK=BLOCK, X_SUMS=sums, num_warps=4,
                                   **pdl.launch_kwargs(x.device))
    return out.view(*shape[:-1], inter)
