"""Where does a W4A16 GEMV's time go? (H100 lab, not a test: docs/KERNEL_NOTES.md, "GEMV v5".) For each linear
shape at 1 token, under CUDA graphs over L2-defeating copies: the production GEMV with this H100's tuned configs
(scripts/device/h100_kernels_splitk.json: the split-K winners before the stream GEMV); the first GEMV's structure (one reduction over rows per tile, BLOCK_N 128,
BLOCK_K 128, 4 warps) as a probe kernel, whole, with the arithmetic removed (load-only: the memory side's
time), and with the weights read from one small cache-resident slice (ALU-only); a SASS instruction
histogram of the production kernel (nvdisasm). Choosing configs is `qwentrt build --tune`'s job."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl

from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv
from qwentrt.engine.tuning import _random_weights, time_in_graph


@triton.jit
def _probe_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  MODE: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PN: tl.constexpr = BLOCK_N // 8
    offs_pn = pid_n * PN + tl.arange(0, PN)
    j = tl.arange(0, 8)
    shifts = ((j % 2) * 4 + j // 2) * 4
    cols = offs_pn[:, None] * 8 + j[None, :]
    mask_pn = offs_pn < N // 8
    acc = tl.zeros((PN, 8), dtype=tl.float32)
    iacc = tl.zeros((BLOCK_K, PN), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows = offs_k
        if MODE == 2:
            rows = offs_k % 128  # one small, cache-resident slice of the weights: ALU-bound
        qw = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_pn[None, :], mask=mask_pn[None, :], other=0)
        if MODE == 1:
            iacc ^= qw  # load-only
        else:
            x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
            q = ((qw[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
            g = k0 // GROUP
            qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask_pn, other=0)
            zf = (((qz[:, None] >> shifts[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            w = q.to(tl.float32, bitcast=True) - zf[None, :, :]
            part = tl.sum(x[:, None, None] * w, axis=0)
            s = tl.load(s_ptr + g * stride_s + cols, mask=mask_pn[:, None], other=0.0).to(tl.float32)
            acc += part * s
    if MODE == 1:
        acc += tl.sum(iacc, axis=0).to(tl.float32)[:, None]
    tl.store(y_ptr + m * stride_ym + pid_k * N + cols, acc.to(y_ptr.dtype.element_ty), mask=mask_pn[:, None])


def probe(x, qw, qz, s, group, cfg, mode):
    m, k = x.shape
    n = s.shape[1]
    out = torch.empty((cfg["SPLIT_K"], n), dtype=x.dtype, device=x.device)
    grid = (m, triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    return _probe_kernel[grid](x, qw, qz, s, out, n, k, x.stride(0), qw.stride(0), qz.stride(0), s.stride(0),
                               out.stride(0), GROUP=group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                               SPLIT_K=cfg["SPLIT_K"], MODE=mode, num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])


def sass_histogram(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(["nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(m.group(1) for m in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", sass))
    return f"{sum(ops.values())} instructions: " + " ".join(f"{k}:{v}" for k, v in ops.most_common(24))


SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}
FIRST_GEMV_SPLIT = {"6144x2560": 8, "2560x4096": 16, "19456x2560": 8, "2560x9728": 16}  # its tuned split-K


def probe_shape(name: str, n: int, k: int, cfg: dict, group: int = 128) -> None:
    from qwentrt.engine.kernels import w4a16_gemv as gemv_module
    ws = _random_weights(n, k, group, torch.device("cuda"))
    nbytes = k * n // 2
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t = time_in_graph(lambda: [w4a16_gemv(x, *w, group, cfg) for w in ws]) / len(ws)
    line = [f"{name:8s} production {t * 1e3:6.1f} us ({nbytes / t / 1e6:5.0f} GB/s of int4)"]
    first = dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=FIRST_GEMV_SPLIT[f"{n}x{k}"], num_warps=4, num_stages=3)
    for mode, label in ((0, "first GEMV"), (1, "load-only"), (2, "ALU-only")):
        tp = time_in_graph(lambda: [probe(x, *w, group, first, mode) for w in ws]) / len(ws)
        line.append(f"{label} {tp * 1e3:6.1f} us")
    print(" | ".join(line), flush=True)
    if name == "gate_up":
        try:  # the compiled kernel from the JIT's cache (an internal of triton 3.x)
            cache = gemv_module._w4a16_gemv_kernel.device_caches[torch.cuda.current_device()][0]
            print("  SASS, production kernel:", sass_histogram(next(iter(cache.values()))), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  (no SASS: {type(e).__name__}: {e})")


def main():
    tuned = json.load(open("scripts/device/h100_kernels_splitk.json"))["w4a16_gemv"]  # (split-K winners)
    for name, (n, k) in SHAPES.items():
        probe_shape(name, n, k, tuned[f"{n}x{k}"])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
