"""The fused elementwise / normalization Triton kernels (write_kv, rms_norm, fused_add_rms_norm,
qk_norm_rope, silu_and_mul) against their torch references on fresh random inputs.

CPU: one subprocess with TRITON_INTERPRET=1 (set before triton is imported there) runs every kernel
through Triton's interpreter at small sizes in float32 (and float16 where the interpreter is faithful),
and prints one line per case; this process checks the bounds. FP8 rounding is not faithful in the
interpreter: the FP8 cache is tested on the GPU only.
GPU (@pytest.mark.gpu): bf16 and FP8 caches at Qwen3-4B shapes (hidden 2560, 32 q heads, 8 kv heads,
head_dim 128, intermediate 9728), T in {1, 7, 256}; outputs are poisoned (NaN) first, so an element a
kernel never writes shows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qwentrt.engine.kernels import reference

triton = pytest.importorskip("triton")

FP8 = torch.float8_e4m3fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def random_slots(num_tokens: int, num_blocks: int, block_size: int, pad_every: int = 3) -> torch.Tensor:
    """Distinct random slots, every pad_every-th token padding (-1)."""
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::pad_every] = -1
    return slots


def write_kv_case(num_tokens, num_kv_heads, head_dim, num_blocks, block_size, dtype, cache_dtype,
                  device="cpu", scales=(1.0, 1.0)):
    """(max rel error over k and v caches, untouched slots unchanged, k/v and the references' caches).
    k, v are views of a fused qkv tensor (strided rows), as in the model; the caches start random."""
    from qwentrt.engine.kernels.kv_write import write_kv

    q_size = 2 * num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * num_kv_heads * head_dim, device=device).to(dtype)
    _, k, v = qkv.split([q_size, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    slots = random_slots(num_tokens, num_blocks, block_size).to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.randn(shape, device=device).to(cache_dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    before = [c.clone() for c in caches]
    reference.write_kv(k, v, *ref_caches, slots, *scales)
    write_kv(k, v, *caches, slots, *scales)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True
    untouched = all(torch.equal(reference._raw(c).view(-1, num_kv_heads, head_dim)[~written],
                                reference._raw(b).view(-1, num_kv_heads, head_dim)[~written])
                    for c, b in zip(caches, before))
    err = max(rel_err(c.float(), r.float()) for c, r in zip(caches, ref_caches))
    return err, untouched, caches, ref_caches


def interpreted_cases() -> list[tuple[str, float, bool]]:
    """Every kernel at small sizes: (case name, relative error, exact-where-required flag)."""
    rows = []
    for dtype, cache_dtype in [(torch.float32, torch.float32), (torch.float16, torch.float16),
                               (torch.bfloat16, torch.bfloat16)]:
        for t, hk, d in [(1, 2, 64), (7, 3, 32), (19, 2, 48)]:
            err, untouched, caches, refs = write_kv_case(t, hk, d, num_blocks=5, block_size=4, dtype=dtype,
                                                         cache_dtype=cache_dtype, scales=(0.7, 1.3))
            exact = untouched and all(torch.equal(c, r) for c, r in zip(caches, refs))
            rows.append((f"write_kv {dtype} -> {cache_dtype} T={t} Hk={hk} D={d}", err, exact))
    return rows


INTERPRET_SCRIPT = textwrap.dedent("""
    import os, torch
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print("SEED", seed)
    from tests.test_fused_kernels import interpreted_cases
    for name, err, flag in interpreted_cases():
        print(f"CASE|{name}|{err:.3e}|{int(flag)}")
""")


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seed = proc.stdout.split("SEED")[1].split()[0]
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE|"):
            _, name, err, flag = line.split("|")
            cases[name] = (float(err), flag == "1")
    return seed, cases


@pytest.mark.parametrize("kernel", ["write_kv"])
def test_kernels_match_reference_in_the_interpreter(interpreted, kernel):
    seed, cases = interpreted
    mine = {name: v for name, v in cases.items() if name.split()[0] == kernel}
    assert mine, cases
    for name, (err, flag) in mine.items():
        bound = 1e-5
        assert err < bound, (seed, name, err)
        if kernel == "write_kv":  # the cast is exact: the caches match bytewise, skipped slots keep their bytes
            assert flag, (seed, name, "differs from the reference or touched a skipped slot")


# ---------------------------------------------------------------------------------------------- GPU
QWEN3_4B = {"hidden": 2560, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 9728}
TOKENS = [1, 7, 256]


def fp8_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp8 e4m3 steps between two FP8 tensors (sign-magnitude bytes; +-0 are 0 apart)."""
    def ordered(x):
        u = x.view(torch.uint8).to(torch.int32)
        mag = u & 0x7F
        return torch.where(u >= 0x80, -mag, mag)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.gpu
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_write_kv_on_cuda(t, cache_dtype):
    hk, d = QWEN3_4B["kv_heads"], QWEN3_4B["head_dim"]
    # scales small enough that some values reach the +-448 clamp in FP8
    scales = (0.005, 0.004) if cache_dtype == FP8 else (1.0, 1.0)
    _, untouched, caches, refs = write_kv_case(t, hk, d, num_blocks=64, block_size=16, dtype=torch.bfloat16,
                                               cache_dtype=cache_dtype, device="cuda", scales=scales)
    assert untouched, "a skipped or foreign slot was written"
    for c, r in zip(caches, refs):
        if cache_dtype == FP8:
            ulps = fp8_ulps(c, r)
            assert int(ulps.max()) <= 1, int(ulps.max())
            assert int((ulps > 0).sum()) <= max(1, c.numel() // 10000), int((ulps > 0).sum())
        else:
            assert torch.equal(c, r)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_write_kv_in_a_cuda_graph(cache_dtype):
    """Captured once, replayed with new k, v and slots (padding included): the replay writes the new slots."""
    from qwentrt.engine.kernels.kv_write import write_kv

    t, hk, d, blocks, bs = 7, QWEN3_4B["kv_heads"], QWEN3_4B["head_dim"], 16, 16
    k = torch.randn(t, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, hk, d, device="cuda", dtype=torch.bfloat16)
    slots = random_slots(t, blocks, bs).cuda()
    caches = [torch.randn(blocks, bs, hk, d, device="cuda").to(cache_dtype) for _ in range(2)]
    write_kv(k, v, *caches, slots, 0.02, 0.03)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv(k, v, *caches, slots, 0.02, 0.03)
    k.copy_(torch.randn_like(k))
    v.copy_(torch.randn_like(v))
    slots.copy_(random_slots(t, blocks, bs, pad_every=2))
    refs = [c.clone() for c in caches]
    reference.write_kv(k, v, *refs, slots, 0.02, 0.03)
    graph.replay()
    torch.cuda.synchronize()
    for c, r in zip(caches, refs):
        if cache_dtype == FP8:
            assert int(fp8_ulps(c, r).max()) <= 1
        else:
            assert torch.equal(c, r)
