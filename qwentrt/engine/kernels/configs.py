"""Kernel configs an engine carries, keyed by kernel: only what the runtime reads (kernels/w4a16.py).
`qwentrt build` stores these defaults for the target's compute capability, or, when it builds on the
target GPU, the winners engine/tuning.py timed there (docs/ENGINE.md, "Kernel configs")."""

from __future__ import annotations

import copy
from typing import Any

# W4A16 GEMM per token bucket (untuned defaults; `qwentrt build` on the target GPU replaces them with
# timed winners per bucket and shape, see engine/tuning.py). sm_89 gets fewer stages: the 4090 has
# 100 KiB of shared memory per SM.
def _w4a16(stages: int) -> dict[str, dict[str, Any]]:
    def cfg(block_m: int, split_k: int) -> dict[str, dict[str, int]]:
        return {"default": {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                            "num_stages": stages}}
    return {"16": cfg(16, 8), "32": cfg(32, 4), "64": cfg(64, 2), "256": cfg(64, 1)}


# The GEMV at 1-2 tokens (kernels/w4a16_gemv.py): memory-bound there on any GPU, so untuned engines take it too
# (H100: 52 us a layer against the GEMM's 90). sm_90: the H100's timed winners for Qwen3-4B's shapes
# (scripts/device/h100_kernels.json, keyed "NxK"): the persistent "stream" GEMV (w4a16_gemv_stream.py; the 144 GEMVs
# of a step 1.47 -> 1.21 ms, batch-1 ITL 2.4 -> 2.2 ms: docs/KERNEL_NOTES.md, session 13), whose weights the model
# keeps tile-major; any other shape, and sm_89, the split-K kernel's safe middle.
_GEMV_SAFE = {"BLOCK_N": 128, "BLOCK_K": 16, "SPLIT_K": 20, "num_warps": 1, "num_stages": 2}


def _stream(per_sm: int, rows: int) -> dict[str, Any]:
    return {"LAYOUT": "stream", "BLOCK_N": 256, "PER_SM": per_sm, "num_warps": 1, "ROWS": rows, "STAGES": 0,
            "BLOCK_K": 8, "WINDOW": True}


_GEMV_H100 = {
    "6144x2560": _stream(12, 64),
    "2560x4096": _stream(8, 64),
    "19456x2560": _stream(12, 64),
    "2560x9728": _stream(12, 64),
    "default": _GEMV_SAFE,
}

# w4a16_gemv_deferred: the qkv / o / gate_up / down GEMVs leave float32 split-K sums for the next kernel to finish (no
# tile counter, no fence a program; w4a16_gemv.SplitKSums). H100: the 144 GEMVs of a step 1.593 -> 1.415 ms, ITL
# 2.5 -> 2.4 ms (docs/KERNEL_NOTES.md, session 11). Kept by `qwentrt build --tune` (the tuner adds tile configs).
# Programmatic dependent launch ("pdl", kernels/pdl.py) stays off: it made the same 144 GEMVs slower (1.93 ms;
# "late", the GEMV's trigger after its main loop: 1.52 against 1.45 ms, session 12).
DEFAULTS: dict[str, dict[str, Any]] = {
    "8.9": {"w4a16_decode": _w4a16(2), "w4a16_prefill_min_tokens": 512,  # from here on: dequantize + cuBLAS
            "w4a16_gemv_max_tokens": 1, "w4a16_gemv": {"default": _GEMV_SAFE}, "w4a16_gemv_deferred": True},
    "9.0": {"w4a16_decode": _w4a16(3), "w4a16_prefill_min_tokens": 512,
            "w4a16_gemv_max_tokens": 2, "w4a16_gemv": _GEMV_H100, "w4a16_gemv_deferred": True},
}


def default_kernel_configs(compute_capability: str) -> dict[str, Any]:
    base = DEFAULTS.get(compute_capability, DEFAULTS["8.9"])
    cfg = copy.deepcopy(base)
    cfg["tuned"] = False
    cfg["compute_capability"] = compute_capability
    return cfg
