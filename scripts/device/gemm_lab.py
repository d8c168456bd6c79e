"""W4A16 GEMM for 16 to 128 tokens on the H100 (lab, not a test): the production GEMM (bf16 dequantize by inline
PTX) over a sweep of tiles, large BLOCK_M included, beside dequantize + cuBLAS, for the 4b model's four linear
shapes, under CUDA graphs over L2-defeating weight copies. Prints the best config per (tokens, shape) and the
36 layers' totals. (The variants compared on the way, in docs/KERNEL_NOTES.md session 4, are gone: a pack=8
inline asm that depended on the register layout, and dequantize + cuBLAS through L2-sized column slices.)"""

from __future__ import annotations

import itertools
import sys

import torch

from qwentrt.engine.kernels.w4a16 import awq_dequantize, w4a16_gemm
from qwentrt.engine.tuning import _random_weights, time_in_graph


def configs(m: int):
    out = []
    for bm, bn, sk, w, st in itertools.product((16, 32, 64, 128, 256), (64, 128, 256), (1, 2, 4), (4, 8), (3, 4)):
        if bm > max(16, m) or bm < min(m, 64) or (bm == 256 and bn == 256) or (bm == 16 and w == 8):
            continue
        if sk > 1 and m >= 256:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk, "num_warps": w, "num_stages": st})
    return out


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "gemm"
    dev = torch.device("cuda")
    shapes = {"6144x2560": (6144, 2560), "2560x4096": (2560, 4096), "19456x2560": (19456, 2560),
              "2560x9728": (2560, 9728)}  # the 4b model's qkv, o, gate_up, down
    group = 128
    failed: set[str] = set()
    if "gemm" in what:  # the production GEMM (PTX dequantize in bf16) over a tile sweep
        for m in (16, 32, 128):
            total = {}
            for key, (n, k) in shapes.items():
                ws = _random_weights(n, k, group, dev)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                best, best_ms = None, float("inf")
                for c in configs(m):
                    try:
                        ms = time_in_graph(lambda: [w4a16_gemm(x, *w, group, c) for w in ws], replays=5) / len(ws)
                    except Exception as e:  # noqa: BLE001
                        if "OutOfResources" not in type(e).__name__ and "gemm" not in failed:
                            failed.add("gemm")
                            print(f"  gemm {c}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    if ms < best_ms:
                        best, best_ms = c, ms
                deq = time_in_graph(lambda: [x @ awq_dequantize(*w, group, x.dtype) for w in ws[:4]]) / 4
                total["gemm"] = total.get("gemm", 0) + best_ms
                total["deq"] = total.get("deq", 0) + deq
                print(f"M={m:4} {key:>11} gemm(ptx) {best_ms * 1e3:7.1f} us {best}  deq+cublas {deq * 1e3:7.1f} us",
                      flush=True)
            print(f"== M={m}: 36 layers: gemm(ptx) {total['gemm'] * 36:.2f} ms, deq+cublas {total['deq'] * 36:.2f} ms",
                  flush=True)

if __name__ == "__main__":
    main()
