"""Prefill / extend attention (kernels/prefill_attention.py) against `reference.paged_attention`, on fresh
random inputs: several sequences of different lengths in one call, chunks after a cached prefix (query
tokens fewer than the context: the causal mask aligned to the bottom right), GQA and MHA, FP8 and unquantized
caches, pages scattered in the cache, and mixed batches (decodes first) through ops.attention.
CPU: SDPA per sequence (the fallback). GPU (@pytest.mark.gpu): torch's varlen_attn (one FlashAttention
call for every sequence) in bf16 / fp16 at Qwen3-4B's head layout, and the SDPA fallback on CUDA."""

from __future__ import annotations

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
def test_varlen_prefills_match_the_reference_cuda(q_dtype, kv_dtype, block_size):
    """Qwen3-4B's head layout (32 query heads, 8 KV heads, head_dim 128), one varlen call."""
    _need_varlen()
    assert pf.varlen_available(torch.device("cuda", torch.cuda.current_device()), q_dtype, 32, 8, 128), \
        "varlen_attn is installed but its probe failed (see the warning): prefills fall back to SDPA"
    kv = q_dtype if kv_dtype == "same" else kv_dtype
    seqs = random_prefills(6, block_size, max_ctx=700) + [(300, 2100)]  # a chunk deep in a long context
    case = Case(seqs, 32, 8, 128, block_size, kv, q_dtype, device="cuda")
    calls = []
    real = pf._varlen_attn

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    pf._varlen_attn = spy
    try:
        out = case.prefill()
    finally:
        pf._varlen_attn = real
    assert calls == [1], "one varlen call for every prefill sequence"
    assert out.dtype == q_dtype
    assert max_rel(out, case.reference()) < 2e-2


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
