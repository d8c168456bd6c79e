"""Re-tune the W4A16 kernel configs for the 4b model's shapes on this GPU, without a checkpoint or a build
(what `qwentrt build --tune` stores in engine.json's `kernels`). Usage: retune.py OUT.json; prints the
per-bucket timings. scripts/device/h100_kernels.json is this script's output on the H100."""

from __future__ import annotations

import json
import sys
from importlib.resources import files

import torch

from qwentrt.config import Qwen3Config
from qwentrt.engine.tuning import tune

cfg = Qwen3Config.from_hf(json.loads((files("qwentrt") / "data" / "qwen3-4b-instruct-2507.config.json").read_text()))
kernels = tune(cfg, 128, torch.device("cuda"), log=lambda line: print(line, flush=True))
with open(sys.argv[1], "w") as f:
    json.dump(kernels, f, indent=1)
total = {}
for key, us in kernels["tuning_us"].items():
    if isinstance(us, float) and "/" in key and not key.startswith("gemv"):
        bucket = key.split("/")[0]
        total[bucket] = total.get(bucket, 0.0) + us
print("36 layers' linears per bucket (ms):", {b: round(t * 36 / 1e3, 2) for b, t in total.items()})
