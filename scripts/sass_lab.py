"""Compile a GEMV lab kernel for a GPU target on the CPU (no GPU needed: Triton's bundled ptxas) and count its SASS:
instructions by opcode, registers and spills, and instructions per nibble. A kernel's instruction mix can be read and
iterated here before any device time is spent on it (the GEMV at 1 token is ALU-bound: docs/KERNEL_NOTES.md).

    python scripts/sass_lab.py                                  # kthread lab kernel, a few configs, sm_90
    python scripts/sass_lab.py --arch 89 --cfg PN=128,BLOCK_K=8,GROUPS_PER_PROG=1,num_warps=4,ACC2D=1
    python scripts/sass_lab.py --production --cfg BLOCK_N=128,BLOCK_K=16,num_warps=1   # the production GEMV

Per nibble = all of the kernel's SASS instructions / the nibbles one thread handles in one group (128 rows); for
the production GEMV (a loop over groups) that counts the prologue and epilogue once, a slight overestimate.
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
sys.path.insert(0, "scripts/device")
import gemv_kthread_lab as lab  # noqa: E402
from qwentrt.engine.kernels import w4a16_gemv  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": "*bf16",
             "ws_ptr": "*fp32", "count_ptr": "*i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qw": "i32",
             "stride_qz": "i32", "stride_s": "i32", "stride_ym": "i32", "magic": "i32", "GROUP": "constexpr",
             "PN": "constexpr",
             "BLOCK_K": "constexpr", "GROUPS_PER_PROG": "constexpr", "ACC2D": "constexpr",
             "EVEN_N": "constexpr", "ASM_HI": "constexpr"}
DEFAULT_CFGS = ["PN=128,BLOCK_K=32,GROUPS_PER_PROG=1,num_warps=4,ACC2D=0,EVEN_N=1",
                "PN=128,BLOCK_K=8,GROUPS_PER_PROG=1,num_warps=4,ACC2D=1,EVEN_N=1",
                "PN=64,BLOCK_K=8,GROUPS_PER_PROG=1,num_warps=2,ACC2D=1,EVEN_N=1",
                "PN=128,BLOCK_K=8,GROUPS_PER_PROG=1,num_warps=4,ACC2D=1,EVEN_N=0"]
PRODUCTION_SIGNATURE = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": "*bf16",
                        "ws_ptr": "*fp32", "count_ptr": "*i32", "N": "i32", "K": "i32", "SPLIT_K": "i32",
                        "stride_xm": "i32", "stride_qw": "i32", "stride_qz": "i32", "stride_s": "i32",
                        "stride_ym": "i32", "GROUP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                        "SILU_MUL": "constexpr"}
WORDS_SIGNATURE = dict(list(PRODUCTION_SIGNATURE.items())[:15] + [("magic", "i32"), ("GROUP", "constexpr"),
                       ("PN", "constexpr"), ("BLOCK_K", "constexpr"), ("EVEN_N", "constexpr"), ("ASM", "constexpr")])
WORDS_CFGS = ["BLOCK_N=1024,BLOCK_K=8,num_warps=4", "BLOCK_N=512,BLOCK_K=8,num_warps=2",
              "BLOCK_N=1024,BLOCK_K=8,num_warps=4,EVEN_N=0"]
PRODUCTION_CFGS = ["BLOCK_N=128,BLOCK_K=16,num_warps=1", "BLOCK_N=256,BLOCK_K=32,num_warps=2"]  # h100_kernels.json
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def divisibility(fn, sig: dict) -> dict:
    """What Triton's JIT assumes at launch for the model's shapes: every pointer 16-byte aligned and every int
    argument divisible by 16 (all N, K and strides of Qwen3-4B's linears are). Without it the AOT compile would
    see no alignment and never vectorize a load."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items() if ty != "constexpr"}


def parse(cfg: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in cfg.split(","))}


def sass_of(cubin: bytes) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(f.name)
    return sass, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cfg", action="append", help="KEY=VALUE,... (PN, BLOCK_K, GROUPS_PER_PROG, num_warps, ACC2D)")
    ap.add_argument("--production", action="store_true", help="the production GEMV (w4a16_gemv.py), lanes layout")
    ap.add_argument("--words", action="store_true", help="the production GEMV's words layout (LAYOUT 'words')")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dump", help="write each config's SASS to DUMP.<n>.sass")
    args = ap.parse_args()
    defaults = PRODUCTION_CFGS if args.production else WORDS_CFGS if args.words else DEFAULT_CFGS
    for i, text in enumerate(args.cfg or defaults):
        cfg = parse(text)
        if args.words:
            fn, sig = w4a16_gemv._w4a16_gemv_words_kernel, WORDS_SIGNATURE
            cfg["PN"], cfg["GROUPS_PER_PROG"] = cfg["BLOCK_N"] // 8, 1
            const = {"GROUP": 128, "PN": cfg["PN"], "BLOCK_K": cfg["BLOCK_K"], "EVEN_N": bool(cfg.get("EVEN_N", 1)),
                     "ASM": True}
        elif args.production:
            fn, sig = w4a16_gemv._w4a16_gemv_kernel, PRODUCTION_SIGNATURE
            const = {"GROUP": 128, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                     "SILU_MUL": bool(cfg.get("SILU_MUL", 0))}
            cfg.setdefault("PN", cfg["BLOCK_N"] // 8)
            cfg.setdefault("GROUPS_PER_PROG", 1)
        else:
            fn, sig = lab._kthread_kernel, SIGNATURE
            const = {"GROUP": 128, "PN": cfg["PN"], "BLOCK_K": cfg["BLOCK_K"],
                     "GROUPS_PER_PROG": cfg["GROUPS_PER_PROG"], "ACC2D": bool(cfg.get("ACC2D", 0)),
                     "EVEN_N": bool(cfg.get("EVEN_N", 0)), "ASM_HI": bool(cfg.get("ASM_HI", 1))}
        t0 = time.perf_counter()
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=divisibility(fn, sig)),
                                target=GPUTarget("cuda", args.arch, 32),
                                options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 2)})
        secs = time.perf_counter() - t0
        sass, res = sass_of(kernel.asm["cubin"])
        if args.dump:
            with open(f"{args.dump}.{i}.sass", "w") as f:
                f.write(sass)
        ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
        regs = re.search(r"REG:(\d+)", res)
        spill = re.search(r"STACK:(\d+)", res)
        # nibbles a thread handles per group: GROUP rows x PN words x 8 columns over 32 * num_warps threads
        nibbles = 128 * cfg["PN"] * 8 * cfg["GROUPS_PER_PROG"] / (32 * cfg["num_warps"])
        total = sum(ops.values())
        print(f"{text}: compile {secs:.1f} s, regs {regs.group(1) if regs else '?'}, stack "
              f"{spill.group(1) if spill else '?'} B, {total} SASS instructions, "
              f"{total / nibbles:.2f} per nibble (static count)")
        print("   ", ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
