"""The persistent "stream" GEMV (qwentrt/engine/kernels/w4a16_gemv_stream.py) against the split-K GEMV, and what
reading the bytes alone costs in this design (GPU lab, not a test). ~3-5 minutes.

1. Per shape (the 4b model's four linears at 1 token, 8 weight copies in one CUDA graph: out of L2):
   - the tuned split-K GEMV (scripts/device/h100_kernels_splitk.json: the split-K winners before session 13; or $KERNELS), AWQ layout and tile-major, deferred;
   - a read floor: a kernel that only streams the tile-major words (each program a contiguous span, summed, one
     store a program) over grids of $LAB_READ ("PER_SM,num_warps,CHUNK_WORDS,STAGES;..."): what the loads cost
     with no arithmetic, no x, no scales, no atomics;
   - the stream GEMV over $LAB_STREAM ("BLOCK_N,PER_SM,num_warps,ROWS,STAGES,BLOCK_K;..."), checked against the
     reference first.
2. The 144 GEMVs of a decode step in one graph (36 layers, each its own weights): split-K (AWQ layout, tile-major),
   the best stream config per shape, and the best read floor per shape.

    python3 scripts/device/stream_lab.py
    STREAM_OUT=/tmp/kernels.json python3 scripts/device/stream_lab.py   # h100_kernels.json + stream winners
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
sys.path.insert(0, "scripts/device")
from gemv_lab import random_awq  # noqa: E402

from qwentrt.engine.kernels import reference  # noqa: E402
from qwentrt.engine.kernels.w4a16 import gemv_config  # noqa: E402
from qwentrt.engine.kernels.w4a16_gemv import reset_split_k_workspaces, tile_major, w4a16_gemv  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402


@triton.jit
def _read_kernel(w_ptr, out_ptr, CHUNKS, CHUNK: tl.constexpr, STAGES: tl.constexpr):
    """Program p sums the words of chunks [p C / P, (p + 1) C / P): the bytes, nothing else."""
    pid = tl.program_id(0)
    c0 = pid * CHUNKS // tl.num_programs(0)
    c1 = (pid + 1) * CHUNKS // tl.num_programs(0)
    acc = tl.zeros([CHUNK], tl.int32)
    offs = tl.arange(0, CHUNK)
    if STAGES == 0:
        for c in range(c0, c1):
            acc += tl.load(w_ptr + c * CHUNK + offs)
    else:
        for c in tl.range(c0, c1, num_stages=STAGES):
            acc += tl.load(w_ptr + c * CHUNK + offs)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


SHAPES = [("qkv", 6144, 2560), ("o", 2560, 4096), ("gate_up", 19456, 2560), ("down", 2560, 9728)]
GROUP, COPIES, DTYPE = 128, 8, torch.bfloat16
if torch.cuda.is_available():
    dev = torch.device("cuda")
    SMS = torch.cuda.get_device_properties(dev).multi_processor_count
else:  # a dry run of the script's logic: TRITON_INTERPRET=1 on the CPU, small shapes, no timing
    dev, SMS, COPIES, DTYPE = torch.device("cpu"), 2, 2, torch.float32
    SHAPES = [("qkv", 768, 256), ("o", 256, 512), ("gate_up", 1024, 256), ("down", 256, 384)]
    torch.cuda.get_device_name = lambda: "cpu (dry run)"

    def time_in_graph(fn, replays=0):  # noqa: F811
        fn()
        return 1e-3
configs = json.load(open(os.environ.get("KERNELS", "scripts/device/h100_kernels_splitk.json")))
tuned = {name: gemv_config(dict(configs, w4a16_gemv_max_tokens=1), 1, n, k, GROUP) for name, n, k in SHAPES}
READ = [tuple(int(v) for v in c.split(",")) for c in
        os.environ.get("LAB_READ", "4,4,1024,0;8,4,1024,0;4,4,1024,3").split(";")]
STREAM = [tuple(int(v) for v in c.split(",")) for c in os.environ.get(
    "LAB_STREAM", "256,8,1,128,0,8;256,4,2,128,0,8;256,2,4,128,0,16;256,8,1,64,0,8;256,2,4,128,3,16;"
                  "128,8,1,128,0,8").split(";")]


def stream_cfg(c: tuple) -> dict:
    bn, per_sm, warps, rows, stages, bk = c
    return {"LAYOUT": "stream", "BLOCK_N": bn, "PER_SM": per_sm, "num_warps": warps, "ROWS": rows,
            "STAGES": stages, "BLOCK_K": bk, "WINDOW": True}


def read(words: torch.Tensor, out: torch.Tensor, c: tuple) -> None:
    per_sm, warps, chunk, stages = c
    chunks = words.numel() // chunk
    _read_kernel[(min(chunks, per_sm * SMS),)](words, out, chunks, CHUNK=chunk, STAGES=stages, num_warps=warps)


def timed(fn) -> float:
    us = time_in_graph(fn, replays=20) * 1e3
    reset_split_k_workspaces()  # (deferred: nothing consumed the sums)
    return us


def main() -> None:
    torch.manual_seed(0)
    print(f"GPU {torch.cuda.get_device_name()}, {SMS} SMs; tuned split-K: {json.dumps(tuned)}", flush=True)
    out = torch.empty(1 << 16, dtype=torch.int32, device=dev)
    best_stream, best_read, rows = {}, {}, []
    for name, n, k in SHAPES:
        ws = [random_awq(n, k, GROUP, dev, DTYPE) for _ in range(COPIES)]
        x = torch.randn(1, k, device=dev, dtype=DTYPE)
        ref = reference.awq_linear(x.float(), *[t if t.dtype == torch.int32 else t.float() for t in ws[0]], GROUP)
        nbytes = n * k / 2 + (k // GROUP) * n * 2.5
        tiled = {}

        def tiles(bn):
            if bn not in tiled:
                tiled[bn] = [tile_major(w[0], bn) for w in ws]
            return tiled[bn]

        t_awq = timed(lambda: [w4a16_gemv(x, *w, GROUP, tuned[name], deferred=True) for w in ws]) / COPIES
        tm = tiles(tuned[name]["BLOCK_N"])
        t_tm = timed(lambda: [w4a16_gemv(x, tm[i], *ws[i][1:], GROUP, tuned[name], deferred=True)
                              for i in range(COPIES)]) / COPIES
        print(f"{name} {n}x{k} ({nbytes / 1e6:.1f} MB): split-K {t_awq:6.2f} us ({nbytes / t_awq / 1e3:5.0f} GB/s), "
              f"tile-major {t_tm:6.2f} us", flush=True)
        line = {"shape": name, "split_k_us": t_awq, "split_k_tile_major_us": t_tm}
        for c in READ:
            words = tiles(256)
            try:
                us = timed(lambda: [read(w, out, c) for w in words]) / COPIES
            except Exception as e:  # noqa: BLE001
                print(f"  read {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            print(f"  read floor PER_SM,warps,CHUNK,STAGES={c}: {us:6.2f} us ({words[0].numel() * 4 / us / 1e3:5.0f} GB/s "
                  f"of words)", flush=True)
            if us < best_read.get(name, (None, 1e9))[1]:
                best_read[name] = (c, us)
        for c in STREAM:
            cfg = stream_cfg(c)
            try:
                tm = tiles(cfg["BLOCK_N"])
                got = w4a16_gemv(x, tm[0], *ws[0][1:], GROUP, cfg).float()
                err = float((got - ref).norm() / ref.norm())
                if not err < 1e-2:
                    print(f"  stream {c}: WRONG (rel err {err:.2e})", flush=True)
                    continue
                us = timed(lambda: [w4a16_gemv(x, tm[i], *ws[i][1:], GROUP, cfg, deferred=True)
                                    for i in range(COPIES)]) / COPIES
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"  stream {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            print(f"  stream BN,PER_SM,warps,ROWS,STAGES,BK={c}: {us:6.2f} us ({nbytes / us / 1e3:5.0f} GB/s), "
                  f"rel err {err:.1e}", flush=True)
            if us < best_stream.get(name, (None, 1e9))[1]:
                best_stream[name] = (c, us)
        line["read_floor"] = best_read.get(name)
        line["stream"] = best_stream.get(name)
        rows.append(line)
        del ws, tiled

    # 2. the 144 GEMVs of a step, each layer its own weights
    layers = int(os.environ.get("LAYERS", "36" if dev.type == "cuda" else "2"))
    weights = [{name: random_awq(n, k, GROUP, dev, DTYPE) for name, n, k in SHAPES} for _ in range(layers)]
    xs = {k: torch.randn(1, k, device=dev, dtype=DTYPE) for _, _, k in SHAPES}
    total = sum(w.numel() * w.element_size() for layer in weights for t in layer.values() for w in t)

    def step(kind: str) -> None:
        for layer in tiled_layers if kind != "awq" else weights:
            for name, n, k in SHAPES:
                qweight, qzeros, scales = layer[name]
                if kind == "read":
                    read(qweight, out, best_read[name][0])
                else:
                    cfg = stream_cfg(best_stream[name][0]) if kind == "stream" else tuned[name]
                    w4a16_gemv(xs[k], qweight, qzeros, scales, GROUP, cfg, deferred=True)

    results = {}
    for kind in ["awq", "tile-major", "stream", "read"]:
        if kind == "stream" and len(best_stream) < len(SHAPES) or kind == "read" and len(best_read) < len(SHAPES):
            continue
        bn = {name: (stream_cfg(best_stream[name][0])["BLOCK_N"] if kind == "stream" else
                     256 if kind == "read" else tuned[name]["BLOCK_N"]) for name, _, _ in SHAPES}
        tiled_layers = [] if kind == "awq" else [
            {name: (tile_major(layer[name][0], bn[name]), *layer[name][1:]) for name, _, _ in SHAPES}
            for layer in weights]
        for _ in range(2):
            results.setdefault(kind, []).append(time_in_graph(lambda: step(kind), replays=20))
            reset_split_k_workspaces()
        del tiled_layers
    print(f"== 144 GEMVs of a step in one graph ({layers} layers, {total / 1e9:.2f} GB):")
    for kind, ms in results.items():
        print(f"  {kind:10s} {min(ms):7.3f} ms ({', '.join(f'{t:.3f}' for t in ms)}): {total / min(ms) / 1e9:5.2f} "
              f"TB/s, {min(ms) * 1e3 / (4 * layers):5.2f} us a GEMV", flush=True)
    print("best stream per shape:", json.dumps({k: v for k, v in best_stream.items()}))
    print("best read floor per shape:", json.dumps({k: v for k, v in best_read.items()}))
    if os.environ.get("OUT"):
        json.dump({"shapes": rows, "step_ms": results}, open(os.path.join(os.environ["OUT"], "stream_lab.json"), "w"),
                  indent=1)
    if os.environ.get("OUT") and best_stream:  # {"NxK": config} where stream beats the split-K GEMV, for
        # QWENTRT_GEMV_CONFIGS (ops.configure) in an A/B of the engine
        wins = {f"{n}x{k}": stream_cfg(best_stream[name][0]) for name, n, k in SHAPES if name in best_stream
                and best_stream[name][1] < min(r["split_k_us"] for r in rows if r["shape"] == name)}
        json.dump(wins, open(os.path.join(os.environ["OUT"], "stream-gemv.json"), "w"), indent=1)
        print("stream winners (QWENTRT_GEMV_CONFIGS):", sorted(wins), flush=True)
    if os.environ.get("STREAM_OUT") and len(best_stream) == len(SHAPES):
        kernels = json.load(open(os.environ.get("KERNELS", "scripts/device/h100_kernels.json")))
        for name, n, k in SHAPES:
            if best_stream[name][1] < min(r["split_k_tile_major_us"] for r in rows if r["shape"] == name):
                kernels["w4a16_gemv"][f"{n}x{k}"] = stream_cfg(best_stream[name][0])
        json.dump(kernels, open(os.environ["STREAM_OUT"], "w"), indent=1)
        print("kernel configs with the stream winners written to", os.environ["STREAM_OUT"], flush=True)


if __name__ == "__main__":
    main()
