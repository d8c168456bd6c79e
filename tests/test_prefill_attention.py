"""Prefill / extend attention (kernels/prefill_attention.py) against `reference.paged_attention`, on fresh
random inputs: several sequences of different lengths in one call, chunks after a cached prefix (query
tokens fewer than the context: the causal mask aligned to the bottom right), GQA and MHA, FP8 and unquantized
caches, pages scattered in the cache, and mixed batches (decodes first) through ops.attention.
CPU: SDPA per sequence (the fallback). GPU (@pytest.mark.gpu): torch's varlen_attn (one FlashAttention
call for every sequence) in bf16 / fp16 at Qwen3-4B's head layout, and the SDPA fallback on CUDA."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from qwentrt.engine.kernels import ops, reference
from qwentrt.engine.kernels import prefill_attention as pf
from qwentrt.engine.model import AttentionMetadata

FP8 = torch.float8_e4m3fn


class Case:
    """seqs: (query tokens, context length) per sequence; those with one query token first are decodes.
    The caches hold random values everywhere (pages of other sequences included), each sequence's pages
    are a random set of the cache's, and its block-table row is padded with random page ids."""

    def __init__(self, seqs, num_heads, num_kv_heads, head_dim, block_size, kv_dtype, q_dtype, device="cpu"):
        self.seqs, self.block_size = seqs, block_size
        pages = [-(-ctx // block_size) for _, ctx in seqs]
        num_blocks = sum(pages) + 7
        width = max(pages) + 2
        perm = torch.randperm(num_blocks)
        tables = torch.randint(0, num_blocks, (len(seqs), width), dtype=torch.int32)
        used = 0
        for i, n in enumerate(pages):
            tables[i, :n] = perm[used:used + n]
            used += n
        self.tables_np = tables.numpy()
        self.tables = tables.to(device)
        fp8 = kv_dtype == FP8
        self.k_scale, self.v_scale = (0.02 + 0.01 * torch.rand(2)).tolist() if fp8 else (1.0, 1.0)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        store = kv_dtype if fp8 else q_dtype
        self.k_cache = reference.quantize_kv(2 * torch.randn(shape, device=device), self.k_scale, store)
        self.v_cache = reference.quantize_kv(2 * torch.randn(shape, device=device), self.v_scale, store)
        self.cu = [0]
        for n_q, _ in seqs:
            self.cu.append(self.cu[-1] + n_q)
        self.ctx = [ctx for _, ctx in seqs]
        self.q = torch.randn(self.cu[-1], num_heads, head_dim, device=device).to(q_dtype)
        self.scale = head_dim ** -0.5
        self.num_decodes = next((i for i, (n_q, _) in enumerate(seqs) if n_q > 1), len(seqs))
        self.device = device

    def layout(self) -> pf.PrefillLayout:
        d = self.num_decodes
        return pf.prefill_layout(self.tables_np[d:], self.cu[d:], self.ctx[d:], self.block_size)

    def reference(self) -> torch.Tensor:
        dev = self.device
        return reference.paged_attention(self.q, self.k_cache, self.v_cache, self.tables,
                                         torch.tensor(self.cu, device=dev), torch.tensor(self.ctx, device=dev),
                                         self.scale, self.k_scale, self.v_scale)

    def prefill(self) -> torch.Tensor:
        return pf.prefill_attention(self.q, self.k_cache, self.v_cache, self.layout().to(self.device), self.scale,
                                    self.k_scale, self.v_scale)

    def metadata(self) -> AttentionMetadata:
        dev = self.device
        d = self.num_decodes
        return AttentionMetadata(positions=torch.empty(0), slot_mapping=torch.empty(0), block_tables=self.tables,
                                 cu_seqlens_q=torch.tensor(self.cu, device=dev),
                                 context_lens=torch.tensor(self.ctx, device=dev), logits_indices=torch.empty(0),
                                 num_decodes=d, prefill=self.layout().to(dev) if d < len(self.seqs) else None)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def random_prefills(n: int, block_size: int, max_ctx: int = 150) -> list[tuple[int, int]]:
    """n sequences: whole prompts (query == context) and chunks after a cached prefix, random lengths
    (page-aligned or not), at least 2 query tokens each."""
    seqs = []
    for i in range(n):
        ctx = int(torch.randint(2, max_ctx, ()))
        n_q = ctx if i % 2 == 0 else int(torch.randint(2, ctx + 1, ()))
        seqs.append((n_q, ctx))
    return seqs


# ------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("block_size", [16, 32])
def test_layout_matches_the_slot_formula(block_size):
    case = Case([(1, 40)] + random_prefills(4, block_size), 4, 2, 16, block_size, torch.float32, torch.float32)
    lay = case.layout()
    d = case.num_decodes
    positions, slots, kv_slots, spans = [], [], [], []
    k0 = 0
    for i in range(d, len(case.seqs)):
        n_q, ctx = case.seqs[i]
        table = case.tables_np[i]
        kv_slots += [int(table[p // block_size]) * block_size + p % block_size for p in range(ctx)]
        positions += list(range(ctx - n_q, ctx))
        slots += kv_slots[len(kv_slots) - n_q:]
        spans.append((case.cu[i], case.cu[i + 1], k0, k0 + ctx))
        k0 += ctx
    assert lay.spans == spans
    assert lay.positions.tolist() == positions and lay.slots.tolist() == slots
    assert lay.kv_slots.tolist() == kv_slots
    assert lay.cu_seq_q.tolist() == [c - case.cu[d] for c in case.cu[d:]]
    assert lay.cu_seq_k.tolist() == [0] + np.cumsum(case.ctx[d:]).tolist()
    assert lay.max_q == max(n for n, _ in case.seqs[d:]) and lay.max_k == max(case.ctx[d:])


def test_layout_refuses_more_queries_than_context():
    with pytest.raises(ValueError, match="5 query tokens for a context of 4"):
        pf.prefill_layout(np.zeros((1, 4), dtype=np.int32), [0, 5], [4], 16)


# ------------------------------------------------------------------------------------------------ the CPU
@pytest.mark.parametrize("kv_dtype", [FP8, torch.float32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])  # GQA 4:1 and MHA
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefills_match_the_reference_cpu(kv_dtype, num_heads, num_kv_heads, block_size):
    case = Case(random_prefills(5, block_size), num_heads, num_kv_heads, 64, block_size, kv_dtype, torch.float32)
    out = case.prefill()
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert max_rel(out, case.reference()) < 1e-5


@pytest.mark.parametrize("seqs", [[(37, 37)], [(20, 83)], [(64, 64), (3, 3)], [(2, 2), (2, 97), (50, 50)]])
def test_single_and_edge_spans_cpu(seqs):
    """One whole prompt (a single SDPA call), one chunk after a prefix, page-aligned lengths, 2-token spans."""
    case = Case(seqs, 8, 2, 32, 16, FP8, torch.float32)
    assert max_rel(case.prefill(), case.reference()) < 1e-5


def test_bf16_queries_cpu():
    case = Case(random_prefills(3, 16), 8, 2, 64, 16, FP8, torch.bfloat16)
    out = case.prefill()
    assert out.dtype == torch.bfloat16
    assert max_rel(out, case.reference()) < 2e-2


@pytest.mark.parametrize("kv_dtype", [FP8, torch.float32])
def test_mixed_batch_through_ops_attention_cpu(kv_dtype):
    """Decodes first (one query token each), then prefills: ops.attention over the whole batch."""
    seqs = [(1, 1), (1, 33), (1, 90)] + random_prefills(3, 32)
    case = Case(seqs, 8, 2, 64, 32, kv_dtype, torch.float32)
    out = ops.attention(case.q, case.k_cache, case.v_cache, case.metadata(), case.scale, case.k_scale, case.v_scale)
    assert max_rel(out, case.reference()) < 1e-5


def test_only_decodes_go_to_paged_attention_cpu():
    case = Case([(1, 5), (1, 70)], 8, 2, 64, 16, FP8, torch.float32)
    meta = case.metadata()
    assert meta.prefill is None
    out = ops.attention(case.q, case.k_cache, case.v_cache, meta, case.scale, case.k_scale, case.v_scale)
    assert max_rel(out, case.reference()) < 1e-5


# Three signatures torch's varlen_attn has had (2.10; 2.11; 2.12 and later), as CPU stand-ins: SDPA per sequence
# with a bottom-right causal mask (FlashAttention's convention); they check what the caller passes.
def _fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
    assert causal, "prefill attention is causal"
    assert gqa or q.shape[1] == k.shape[1], "GQA without enable_gqa (2.12+ refuses it)"
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert cq[0] == 0 and cq[-1] == q.shape[0] and ck[0] == 0 and ck[-1] == k.shape[0]
    assert max_q == max(b - a for a, b in zip(cq, cq[1:])) and max_k == max(b - a for a, b in zip(ck, ck[1:]))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.cat([pf._sdpa(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale)
                      for i in range(len(cq) - 1)])


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, True)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    return _fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale, True)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale, enable_gqa)


@pytest.mark.parametrize("fn", [varlen_2_10, varlen_2_11, varlen_2_12])
@pytest.mark.parametrize("kv_dtype", [FP8, torch.float32])
def test_varlen_call_for_each_torch_signature_cpu(fn, kv_dtype, monkeypatch):
    """The one-call path's plumbing (keywords, offsets, maxima, the FP8 K scale folded or applied, decodes
    first) through a CPU stand-in of each signature."""
    kw, has_scale = pf._varlen_kwargs(fn)
    assert has_scale == ("scale" in inspect.signature(fn).parameters)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fn(*args, **kwargs)

    monkeypatch.setattr(pf, "_varlen_attn", spy)
    monkeypatch.setattr(pf, "_VARLEN_KW", kw)
    monkeypatch.setattr(pf, "_VARLEN_SCALE", has_scale)
    monkeypatch.setattr(pf, "varlen_available", lambda *a: True)
    seqs = [(1, 40), (1, 3)] + random_prefills(4, 16)
    case = Case(seqs, 8, 2, 64, 16, kv_dtype, torch.float32)
    out = ops.attention(case.q, case.k_cache, case.v_cache, case.metadata(), case.scale, case.k_scale, case.v_scale)
    assert len(calls) == 1
    assert max_rel(out, case.reference()) < 1e-5


def test_no_varlen_without_the_default_scale_on_torch_2_10(monkeypatch):
    """torch 2.10's varlen_attn takes no softmax scale: another scale than 1/sqrt(head_dim) goes to SDPA."""
    monkeypatch.setattr(pf, "_varlen_attn", lambda *a, **k: pytest.fail("varlen_attn called"))
    monkeypatch.setattr(pf, "_VARLEN_KW", {"is_causal": True})
    monkeypatch.setattr(pf, "_VARLEN_SCALE", False)
    monkeypatch.setattr(pf, "varlen_available", lambda *a: True)
    case = Case(random_prefills(3, 16), 8, 2, 64, 16, FP8, torch.float32)
    case.scale = 0.3
    assert max_rel(case.prefill(), case.reference()) < 1e-5


def test_no_varlen_on_the_cpu():
    assert not pf.varlen_available(torch.device("cpu"), torch.bfloat16, 8, 2, 64)


# ------------------------------------------------------------------------------------------------ the GPU
def _need_varlen():
    if pf._VARLEN_KW is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_dtype", [FP8, "same"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("direct", [True, False], ids=["aten-op", "varlen_attn"])
def test_varlen_prefills_match_the_reference_cuda(q_dtype, kv_dtype, block_size, direct, monkeypatch):
    """Qwen3-4B's head layout (32 query heads, 8 KV heads, head_dim 128), one varlen call: the FlashAttention
    aten op called directly (where it probes right, as on the H100) or the public varlen_attn."""
    _need_varlen()
    dev = torch.device("cuda", torch.cuda.current_device())
    assert pf.varlen_available(dev, q_dtype, 32, 8, 128), \
        "varlen_attn is installed but its probe failed (see the warning): prefills fall back to SDPA"
    monkeypatch.setattr(pf, "USE_FLASH_DIRECT", direct)
    pf.flash_direct_available.cache_clear()
    if direct and not pf.flash_direct_available(dev, q_dtype, 32, 8, 128):
        pf.flash_direct_available.cache_clear()
        pytest.skip(f"torch {torch.__version__}: the FlashAttention op cannot be called directly here")
    kv = q_dtype if kv_dtype == "same" else kv_dtype
    seqs = random_prefills(6, block_size, max_ctx=700) + [(300, 2100)]  # a chunk deep in a long context
    case = Case(seqs, 32, 8, 128, block_size, kv, q_dtype, device="cuda")
    calls = []

    def spy(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(pf, "_varlen_attn", spy("varlen_attn", pf._varlen_attn))
    monkeypatch.setattr(pf, "_flash_direct", spy("aten-op", pf._flash_direct))
    try:
        out = case.prefill()
    finally:
        pf.flash_direct_available.cache_clear()
    assert calls == ["aten-op" if direct else "varlen_attn"], "one varlen call for every prefill sequence"
    assert out.dtype == q_dtype
    assert max_rel(out, case.reference()) < 2e-2


def test_no_direct_flash_on_the_cpu():
    assert not pf.flash_direct_available(torch.device("cpu"), torch.bfloat16, 8, 2, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
def test_mixed_batch_through_ops_attention_cuda(kv_dtype):
    _need_varlen()
    seqs = [(1, 1), (1, 300), (1, 1500)] + random_prefills(3, 32, max_ctx=900)
    case = Case(seqs, 32, 8, 128, 32, kv_dtype, torch.bfloat16, device="cuda")
    out = ops.attention(case.q, case.k_cache, case.v_cache, case.metadata(), case.scale, case.k_scale, case.v_scale)
    assert max_rel(out, case.reference()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_sdpa_fallback_matches_the_reference_cuda(q_dtype, monkeypatch):
    """The path taken without varlen_attn (older torch, fp32): SDPA per sequence with enable_gqa."""
    monkeypatch.setattr(pf, "varlen_available", lambda *a: False)
    case = Case(random_prefills(4, 16, max_ctx=400), 32, 8, 128, 16, FP8, q_dtype, device="cuda")
    assert max_rel(case.prefill(), case.reference()) < (2e-2 if q_dtype == torch.bfloat16 else 1e-3)
