"""The W4A16 Triton kernel against the torch reference on fresh random inputs: on the CPU through
Triton's interpreter (float32, small sizes: the interpreter is faithful there), on CUDA in bf16."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwentrt.quant.awq import pseudo_quantize
from qwentrt.quant.pack import pack_awq

triton = pytest.importorskip("triton")


def random_awq(n: int, k: int, group: int, device="cpu"):
    w = torch.randn(n, k) * 0.05
    _, scales, zeros = pseudo_quantize(w, group)
    t = pack_awq(w, scales, zeros, group)
    return {name: v.to(device) for name, v in t.items()}


INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import w4a16_gemm
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    for m, n, k, group, split in [(1, 64, 256, 128, 1), (5, 128, 256, 64, 2), (17, 72, 128, 128, 1)]:
        t = random_awq(n, k, group)
        x = torch.randn(m, k)
        ref = reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], group)
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(64, group), "SPLIT_K": split}
        out = w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], group, cfg)
        assert not torch.isnan(out).any()
        worst = max(worst, float((out - ref).norm() / ref.norm()))
    print(f"WORST {worst:.3e}")
""")


def test_kernel_matches_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1])
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_kernel_matches_reference_on_cuda(m):
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import w4a16_gemm

    for n, k in [(6144, 2560), (2560, 9728)]:
        t = random_awq(n, k, 128, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.awq_linear(x.float(), t["qweight"], t["qzeros"], t["scales"], 128)
        for split in (1, 4):
            out = w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], 128, {"SPLIT_K": split})
            assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
            rel = float((out.float() - ref).norm() / ref.norm())
            assert rel < 1e-2, (m, n, k, split, rel)


def bench_linears(tokens=(1, 8, 32, 128), configs=None):
    """Median ms of the 36 layers' linears of Qwen3-4B (qkv, o, gate_up, down) at each token count:
    the Triton kernel, the torch reference (dequantize + matmul) and cuBLAS bf16. For the GPU script."""
    from triton.testing import do_bench

    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import w4a16_gemm

    shapes = [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]
    weights = [random_awq(n, k, 128, "cuda") for n, k in shapes]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05 for n, k in shapes]
    rows = []
    for m in tokens:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
        tri = sum(do_bench(lambda x=x, t=t: w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], 128, configs),
                           return_mode="median") for x, t in zip(xs, weights))
        ref = sum(do_bench(lambda x=x, t=t: reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], 128),
                           return_mode="median") for x, t in zip(xs, weights))
        cub = sum(do_bench(lambda x=x, w=w: x @ w.t(), return_mode="median") for x, w in zip(xs, dense))
        rows.append({"tokens": m, "triton_ms_36_layers": 36 * tri, "reference_ms_36_layers": 36 * ref,
                     "cublas_bf16_ms_36_layers": 36 * cub})
    return rows
