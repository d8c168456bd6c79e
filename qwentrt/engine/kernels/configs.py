"""Kernel configs an engine carries, keyed by kernel: only what the runtime reads (kernels/w4a16.py).
`qwentrt build` stores these defaults for the target's compute capability, or, when it builds on the
target GPU, the winners engine/tuning.py timed there (docs/ENGINE.md, "Kernel configs")."""

from __future__ import annotations

from typing import Any

# W4A16 GEMM per token bucket (untuned defaults; `qwentrt build` on the target GPU replaces them with
# timed winners per bucket and shape, see engine/tuning.py). sm_89 gets fewer stages: the 4090 has
# 100 KiB of shared memory per SM.
def _w4a16(stages: int) -> dict[str, dict[str, Any]]:
    def cfg(block_m: int, split_k: int) -> dict[str, dict[str, int]]:
        return {"default": {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                            "num_stages": stages}}
    return {"16": cfg(16, 8), "32": cfg(32, 4), "64": cfg(64, 2), "256": cfg(64, 1)}


DEFAULTS: dict[str, dict[str, Any]] = {
    "8.9": {"w4a16_decode": _w4a16(2), "w4a16_prefill_min_tokens": 512},  # from here on: dequantize + cuBLAS
    "9.0": {"w4a16_decode": _w4a16(3), "w4a16_prefill_min_tokens": 512},
}


def default_kernel_configs(compute_capability: str) -> dict[str, Any]:
    base = DEFAULTS.get(compute_capability, DEFAULTS["8.9"])
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    cfg["tuned"] = False
    cfg["compute_capability"] = compute_capability
    return cfg
