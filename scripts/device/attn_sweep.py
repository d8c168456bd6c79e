"""Paged-attention decode at large batches (the throughput case: 256-512 sequences of ~1,500 tokens, FP8 KV,
Qwen3-4B's heads, block tables of the engine's full width): tile / warps / stages sweep under CUDA graphs (median of 50 replays),
time per layer and the KV bytes read per second. (H100 lab, not a test.) Usage: attn_sweep.py [BATCH,...]"""

import itertools
import sys

import torch

sys.path.insert(0, ".")
from qwentrt.engine.kernels import paged_attention as pa  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402
from tests.test_paged_attention_kernel import make_batch  # noqa: E402

FULL_PAGES = 1024
batches = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "256,512").split(",")]
for batch in batches:
    lens = torch.randint(1000, 2001, (batch,)).tolist()  # mid-run of 1000 in / 1000 out
    pages = -(-max(lens) // 32)
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=torch.float8_e4m3fn, device="cuda", extra_cols=FULL_PAGES - pages)
    kv_bytes = sum(lens) * 8 * 128 * 2  # K and V, one byte each, per layer
    out = torch.empty_like(inp["q"])
    results = []
    for tile, warps, stages in itertools.product((32, 64, 128, 256), (2, 4, 8), (2, 3, 4)):
        try:
            ms = time_in_graph(lambda: pa.paged_attention_decode(**inp, partition_size=None, out=out, tile_tokens=tile,
                                                                 num_warps=warps, num_stages=stages), replays=50)
            results.append((ms, tile, warps, stages))
        except Exception:  # noqa: BLE001 (a config that does not fit: not a candidate)
            results.append((float("inf"), tile, warps, stages))
    ms0 = time_in_graph(lambda: pa.paged_attention_decode(**inp, partition_size=None, out=out), replays=50)
    print(f"batch {batch}: default {ms0 * 1e3:.1f} us/layer ({kv_bytes / ms0 / 1e9:.2f} TB/s), x36 {ms0 * 36:.2f} ms")
    for ms, tile, warps, stages in sorted(results)[:8]:
        print(f"  tile {tile:3d} warps {warps} stages {stages}: {ms * 1e3:7.1f} us ({kv_bytes / ms / 1e9:.2f} TB/s)")
