"""Paged-attention decode partition sizes as the engine's graphs see them (block tables full width: max_seq_len
32768), FP8 KV, Qwen3-4B shapes; CUDA-graph time per layer. (H100 lab, not a test.)"""

import sys

import torch

sys.path.insert(0, ".")
from qwentrt.engine.kernels import paged_attention as pa  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402
from tests.test_paged_attention_kernel import make_batch  # noqa: E402

FULL_PAGES = 1024
for batch, context in ((1, 1024), (1, 2048), (16, 1024), (64, 1024), (64, 2048), (256, 1024), (256, 2048)):
    pages = -(-context // 32)
    lens = [context] * batch
    line = []
    for psize in (None, 32, 64, 128, 256, 512):
        inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                         kv_dtype=torch.float8_e4m3fn, device="cuda", extra_cols=FULL_PAGES - pages)
        out = torch.empty_like(inp["q"])
        try:
            ms = time_in_graph(lambda: pa.paged_attention_decode(**inp, partition_size=psize, out=out), replays=50)
            line.append(f"{psize or 'auto'}:{ms * 1e3:6.1f}")
        except Exception as e:  # noqa: BLE001
            line.append(f"{psize}: fail {str(e)[:60]}")
    auto = pa.auto_partition_size(batch, 8, FULL_PAGES * 32, 132)
    print(f"batch {batch:3d} ctx {context:5d} (auto={auto}) us: " + "  ".join(line), flush=True)
