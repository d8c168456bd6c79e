"""The kernels the model calls, by name: Triton kernels on CUDA where one exists, the torch
references elsewhere (the CPU, or shapes a kernel does not cover). `configure` takes the engine's
kernel configs (tuned at build time, or the target's defaults)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from qwentrt.engine.kernels import activation as _activation
from qwentrt.engine.kernels import kv_write as _kv_write
from qwentrt.engine.kernels import norm as _norm
from qwentrt.engine.kernels import paged_attention as _paged_attention
from qwentrt.engine.kernels import pdl as _pdl
from qwentrt.engine.kernels import qk_norm_rope_write_kv as _qk_norm_rope_write_kv
from qwentrt.engine.kernels.prefill_attention import prefill_attention as _prefill_attention
from qwentrt.engine.kernels import reference
from qwentrt.engine.kernels import rope as _rope
from qwentrt.engine.kernels.reference import rope_cos_sin_cache  # noqa: F401  (re-exported: built once, at load)
from qwentrt.engine.kernels.w4a16 import awq_linear as _awq_linear
from qwentrt.engine.kernels.w4a16 import awq_linear_silu_mul as _awq_linear_silu_mul
from qwentrt.engine.kernels.w4a16 import gemv_config, gemv_deferred_wanted, gemv_tile_major_wanted
from qwentrt.engine.kernels.w4a16_gemv import DEFAULT_CONFIG as GEMV_DEFAULT_CONFIG
from qwentrt.engine.kernels.w4a16_gemv import SplitKSums, tile_major

_configs: dict[str, Any] = {}


def configure(kernel_configs: dict[str, Any]) -> None:
    _configs.clear()
    _configs.update(kernel_configs or {})
    override = os.environ.get("QWENTRT_GEMV_CONFIGS")  # labs / A/B: {"NxK": GEMV config} over the engine's
    if override:
        try:
            with open(override) as f:
                gemv = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"QWENTRT_GEMV_CONFIGS={override}: not a readable JSON file ({e})") from e
        if not isinstance(gemv, dict) or not all(isinstance(v, dict) for v in gemv.values()):
            raise ValueError(f'QWENTRT_GEMV_CONFIGS={override}: expected {{"NxK": {{config}}, ...}}')
        _configs["w4a16_gemv"] = dict(_configs.get("w4a16_gemv", {}), **gemv)
    _configs["w4a16_gemv_deferred"] = gemv_deferred_wanted(_configs)  # (the environment read once, here)
    _configs["w4a16_gemv_tile_major"] = gemv_tile_major_wanted(_configs)
    env = os.environ.get("QWENTRT_GEMV_DEFERRED_QKV")  # the qkv GEMV's sums to q/k-norm + RoPE + KV write (A/B)
    _configs["w4a16_gemv_deferred_qkv"] = DEFERRED_QKV if env is None else env != "0"
    _pdl.configure(_configs)  # programmatic dependent launch: `"pdl": true` (pdl.py)


# The qkv projection's split-K sums deferred to qk_norm_rope_write_kv too (with w4a16_gemv_deferred). H100, batch-1
# decode step: the qkv GEMVs -44 us, q/k-norm + RoPE + KV write +30 us (it reads float32 and clears them), the step
# 2471 -> 2452 us (docs/KERNEL_NOTES.md, session 12). QWENTRT_GEMV_DEFERRED_QKV=0 turns it off.
DEFERRED_QKV = True


def deferred_qkv() -> bool:
    return bool(_configs.get("w4a16_gemv_deferred_qkv", DEFERRED_QKV))


@functools.lru_cache(maxsize=None)
def _has_fp8(device: torch.device) -> bool:
    """FP8 e4m3 conversions in Triton need sm_89 or newer."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Store k, v into the paged caches at slot_mapping (-1: skip): the Triton kernel on CUDA."""
    if _kv_write.HAS_TRITON and k.is_cuda and (k_cache.dtype != torch.float8_e4m3fn or _has_fp8(k.device)):
        return _kv_write.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return reference.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _norm.HAS_TRITON and x.is_cuda and x.shape[-1] <= _norm.MAX_COLS:
        return _norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x); the inputs are not modified (x may be a GEMV's SplitKSums: read and
    cleared)."""
    if isinstance(x, SplitKSums) and residual is None:
        x = x.materialize()
    if _norm.HAS_TRITON and x.is_cuda and x.shape[-1] <= _norm.MAX_COLS:
        return _norm.fused_add_rms_norm(x, residual, weight, eps)
    if isinstance(x, SplitKSums):
        x = x.materialize()
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _rope.HAS_TRITON and q.is_cuda:
        return _rope.qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin)
    return reference.qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin)


def qk_norm_rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                          k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float,
                          v_scale: float, sums_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q/k RMSNorm + RoPE, k and v stored into the caches at slot_mapping (-1: skip); -> the new q. One Triton
    kernel on CUDA; elsewhere (the CPU, FP8 before sm_89) qk_norm_rope then write_kv, each dispatched.
    sums_dtype: q, k, v are views of the qkv GEMV's float32 split-K sums (SplitKSums.sums) it would have stored in
    that dtype: read as that, and cleared."""
    if (_qk_norm_rope_write_kv.HAS_TRITON and q.is_cuda
            and (k_cache.dtype != torch.float8_e4m3fn or _has_fp8(q.device))):
        return _qk_norm_rope_write_kv.qk_norm_rope_write_kv(q, k, v, q_weight, k_weight, eps, positions, cos_sin,
                                                            k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                                            sums_dtype)
    if sums_dtype is not None:
        rounded = [t.to(sums_dtype) for t in (q, k, v)]
        for t in (q, k, v):
            t.zero_()
        q, k, v = rounded
    q, k = qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x may be a GEMV's SplitKSums (read and cleared)."""
    if _activation.HAS_TRITON and x.is_cuda:
        return _activation.silu_and_mul(x)
    if isinstance(x, SplitKSums):
        x = x.materialize()
    return reference.silu_and_mul(x)


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, deferred: bool = False):
    """qweight: as `pack_weight` left it (either layout). deferred: the output goes to a kernel that takes a
    SplitKSums (w4a16_gemv.py)."""
    return _awq_linear(x, qweight, qzeros, scales, group_size, _configs, deferred)


# Where the model keeps INT4 weights tile-major when asked (`pack_weight`): the GEMV runs on CUDA only; elsewhere the
# torch reference would untile the weight on every call. (Tests add "cpu" to check the engine over either layout.)
TILE_MAJOR_DEVICES = ("cuda",)


def pack_weight(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The layout the model keeps an INT4 weight in, its only copy: tile-major (w4a16_gemv.tile_major, at the BLOCK_N
    of the GEMV's config for the shape: a GEMV program's rows contiguous) where the engine's configs ask for it
    (`w4a16_gemv_tile_major`, experimental, or the shape's GEMV is the "stream" one), the weight is on CUDA and the
    GEMV runs the shape at one token; else AutoAWQ's qweight itself. Every W4A16 path reads either (w4a16.py); the
    caller drops the AWQ tensor it passed."""
    if not (qweight.device.type in TILE_MAJOR_DEVICES and qweight.dim() == 2):
        return qweight
    cfg = gemv_config(_configs, 1, scales.shape[1], qweight.shape[0], group_size)
    if cfg is None or not (_configs.get("w4a16_gemv_tile_major") or cfg.get("LAYOUT") == "stream"):
        return qweight  # (the persistent "stream" GEMV reads tile-major weights only: packed whatever the knob)
    return tile_major(qweight, dict(GEMV_DEFAULT_CONFIG, **cfg)["BLOCK_N"])


def awq_linear_of_silu_mul(gate_up: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                           scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """awq_linear(silu_and_mul(gate_up)): one launch where the GEMV runs (a few tokens on CUDA), else the two."""
    if isinstance(gate_up, SplitKSums):
        return awq_linear(silu_and_mul(gate_up), qweight, qzeros, scales, group_size, deferred=True)
    out = _awq_linear_silu_mul(gate_up, qweight, qzeros, scales, group_size, _configs)
    if out is None:
        out = awq_linear(silu_and_mul(gate_up), qweight, qzeros, scales, group_size, deferred=True)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, k_scale, v_scale):
    """All-decode batches on CUDA: the split-KV Triton kernel; otherwise the reference."""
    return _paged_attention.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                            k_scale, v_scale)


def attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale):
    """Attention of a mixed batch laid out decodes first (AttentionMetadata): the first meta.num_decodes
    sequences have one query token each (the split-KV decode kernel on CUDA), the rest (meta.prefill) run
    prefill/extend attention over their pages, all in one call (prefill_attention.py)."""
    d = meta.num_decodes
    if meta.prefill is None:
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, scale,
                               k_scale, v_scale)
    prefill = _prefill_attention(q, k_cache, v_cache, meta.prefill, scale, k_scale, v_scale)
    if not d:
        return prefill
    tables, cu, ctx = meta.decodes
    decode = paged_attention(q[:d], k_cache, v_cache, tables, cu, ctx, scale, k_scale, v_scale)
    return torch.cat([decode, prefill])
