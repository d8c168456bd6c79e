"""Kernel configs an engine carries, keyed by kernel: only what the runtime reads (kernels/ops.py).
`qwentrt build` stores the defaults for the target's compute capability; build-time tuning (timing
candidates on the target GPU, issue 5) will replace them with measured winners per shape."""

from __future__ import annotations

from typing import Any

# W4A16 decode GEMM: the best of five configs timed on the H100 (docs/KERNEL_NOTES.md); untested on sm_89,
# where fewer stages keep the shared memory within the 4090's 100 KiB.
_W4A16_DECODE = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}

DEFAULTS: dict[str, dict[str, Any]] = {
    "8.9": {
        "w4a16_decode": {"default": _W4A16_DECODE | {"num_stages": 2}},
        "w4a16_prefill_min_tokens": 64,  # from this many tokens on: dequantize + cuBLAS
    },
    "9.0": {
        "w4a16_decode": {"default": _W4A16_DECODE},
        "w4a16_prefill_min_tokens": 64,
    },
}


def default_kernel_configs(compute_capability: str) -> dict[str, Any]:
    base = DEFAULTS.get(compute_capability, DEFAULTS["8.9"])
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    cfg["tuned"] = False
    cfg["compute_capability"] = compute_capability
    return cfg
