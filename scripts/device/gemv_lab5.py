"""Sweep GEMV v5 (scripts/device/gemv_v5.py) against the tuned production GEMV on the H100, 1 token, under CUDA
graphs over L2-defeating copies; SASS histogram of the best config."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemv_v5 import gemv_v5  # noqa: E402

from qwentrt.engine.kernels import reference  # noqa: E402
from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv  # noqa: E402
from qwentrt.engine.tuning import _random_weights, time_in_graph  # noqa: E402

SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
TUNED = {"6144x2560": 8, "2560x4096": 16, "19456x2560": 8, "2560x9728": 16}


def sass_histogram(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run(["nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        mt = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line)
        if mt:
            ops[mt.group(1)] += 1
    return f"{sum(ops.values())} instrs: " + " ".join(f"{k}:{v}" for k, v in ops.most_common(24))


def candidates(k, group):
    ng = k // group
    for pn in (8, 16, 32, 64):
        for bk in (8, 16, 32):
            for w in (1, 2, 4):
                if bk * pn * 8 // (32 * w) > 128 or bk * pn < 32 * w * 4:
                    continue
                for split in sorted({ng, max(1, ng // 2), max(1, ng // 4)}):
                    yield {"PN": pn, "BK": bk, "SPLIT_K": split, "num_warps": w}


def main():
    dev = torch.device("cuda")
    group = 128
    tot_cur = tot_new = 0.0
    best_cfgs = {}
    for name, (n, k) in SHAPES.items():
        key = f"{n}x{k}"
        ws = _random_weights(n, k, group, dev)
        nbytes = k * n // 2
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = reference.awq_linear(x.float(), ws[0][0], ws[0][1], ws[0][2].float(), group)
        cfg = dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=TUNED[key], num_warps=4, num_stages=3)
        t = time_in_graph(lambda: [w4a16_gemv(x, *w, group, cfg) for w in ws]) / len(ws)
        t0 = time.time()
        res = []
        for c in candidates(k, group):
            try:
                _, y = gemv_v5(x, *ws[0], group, c)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if err > 1e-2:
                    print("   WRONG", c, err)
                    continue
                tc = time_in_graph(lambda: [gemv_v5(x, *w, group, c) for w in ws]) / len(ws)
            except Exception as e:  # noqa: BLE001
                print("   fail", c, str(e)[:100])
                continue
            res.append((tc, c, err))
        res.sort(key=lambda r: r[0])
        tot_cur += t
        tot_new += res[0][0]
        best_cfgs[key] = res[0][1]
        print(f"{name:8s} tuned v4 {t * 1e3:6.1f} us ({nbytes / t / 1e6:5.0f} GB/s) | v5 best {res[0][0] * 1e3:6.1f} us "
              f"({nbytes / res[0][0] / 1e6:5.0f} GB/s) err {res[0][2]:.1e} [{time.time() - t0:.0f}s]", flush=True)
        for tc, c, _ in res[:6]:
            print(f"    {tc * 1e3:6.1f} us {c}", flush=True)
        if name == "gate_up":
            compiled, _ = gemv_v5(x, *ws[0], group, res[0][1])
            print("  SASS v5 best:", sass_histogram(compiled), flush=True)
        del ws
        torch.cuda.empty_cache()
    print(f"4 linears (int4 bytes only): v4 {tot_cur * 1e3:.1f} us, v5 {tot_new * 1e3:.1f} us; 36 layers "
          f"{36 * tot_cur:.3f} -> {36 * tot_new:.3f} ms")
    print("best:", best_cfgs)


if __name__ == "__main__":
    main()
