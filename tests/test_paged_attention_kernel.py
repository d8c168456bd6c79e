"""The Triton decode paged-attention kernel against `reference.paged_attention`.

CPU: the kernels run in Triton's interpreter. Whether @triton.jit interprets is fixed when a function is
decorated, and that includes triton's own library functions (tl.zeros, tl.max, ...) decorated when
triton itself is imported: so TRITON_INTERPRET=1 must be set before `import triton` in the whole process.
Setting it at the top of this module would depend on no other module having imported triton first, and
would turn the GPU tests below into interpreted ones. Instead the `interpreter` fixture starts one
worker process (spawn) with TRITON_INTERPRET=1 in its environment; the interpreted cases run there on
CPU tensors (seeded from this process, so a failure names its seed), and this process keeps compiled
kernels for the GPU tests. fp32 q only (the interpreter has no faithful bf16): fp32 caches, and FP8
caches, whose bytes it decodes exactly.
GPU (@pytest.mark.gpu): bf16 / fp16 / fp32, bf16 and FP8 caches, Qwen3-4B shapes, CUDA-graph replay.
`bench_decode` times the kernel against the reference (called from a GPU script, not a test)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from qwentrt.engine.kernels import paged_attention as pa
from qwentrt.engine.kernels import reference

pytestmark = pytest.mark.skipif(not pa.HAS_TRITON, reason="triton is not installed (pip install triton)")

FP8 = torch.float8_e4m3fn


def _nan_alloc(shape, dtype, device):
    """Partials come back NaN-filled: a partition the reduction reads but no program wrote shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(pa, "_alloc", _nan_alloc)


def _worker_init() -> None:
    pa._alloc = _nan_alloc


def _worker_kernel_kind() -> str:
    return type(pa._decode_kernel).__name__


@pytest.fixture(scope="module")
def interpreter():
    """A worker process whose triton was imported with TRITON_INTERPRET=1 (see the module doc)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the worker, started before this is undone
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        kind = pool.submit(_worker_kernel_kind).result(timeout=120)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    assert kind == "InterpretedFunction", kind
    yield pool
    pool.shutdown()


def _interpreted_case(seed: int, context_lens: list[int], partition_size: int, zero_rows: list[int] = (),
                      tile_tokens: int | None = None, compute_f16: bool | None = None,
                      dynamic: bool | None = None, **make_kw) -> tuple[float, bool]:
    """In the worker: (relative error vs the reference, whether the rows zero_rows are exactly 0)."""
    torch.manual_seed(seed)
    inp = make_batch(context_lens, **make_kw)
    ref = ref_out(inp)
    out = run_kernel(pa, inp, partition_size, tile_tokens, compute_f16=compute_f16, dynamic=dynamic)
    zeros = all(torch.equal(out[r], torch.zeros_like(out[r])) and torch.equal(ref[r], out[r]) for r in zero_rows)
    return rel_err(out, ref), zeros


def interpreted(pool, *args, **kw) -> tuple[float, bool, int]:
    seed = int(torch.randint(0, 2**31 - 1, ()))
    err, zeros = pool.submit(_interpreted_case, seed, *args, **kw).result(timeout=300)
    return err, zeros, seed


# ---------------------------------------------------------------------------------------------- inputs

def make_batch(context_lens: list[int], *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               q_dtype: torch.dtype, kv_dtype: torch.dtype, device="cpu", spare_pages: int = 5,
               extra_cols: int = 2, lens_dtype: torch.dtype = torch.long) -> dict:
    """Fresh random decode batch: shuffled (non-contiguous) pages, the block table padded past each
    sequence's pages with random page ids (never to be read), random KV in the cache everywhere."""
    n_pages = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(n_pages) + spare_pages
    perm = torch.randperm(num_blocks).tolist()
    width = max(max(n_pages), 1) + extra_cols
    tables = torch.randint(0, num_blocks, (len(context_lens), width), dtype=torch.int32)
    i = 0
    for b, n in enumerate(n_pages):
        tables[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_dtype == FP8:
        k_scale, v_scale = (float(torch.empty(()).uniform_(0.005, 0.02)) for _ in range(2))
    else:
        k_scale = v_scale = 1.0
    # amplitude 2: fp8 values then span most of e4m3's range (|x| / scale up to a few hundred)
    k_cache = reference.quantize_kv(2 * torch.randn(shape, device=device), k_scale, kv_dtype)
    v_cache = reference.quantize_kv(2 * torch.randn(shape, device=device), v_scale, kv_dtype)
    b = len(context_lens)
    return dict(q=torch.randn(b, num_heads, head_dim, device=device).to(q_dtype),
                k_cache=k_cache, v_cache=v_cache, block_tables=tables.to(device),
                context_lens=torch.tensor(context_lens, dtype=lens_dtype, device=device),
                scale=head_dim ** -0.5, k_scale=k_scale, v_scale=v_scale)


def ref_out(inp: dict) -> torch.Tensor:
    b = inp["q"].shape[0]
    cu = torch.arange(b + 1, device=inp["q"].device)
    return reference.paged_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], cu,
                                     inp["context_lens"], inp["scale"], inp["k_scale"], inp["v_scale"])


def run_kernel(mod, inp: dict, partition_size: int, tile_tokens: int | None = None, **kw) -> torch.Tensor:
    out = torch.full_like(inp["q"], float("nan"))  # poison: every element must be written
    res = mod.paged_attention_decode(**inp, partition_size=partition_size, out=out, tile_tokens=tile_tokens, **kw)
    assert res is out
    assert not out.isnan().any(), "the kernel left elements of the output unwritten (or wrote NaN)"
    assert not pa._counters(out.device).any(), "the split-KV arrival counters were not left zero"
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def context_lens_for(block_size: int, partition_size: int, n_random: int = 2) -> list[int]:
    """Edge cases plus a few random lengths: 1, one page, a page boundary +-1, exactly one partition,
    several partitions (ending mid-page)."""
    lens = [1, block_size, block_size + 1, 2 * block_size - 1, partition_size, 3 * partition_size + 5]
    lens += torch.randint(1, 4 * partition_size, (n_random,)).tolist()
    return lens


# ------------------------------------------------------------------------------------ CPU (interpreter)

@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (2, 2)])  # GQA 4:1 and 1:1
@pytest.mark.parametrize("split", [True, False])
def test_decode_fp32_interpreted(interpreter, block_size, head_dim, num_heads, num_kv_heads, split):
    """Tiles of the default size: a page (block 32, split) or several pages."""
    partition_size = 2 * block_size if split else 4096  # split: several partitions at small sizes
    err, _, seed = interpreted(interpreter, context_lens_for(block_size, 2 * block_size), partition_size,
                               num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                               block_size=block_size, q_dtype=torch.float32, kv_dtype=torch.float32)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("block_size", [32, 64])
def test_decode_tile_smaller_than_a_page_interpreted(interpreter, block_size):
    err, _, seed = interpreted(interpreter, context_lens_for(block_size, 64), 64, tile_tokens=16,
                               num_heads=8, num_kv_heads=2, head_dim=64, block_size=block_size,
                               q_dtype=torch.float32, kv_dtype=torch.float32)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("split", [True, False])
def test_decode_fp8_cache_interpreted(interpreter, num_heads, num_kv_heads, split):
    """FP8 KV with fp32 q: the interpreter decodes e4m3fn bytes exactly, so this holds to fp32 accuracy."""
    err, _, seed = interpreted(interpreter, context_lens_for(16, 32), 32 if split else 1024,
                               num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64, block_size=16,
                               q_dtype=torch.float32, kv_dtype=FP8, lens_dtype=torch.int32)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"


@pytest.mark.parametrize("split", [True, False])
def test_decode_fp8_cache_fp16_dots_interpreted(interpreter, split):
    """compute_f16 (the default for FP8 caches with a bf16 q on CUDA) forced with an fp32 q: q rounded to
    fp16, K / V exact in fp16, p in fp16: fp16 operand accuracy (the interpreter is faithful for fp16)."""
    err, _, seed = interpreted(interpreter, context_lens_for(16, 32), 32 if split else 1024, compute_f16=True,
                               num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                               q_dtype=torch.float32, kv_dtype=FP8, lens_dtype=torch.int32)
    assert 0 < err < 2e-3, f"rel err {err:.3g} (seed {seed})"


def test_fp16_dots_refused_for_an_unquantized_cache():
    inp = make_batch([5, 9], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, q_dtype=torch.float32,
                     kv_dtype=torch.float32)
    if not pa.HAS_TRITON:
        pytest.skip("triton is not installed")
    with pytest.raises(ValueError, match="compute_f16 is for FP8 caches"):
        pa.paged_attention_decode(**inp, compute_f16=True)


@pytest.mark.parametrize("split", [True, False])
def test_empty_context_gives_zeros_interpreted(interpreter, split):
    """context_len 0 (a padding slot) gives zeros, as the reference; its neighbours are unaffected."""
    err, zeros, seed = interpreted(interpreter, [0, 37, 0, 5], 16 if split else 1024, zero_rows=[0, 2],
                                   num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                                   q_dtype=torch.float32, kv_dtype=torch.float32)
    assert zeros and err < 1e-4, f"rel err {err:.3g}, zero rows ok: {zeros} (seed {seed})"


@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8])
def test_decode_dynamic_partitions_interpreted(interpreter, kv_dtype):
    """Partitions sized from each sequence's context (the batch-1 default on CUDA): a 40-page block table split
    into 40 partitions, so short contexts get one tile each and the reduction reads several chunks of partials;
    empty rows still give zeros."""
    lens = [0, 1, 16, 17, 100, 255, 600, 640] + torch.randint(1, 640, (2,)).tolist()
    err, zeros, seed = interpreted(interpreter, lens, 16, tile_tokens=16, dynamic=True, zero_rows=[0],
                                   num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, extra_cols=0,
                                   q_dtype=torch.float32, kv_dtype=kv_dtype, lens_dtype=torch.int32)
    assert zeros and err < 1e-4, f"rel err {err:.3g}, zero rows ok: {zeros} (seed {seed})"


def test_decode_dynamic_tile_rounding_interpreted(interpreter):
    """Tiles of 32 in pages of 16, partitions capped at 64 tokens: contexts that round up to one or two tiles."""
    lens = [1, 31, 33, 63, 64, 65, 300] + torch.randint(1, 320, (2,)).tolist()
    err, zeros, seed = interpreted(interpreter, lens, 64, tile_tokens=32, dynamic=True,
                                   num_heads=4, num_kv_heads=4, head_dim=64, block_size=16,
                                   q_dtype=torch.float32, kv_dtype=torch.float32)
    assert err < 1e-4, f"rel err {err:.3g} (seed {seed})"


def test_dispatch_on_cpu_is_the_reference():
    """On the CPU (decode or not) paged_attention is exactly the reference."""
    inp = make_batch([5, 40, 17], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                     q_dtype=torch.float32, kv_dtype=torch.float32)
    args = (inp["k_cache"], inp["v_cache"], inp["block_tables"])
    tail = (inp["context_lens"], inp["scale"], inp["k_scale"], inp["v_scale"])
    decode_cu = torch.arange(4)
    assert torch.equal(pa.paged_attention(inp["q"], *args, decode_cu, *tail), ref_out(inp))
    q = torch.randn(9, 4, 64)  # prefill: 2 + 4 + 3 new tokens
    cu = torch.tensor([0, 2, 6, 9])
    assert torch.equal(pa.paged_attention(q, *args, cu, *tail), reference.paged_attention(q, *args, cu, *tail))


# ---------------------------------------------------------------------------------------------------- GPU

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype,kv", [(torch.bfloat16, "same"), (torch.bfloat16, "fp8"), (torch.float16, "fp8"),
                                        (torch.float16, "same"), (torch.float32, "same")])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("split,tile_tokens", [(True, None), (False, None), (True, 16)])
def test_decode_cuda(poisoned, q_dtype, kv, block_size, head_dim, num_heads, num_kv_heads, split, tile_tokens):
    partition_size = 2 * block_size if split else 8192
    inp = make_batch(context_lens_for(block_size, 2 * block_size, n_random=6), num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, q_dtype=q_dtype,
                     kv_dtype=FP8 if kv == "fp8" else q_dtype, device="cuda")
    ref = ref_out(inp)  # with an FP8 cache: the reference reads the very same FP8 cache
    assert rel_err(run_kernel(pa, inp, partition_size, tile_tokens), ref) < TOL[q_dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("partition_size,tile_tokens", [(None, None), (256, None), (512, None), (1024, None),
                                                         (512, 32), (512, 128)])
def test_decode_cuda_qwen3_4b_shapes(poisoned, kv_dtype, partition_size, tile_tokens):
    lens = [1, 31, 32, 33, 511, 512, 513, 1500, 4096] + torch.randint(1, 5000, (7,)).tolist()
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, device="cuda", extra_cols=40)
    ref = ref_out(inp)
    assert rel_err(run_kernel(pa, inp, partition_size, tile_tokens), ref) < 1e-2
    ctx0 = dict(inp, context_lens=inp["context_lens"].clone())
    ctx0["context_lens"][3] = 0  # an empty (padding) slot gives zeros
    out = run_kernel(pa, ctx0, partition_size, tile_tokens)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.gpu
@pytest.mark.parametrize("compute_f16", [False, True])
@pytest.mark.parametrize("partition_size", [None, 256])
def test_decode_cuda_fp8_dots_in_bf16_and_fp16(poisoned, compute_f16, partition_size):
    """Both dot dtypes of an FP8 cache against the reference; fp16 is at least as close (p keeps 10 bits)."""
    lens = [1, 33, 700, 2000] + torch.randint(1, 3000, (6,)).tolist()
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=FP8, device="cuda", extra_cols=8)
    ref = ref_out(inp)
    err = rel_err(run_kernel(pa, inp, partition_size, compute_f16=compute_f16), ref)
    assert err < (5e-3 if compute_f16 else 1e-2), err


@pytest.mark.gpu
def test_dispatch_cuda():
    inp = make_batch([7, 300, 64, 1], num_heads=32, num_kv_heads=8, head_dim=128, block_size=32,
                     q_dtype=torch.bfloat16, kv_dtype=FP8, device="cuda")
    args = (inp["k_cache"], inp["v_cache"], inp["block_tables"])
    tail = (inp["context_lens"], inp["scale"], inp["k_scale"], inp["v_scale"])
    decode = pa.paged_attention(inp["q"], *args, torch.arange(5, device="cuda"), *tail)
    assert torch.equal(decode, pa.paged_attention_decode(inp["q"], *args, *tail, partition_size=None))
    assert rel_err(decode, ref_out(inp)) < 1e-2
    q = torch.randn(10, 32, 128, device="cuda", dtype=torch.bfloat16)  # mixed: 1 + 6 + 2 + 1 new tokens
    cu = torch.tensor([0, 1, 7, 9, 10], device="cuda")
    assert torch.equal(pa.paged_attention(q, *args, cu, *tail), reference.paged_attention(q, *args, cu, *tail))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
def test_decode_cuda_graph_replay(kv_dtype):
    """Captured once, replayed after the context lengths and page tables change in place: contexts cross
    partition boundaries, empty (padding) rows included; the arrival counters come back to zero."""
    lens = [100, 2000, 1, 700]
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, device="cuda", extra_cols=20)
    out = torch.empty_like(inp["q"])
    run = lambda: pa.paged_attention_decode(**inp, partition_size=512, out=out)  # noqa: E731
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for new_lens in ([1, 33, 2500, 640], [2600, 0, 17, 512], [513, 1024, 1025, 0], [2620, 2620, 2620, 2620]):
        inp["context_lens"].copy_(torch.tensor(new_lens))
        inp["block_tables"].copy_(inp["block_tables"][torch.randperm(len(lens))])
        inp["q"].copy_(torch.randn_like(inp["q"]))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref_out(inp)) < 1e-2, new_lens
        assert not pa._counters(out.device).any()
        for row in (i for i, n in enumerate(new_lens) if n == 0):
            assert torch.equal(out[row], torch.zeros_like(out[row]))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("partition_size", [None, 256])
@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_cuda_many_partitions_repeated(poisoned, kv_dtype, partition_size, dynamic):
    """The batch-1-like case of a full-width (32k-token) block table: up to 128 partitions per sequence
    arrive in any order, the last reduces. Twenty launches of the same inputs must all match the reference
    (a missed arrival or a stale partial read would show in some of them) and leave the counters zero."""
    lens = [32768, 20000, 1000, 257]
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, device="cuda", extra_cols=0)
    ref = ref_out(inp)
    first = run_kernel(pa, inp, partition_size, dynamic=dynamic)
    assert rel_err(first, ref) < 1e-2
    for _ in range(20):
        again = run_kernel(pa, inp, partition_size, dynamic=dynamic)
        assert rel_err(again, ref) < 1e-2
        assert torch.equal(again, first)  # the same arithmetic in the same order, whichever program reduces


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("tile_tokens", [None, 32, 128])
def test_decode_cuda_dynamic_partitions_graph(poisoned, kv_dtype, tile_tokens):
    """The batch-1 decode graph's case: a full-width (32k-token) block table, partitions sized from the context in
    the kernel, captured once and replayed as the context grows from 1 token to the whole table (and back to a
    padding row of 0)."""
    inp = make_batch([32768], num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=kv_dtype, device="cuda", extra_cols=0)
    out = torch.empty_like(inp["q"])
    run = lambda: pa.paged_attention_decode(**inp, partition_size=None, out=out, tile_tokens=tile_tokens,  # noqa
                                            dynamic=True)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for n in (1, 31, 64, 65, 128, 129, 384, 1000, 2048, 5000, 32767, 32768, 0):
        inp["context_lens"].fill_(n)
        inp["q"].copy_(torch.randn_like(inp["q"]))
        graph.replay()
        torch.cuda.synchronize()
        assert not pa._counters(out.device).any(), n
        if n == 0:
            assert torch.equal(out, torch.zeros_like(out))
        else:
            assert rel_err(out, ref_out(inp)) < 1e-2, n
            fixed = run_kernel(pa, inp, None, tile_tokens, dynamic=False)
            assert rel_err(out, fixed) < 1e-2, n


# -------------------------------------------------------------------------------------------- benchmark

def bench_decode(batch: int, context: int, *, partition_size: int | None = None, tile_tokens: int | None = None,
                 num_warps: int = 4, num_stages: int | None = None, mixed: bool = False, num_heads: int = 32,
                 num_kv_heads: int = 8, head_dim: int = 128, block_size: int = 32, kv_dtype: torch.dtype = FP8,
                 q_dtype: torch.dtype = torch.bfloat16, with_reference: bool = True) -> dict:
    """Median ms (triton.testing.do_bench) of the decode kernel and of the reference, at Qwen3-4B shapes by
    default (32 q heads, 8 KV heads, head_dim 128, block 32, FP8 KV), every sequence `context` tokens long
    (mixed: lengths uniform in [1, context], one of them context). Kernel defaults: auto partition size.
    Returns kernel_ms (eager launch: includes the host's launch overhead, which dominates small batches),
    kernel_graph_ms (the same launch replayed from a CUDA graph: the GPU's time, as the engine sees it
    under graphs), kernel_gbs (KV bytes read / graph time), reference_ms and rel_err (kernel vs reference;
    None without with_reference)."""
    import triton.testing

    lens = [context] * batch
    if mixed:
        lens[1:] = torch.randint(1, context + 1, (batch - 1,)).tolist()
    inp = make_batch(lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=block_size, q_dtype=q_dtype, kv_dtype=kv_dtype, device="cuda", extra_cols=0)
    out = torch.empty_like(inp["q"])
    kernel = lambda: pa.paged_attention_decode(**inp, partition_size=partition_size, out=out,  # noqa: E731
                                               tile_tokens=tile_tokens, num_warps=num_warps,
                                               num_stages=num_stages)
    kernel()
    torch.cuda.synchronize()
    kernel_ms = triton.testing.do_bench(kernel, return_mode="median")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel()
    graph_ms = triton.testing.do_bench(graph.replay, return_mode="median")
    kv_bytes = 2 * sum(lens) * num_kv_heads * head_dim * inp["k_cache"].element_size()
    res = dict(batch=batch, context=context, mixed=mixed, partition_size=partition_size, tile_tokens=tile_tokens,
               num_warps=num_warps, num_stages=num_stages, kernel_ms=kernel_ms, kernel_graph_ms=graph_ms,
               kernel_gbs=kv_bytes / graph_ms / 1e6, reference_ms=None, rel_err=None)
    if with_reference:
        ref = ref_out(inp)
        res["rel_err"] = rel_err(out, ref)
        res["reference_ms"] = triton.testing.do_bench(lambda: ref_out(inp), return_mode="median", warmup=5, rep=50)
    return res


def bench_decode_table(batches=(1, 16, 64, 256), contexts=(1024, 4096), **kw) -> list[dict]:
    """bench_decode over the grid the lead reports (prints one line per shape)."""
    rows = []
    for context in contexts:
        for batch in batches:
            r = bench_decode(batch, context, **kw)
            ref = f"{r['reference_ms']:9.3f}" if r["reference_ms"] is not None else "        -"
            err = f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "-"
            mixed = " mixed" if r["mixed"] else ""
            print(f"batch {batch:4d} context {context:5d}{mixed}: kernel {r['kernel_ms']:7.4f} ms eager, "
                  f"{r['kernel_graph_ms']:7.4f} ms graph ({r['kernel_gbs']:6.0f} GB/s)  reference {ref} ms  "
                  f"rel_err {err}", flush=True)
            rows.append(r)
    return rows


if __name__ == "__main__":  # python tests/test_paged_attention_kernel.py on a GPU machine
    bench_decode_table()
    bench_decode_table(mixed=True, with_reference=False)
