"""Build-time kernel tuning (our answer to an engine builder's tactic selection): on the target GPU, time
the candidate W4A16 GEMM configs for each of the model's linear shapes and token buckets, and the
dequantize + cuBLAS path for many tokens, and keep the winners in engine.json's `kernels`.

Timing: every candidate runs inside a CUDA graph (as the decode step does), over enough distinct weight
copies that they do not stay in L2, median of several replays. The result maps bucket -> shape -> config:

    kernels["w4a16_decode"] = {"16": {"default": cfg, "6144x2560": cfg, ...}, "32": {...}, ...}
    kernels["w4a16_prefill_min_tokens"] = the fewest tokens from which dequantize + cuBLAS wins
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any, Callable

import torch

L2_FLUSH_BYTES = 192 << 20  # distinct weight copies per timing: more than any GPU's L2
BUCKETS = (16, 32, 64, 128, 256)
PREFILL_CANDIDATES = (128, 256, 512, 1024)


def candidate_configs(bucket: int) -> list[dict[str, int]]:
    """GEMM tiles for a token bucket. Up to 64 tokens one M tile holds the bucket; from 128 on, the tile
    sizes that won on the H100 (docs/KERNEL_NOTES.md, session 4): M tiles of 64 to 256 rows (the fewer M
    tiles, the fewer times each weight is dequantized), 4 warps, 3 or 4 stages."""
    out = []
    if bucket <= 64:
        block_m = max(16, bucket)
        for block_n, split_k, warps in itertools.product((64, 128), (1, 2, 4, 8), (4, 8)):
            if warps == 8 and block_n == 64 and block_m == 16:
                continue
            out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split_k,
                        "num_warps": warps, "num_stages": 3})
        return out
    for block_m, block_n, split_k, stages in itertools.product((64, 128, 256), (64, 128), (1, 2, 4), (3, 4)):
        if block_m > bucket or (block_m == 256 and (block_n == 128 or split_k > 1)):
            continue
        out.append({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split_k,
                    "num_warps": 4, "num_stages": stages})
    return out


def gemv_candidates() -> list[dict[str, Any]]:
    """GEMV tiles (BLOCK_N columns x BLOCK_K rows per step, a split owning whole groups; SPLIT_K is clamped
    to the number of groups, so the large ones mean "one group per program"), in the three layouts of w4a16_gemv.py:
    "lanes" (a word's nibbles on 8 threads), "words" (each thread owns whole words; fewer instructions per
    nibble) and "window" (words with one LOP3 + one FFMA per nibble)."""
    lanes = ((128, 16, 1), (128, 32, 1), (128, 16, 2), (128, 32, 2), (256, 16, 2), (256, 32, 2), (512, 32, 4))
    words = ((256, 8, 1), (512, 8, 2))
    window = ((256, 8, 1), (256, 8, 2), (256, 8, 4), (512, 8, 2))  # (the H100's best words-family tiles, session 10)
    tiles = [(bn, bk, w, "lanes") for bn, bk, w in lanes] + [(bn, bk, w, "words") for bn, bk, w in words] + \
        [(bn, bk, w, "window") for bn, bk, w in window]
    split_k = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": 2, "LAYOUT": layout}
               for (bn, bk, w, layout), sk in itertools.product(tiles, (4, 8, 16, 32, 128))]
    # the persistent GEMV (w4a16_gemv_stream.py) over tile-major weights: one-warp programs, PER_SM of them an SM,
    # items of ROWS rows (the H100's best: 8-16 an SM, 64-128 rows; session 13)
    stream = [{"LAYOUT": "stream", "BLOCK_N": 256, "PER_SM": per_sm, "num_warps": 1, "ROWS": rows, "STAGES": 0,
               "BLOCK_K": 8, "WINDOW": True} for per_sm, rows in itertools.product((8, 12, 16), (64, 128))]
    return split_k + stream


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(N, K) of the decoder layer's four (fused) linears, keyed "NxK"."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (2 * i, h), (h, i)]
    return {f"{n}x{k}": (n, k) for n, k in shapes}


def _random_weights(n: int, k: int, group: int, device) -> list[tuple[torch.Tensor, ...]]:
    bytes_one = k * n // 2 + 2 * (k // group) * n
    copies = max(2, min(64, -(-L2_FLUSH_BYTES // bytes_one)))
    out = []
    for _ in range(copies):
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, device=device)
        qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // group, n // 8), dtype=torch.int32, device=device)
        scales = (torch.rand(k // group, n, device=device) * 0.01 + 0.001).to(torch.bfloat16)
        out.append((qweight, qzeros, scales))
    return out


def time_in_graph(fn: Callable[[], Any], replays: int = 10) -> float:
    """Median milliseconds of one replay of a CUDA graph capturing fn (fn is warmed up first)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def tune_w4a16(cfg, group_size: int, device: torch.device, buckets=BUCKETS,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, decode_config, w4a16_gemm

    shapes = linear_shapes(cfg)
    weights = {key: _random_weights(n, k, group_size, device) for key, (n, k) in shapes.items()}
    decode: dict[str, dict[str, Any]] = {}
    timings: dict[str, Any] = {}
    for bucket in buckets:
        decode[str(bucket)] = {}
        for key, (n, k) in shapes.items():
            x = torch.randn(bucket, k, device=device, dtype=torch.bfloat16)
            ws = weights[key]
            best, best_ms = None, float("inf")
            for c in candidate_configs(bucket):
                try:
                    ms = time_in_graph(lambda: [w4a16_gemm(x, *w, group_size, c) for w in ws]) / len(ws)
                except Exception:  # a config the GPU cannot run (shared memory): not a candidate
                    continue
                if ms < best_ms:
                    best, best_ms = c, ms
            decode[str(bucket)][key] = best
            timings[f"{bucket}/{key}"] = round(best_ms * 1e3, 2)
            log(f"  w4a16 {bucket:>4} tokens {key:>11}: {best_ms * 1e3:7.1f} us  {best}")
    # a few tokens: the GEMV (tuned at one token) while it beats the GEMM's smallest bucket
    from qwentrt.engine.kernels.w4a16_gemv import reset_split_k_workspaces, tile_major, w4a16_gemv

    tiled: dict[tuple[str, int], list[tuple[torch.Tensor, ...]]] = {}

    def laid_out(key: str, c: dict) -> list[tuple[torch.Tensor, ...]]:
        """The shape's weight copies as the engine would keep them for config c: tile-major at its BLOCK_N for the
        stream GEMV (ops.pack_weight), AutoAWQ's layout otherwise."""
        if c.get("LAYOUT") != "stream":
            return weights[key]
        if (key, c["BLOCK_N"]) not in tiled:
            tiled[key, c["BLOCK_N"]] = [(tile_major(w[0], c["BLOCK_N"]), *w[1:]) for w in weights[key]]
        return tiled[key, c["BLOCK_N"]]

    def time_gemv(x: torch.Tensor, ws, c: dict) -> float:
        """A GEMV config as the engine runs it: deferred split-K (w4a16_gemv_deferred, the default), whose sums
        pile up here with nothing to consume them (cleared after)."""
        ms = time_in_graph(lambda: [w4a16_gemv(x, *w, group_size, c, deferred=True) for w in ws]) / len(ws)
        reset_split_k_workspaces()
        return ms

    gemv: dict[str, Any] = {}
    for key, (n, k) in shapes.items():
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        ws = weights[key]
        ref = awq_dequantize(*ws[0], group_size, torch.float32)
        ref = x.float() @ ref
        best, best_ms = None, float("inf")
        seen = set()
        for c in gemv_candidates():
            if "SPLIT_K" in c:
                c = dict(c, SPLIT_K=min(c["SPLIT_K"], k // group_size))  # a split owns whole groups
            if tuple(c.values()) in seen:
                continue
            seen.add(tuple(c.values()))
            try:
                wc = laid_out(key, c)
                out = w4a16_gemv(x, *wc[0], group_size, c).float()
                if not float((out - ref).norm() / ref.norm()) < 1e-2:  # a wrong kernel is never a winner
                    log(f"  w4a16 gemv {key}: {c} gives wrong results; skipped")
                    continue
                ms = time_gemv(x, wc, c)
            except Exception:  # a config that does not compile or fit: not a candidate (and no sums left behind)
                reset_split_k_workspaces()
                continue
            if ms < best_ms:
                best, best_ms = c, ms
        gemv[key] = best
        timings[f"gemv/1/{key}"] = round(best_ms * 1e3, 2)
        log(f"  w4a16 gemv    1 token  {key:>11}: {best_ms * 1e3:7.1f} us  {best}")
    gemv_max = 0
    small = str(buckets[0])
    for m in (1, 2, 4, 8):
        t_gemv = t_gemm = 0.0
        for key, (n, k) in shapes.items():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ws = weights[key]
            t_gemv += time_gemv(x, laid_out(key, gemv[key]), gemv[key])
            t_gemm += time_in_graph(lambda: [w4a16_gemm(x, *w, group_size, decode[small][key]) for w in ws]) / len(ws)
        timings[f"gemv_vs_gemm/{m}"] = {"gemv_us": round(t_gemv * 1e3, 1), "gemm_us": round(t_gemm * 1e3, 1)}
        log(f"  w4a16 {m:>4} tokens, 4 linears: GEMV {t_gemv * 1e3:7.1f} us, GEMM {t_gemm * 1e3:7.1f} us")
        if t_gemv >= t_gemm:
            break
        gemv_max = m
    # many tokens: the GEMM (the config of the bucket holding m) against dequantize + cuBLAS
    prefill_min = None
    for m in PREFILL_CANDIDATES:
        t_gemm = t_deq = 0.0
        for key, (n, k) in shapes.items():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ws = weights[key][:2]
            cfg_m = decode_config({"w4a16_decode": decode}, m, n, k)  # the bucket holding m, else the largest
            t_gemm += time_in_graph(lambda: [w4a16_gemm(x, *w, group_size, cfg_m) for w in ws]) / 2
            t_deq += time_in_graph(lambda: [x @ awq_dequantize(*w, group_size, x.dtype) for w in ws]) / 2
        timings[f"prefill/{m}"] = {"gemm_us": round(t_gemm * 1e3, 1), "dequant_cublas_us": round(t_deq * 1e3, 1)}
        log(f"  w4a16 {m:>4} tokens, 4 linears: GEMM {t_gemm * 1e3:7.1f} us, dequantize + cuBLAS {t_deq * 1e3:7.1f} us")
        if prefill_min is None and t_deq < t_gemm:
            prefill_min = m
    del weights, tiled
    torch.cuda.empty_cache()
    for table in decode.values():
        table["default"] = table[max(shapes, key=lambda s: shapes[s][0] * shapes[s][1])]
    gemv["default"] = gemv[max(shapes, key=lambda s: shapes[s][0] * shapes[s][1])]
    return {"w4a16_decode": decode, "w4a16_gemv": gemv, "w4a16_gemv_max_tokens": gemv_max,
            "w4a16_prefill_min_tokens": prefill_min or 2 * PREFILL_CANDIDATES[-1], "tuning_us": timings}


def tune(cfg, group_size: int, device: torch.device, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Kernel configs for this model on this GPU (the `kernels` of engine.json, with tuned = True)."""
    major, minor = torch.cuda.get_device_capability(device)
    out = tune_w4a16(cfg, group_size, device, log=log)
    out.update(tuned=True, compute_capability=f"{major}.{minor}", tuned_on=torch.cuda.get_device_name(device))
    return out
