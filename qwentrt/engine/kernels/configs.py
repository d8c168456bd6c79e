"""Kernel configs an engine carries (tile sizes, warps, stages, split-K), keyed by kernel and shape.
`qwentrt build` stores the defaults for the target's compute capability; build-time tuning (timing the
candidates on the target GPU) replaces them with measured winners."""

from __future__ import annotations

from typing import Any

# Defaults per compute capability; shapes not listed use "default". Tuned entries are keyed "N x K".
_W4A16_DECODE = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}
_W4A16_PREFILL = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
# PARTITION_SIZE None: sized per batch so (batch x kv heads x partitions) fills the SMs (measured on
# the H100 within 0-12% of the best of 30 configs); 3 stages need 96 KiB of shared memory (sm_90).
_PAGED_ATTN_DECODE = {"PARTITION_SIZE": None, "num_warps": 4, "num_stages": 2}

DEFAULTS: dict[str, dict[str, Any]] = {
    "8.9": {
        "w4a16_decode": {"default": _W4A16_DECODE | {"num_stages": 2}},
        "w4a16_prefill": {"default": _W4A16_PREFILL | {"num_stages": 3}},
        "w4a16_prefill_min_tokens": 64,  # from this many tokens on: dequantize + cuBLAS may win
        "paged_attention_decode": {"default": _PAGED_ATTN_DECODE},
        "cuda_graph_batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    },
    "9.0": {
        "w4a16_decode": {"default": _W4A16_DECODE},
        "w4a16_prefill": {"default": _W4A16_PREFILL | {"BLOCK_M": 128}},
        "w4a16_prefill_min_tokens": 64,
        "paged_attention_decode": {"default": _PAGED_ATTN_DECODE | {"num_stages": 3}},
        "cuda_graph_batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    },
}


def default_kernel_configs(compute_capability: str, max_batch_size: int) -> dict[str, Any]:
    base = DEFAULTS.get(compute_capability, DEFAULTS["8.9"])
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    sizes = [b for b in base["cuda_graph_batch_sizes"] if b < max_batch_size] + [max_batch_size]
    cfg["cuda_graph_batch_sizes"] = sorted(set(sizes))
    cfg["tuned"] = False
    cfg["compute_capability"] = compute_capability
    return cfg
