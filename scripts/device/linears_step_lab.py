"""The 36 layers' linears of one batch-1 decode step as the decode graph runs them: qkv, o, gate_up, down per
layer, 144 GEMVs back to back in one CUDA graph, each layer its own fresh random weights (1.9 GB: out of L2), with
the engine's GEMV configs (scripts/device/h100_kernels_splitk.json, the split-K winners, or $KERNELS). This is the issue's "linears at 1 token"
figure with the gaps between kernels in it (gemv_words_lab.py times each shape alone). Variants ($VARIANTS): PDL off / on / late,
the split-K counter as built / relaxed (what its acq_rel fence costs; lab only), deferred split-K (all four GEMVs
leave float32 sums; here nothing consumes them, so a replay's sums pile up: timing only).
GPU lab, not a test.

    python3 scripts/device/linears_step_lab.py            # ~1 minute
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "scripts/device")
from gemv_lab import random_awq  # noqa: E402

from qwentrt.engine.kernels import pdl  # noqa: E402
from qwentrt.engine.kernels.w4a16 import gemv_config  # noqa: E402
from qwentrt.engine.kernels.w4a16_gemv import reset_split_k_workspaces, tile_major, w4a16_gemv  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402

SHAPES = [("qkv", 6144, 2560), ("o", 2560, 4096), ("gate_up", 19456, 2560), ("down", 2560, 9728)]
LAYERS = int(os.environ.get("LAYERS", "36"))
GROUP = 128
dev = torch.device("cuda")
configs = json.load(open(os.environ.get("KERNELS", "scripts/device/h100_kernels_splitk.json")))
torch.manual_seed(0)
weights = [{name: random_awq(n, k, GROUP, dev, torch.bfloat16) for name, n, k in SHAPES} for _ in range(LAYERS)]
cfg = {name: gemv_config(dict(configs, w4a16_gemv_max_tokens=max(1, configs.get("w4a16_gemv_max_tokens", 1))),
                         1, n, k, GROUP) for name, n, k in SHAPES}
xs = {k: torch.randn(1, k, device=dev, dtype=torch.bfloat16) for _, _, k in SHAPES}
total_bytes = sum(w.numel() * w.element_size() for layer in weights for t in layer.values() for w in t)


tiled_weights = None  # the same weights tile-major (w4a16_gemv.tile_major): made on first use


def step(relaxed: bool, deferred: bool, tiled: bool) -> None:
    for i, layer in enumerate(weights):
        for name, n, k in SHAPES:
            qweight, qzeros, scales = layer[name]
            if tiled:
                qweight = tiled_weights[i][name]
            w4a16_gemv(xs[k], qweight, qzeros, scales, GROUP, cfg[name], _lab_relaxed_counter=relaxed,
                       deferred=deferred)


def timed(relaxed: bool, deferred: bool, tiled: bool = False) -> float:
    global tiled_weights
    if tiled and tiled_weights is None:
        tiled_weights = [{name: tile_major(layer[name][0], cfg[name]["BLOCK_N"]) for name, _, _ in SHAPES}
                         for layer in weights]
    ms = time_in_graph(lambda: step(relaxed, deferred, tiled), replays=20)
    reset_split_k_workspaces()  # (deferred: nothing consumed the sums)
    return ms


print(f"GPU {torch.cuda.get_device_name()}; {LAYERS} layers x 4 GEMVs, {total_bytes / 1e9:.2f} GB of weights; "
      f"configs: {json.dumps(cfg)}")
# VARIANTS: ';'-separated "PDL:PROTOCOL", PDL 0 / 1 (trigger at the GEMV's start) / late (after its main loop),
# PROTOCOL "as built" (the counter), "relaxed counter" or "deferred"; a third field "tiled": tile-major weights
VARIANTS = os.environ.get("VARIANTS", "0:as built;0:deferred;0:deferred:tiled;late:deferred;late:deferred:tiled")
results = {}
for rounds in range(2):  # twice, interleaved: drift shows as spread
    for variant in VARIANTS.split(";"):
        mode, protocol, *layout = variant.split(":")
        pdl.configure({"pdl": {"0": False, "1": True, "late": "late"}[mode]})
        name = f"pdl={mode} {protocol}{' tile-major' if layout == ['tiled'] else ''}"
        ms = timed(protocol == "relaxed counter", protocol == "deferred", layout == ["tiled"])
        results.setdefault(name, []).append(ms)
for name, ms in results.items():
    best = min(ms)
    print(f"{name:28s} {best:7.3f} ms ({', '.join(f'{t:.3f}' for t in ms)}): {total_bytes / best / 1e9:5.2f} TB/s, "
          f"{best * 1e3 / (4 * LAYERS):5.2f} us a GEMV")
