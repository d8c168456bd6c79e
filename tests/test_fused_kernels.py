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

import contextlib
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
    """norm(out - ref) / norm(ref); inf where out has a NaN (an unwritten, poisoned element)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def worst_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: catches a few wrong elements (one head of one token) that the norm hides."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max())


def errors(pairs) -> tuple[float, float]:
    """(max rel_err, max worst_err) over (out, ref) pairs."""
    return max(rel_err(o, r) for o, r in pairs), max(worst_err(o, r) for o, r in pairs)


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


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled float tensors inside: an output element a kernel never writes shows."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def random_weight(n: int, dtype, device) -> torch.Tensor:
    return (1.0 + 0.3 * torch.randn(n, device=device)).to(dtype)


def strided_rows(t: int, n: int, dtype, device) -> torch.Tensor:
    """[t, n] as a view of a wider tensor (row stride n + 8), like a slice of a fused projection."""
    return torch.randn(t, n + 8, device=device).to(dtype)[:, 4:4 + n]


def norm_case(t, n, dtype, device="cpu", with_residual=True, eps=1e-6):
    """fused_add_rms_norm (or rms_norm without a residual): (max rel error of out and new residual,
    new residual exact and inputs untouched)."""
    from qwentrt.engine.kernels import norm

    x = strided_rows(t, n, dtype, device)
    residual = torch.randn(t, n, device=device).to(dtype) if with_residual else None
    w = random_weight(n, dtype, device)
    x0, r0 = x.clone(), residual.clone() if with_residual else None
    with poisoned_empty():
        out, res = norm.fused_add_rms_norm(x, residual, w, eps)
        plain = norm.rms_norm(x, w, eps)
    ref_out, ref_res = reference.fused_add_rms_norm(x.clone(), None if r0 is None else r0.clone(), w, eps)
    rel, worst = errors([(out, ref_out), (plain, reference.rms_norm(x, w, eps))])
    ok = (out.dtype == ref_out.dtype and out.shape == ref_out.shape and res.dtype == ref_res.dtype
          and torch.equal(res, ref_res) and torch.equal(x, x0) and (r0 is None or torch.equal(residual, r0)))
    return rel, worst, ok


def qkv_views(t, heads, kv_heads, head_dim, dtype, device):
    """q [t, H, D], k, v [t, Hk, D] as views of one fused qkv output, as the model makes them."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, q_size + 2 * kv_size, device=device).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)


def rope_case(t, heads, kv_heads, head_dim, dtype, device="cpu", max_pos=4096, eps=1e-6):
    """qk_norm_rope on strided views of a fused qkv: (max rel error of q and k, dtypes/shapes right)."""
    from qwentrt.engine.kernels import rope

    q, k, _ = qkv_views(t, heads, kv_heads, head_dim, dtype, device)
    qw, kw = random_weight(head_dim, dtype, device), random_weight(head_dim, dtype, device)
    positions = torch.randint(0, max_pos, (t,), device=device)
    cos_sin = reference.rope_cos_sin_cache(max_pos, head_dim, 1e6, device)
    with poisoned_empty():
        q_out, k_out = rope.qk_norm_rope(q, k, qw, kw, eps, positions, cos_sin)
    q_ref, k_ref = reference.qk_norm_rope(q, k, qw, kw, eps, positions, cos_sin)
    ok = all(a.dtype == b.dtype and a.shape == b.shape for a, b in ((q_out, q_ref), (k_out, k_ref)))
    return (*errors([(q_out, q_ref), (k_out, k_ref)]), ok)


def rope_kv_case(t, heads, kv_heads, head_dim, dtype, cache_dtype, device="cpu", num_blocks=8, block_size=4,
                 scales=(1.0, 1.0), max_pos=4096, eps=1e-6, pad_every=3):
    """qk_norm_rope_write_kv on strided views of a fused qkv, random caches, slots with padding (-1):
    (max rel error of q and the written cache rows, max worst error, q's dtype/shape right and every other
    slot of the caches untouched), and the written rows of the caches (kernel's, reference's) as stored
    (FP8 as bytes) for bytewise checks."""
    from qwentrt.engine.kernels.qk_norm_rope_write_kv import qk_norm_rope_write_kv

    q, k, v = qkv_views(t, heads, kv_heads, head_dim, dtype, device)
    qw, kw = random_weight(head_dim, dtype, device), random_weight(head_dim, dtype, device)
    positions = torch.randint(0, max_pos, (t,), device=device)
    cos_sin = reference.rope_cos_sin_cache(max_pos, head_dim, 1e6, device)
    slots = torch.randperm(num_blocks * block_size)[:t]
    slots[pad_every - 1::pad_every] = -1  # token 0 is written: T = 1 writes too
    slots = slots.to(device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.randn(shape, device=device).to(cache_dtype) for _ in range(2)]
    refs = [c.clone() for c in caches]
    before = [c.clone() for c in caches]
    with poisoned_empty():
        q_out = qk_norm_rope_write_kv(q, k, v, qw, kw, eps, positions, cos_sin, *caches, slots, *scales)
    q_ref = reference.qk_norm_rope_write_kv(q, k, v, qw, kw, eps, positions, cos_sin, *refs, slots, *scales)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[slots >= 0]] = True

    def rows(c, sel):
        return reference._raw(c).view(-1, kv_heads, head_dim)[sel]

    untouched = all(torch.equal(rows(c, ~written), rows(b, ~written)) for c, b in zip(caches, before))
    pairs = [(q_out, q_ref)] + [(rows(c, written).view(cache_dtype).float(), rows(r, written).view(cache_dtype).float())
                                for c, r in zip(caches, refs)]
    ok = q_out.dtype == q_ref.dtype and q_out.shape == q_ref.shape and untouched
    return (*errors(pairs), ok), [rows(c, written) for c in caches], [rows(r, written) for r in refs]


def silu_case(t, inter, dtype, device="cpu"):
    """silu_and_mul on strided rows: (rel error, dtype/shape right)."""
    from qwentrt.engine.kernels import activation

    x = strided_rows(t, 2 * inter, dtype, device) * 3
    with poisoned_empty():
        out = activation.silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    return (*errors([(out, ref)]), out.dtype == ref.dtype and out.shape == ref.shape)


def interpreted_cases() -> list[tuple[str, float, float, bool]]:
    """Every kernel at small sizes: (case name, rel_err, worst_err, the case's flag: see FLAG_MEANS)."""
    rows = []
    for dtype, cache_dtype in [(torch.float32, torch.float32), (torch.float16, torch.float16),
                               (torch.bfloat16, torch.bfloat16)]:
        for t, hk, d in [(1, 2, 64), (7, 3, 32), (19, 2, 48)]:
            err, untouched, caches, refs = write_kv_case(t, hk, d, num_blocks=5, block_size=4, dtype=dtype,
                                                         cache_dtype=cache_dtype, scales=(0.7, 1.3))
            exact = untouched and all(torch.equal(c, r) for c, r in zip(caches, refs))
            rows.append((f"write_kv {dtype} -> {cache_dtype} T={t} Hk={hk} D={d}", err, err, exact))
    for dtype in (torch.float32, torch.float16):
        for t, n in [(1, 64), (5, 96)]:
            for with_residual in (True, False):
                rows.append((f"norm {dtype} T={t} N={n} residual={with_residual}",
                             *norm_case(t, n, dtype, with_residual=with_residual)))
        for t, h, hk, d in [(1, 4, 2, 32), (5, 6, 2, 48)]:
            rows.append((f"qk_norm_rope {dtype} T={t} H={h} Hk={hk} D={d}", *rope_case(t, h, hk, d, dtype)))
        for t, h, hk, d in [(1, 4, 2, 32), (7, 6, 3, 48), (13, 8, 8, 64)]:
            # a cache in another dtype (a plain cast; not bf16: the interpreter does not round to it as CUDA does)
            for cache_dtype in (dtype, torch.float16 if dtype == torch.float32 else torch.float32):
                res, _, _ = rope_kv_case(t, h, hk, d, dtype, cache_dtype, scales=(0.7, 1.3))
                rows.append((f"qk_norm_rope_write_kv {dtype} -> {cache_dtype} T={t} H={h} Hk={hk} D={d}", *res))
        for t, inter in [(1, 40), (3, 1100)]:
            rows.append((f"silu_and_mul {dtype} T={t} I={inter}", *silu_case(t, inter, dtype)))
    return rows


INTERPRET_SCRIPT = textwrap.dedent("""
    import os, torch
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print("SEED", seed)
    from tests.test_fused_kernels import interpreted_cases
    for name, rel, worst, flag in interpreted_cases():
        print(f"CASE|{name}|{rel:.3e}|{worst:.3e}|{int(flag)}")
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
            _, name, rel, worst, flag = line.split("|")
            cases[name] = (float(rel), float(worst), flag == "1")
    return seed, cases


FLAG_MEANS = {
    "write_kv": "caches differ bytewise from the reference's, or a skipped slot was touched",
    "norm": "wrong dtype/shape, new residual not exactly the reference's, or an input was modified",
    "qk_norm_rope": "wrong dtype or shape",
    "silu_and_mul": "wrong dtype or shape",
    "qk_norm_rope_write_kv": "wrong q dtype/shape, or a skipped or foreign cache slot was touched",
}


@pytest.mark.parametrize("kernel", list(FLAG_MEANS))
def test_kernels_match_reference_in_the_interpreter(interpreted, kernel):
    seed, cases = interpreted
    mine = {name: v for name, v in cases.items() if name.split()[0] == kernel}
    assert mine, cases
    for name, (rel, worst, flag) in mine.items():
        bound = 1e-3 if "float16" in name else 1e-5  # fp16 outputs: a rare 1-ulp rounding flip
        assert rel < bound and worst < bound, (seed, name, rel, worst)
        assert flag, (seed, name, FLAG_MEANS[kernel])


# ---------------------------------------------------------------------------------------------- GPU
QWEN3_4B = {"hidden": 2560, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 9728}
TOKENS = [1, 7, 256]
# 16-bit outputs: the kernels round as the references do, so only the GPU's approximate rsqrt / exp and
# FMA contraction move an element, by a rounding flip (1-2 ulps: 2^-8 relative in bf16); RoPE's
# y1 c - y2 s can put two such flips in one element, relative to the head's largest value.
BOUND_16 = 1e-2   # rel_err
WORST_16 = 2e-2   # worst_err


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
            # The kernel divides correctly rounded (as the reference on the CPU); torch on CUDA multiplies by
            # the scale's reciprocal, 1 fp32 ulp off at times: a rare element may round to the next fp8 value.
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


@pytest.mark.gpu
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_on_cuda(t, dtype):
    for with_residual in (True, False):
        rel, worst, ok = norm_case(t, QWEN3_4B["hidden"], dtype, "cuda", with_residual=with_residual)
        assert ok, (t, dtype, with_residual, FLAG_MEANS["norm"])
        assert rel < BOUND_16 and worst < WORST_16, (t, dtype, with_residual, rel, worst)


@pytest.mark.gpu
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_on_cuda(t, dtype):
    rel, worst, ok = rope_case(t, QWEN3_4B["heads"], QWEN3_4B["kv_heads"], QWEN3_4B["head_dim"], dtype, "cuda",
                               max_pos=32768)
    assert ok and rel < BOUND_16 and worst < WORST_16, (t, dtype, rel, worst)


@pytest.mark.gpu
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_on_cuda(t, dtype):
    rel, worst, ok = silu_case(t, QWEN3_4B["intermediate"], dtype, "cuda")
    assert ok and rel < BOUND_16 and worst < WORST_16, (t, dtype, rel, worst)


@pytest.mark.gpu
def test_float32_on_cuda():
    """float32 end to end (the engine's fp32 mode): GPU approximations (rsqrt, exp, division) stay ~1e-6."""
    c = QWEN3_4B
    for name, (rel, worst, ok) in [("norm", norm_case(7, c["hidden"], torch.float32, "cuda")),
                                   ("rope", rope_case(7, c["heads"], c["kv_heads"], c["head_dim"], torch.float32,
                                                      "cuda")),
                                   ("silu", silu_case(7, c["intermediate"], torch.float32, "cuda"))]:
        assert ok and rel < 1e-5 and worst < 1e-5, (name, rel, worst)


@pytest.mark.gpu
def test_ops_dispatch_to_triton_and_replay_in_a_cuda_graph(monkeypatch):
    """The decoder layer's elementwise ops through `ops` (as model.py calls them), captured once in a CUDA
    graph and replayed on new inputs (bf16, FP8 cache): the replay matches the references, and no
    reference ran on the GPU (each is made to raise while the ops run)."""
    from qwentrt.engine.kernels import ops

    c = QWEN3_4B
    t, blocks, bs, eps, scales = 7, 16, 16, 1e-6, (0.02, 0.03)
    dev, dt = "cuda", torch.bfloat16
    hidden = torch.randn(t, c["hidden"], device=dev, dtype=dt)
    residual = torch.randn(t, c["hidden"], device=dev, dtype=dt)
    qkv = torch.randn(t, (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"], device=dev, dtype=dt)
    gate_up = torch.randn(t, 2 * c["intermediate"], device=dev, dtype=dt)
    positions = torch.randint(0, 4096, (t,), device=dev)
    slots = random_slots(t, blocks, bs).to(dev)
    w_norm, qw, kw = (random_weight(n, dt, dev) for n in (c["hidden"], c["head_dim"], c["head_dim"]))
    cos_sin = reference.rope_cos_sin_cache(4096, c["head_dim"], 1e6, dev)
    k_cache, v_cache = (torch.randn(blocks, bs, c["kv_heads"], c["head_dim"], device=dev).to(FP8) for _ in range(2))

    def split(qkv):
        q, k, v = qkv.split([c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"],
                             c["kv_heads"] * c["head_dim"]], dim=-1)
        return (q.view(t, c["heads"], c["head_dim"]), k.view(t, c["kv_heads"], c["head_dim"]),
                v.view(t, c["kv_heads"], c["head_dim"]))

    def layer(mod, k_cache, v_cache):
        x, res = mod.fused_add_rms_norm(hidden, residual, w_norm, eps)
        q, k, v = split(qkv)
        q, k = mod.qk_norm_rope(q, k, qw, kw, eps, positions, cos_sin)
        mod.write_kv(k, v, k_cache, v_cache, slots, *scales)
        return x, res, q, k, mod.silu_and_mul(gate_up)

    with monkeypatch.context() as m:
        for name in ("fused_add_rms_norm", "qk_norm_rope", "write_kv", "silu_and_mul"):
            m.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"ops.{_n} ran the reference on CUDA"))
        layer(ops, k_cache, v_cache)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = layer(ops, k_cache, v_cache)
    for x in (hidden, residual, qkv, gate_up):
        x.copy_(torch.randn_like(x))
    positions.copy_(torch.randint(0, 4096, (t,), device=dev))
    slots.copy_(random_slots(t, blocks, bs, pad_every=2))
    ref_caches = [k_cache.clone(), v_cache.clone()]
    refs = layer(reference, *ref_caches)
    graph.replay()
    torch.cuda.synchronize()
    for name, out, ref in zip(("normed", "residual", "q", "k", "silu_and_mul"), outs, refs):
        rel, worst = errors([(out, ref)])
        assert rel < BOUND_16 and worst < WORST_16, (name, rel, worst)
    for cache, ref in zip((k_cache, v_cache), ref_caches):
        assert int(fp8_ulps(cache, ref).max()) <= 1


def assert_close_fp8(out: torch.Tensor, ref: torch.Tensor, max_fraction: float) -> None:
    """FP8 bytes at most 1 step apart, in at most max_fraction of the elements."""
    ulps = fp8_ulps(out.view(FP8), ref.view(FP8))
    assert int(ulps.max()) <= 1, int(ulps.max())
    assert int((ulps > 0).sum()) <= max(1, int(max_fraction * ulps.numel())), (int((ulps > 0).sum()), ulps.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_qk_norm_rope_write_kv_on_cuda(t, cache_dtype):
    """bf16 q/k/v (strided views of a fused qkv) at Qwen3-4B shapes, page 32, padding slots, against the
    reference composition (qk_norm_rope, then write_kv of the rounded k) run on the GPU. k may differ from
    the reference's by a bf16 rounding flip (GPU rsqrt, FMA), which moves its FP8 byte by one step in a
    few elements; v is copied exactly (FP8: as write_kv's test, a rare 1-step flip of the division)."""
    c = QWEN3_4B
    scales = (0.006, 0.004) if cache_dtype == FP8 else (1.0, 1.0)  # FP8: some values reach the +-448 clamp
    (rel, worst, ok), caches, refs = rope_kv_case(t, c["heads"], c["kv_heads"], c["head_dim"], torch.bfloat16,
                                                  cache_dtype, "cuda", num_blocks=64, block_size=32, scales=scales,
                                                  max_pos=32768)
    assert ok, FLAG_MEANS["qk_norm_rope_write_kv"]
    assert rel < BOUND_16 and worst < WORST_16, (rel, worst)
    k, v = caches
    k_ref, v_ref = refs
    if cache_dtype == FP8:
        assert_close_fp8(k, k_ref, 0.01)
        assert_close_fp8(v, v_ref, 1e-4)
    else:
        assert torch.equal(v, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_qk_norm_rope_write_kv_matches_the_two_kernels_it_replaces(cache_dtype):
    """Against rope.qk_norm_rope then kv_write.write_kv (the Triton kernels DecoderLayer ran before): the same
    device code (rope.norm_rope, kv_write.to_cache) on the same inputs, so identical up to the compiler's
    FMA contraction, which may differ between the two kernels (then a rare 1-step flip)."""
    from qwentrt.engine.kernels import kv_write, rope
    from qwentrt.engine.kernels.qk_norm_rope_write_kv import qk_norm_rope_write_kv

    c = QWEN3_4B
    t, blocks, bs, eps, scales = 256, 16, 32, 1e-6, (0.01, 0.02)
    q, k, v = qkv_views(t, c["heads"], c["kv_heads"], c["head_dim"], torch.bfloat16, "cuda")
    qw, kw = (random_weight(c["head_dim"], torch.bfloat16, "cuda") for _ in range(2))
    positions = torch.randint(0, 32768, (t,), device="cuda")
    cos_sin = reference.rope_cos_sin_cache(32768, c["head_dim"], 1e6, "cuda")
    slots = random_slots(t, blocks, bs).cuda()
    caches = [torch.randn(blocks, bs, c["kv_heads"], c["head_dim"], device="cuda").to(cache_dtype) for _ in range(2)]
    old = [x.clone() for x in caches]
    q_new = qk_norm_rope_write_kv(q, k, v, qw, kw, eps, positions, cos_sin, *caches, slots, *scales)
    q_old, k_old = rope.qk_norm_rope(q, k, qw, kw, eps, positions, cos_sin)
    kv_write.write_kv(k_old, v, *old, slots, *scales)
    assert rel_err(q_new, q_old) < 1e-3
    for new, ref in zip(caches, old):
        if cache_dtype == FP8:
            assert_close_fp8(new, ref, 1e-3)
        else:
            assert rel_err(new, ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_qk_norm_rope_write_kv_in_a_cuda_graph(cache_dtype, monkeypatch):
    """Through `ops` as DecoderLayer calls it, at T = 8 (a decode graph's batch): captured once (the reference
    made to raise: the Triton kernel runs), replayed with new q/k/v, positions and slots (other tokens
    padding), against the reference on the cache as it was before the replay."""
    from qwentrt.engine.kernels import ops

    c = QWEN3_4B
    t, blocks, bs, eps = 8, 32, 32, 1e-6
    scales = (0.01, 0.02) if cache_dtype == FP8 else (1.0, 1.0)
    qkv = torch.randn(t, (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"], device="cuda", dtype=torch.bfloat16)
    sizes = [c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]]
    views = [x.view(t, -1, c["head_dim"]) for x in qkv.split(sizes, dim=-1)]
    qw, kw = (random_weight(c["head_dim"], torch.bfloat16, "cuda") for _ in range(2))
    positions = torch.randint(0, 4096, (t,), device="cuda")
    cos_sin = reference.rope_cos_sin_cache(4096, c["head_dim"], 1e6, "cuda")
    slots = torch.full((t,), -1, dtype=torch.long, device="cuda")  # capture on padding, as DecodeGraphs does
    caches = [torch.randn(blocks, bs, c["kv_heads"], c["head_dim"], device="cuda").to(cache_dtype) for _ in range(2)]
    run = lambda: ops.qk_norm_rope_write_kv(*views, qw, kw, eps, positions, cos_sin, *caches, slots, *scales)  # noqa: E731
    with monkeypatch.context() as m:
        for name in ("qk_norm_rope_write_kv", "qk_norm_rope", "write_kv"):
            m.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"reference.{_n} ran on CUDA"))
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q_out = run()
    for pad_every in (3, 2, t + 1):  # several replays, a different set of padding tokens each
        qkv.copy_(torch.randn_like(qkv))
        positions.copy_(torch.randint(0, 4096, (t,), device="cuda"))
        new_slots = torch.randperm(blocks * bs)[:t]
        new_slots[pad_every - 1::pad_every] = -1
        slots.copy_(new_slots)
        refs = [x.clone() for x in caches]
        q_ref = reference.qk_norm_rope_write_kv(*views, qw, kw, eps, positions, cos_sin, *refs, slots, *scales)
        graph.replay()
        torch.cuda.synchronize()
        rel, worst = errors([(q_out, q_ref)])
        assert rel < BOUND_16 and worst < WORST_16, (pad_every, rel, worst)
        for cache, ref in zip(caches, refs):
            if cache_dtype == FP8:
                assert_close_fp8(cache, ref, 1e-3)  # over the whole cache: untouched slots are equal
            else:
                assert rel_err(cache, ref) < 1e-3


@pytest.mark.gpu
def test_qk_norm_rope_write_kv_float32_on_cuda():
    c = QWEN3_4B
    (rel, worst, ok), caches, refs = rope_kv_case(7, c["heads"], c["kv_heads"], c["head_dim"], torch.float32,
                                                  torch.float32, "cuda", num_blocks=16, block_size=32)
    assert ok and rel < 1e-5 and worst < 1e-5, (rel, worst)
