"""The W4A16 GEMV with SiLU-mul fused into its input load (the MLP's down projection at a few tokens) against the
two kernels it replaces (activation.silu_and_mul, then the GEMV) and against the torch reference, on fresh random
inputs: through Triton's interpreter on the CPU (float32 and float16, where it is faithful), on CUDA in bf16."""

import textwrap

import pytest
import torch

from qwentrt.engine.kernels import ops, reference
from tests.test_w4a16_kernel import random_awq, worst_in_the_interpreter

triton = pytest.importorskip("triton")

INTERPRET_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.activation import silu_and_mul
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv, split_k_workspace
    from tests.test_w4a16_kernel import random_awq, worst_in_the_interpreter
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    for dtype in (torch.float32, torch.float16):
        for m, n, k, group, split, bn, strided in [(1, 64, 256, 128, 1, 32, False), (3, 128, 512, 128, 2, 64, True),
                                                   (2, 72, 256, 64, 4, 16, False)]:
            t = random_awq(n, k, group)
            t["scales"] = t["scales"].to(dtype)
            wide = torch.randn(m, 2 * k + (8 if strided else 0)) * 2
            gate_up = (wide[:, :2 * k] if strided else wide).to(dtype)
            cfg = {"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split}
            fused = w4a16_gemv(gate_up, t["qweight"], t["qzeros"], t["scales"], group, cfg, silu_mul=True)
            two = w4a16_gemv(silu_and_mul(gate_up), t["qweight"], t["qzeros"], t["scales"], group, cfg)
            assert fused.dtype == dtype and fused.shape == (m, n)
            assert torch.equal(fused, two), (dtype, m, n, k, split)  # the same input values, the same sums
            ref = reference.awq_linear(reference.silu_and_mul(gate_up.float()), t["qweight"], t["qzeros"],
                                       t["scales"].float(), group)
            if dtype == torch.float32:
                worst = max(worst, float((fused - ref).norm() / ref.norm()))
            ws, counts = split_k_workspace(gate_up.device)
            assert not ws.any() and not counts.any()
    print(f"WORST {worst:.3e}")
""")


def test_fused_silu_mul_gemv_in_the_interpreter():
    worst = worst_in_the_interpreter(INTERPRET_SCRIPT)
    assert worst < 1e-5, worst


def test_gemv_refuses_a_gate_up_that_does_not_match_the_weight():
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv

    t = random_awq(64, 256, 128)
    with pytest.raises(ValueError, match="K = 200"):
        w4a16_gemv(torch.randn(1, 400), t["qweight"], t["qzeros"], t["scales"], 128, silu_mul=True)
    with pytest.raises(ValueError, match=r"gate \| up"):
        w4a16_gemv(torch.randn(1, 511), t["qweight"], t["qzeros"], t["scales"], 128, silu_mul=True)


def test_the_op_on_the_cpu_is_the_two_references():
    t = random_awq(64, 256, 128)
    gate_up = torch.randn(3, 512)
    out = ops.awq_linear_of_silu_mul(gate_up, t["qweight"], t["qzeros"], t["scales"], 128)
    ref = reference.awq_linear(reference.silu_and_mul(gate_up), t["qweight"], t["qzeros"], t["scales"], 128)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_fused_silu_mul_gemv_on_cuda(m):
    """bf16 at the down projection's shape: bit for bit the unfused pair (SPLIT_K 1: one order of sums), within the
    usual bound of the reference with split-K; the op takes the fused path only where the GEMV runs."""
    from qwentrt.engine.kernels import w4a16
    from qwentrt.engine.kernels.activation import silu_and_mul
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv

    n, k = 2560, 9728
    t = random_awq(n, k, 128, "cuda")
    t["scales"] = t["scales"].to(torch.bfloat16)
    gate_up = (torch.randn(m, 2 * k, device="cuda") * 2).to(torch.bfloat16)
    one = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}
    fused = w4a16_gemv(gate_up, t["qweight"], t["qzeros"], t["scales"], 128, one, silu_mul=True)
    assert torch.equal(fused, w4a16_gemv(silu_and_mul(gate_up), t["qweight"], t["qzeros"], t["scales"], 128, one))
    ref = reference.awq_linear(reference.silu_and_mul(gate_up).float(), t["qweight"], t["qzeros"],
                               t["scales"].float(), 128)
    configs = {"w4a16_gemv_max_tokens": 4, "w4a16_gemv": {"default": {"SPLIT_K": 8}}, "w4a16_gemv_silu_mul": True}
    for _ in range(3):  # split-K: the workspace comes back to zero between calls
        out = w4a16.awq_linear_silu_mul(gate_up, t["qweight"], t["qzeros"], t["scales"], 128, configs)
        assert out is not None and float((out.float() - ref).norm() / ref.norm()) < 1e-2
    assert w4a16.awq_linear_silu_mul(gate_up, t["qweight"], t["qzeros"], t["scales"], 128,
                                     dict(configs, w4a16_gemv_max_tokens=m - 1)) is None
    assert w4a16.awq_linear_silu_mul(gate_up, t["qweight"], t["qzeros"], t["scales"], 128,
                                     dict(configs, w4a16_gemv_silu_mul=False)) is None
    assert w4a16.awq_linear_silu_mul(gate_up, t["qweight"], t["qzeros"], t["scales"], 128,
                                     {"w4a16_gemv_max_tokens": 4}) is None  # off by default
