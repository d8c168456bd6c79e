"""Compile the production W4A16 GEMV (qwentrt/engine/kernels/w4a16_gemv.py) for a GPU target on the CPU (no GPU
needed: Triton's bundled ptxas) and count its SASS: registers, stack (spills), instructions by opcode and per
nibble. At one token the GEMV is ALU-bound (docs/KERNEL_NOTES.md), so its instruction mix can be read and iterated
here before any device time is spent on it.

    python scripts/sass_lab.py                          # both layouts, the configs below, sm_90
    python scripts/sass_lab.py --layout words --arch 89 --cfg BLOCK_N=1024,BLOCK_K=8,num_warps=4 --dump /tmp/w

Per nibble = all of the kernel's SASS instructions / the nibbles one thread handles in one group (128 rows of
BLOCK_N columns); the loop over groups is counted once with its prologue and epilogue (a slight overestimate; a
program of a split runs 1-2 groups). The compile assumes what Triton's JIT assumes at launch for Qwen3-4B's linears:
16-byte aligned pointers and every integer argument divisible by 16 (without it no load is vectorized).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, ".")
from qwentrt.engine.kernels import w4a16_gemv  # noqa: E402

ARGS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
        "count_ptr": "*i32", "N": "i32", "K": "i32", "SPLIT_K": "i32", "stride_xm": "i32", "stride_qw": "i32",
        "stride_qz": "i32", "stride_s": "i32", "stride_ym": "i32", "stride_qt": "i32"}
LAYOUTS = {  # kernel, its signature, default configs (the H100's tuned lanes configs; words candidates)
    "lanes": (w4a16_gemv._w4a16_gemv_kernel,
              dict(ARGS, GROUP="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", SILU_MUL="constexpr"),
              ["BLOCK_N=128,BLOCK_K=16,num_warps=1", "BLOCK_N=256,BLOCK_K=32,num_warps=2"]),
    "words": (w4a16_gemv._w4a16_gemv_words_kernel,
              dict(ARGS, magic="i32", GROUP="constexpr", PN="constexpr", BLOCK_K="constexpr", EVEN_N="constexpr",
                   ASM="constexpr"),
              ["BLOCK_N=1024,BLOCK_K=8,num_warps=4", "BLOCK_N=512,BLOCK_K=8,num_warps=2",
               "BLOCK_N=1024,BLOCK_K=8,num_warps=4,EVEN_N=0"]),
}
LAYOUTS["window"] = LAYOUTS["words"]  # (the words kernel with WINDOW; KSTAGES=n in --cfg: its pipelined loop)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def parse(cfg: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in cfg.split(","))}


def compile_layout(layout: str, cfg: dict, arch: int):
    fn, sig, _ = LAYOUTS[layout]
    if layout == "lanes":
        const = {"GROUP": 128, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                 "SILU_MUL": bool(cfg.get("SILU_MUL", 0))}
    else:
        const = {"GROUP": 128, "PN": cfg["BLOCK_N"] // 8, "BLOCK_K": cfg["BLOCK_K"],
                 "EVEN_N": bool(cfg.get("EVEN_N", 1)), "ASM": True}
        sig = dict(sig, WINDOW="constexpr", KSTAGES="constexpr")
        const["WINDOW"] = layout == "window"
        const["KSTAGES"] = cfg.get("KSTAGES", 0)
    sig = dict(sig, PDL="constexpr", COUNTER_SEM="constexpr", DEFERRED="constexpr")
    const["DEFERRED"] = bool(cfg.get("DEFERRED", 0))
    const["COUNTER_SEM"] = "relaxed" if cfg.get("RELAXED") else "acq_rel"
    const["PDL"] = bool(cfg.get("PDL", 0))  # (PDL=1: the programmatic-dependent-launch prologue, kernels/pdl.py)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items() if ty != "constexpr"}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 2),
                                   **({"launch_pdl": True} if cfg.get("PDL") else {})})


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 (H100), 89 (RTX 4090), 80")
    ap.add_argument("--cfg", action="append",
                    help="KEY=VALUE,... (BLOCK_N, BLOCK_K, num_warps, num_stages, EVEN_N, KSTAGES, PDL)")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per config")
    ap.add_argument("--dump", help="write each config's SASS to DUMP.<layout>.<n>.sass")
    args = ap.parse_args()
    for layout in LAYOUTS if args.layout == "both" else [args.layout]:
        for i, text in enumerate(args.cfg or LAYOUTS[layout][2]):
            cfg = parse(text)
            t0 = time.perf_counter()
            kernel = compile_layout(layout, cfg, args.arch)
            secs = time.perf_counter() - t0
            sass = cuobjdump(kernel.asm["cubin"], "-sass")
            res = cuobjdump(kernel.asm["cubin"], "-res-usage")
            if args.dump:
                with open(f"{args.dump}.{layout}.{i}.sass", "w") as f:
                    f.write(sass)
            ops = collections.Counter(OPCODE.findall(sass))
            regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
            nibbles = 128 * cfg["BLOCK_N"] / (32 * cfg["num_warps"])
            total = sum(ops.values())
            print(f"{layout} {text} (sm_{args.arch}): compile {secs:.1f} s, regs {regs.group(1) if regs else '?'}, "
                  f"stack {stack.group(1) if stack else '?'} B, {total} SASS instructions, "
                  f"{total / nibbles:.2f} per nibble")
            print("   ", ", ".join(f"{op} {n / nibbles:.2f}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
