"""RMSNorm and the fused residual-add + RMSNorm of the decoder layer (vLLM's rms_norm / fused_add_rms_norm).

What they compute is `reference.rms_norm` and `reference.fused_add_rms_norm`, rounded as they are:
  h     = residual + x                      in the residual's (promoted) dtype; h = x without a residual
  y     = h * rsqrt(mean(h^2) + eps)        in float32, rounded to h's dtype
  out   = weight * y                        in the promoted dtype of weight and h
Layout: x, residual [T, N] (rows may be strided, N contiguous), weight [N]; out [T, N] new; the new
residual h is written to a new tensor (the inputs are not modified), returned as (out, h).

Grid: (T,); one program normalizes one row, the whole row in registers (N up to 64K), math in float32.
Launch parameters depend on shapes only (CUDA-graph safe).
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
MAX_COLS = 65536


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, n_cols, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                         X_SUMS: tl.constexpr = False):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if X_SUMS:  # a GEMV's float32 split-K sums: as it would have stored them, and the workspace cleared
            h = h.to(residual_out_ptr.dtype.element_ty)
            tl.store(x_ptr + row * stride_x + cols, tl.zeros([BLOCK], tl.float32), mask=mask)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
            h = (r.to(tl.float32) + h.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
            tl.store(residual_out_ptr + row * stride_ro + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
        y = (hf * rstd).to(h.dtype)  # the reference normalizes in float32 and rounds to h's dtype
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        out = y.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])  # a view where the layout allows it
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    if not HAS_TRITON:
        raise RuntimeError("the RMSNorm Triton kernel needs the triton package")
    sums = isinstance(x, SplitKSums)  # (with a residual: the new residual is where the rounded sums go)
    if sums and residual is None:
        x, sums = x.materialize(), False
    x_dtype = x.dtype
    if sums:
        x = x.sums
    shape, n = x.shape, x.shape[-1]
    assert weight.shape == (n,) and n <= MAX_COLS, "one row per program: N up to 64K"
    assert residual is None or residual.shape == shape
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    h_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x_dtype)
    h2 = x2 if residual is None else torch.empty(x2.shape, dtype=h_dtype, device=x.device)  # the new residual
    weight = weight.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, h2, n, float(eps),
                                         x2.stride(0), r2.stride(0), out.stride(0), h2.stride(0),
                                         HAS_RESIDUAL=residual is not None, BLOCK=block, X_SUMS=sums,
                                         num_warps=min(16, max(1, block // 512)), **pdl.launch_kwargs(x.device))
    return out.view(shape), (x if residual is None else h2.view(shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`reference.rms_norm` over the last dim with the Triton kernel."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.fused_add_rms_norm`: (rms_norm(residual + x), residual + x), or (rms_norm(x), x)."""
    return _launch(x, residual, weight, eps)
