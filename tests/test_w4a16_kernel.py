"""The W4A16 Triton kernel against the torch reference on fresh random inputs: on the CPU through
Triton's interpreter (float32, small sizes: the interpreter is faithful there), on CUDA in bf16."""

import os
import re
import subprocess
import sys
import tempfile
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
        for _ in range(2):  # twice: the split-K workspace and counters must come back to zero
            out = w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], group, cfg)
            assert not torch.isnan(out).any()
            worst = max(worst, float((out - ref).norm() / ref.norm()))
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv, split_k_workspace
    ws, counts = split_k_workspace(torch.device("cpu"))
    assert not ws.any() and not counts.any()
    for m, n, k, group, split, bn in [(1, 64, 256, 128, 1, 32), (3, 128, 512, 128, 2, 64), (2, 72, 256, 64, 4, 16)]:
        t = random_awq(n, k, group)
        x = torch.randn(m, k)
        ref = reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], group)
        for layout in ("lanes", "words"):  # (words: n = 72 leaves a partial tile, the masked loads)
            for _ in range(2):  # twice: the split-K workspace and counters must come back to zero
                out = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], group,
                                 {"BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": split, "LAYOUT": layout})
                assert not torch.isnan(out).any()
                worst = max(worst, float((out - ref).norm() / ref.norm()))
        ws, counts = split_k_workspace(x.device)
        assert not ws.any() and not counts.any()
    from qwentrt.engine.kernels.w4a16 import awq_dequantize
    for n, k, group in [(64, 256, 128), (200, 192, 64)]:
        t = random_awq(n, k, group)
        ref = reference.awq_dequantize(t["qweight"], t["qzeros"], t["scales"], group, torch.float32)
        out = awq_dequantize(t["qweight"], t["qzeros"], t["scales"], group, torch.float32)
        worst = max(worst, float((out - ref).norm() / ref.norm()))
    print(f"WORST {worst:.3e}")
""")


def worst_in_the_interpreter(script: str) -> float:
    """Run a check script under TRITON_INTERPRET=1 from the repository root; -> the relative error it printed
    after "WORST" (the script fails on anything else)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.split("WORST")[1])


def test_kernel_matches_reference_in_the_interpreter():
    worst = worst_in_the_interpreter(INTERPRET_SCRIPT)
    assert worst < 1e-5, worst


WINDOW_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv, split_k_workspace
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    for m, n, k, group, split, bn in [(1, 64, 256, 128, 1, 32), (3, 128, 512, 128, 2, 64), (2, 72, 256, 64, 4, 16)]:
        t = random_awq(n, k, group)
        x = torch.randn(m, k) * (1 + 10 * (torch.rand(k) < 0.02))  # a few outlier channels, as activations have
        ref = reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], group)
        for _ in range(2):
            out = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], group,
                             {"BLOCK_N": bn, "BLOCK_K": 16, "SPLIT_K": split, "LAYOUT": "window",
                              "KSTAGES": 3 * (split % 2)})  # (the unrolled steps, and the pipelined loop)
            assert not torch.isnan(out).any()
            worst = max(worst, float((out - ref).norm() / ref.norm()))
        ws, counts = split_k_workspace(x.device)
        assert not ws.any() and not counts.any()
    print(f"WORST {worst:.3e}")
""")


DEFERRED_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels import activation, norm
    from qwentrt.engine.kernels.w4a16_gemv import SplitKSums, split_k_workspace, w4a16_gemv
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    for layout in ("lanes", "window"):
        cfg = {"BLOCK_N": 32, "BLOCK_K": 16, "SPLIT_K": 4, "LAYOUT": layout}
        t = random_awq(64, 512, 128)
        x = torch.randn(2, 512)
        plain = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg)
        sums = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg, deferred=True)
        assert isinstance(sums, SplitKSums) and sums.shape == (2, 64) and sums.dtype == x.dtype
        worst = max(worst, float((sums.sums - plain).abs().max() / plain.abs().max()))
        residual, weight = torch.randn(2, 64), torch.rand(64) + 0.5
        want = norm.fused_add_rms_norm(plain, residual, weight, 1e-6)
        got = norm.fused_add_rms_norm(sums, residual, weight, 1e-6)
        ws, counts = split_k_workspace(x.device)
        assert not ws.any() and not counts.any(), "the consumer clears the sums"
        for a, b in zip(got, want):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
        t = random_awq(128, 256, 128)  # gate | up of 64 each
        x = torch.randn(1, 256)
        plain = activation.silu_and_mul(w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg))
        sums = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg, deferred=True)
        got = activation.silu_and_mul(sums)
        assert not ws.any() and got.shape == (1, 64)
        worst = max(worst, float((got - plain).abs().max() / plain.abs().max()))
        one = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, dict(cfg, SPLIT_K=1), deferred=True)
        assert isinstance(one, torch.Tensor)  # (no split: the GEMV stores its output itself)
        left = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg, deferred=True).materialize()
        assert not ws.any() and left.dtype == x.dtype
        # qkv (2 q heads, 1 KV head of 16): q/k-norm + RoPE + KV write reads the sums; token 1 is padding (slot -1)
        from qwentrt.engine.kernels.qk_norm_rope_write_kv import qk_norm_rope_write_kv
        from qwentrt.engine.kernels.reference import rope_cos_sin_cache
        t = random_awq(64, 512, 128)
        x = torch.randn(2, 512)
        cos_sin = rope_cos_sin_cache(64, 16, 10000.0, x.device)
        qw, kw = torch.rand(16) + 0.5, torch.rand(16) + 0.5
        pos, slots = torch.tensor([7, 9]), torch.tensor([5, -1])
        outs = []
        for deferred in (False, True):
            y = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg, deferred=deferred)
            flat = y.sums if deferred else y
            q, k, v = flat.split([32, 16, 16], dim=-1)
            caches = torch.zeros(4, 4, 1, 16), torch.zeros(4, 4, 1, 16)
            q_out = qk_norm_rope_write_kv(q.view(2, 2, 16), k.view(2, 1, 16), v.view(2, 1, 16), qw, kw, 1e-6, pos,
                                          cos_sin, *caches, slots, 1.0, 1.0, x.dtype if deferred else None)
            outs.append((q_out, *caches))
            assert not ws.any(), "q, k and v sums cleared, the padding token's too"
        for a, b in zip(*outs):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    print(f"WORST {worst:.3e}")
""")


TILE_MAJOR_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels.w4a16_gemv import tile_major, w4a16_gemv
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    for layout in ("lanes", "words", "window"):
        for n, bn, split in [(128, 64, 1), (72, 32, 2), (200, 64, 4)]:  # (72 and 200: a partial last tile)
            t = random_awq(n, 512, 128)
            x = torch.randn(2, 512)
            cfg = {"BLOCK_N": bn, "BLOCK_K": 16, "SPLIT_K": split, "LAYOUT": layout}
            want = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg)
            tiled = tile_major(t["qweight"], bn)
            assert tiled.shape == (-(-n // bn), 512, bn // 8)
            got = w4a16_gemv(x, tiled, t["qzeros"], t["scales"], 128, cfg)
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            try:
                w4a16_gemv(x, tiled, t["qzeros"], t["scales"], 128, dict(cfg, BLOCK_N=2 * bn))
                raise AssertionError("a tile-major weight of another BLOCK_N was accepted")
            except ValueError as e:
                assert "tile_major" in str(e)
    print(f"WORST {worst:.3e}")
""")


def test_tile_major_weights_give_the_same_results_in_the_interpreter():
    """`tile_major` repacks qweight so each program's rows are contiguous; the GEMV reads either layout, all three
    kernels, partial last tiles padded: the same sums up to summation order."""
    worst = worst_in_the_interpreter(TILE_MAJOR_SCRIPT)
    assert worst < 1e-5, worst


STREAM_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, tile_major, w4a16_gemv
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    # (m, n, k, group, BLOCK_N, ROWS, programs, window, BLOCK_K, STAGES): spans that start and end mid-tile,
    # a program per item, a partial last tile (72, 200), two rows, the words and window arithmetic
    for m, n, k, group, bn, rows, programs, window, bk, stages in [
            (1, 64, 256, 128, 32, 128, 3, True, 16, 0), (2, 72, 512, 128, 16, 64, 7, False, 16, 0),
            (1, 200, 256, 64, 64, 32, 5, True, 8, 2), (1, 128, 256, 128, 64, 128, 100, False, 32, 3)]:
        t = random_awq(n, k, group)
        x = torch.randn(m, k) * (1 + 10 * (torch.rand(k) < 0.02))
        ref = reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], group)
        cfg = {"LAYOUT": "stream", "BLOCK_N": bn, "ROWS": rows, "PROGRAMS": programs, "WINDOW": window,
               "BLOCK_K": bk, "STAGES": stages}
        sums = w4a16_gemv(x, tile_major(t["qweight"], bn), t["qzeros"], t["scales"], group, cfg, deferred=True)
        got = sums.materialize()
        assert not split_k_workspace(x.device)[0].any(), "materialize leaves the workspace zero"
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        got = w4a16_gemv(x, tile_major(t["qweight"], bn), t["qzeros"], t["scales"], group, cfg)  # (not deferred)
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        try:
            w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], group, cfg)
            raise AssertionError("the AWQ layout was accepted by the stream GEMV")
        except ValueError as e:
            assert "tile_major" in str(e)
    print(f"WORST {worst:.3e}")
""")


def test_stream_gemv_matches_reference_in_the_interpreter():
    """The persistent GEMV (w4a16_gemv_stream.py): each program a contiguous span of (tile, rows) items of the
    tile-major weight, sums kept per tile and added once; float32 with a few outlier channels (the window
    arithmetic's ~1e-4, as in the window test)."""
    worst = worst_in_the_interpreter(STREAM_SCRIPT)
    assert worst < 1e-3, worst


TILE_MAJOR_GEMM_SCRIPT = textwrap.dedent("""
    import torch
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, w4a16_gemm
    from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, tile_major
    from tests.test_w4a16_kernel import random_awq
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    worst = 0.0
    # (N, group, the tile's BLOCK_N, the GEMM's BLOCK_N, SPLIT_K): tiles narrower than the GEMM's, as wide, wider;
    # 200 and 72 columns leave the last tile padded
    for n, group, tile_bn, gemm_bn, split in [(200, 64, 64, 32, 1), (72, 128, 32, 64, 2), (200, 64, 16, 128, 3),
                                              (128, 128, 64, 64, 1), (200, 64, 256, 64, 2)]:
        t = random_awq(n, 256, group)
        tiled = tile_major(t["qweight"], tile_bn)
        assert tiled.shape == (-(-n // tile_bn), 256, tile_bn // 8)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(5, 256, dtype=dtype)
            scales = t["scales"].to(dtype)
            cfg = {"BLOCK_M": 16, "BLOCK_N": gemm_bn, "BLOCK_K": min(64, group), "SPLIT_K": split}
            for _ in range(2):  # twice: the split-K workspace and counters must come back to zero
                want = w4a16_gemm(x, t["qweight"], t["qzeros"], scales, group, cfg).float()
                got = w4a16_gemm(x, tiled, t["qzeros"], scales, group, cfg).float()
                assert not torch.isnan(got).any()
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            want = awq_dequantize(t["qweight"], t["qzeros"], scales, group, dtype)
            assert torch.equal(awq_dequantize(tiled, t["qzeros"], scales, group, dtype), want), (n, tile_bn, dtype)
        ws, counts = split_k_workspace(torch.device("cpu"))
        assert not ws.any() and not counts.any()
    print(f"WORST {worst:.3e}")
""")


def test_gemm_and_dequantize_read_tile_major_weights_in_the_interpreter():
    """`w4a16_gemv_tile_major` keeps the tile-major weight as the only copy, so the GEMM and the dequantization read it
    too (TILE_PN, stride_qt): the AWQ layout's results, at any GEMM BLOCK_N against the tile width, padded last tiles
    included (float32 and fp16; the dequantization bit for bit)."""
    worst = worst_in_the_interpreter(TILE_MAJOR_GEMM_SCRIPT)
    assert worst < 1e-6, worst


def test_tile_major_weights_are_checked_with_a_clear_error():
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, awq_linear, w4a16_gemm
    from qwentrt.engine.kernels.w4a16_gemv import tile_major
    t = random_awq(200, 256, 64)
    tiled = tile_major(t["qweight"], 64)  # 25 words in 4 tiles of 8
    x = torch.randn(3, 256)
    args = (t["qzeros"], t["scales"], 64)
    k_from_scales = "but the scales \\(4 groups of 64\\) say K = 256"
    for bad, match in [(tiled[:-1], "needs 4 tiles"),  # another N's tiles
                       (tile_major(t["qweight"][:, :16], 64), "needs 4 tiles"),
                       (tiled[:, :128].contiguous(), "has K = 128 rows, but x has K = 256"),  # another K
                       (tiled[:, :128], "contiguous"),
                       (tiled.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
                       (tiled[None], "AutoAWQ's \\[K, N/8\\] or tile-major"),
                       (t["qweight"][:, :24], "25 packed columns expected")]:
        with pytest.raises(ValueError, match=match):
            w4a16_gemm(x, bad, *args)
        match = match.replace("but x has K = 256", k_from_scales)
        with pytest.raises(ValueError, match=match):
            awq_dequantize(bad, *args, torch.float32)
        with pytest.raises(ValueError, match=match):
            awq_linear(x, bad, *args)  # (the CPU: the reference checks it the same way)


def test_the_reference_reads_tile_major_weights():
    """The CPU path (reference.awq_linear) untiles a tile-major weight (reference.awq_layout): the same bits."""
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import awq_linear
    from qwentrt.engine.kernels.w4a16_gemv import tile_major
    for n, bn in [(200, 64), (256, 128), (72, 1024)]:
        t = random_awq(n, 256, 128)
        tiled = tile_major(t["qweight"], bn)
        assert torch.equal(reference.awq_layout(tiled, n), t["qweight"])
        assert reference.awq_layout(t["qweight"], n) is t["qweight"]
        x = torch.randn(4, 256)
        want = reference.awq_linear(x, t["qweight"], t["qzeros"], t["scales"], 128)
        assert torch.equal(reference.awq_linear(x, tiled, t["qzeros"], t["scales"], 128), want)
        assert torch.equal(awq_linear(x, tiled, t["qzeros"], t["scales"], 128), want)


def test_pack_weight_keeps_one_layout_and_the_gemv_reads_it_at_its_tile_width(monkeypatch):
    """ops.pack_weight: tile-major at the GEMV's BLOCK_N for the shape where `w4a16_gemv_tile_major` is on (on CUDA;
    here with the CPU let in), else the AWQ tensor itself; w4a16.at_tile_width runs the GEMV at the weight's width."""
    from qwentrt.engine.kernels import ops
    from qwentrt.engine.kernels.configs import default_kernel_configs
    from qwentrt.engine.kernels.w4a16 import at_tile_width
    monkeypatch.delenv("QWENTRT_GEMV_TILE_MAJOR", raising=False)
    t = random_awq(6144, 256, 128)
    try:
        cfg = default_kernel_configs("9.0")
        cfg["w4a16_gemv"]["6144x256"] = {"BLOCK_N": 512, "LAYOUT": "words"}
        ops.configure(dict(cfg, w4a16_gemv_tile_major=True))
        assert ops.pack_weight(t["qweight"], t["scales"], 128) is t["qweight"]  # (the CPU: the reference's layout)
        monkeypatch.setattr(ops, "TILE_MAJOR_DEVICES", ("cuda", "cpu"))
        tiled = ops.pack_weight(t["qweight"], t["scales"], 128)
        assert tiled.shape == (12, 256, 64) and tiled.is_contiguous()
        assert ops.pack_weight(tiled, t["scales"], 128) is tiled
        ops.configure(dict(cfg, w4a16_gemv_tile_major=False))
        assert ops.pack_weight(t["qweight"], t["scales"], 128) is t["qweight"]
        ops.configure(dict(cfg, w4a16_gemv_tile_major=True, w4a16_gemv_max_tokens=0))  # the GEMV never runs
        assert ops.pack_weight(t["qweight"], t["scales"], 128) is t["qweight"]
    finally:
        ops.configure({})
    gemv = {"BLOCK_N": 512, "LAYOUT": "words"}
    assert at_tile_width(gemv, tiled) is gemv and at_tile_width(gemv, t["qweight"]) is gemv
    assert at_tile_width({"LAYOUT": "words"}, tiled) == {"BLOCK_N": 512, "LAYOUT": "words"}
    assert at_tile_width(dict(gemv, BLOCK_N=128), tiled)["BLOCK_N"] == 512  # (configs changed after packing)


def test_deferred_split_k_sums_are_finished_by_the_next_kernel_in_the_interpreter():
    """w4a16_gemv_deferred: the GEMV leaves float32 sums (no tile counter, no fence) that the residual-add + RMSNorm,
    the SiLU-mul or the q/k-norm + RoPE + KV write reads, rounds as the GEMV would have and clears: the same results,
    the workspace zero after."""
    worst = worst_in_the_interpreter(DEFERRED_SCRIPT)
    assert worst < 1e-5, worst


def test_window_gemv_matches_reference_in_the_interpreter():
    """The "window" dequantization accumulates x (1 + q 2^-11) or x (1 + q 2^-7) in float32 and takes the sum of x
    out per group: the cancellation costs ~7 of float32's 24 bits at most (~1e-4 relative; bf16's own rounding of
    the output is ~2e-3), in exchange for no subtraction per nibble."""
    worst = worst_in_the_interpreter(WINDOW_SCRIPT)
    assert worst < 1e-3, worst


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
        if m <= 16:
            from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv
            # words at 1024 columns (128 words): a partial tile of 2560 columns (320 words), whole ones of 6144
            for split, layout, bn in [(1, "lanes", 128), (8, "lanes", 128), (1, "words", 512), (8, "words", 1024),
                                      (20, "words", 512), (1, "window", 512), (8, "window", 1024),
                                      (8, "window+k3", 512), (20, "words+k3", 512)]:
                layout, _, stages = layout.partition("+k")
                cfg = {"SPLIT_K": split, "LAYOUT": layout, "KSTAGES": int(stages or 0), "BLOCK_N": bn,
                       "BLOCK_K": 16 if layout == "lanes" else 8, "num_warps": 1 if layout == "lanes" else 4}
                for _ in range(3):
                    out = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg)
                    rel = float((out.float() - ref).norm() / ref.norm())
                    assert out.dtype == torch.bfloat16 and rel < 1e-2, ("gemv", m, n, k, cfg, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [64, 300])
def test_many_tokens_dequantize_then_cublas_on_cuda(m):
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, awq_linear

    t = random_awq(2560, 4096, 128, "cuda")
    ref_w = reference.awq_dequantize(t["qweight"], t["qzeros"], t["scales"], 128, torch.bfloat16)
    assert torch.equal(awq_dequantize(t["qweight"], t["qzeros"], t["scales"], 128, torch.bfloat16), ref_w)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = reference.awq_linear(x.float(), t["qweight"], t["qzeros"], t["scales"], 128)
    out = awq_linear(x, t["qweight"], t["qzeros"], t["scales"], 128, {"w4a16_prefill_min_tokens": 64})
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_ptx_dequantize_is_exact_and_large_tiles_on_cuda():
    """The bf16 inline-PTX dequantization gives the reference's bits, odd column counts and group sizes
    included; the GEMM with large BLOCK_M tiles (the 128-512 token buckets) agrees with the reference."""
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, bf16_ptx, w4a16_gemm

    for n, k, group in [(2560, 4096, 128), (200, 192, 64), (72, 256, 32)]:
        t = random_awq(n, k, group, "cuda")
        t["scales"] = t["scales"].to(torch.bfloat16)
        assert bf16_ptx(torch.empty(1, device="cuda", dtype=torch.bfloat16), t["scales"])
        ref_w = reference.awq_dequantize(t["qweight"], t["qzeros"], t["scales"], group, torch.bfloat16)
        assert torch.equal(awq_dequantize(t["qweight"], t["qzeros"], t["scales"], group, torch.bfloat16), ref_w)
    t = random_awq(6144, 2560, 128, "cuda")
    t["scales"] = t["scales"].to(torch.bfloat16)
    for m, cfg in [(256, {"BLOCK_M": 256, "BLOCK_N": 64, "SPLIT_K": 1}),
                   (200, {"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_K": 2}),
                   (64, {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 4, "num_warps": 8})]:
        x = torch.randn(m, 2560, device="cuda", dtype=torch.bfloat16)
        ref = reference.awq_linear(x.float(), t["qweight"], t["qzeros"], t["scales"], 128)
        out = w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2, (m, cfg)
    t = random_awq(200, 192, 64, "cuda")  # a partial N tile, a smaller group
    t["scales"] = t["scales"].to(torch.bfloat16)
    x = torch.randn(5, 192, device="cuda", dtype=torch.bfloat16)
    ref = reference.awq_linear(x.float(), t["qweight"], t["qzeros"], t["scales"], 64)
    for split in (1, 3):
        out = w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], 64, {"BLOCK_N": 128, "SPLIT_K": split})
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2, split


@pytest.mark.gpu
def test_gemm_and_dequantize_over_tile_major_weights_on_cuda():
    """Qwen3-4B's qkv and down shapes in bf16 (the inline-PTX dequantization): the GEMM at several BLOCK_N and the
    dequantization over tile-major weights of several tile widths give the AWQ layout's results (the dequantization
    bit for bit, the GEMM without a split too; with one, up to the order of the split-K atomics), and so does
    awq_linear at each of its paths (GEMV, GEMM, dequantize + cuBLAS) with the H100's configs."""
    from qwentrt.engine.kernels.configs import default_kernel_configs
    from qwentrt.engine.kernels.w4a16 import awq_dequantize, awq_linear, bf16_ptx, w4a16_gemm
    from qwentrt.engine.kernels.w4a16_gemv import tile_major
    configs = default_kernel_configs("9.0")
    for n, k in [(6144, 2560), (2560, 9728)]:
        t = random_awq(n, k, 128, "cuda")
        t["scales"] = t["scales"].to(torch.bfloat16)
        awq = (t["qweight"], t["qzeros"], t["scales"], 128)
        assert bf16_ptx(torch.empty(1, device="cuda", dtype=torch.bfloat16), t["scales"])
        w = awq_dequantize(*awq, torch.bfloat16)
        for tile_bn in (128, 256, 1024):  # (2560 columns: 320 words, a padded last tile at 256 and 1024)
            tiled = tile_major(t["qweight"], tile_bn)
            tm = (tiled, t["qzeros"], t["scales"], 128)
            assert torch.equal(awq_dequantize(*tm, torch.bfloat16), w), (n, k, tile_bn)
            for m, cfg in [(16, {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 1}),
                           (16, {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 8}),
                           (64, {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 2}),
                           (200, {"BLOCK_M": 128, "BLOCK_N": 256, "SPLIT_K": 1})]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                want = w4a16_gemm(x, *awq, cfg).float()
                got = w4a16_gemm(x, *tm, cfg).float()
                if cfg["SPLIT_K"] == 1:
                    assert torch.equal(got, want), (n, k, tile_bn, m, cfg)
                else:
                    assert float((got - want).norm() / want.norm()) < 1e-2, (n, k, tile_bn, m, cfg)
        tiled = tile_major(t["qweight"], configs["w4a16_gemv"][f"{n}x{k}"]["BLOCK_N"])  # as ops.pack_weight does
        for m in (1, 2, 16, 600):  # the GEMV, the GEMM, dequantize + cuBLAS
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = awq_linear(x, *awq, configs).float()
            got = awq_linear(x, tiled, t["qzeros"], t["scales"], 128, configs).float()
            assert float((got - want).norm() / want.norm()) < 1e-2, (n, k, m)


def test_decode_config_picks_bucket_then_shape():
    from qwentrt.engine.kernels.configs import default_kernel_configs
    from qwentrt.engine.kernels.w4a16 import decode_config, gemv_config

    a, b, c = ({"BLOCK_M": m, "SPLIT_K": 1} for m in (16, 32, 64))
    configs = {"w4a16_decode": {"16": {"default": a, "6144x2560": c}, "64": {"default": b}}}
    assert decode_config(configs, 1, 2560, 4096) is a
    assert decode_config(configs, 16, 6144, 2560) is c
    assert decode_config(configs, 17, 6144, 2560) is b
    assert decode_config(configs, 500, 1, 1) is b  # past the largest bucket: the largest
    assert decode_config({"w4a16_decode": {"default": a}}, 5, 1, 1) is a  # engines built before buckets
    for cc in ("8.9", "9.0"):
        cfg = default_kernel_configs(cc)
        for m in (1, 16, 17, 64, 65, 256):
            assert decode_config(cfg, m, 6144, 2560)["BLOCK_M"] >= min(m, 64)
        # untuned engines take the GEMV at one token (any shape), and the GEMM from 3 tokens on
        assert gemv_config(cfg, 1, 6144, 2560, 128) and gemv_config(cfg, 1, 1000, 256, 128)
        assert gemv_config(cfg, 3, 6144, 2560, 128) is None
    assert gemv_config(default_kernel_configs("9.0"), 1, 19456, 2560, 128)["BLOCK_K"] == 8  # the H100's winner


def test_gemv_refuses_a_bad_config_with_a_clear_error():
    from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv
    t = random_awq(64, 256, 128)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="LAYOUT"):
        w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, {"LAYOUT": "rows"})
    with pytest.raises(ValueError, match="BLOCK_N"):
        w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, {"BLOCK_N": 96, "LAYOUT": "words"})


def test_tuning_candidates_and_shapes():
    from qwentrt.config import Qwen3Config
    from qwentrt.engine.tuning import candidate_configs, gemv_candidates, linear_shapes

    for bucket in (16, 32, 64, 256):
        cands = candidate_configs(bucket)
        assert cands and all(c["BLOCK_M"] >= min(bucket, 64) and 128 % c["BLOCK_K"] == 0 for c in cands)
    gemv = gemv_candidates()
    assert {c["LAYOUT"] for c in gemv} == {"lanes", "words", "window", "stream"}
    assert all(128 % c["ROWS"] == 0 and c["ROWS"] % c["BLOCK_K"] == 0 for c in gemv if c["LAYOUT"] == "stream")
    assert all(128 % c["BLOCK_K"] == 0 and c["BLOCK_N"] % 8 == 0 and (c["BLOCK_N"] // 8) & (c["BLOCK_N"] // 8 - 1) == 0
               for c in gemv)  # whole groups per step; a power-of-two count of words
    import json
    from importlib.resources import files
    cfg = Qwen3Config.from_hf(json.loads((files("qwentrt") / "data" / "qwen3-4b-instruct-2507.config.json").read_text()))
    assert linear_shapes(cfg) == {"6144x2560": (6144, 2560), "2560x4096": (2560, 4096),
                                  "19456x2560": (19456, 2560), "2560x9728": (2560, 9728)}


TUNER_SCRIPT = textwrap.dedent("""
    import itertools, torch
    from types import SimpleNamespace
    from qwentrt.engine import tuning
    # the tuner's logic in the interpreter: a made-up clock (the stream candidates "fastest"), small shapes, two
    # weight copies, one GEMM candidate and bucket; float32 scales (the interpreter's bf16 is not faithful)
    fake = itertools.count(1)
    def time_in_graph(fn, replays=10):
        fn()
        return 1.0 / next(fake)  # later candidates look faster: the last stream candidate wins
    tuning.time_in_graph = time_in_graph
    tuning.L2_FLUSH_BYTES = 1
    tuning.candidate_configs = lambda bucket: [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1,
                                               "num_warps": 4, "num_stages": 1}]
    tuning.gemv_candidates = lambda: [{"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 4, "num_warps": 1, "num_stages": 1},
                                      {"LAYOUT": "stream", "BLOCK_N": 64, "PER_SM": 2, "num_warps": 1, "ROWS": 64,
                                       "STAGES": 0, "BLOCK_K": 8, "WINDOW": True}]
    tuning.PREFILL_CANDIDATES = (16,)
    real_randn = torch.randn
    torch.randn = lambda *a, dtype=None, **kw: real_randn(*a, dtype=torch.float32, **kw)
    torch.Tensor.to = (lambda to: lambda self, *a, **kw: to(self, *[torch.float32 if x is torch.bfloat16 else x
                                                                  for x in a], **kw))(torch.Tensor.to)
    cfg = SimpleNamespace(hidden_size=256, intermediate_size=384, q_size=256, kv_size=128)
    out = tuning.tune_w4a16(cfg, 128, torch.device("cpu"), buckets=(16,))
    assert all(c["LAYOUT"] == "stream" for key, c in out["w4a16_gemv"].items()), out["w4a16_gemv"]
    assert "gemv_vs_gemm/1" in out["tuning_us"]  # (the stream winner timed over its tile-major copies again)
    print("WORST 0")
""")


def test_the_tuner_times_stream_candidates_over_tile_major_weights_in_the_interpreter():
    """`qwentrt build --tune`'s GEMV search with a persistent ("stream") candidate: its weights are laid out
    tile-major as the engine will keep them, it is checked against the reference and can win (a made-up clock)."""
    assert worst_in_the_interpreter(TUNER_SCRIPT) == 0


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


def test_deferred_split_k_is_the_default_and_the_environment_overrides(monkeypatch):
    from qwentrt.engine.kernels.configs import default_kernel_configs
    from qwentrt.engine.kernels.w4a16 import gemv_deferred_wanted

    monkeypatch.delenv("QWENTRT_GEMV_DEFERRED", raising=False)
    assert all(gemv_deferred_wanted(default_kernel_configs(cc)) for cc in ("8.9", "9.0"))
    assert not gemv_deferred_wanted({})  # engines built before it: the counter protocol
    monkeypatch.setenv("QWENTRT_GEMV_DEFERRED", "0")
    assert not gemv_deferred_wanted(default_kernel_configs("9.0"))
    monkeypatch.setenv("QWENTRT_GEMV_DEFERRED", "1")
    assert gemv_deferred_wanted({})
    from qwentrt.engine.kernels import ops  # the engine reads it once, when it configures its kernels
    try:
        ops.configure({"w4a16_gemv_deferred": False})
        assert ops._configs["w4a16_gemv_deferred"] is True
        monkeypatch.setenv("QWENTRT_GEMV_DEFERRED", "0")
        ops.configure(default_kernel_configs("9.0"))
        assert ops._configs["w4a16_gemv_deferred"] is False
    finally:
        monkeypatch.delenv("QWENTRT_GEMV_DEFERRED")
        ops.configure({})


def test_stream_configs_pack_tile_major_and_the_environment_overrides_gemv_configs(monkeypatch, tmp_path):
    """A shape whose GEMV is the persistent "stream" one keeps its weight tile-major whatever the tile-major knob
    says (the stream GEMV reads no other layout; over an AWQ-layout weight the split-K default runs instead), and
    QWENTRT_GEMV_CONFIGS puts {"NxK": config} over the engine's GEMV configs when the kernels are configured."""
    import json
    from qwentrt.engine.kernels import ops
    from qwentrt.engine.kernels.w4a16 import at_tile_width
    from qwentrt.engine.kernels.w4a16_gemv import DEFAULT_CONFIG
    stream = {"LAYOUT": "stream", "BLOCK_N": 64, "PER_SM": 4}
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps({"128x256": stream}))
    monkeypatch.setenv("QWENTRT_GEMV_CONFIGS", str(path))
    monkeypatch.delenv("QWENTRT_GEMV_TILE_MAJOR", raising=False)
    monkeypatch.setattr(ops, "TILE_MAJOR_DEVICES", ("cpu",))
    t = random_awq(128, 256, 128)
    try:
        ops.configure({"w4a16_gemv_max_tokens": 1, "w4a16_gemv": {"default": {"BLOCK_N": 32}}})
        assert ops._configs["w4a16_gemv"]["128x256"] == stream and not ops._configs["w4a16_gemv_tile_major"]
        packed = ops.pack_weight(t["qweight"], t["scales"], 128)
        assert packed.shape == (2, 256, 8)  # tile-major at the stream config's BLOCK_N
        other = random_awq(64, 256, 128)  # another shape: the default config, the knob off: AutoAWQ's layout
        assert ops.pack_weight(other["qweight"], other["scales"], 128) is other["qweight"]
        assert at_tile_width(stream, t["qweight"]) == DEFAULT_CONFIG
        assert at_tile_width(stream, packed) == stream
        for bad in ("{not json", '["a list"]'):
            path.write_text(bad)
            with pytest.raises(ValueError, match="QWENTRT_GEMV_CONFIGS"):
                ops.configure({})
        with pytest.raises(ValueError, match="power of two"):
            from qwentrt.engine.kernels.w4a16_gemv import w4a16_gemv
            w4a16_gemv(torch.randn(1, 256), packed, t["qzeros"], t["scales"], 128, dict(stream, BLOCK_K=6))
    finally:
        monkeypatch.delenv("QWENTRT_GEMV_CONFIGS")
        ops.configure({})


@pytest.mark.gpu
def test_tile_major_weights_on_cuda():
    """The H100's GEMV configs for Qwen3-4B's shapes over tile-major weights: the results of the AWQ layout (bf16;
    up to the order of the split-K atomics)."""
    from qwentrt.engine.kernels.configs import default_kernel_configs
    from qwentrt.engine.kernels.w4a16_gemv import tile_major, w4a16_gemv
    configs = default_kernel_configs("9.0")["w4a16_gemv"]
    for n, k in [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]:
        t = random_awq(n, k, 128, "cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cfg = configs[f"{n}x{k}"]
        want = w4a16_gemv(x, t["qweight"], t["qzeros"], t["scales"], 128, cfg).float()
        got = w4a16_gemv(x, tile_major(t["qweight"], cfg["BLOCK_N"]), t["qzeros"], t["scales"], 128, cfg).float()
        assert float((got - want).norm() / want.norm()) < 1e-2, (n, k)


@pytest.mark.gpu
def test_stream_gemv_on_cuda():
    """The persistent GEMV at Qwen3-4B's four shapes in bf16 over tile-major weights, one wave of programs on this
    GPU's SMs and a few other grids (spans crossing tiles), deferred and not, against the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qwentrt.engine.kernels import reference
    from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace, tile_major, w4a16_gemv
    for n, k in [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]:
        t = random_awq(n, k, 128, "cuda")
        t["scales"] = t["scales"].to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.awq_linear(x.float(), t["qweight"], t["qzeros"], t["scales"].float(), 128)
        for cfg in [{"BLOCK_N": 256, "PER_SM": 8, "num_warps": 1}, {"BLOCK_N": 128, "PROGRAMS": 77, "ROWS": 64},
                    {"BLOCK_N": 256, "PER_SM": 2, "num_warps": 4, "BLOCK_K": 16, "STAGES": 3, "WINDOW": False}]:
            cfg = dict(cfg, LAYOUT="stream")
            tiled = tile_major(t["qweight"], cfg["BLOCK_N"])
            got = w4a16_gemv(x, tiled, t["qzeros"], t["scales"], 128, cfg, deferred=True).materialize()
            assert float((got.float() - ref).norm() / ref.norm()) < 1e-2, (n, k, cfg)
            assert not split_k_workspace(x.device)[0].any()
            got = w4a16_gemv(x, tiled, t["qzeros"], t["scales"], 128, cfg)
            assert float((got.float() - ref).norm() / ref.norm()) < 1e-2, (n, k, cfg)


@pytest.mark.gpu
def test_the_tuner_on_cuda_with_a_stream_candidate(monkeypatch):
    """The build-time tuner on the GPU, cut to a few candidates: the stream GEMV is timed over tile-major copies,
    checked against the reference, and whichever wins is a config the engine can run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from types import SimpleNamespace
    from qwentrt.engine import tuning
    monkeypatch.setattr(tuning, "candidate_configs", lambda bucket: [
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3}])
    monkeypatch.setattr(tuning, "gemv_candidates", lambda: [
        {"BLOCK_N": 256, "BLOCK_K": 32, "SPLIT_K": 20, "num_warps": 2, "num_stages": 2},
        {"LAYOUT": "stream", "BLOCK_N": 256, "PER_SM": 12, "num_warps": 1, "ROWS": 64, "STAGES": 0, "BLOCK_K": 8,
         "WINDOW": True}])
    monkeypatch.setattr(tuning, "PREFILL_CANDIDATES", (128,))
    cfg = SimpleNamespace(hidden_size=2560, intermediate_size=9728, q_size=4096, kv_size=1024)
    out = tuning.tune_w4a16(cfg, 128, torch.device("cuda"), buckets=(16,))
    assert set(out["w4a16_gemv"]) == {"6144x2560", "2560x4096", "19456x2560", "2560x9728", "default"}
    assert all(c is not None for c in out["w4a16_gemv"].values())
    assert all(v > 0 for k, v in out["tuning_us"].items() if k.startswith("gemv/1/"))


@pytest.mark.parametrize("arch,stages,window", [(90, 0, True), (90, 2, False), (89, 0, True)])
def test_the_stream_gemv_compiles_for_the_gpu_without_spills(arch, stages, window):
    """The persistent GEMV compiled on the CPU (Triton's bundled ptxas) for sm_90 / sm_89 at the H100's config (one
    warp, BLOCK_N 256, items of 64 rows): its sums added by float reductions, and ptxas's resource report shows no
    stack (no spills: a one-warp program may hold 255 registers a thread)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qwentrt.engine.kernels.w4a16_gemv_stream import _w4a16_gemv_stream_kernel as fn
    sig = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "ws_ptr": "*fp32", "N": "i32",
           "K": "i32", "ITEMS": "i32", "stride_xm": "i32", "stride_qz": "i32", "stride_s": "i32", "magic": "i32"}
    const = {"GROUP": 128, "PN": 32, "BLOCK_K": 8, "ROWS": 64, "ASM": True, "WINDOW": window, "STAGES": stages}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=dict(sig, **{n: "constexpr" for n in const}),
                                      constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
    ptx = kernel.asm["ptx"]
    assert "red.global" in ptx or "atom.global" in ptx
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("this Triton bundles no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    assert regs and int(regs.group(1)) <= 255 and stack and int(stack.group(1)) == 0, res
