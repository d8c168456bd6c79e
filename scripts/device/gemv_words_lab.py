"""W4A16 at 1 token on the GPU (lab, not a test): the production GEMV's "lanes" layout (the configs tuned on
the H100, scripts/device/h100_kernels_splitk.json) against "words" (each thread owns whole packed words; ~4.1 against ~5.7
SASS instructions per nibble on sm_90, scripts/sass_lab.py) and "window" (words with one LOP3 + one FFMA per
nibble, ~3.5), each unrolled (KSTAGES 0) or as a cp.async-pipelined loop (KSTAGES 3), for the 4b model's four linears, each in a CUDA graph
over 8 weight copies (out of L2). Prints the best words config per shape, the 36 layers' totals, and the
`w4a16_gemv` entries to paste into h100_kernels.json where words wins. ~1-2 minutes (a config compiles in ~5 s).

    python3 scripts/device/gemv_words_lab.py
    KERNELS_OUT=/tmp/kernels.json python3 scripts/device/gemv_words_lab.py   # also writes the merged configs
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, "scripts/device")
from gemv_lab import random_awq  # noqa: E402  (fresh random AutoAWQ-layout weights)

from qwentrt.engine.kernels import reference  # noqa: E402
from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, w4a16_gemv  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402

SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
def _env(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).split(";")


# LAB_LAYOUTS, LAB_KSTAGES, LAB_TILES (BLOCK_N,BLOCK_K,num_warps;...), LAB_SPLITS narrow or widen the sweep;
# LAB_FENCE=0 skips timing the lanes and best configs without the split-K counter's fence
WORDS = [{"BLOCK_N": int(bn), "BLOCK_K": int(bk), "SPLIT_K": int(sk), "num_warps": int(nw), "num_stages": 2,
          "LAYOUT": layout, "KSTAGES": int(ks)}
         for layout, ks, (bn, bk, nw), sk in itertools.product(
             _env("LAB_LAYOUTS", "words;window"), _env("LAB_KSTAGES", "0;3"),
             [t.split(",") for t in _env("LAB_TILES", "512,8,2;1024,8,4;512,16,2;256,8,1")],
             _env("LAB_SPLITS", "8;16;32;128"))]


DEFERRED = os.environ.get("LAB_DEFERRED", "1") == "1"  # time as the engine runs them: deferred split-K sums


def timed(x, ws, group, cfg, **kw) -> float:
    """us a call, the copies in one graph; deferred (LAB_DEFERRED, the engine's default): the sums pile up in the
    workspace (nothing consumes them here), cleared after."""
    ms = time_in_graph(lambda: [w4a16_gemv(x, *w, group, cfg, deferred=DEFERRED, **kw) for w in ws],
                       replays=20) / len(ws)
    for t in split_k_workspace(x.device):
        t.zero_()
    return ms


def main() -> None:
    dev = torch.device("cuda")
    tuned = json.load(open("scripts/device/h100_kernels_splitk.json"))["w4a16_gemv"]  # (split-K winners)
    group, copies = 128, 8
    totals = {"lanes": 0.0, "words": 0.0}
    winners = {}
    for name, (n, k) in SHAPES.items():
        ws = [random_awq(n, k, group, dev, torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = reference.awq_linear(x.float(), *[t if t.dtype == torch.int32 else t.float() for t in ws[0]], group)
        lanes = tuned.get(f"{n}x{k}", tuned["default"])
        t_lanes = timed(x, ws, group, lanes)
        best, best_ms = None, float("inf")
        for c in WORDS:
            c = dict(c, SPLIT_K=min(c["SPLIT_K"], k // group))
            try:
                out = w4a16_gemv(x, *ws[0], group, c).float()
                err = float((out - ref).norm() / ref.norm())
                if not err < 1e-2:
                    print(f"  {name} {c}: WRONG (rel err {err:.2e})", flush=True)
                    continue
                ms = timed(x, ws, group, c)
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"  {name} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            print(f"  {name} {c['LAYOUT']} k{c['KSTAGES']} {c['BLOCK_N']}/{c['BLOCK_K']}/{c['num_warps']}w split {c['SPLIT_K']}: "
                  f"{ms * 1e3:6.1f} us (rel err {err:.1e})",
                  flush=True)
            if ms < best_ms:
                best, best_ms = c, ms
        fence = ""
        if os.environ.get("LAB_FENCE", "0" if DEFERRED else "1") == "1":  # what the split-K counter's acq_rel fence costs (timing only:
            # without it a sum may be read before every split's part arrived)
            relaxed = timed(x, ws, group, lanes, _lab_relaxed_counter=True)
            fence = f", lanes without the counter's fence {relaxed * 1e3:6.1f} us"
            if best is not None:
                relaxed = timed(x, ws, group, best, _lab_relaxed_counter=True)
                fence += f", best words-family without it {relaxed * 1e3:6.1f} us"
            for t in split_k_workspace(dev):  # (a part that arrived after its tile was read and cleared)
                t.zero_()
        nbytes = n * k // 2 + (k // group) * n * 2.5
        totals["lanes"] += t_lanes
        totals["words"] += min(best_ms, t_lanes)
        if best_ms < t_lanes:
            winners[f"{n}x{k}"] = best
        print(f"{name:>7} {n}x{k}{' (deferred)' if DEFERRED else ''}: lanes {t_lanes * 1e3:6.1f} us ({nbytes / t_lanes / 1e6:5.0f} GB/s), words "
              f"{best_ms * 1e3:6.1f} us ({nbytes / best_ms / 1e6:5.0f} GB/s) {best}{fence}", flush=True)
    print(f"== 36 layers' linears at 1 token: lanes {totals['lanes'] * 36:.3f} ms, best of both "
          f"{totals['words'] * 36:.3f} ms", flush=True)
    print("w4a16_gemv entries where words wins:", json.dumps(winners), flush=True)
    if os.environ.get("KERNELS_OUT"):  # h100_kernels.json with the winners merged in, for bench_h100.sh's KERNELS
        kernels = json.load(open("scripts/device/h100_kernels.json"))
        kernels["w4a16_gemv"].update(winners)
        json.dump(kernels, open(os.environ["KERNELS_OUT"], "w"), indent=1)
        print("merged kernel configs written to", os.environ["KERNELS_OUT"], flush=True)


if __name__ == "__main__":
    main()
