"""One Qwen3-4B decoder layer's decode step with the fused kernels (qk_norm_rope_write_kv, one-launch split-KV
attention), captured in a CUDA graph as DecodeGraphs does, against the composition they replace run eagerly
with the torch references (reference.qk_norm_rope_write_kv = qk_norm_rope then write_kv, and
reference.paged_attention). Random bf16 weights of the real shapes (the linears are not under test), FP8 and
BF16 KV caches, page 32, a batch padded to its graph size (padding rows: slot -1, context 0).
(The whole model's step on the tiny engine: tests/test_gpu_engine.py.)"""

from __future__ import annotations

import pytest
import torch

from qwentrt.engine.kernels import ops, reference
from qwentrt.engine.model import AttentionMetadata, DecoderLayer
from qwentrt.synth import preset

from .test_fused_kernels import FP8, fp8_ulps, rel_err

pytestmark = pytest.mark.gpu

BLOCK = 32
WIDTH = 64  # block-table width: 2,048 tokens, split into partitions at these batch sizes


def random_layer(cfg, device="cuda", dtype=torch.bfloat16) -> DecoderLayer:
    tensors = {name: {"weight": (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)}
               for name, (n, k) in cfg.linear_shapes().items()}
    for name, n in (("input_layernorm", cfg.hidden_size), ("post_attention_layernorm", cfg.hidden_size),
                    ("self_attn.q_norm", cfg.head_dim), ("self_attn.k_norm", cfg.head_dim)):
        tensors[name] = {"weight": (1.0 + 0.3 * torch.randn(n, device=device)).to(dtype)}
    return DecoderLayer(cfg, tensors, group_size=128)


class DecodeBatch:
    """Static decode inputs of `size` rows (as DecodeGraphs keeps them); `fill` puts n real sequences in."""

    def __init__(self, cfg, size: int, num_blocks: int, device="cuda"):
        self.size, self.num_blocks = size, num_blocks
        self.hidden = torch.zeros(size, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        self.residual = torch.zeros_like(self.hidden)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.full((size,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(size, dtype=torch.long, device=device)
        self.tables = torch.zeros(size, WIDTH, dtype=torch.int32, device=device)
        self.meta = AttentionMetadata(positions=self.positions, slot_mapping=self.slots, block_tables=self.tables,
                                      cu_seqlens_q=torch.arange(size + 1, device=device),
                                      context_lens=self.context_lens,
                                      logits_indices=torch.arange(size, device=device), num_decodes=size)

    def fill(self, lens: list[int]) -> None:
        n = len(lens)
        pages = torch.randperm(self.num_blocks)[:n * WIDTH].view(n, WIDTH).to(torch.int32)
        last = torch.tensor(lens) - 1
        slots = torch.full((self.size,), -1, dtype=torch.long)
        slots[:n] = pages[torch.arange(n), last // BLOCK].long() * BLOCK + last % BLOCK
        positions = torch.zeros(self.size, dtype=torch.long)
        positions[:n] = last
        ctx = torch.zeros(self.size, dtype=torch.long)
        ctx[:n] = torch.tensor(lens)
        tables = torch.zeros(self.size, WIDTH, dtype=torch.int32)
        tables[:n] = pages
        for dst, src in ((self.slots, slots), (self.positions, positions), (self.context_lens, ctx),
                         (self.tables, tables)):
            dst.copy_(src)
        self.hidden.copy_(torch.randn_like(self.hidden))
        self.residual.copy_(torch.randn_like(self.residual))


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16])
@pytest.mark.parametrize("graph_size,batches", [(1, [[1700], [33], [2048]]),
                                                (8, [[5, 600, 1300, 2048, 31], [257, 1, 1024, 512, 513, 800, 9, 2000]])])
def test_graphed_decode_layer_matches_the_reference_composition(kv_dtype, graph_size, batches, monkeypatch):
    cfg = preset("4b")
    layer = random_layer(cfg)
    num_blocks = graph_size * WIDTH + 8
    shape = (num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    fp8 = kv_dtype == FP8
    k_scale, v_scale = (0.02, 0.015) if fp8 else (1.0, 1.0)
    k_cache = reference.quantize_kv(2 * torch.randn(shape, device="cuda"), k_scale, kv_dtype)
    v_cache = reference.quantize_kv(2 * torch.randn(shape, device="cuda"), v_scale, kv_dtype)
    cos_sin = reference.rope_cos_sin_cache(4096, cfg.head_dim, cfg.rope_theta, "cuda")
    inp = DecodeBatch(cfg, graph_size, num_blocks)

    def step(k, v):
        return layer(inp.hidden, inp.residual, inp.meta, k, v, k_scale, v_scale, cos_sin)

    with torch.no_grad():
        step(k_cache, v_cache)  # warm-up on padding (writes nothing), then capture, as DecodeGraphs does
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, res = step(k_cache, v_cache)
        for lens in batches:
            inp.fill(lens)
            ref_k, ref_v = k_cache.clone(), v_cache.clone()
            with monkeypatch.context() as m:  # the composition before fusing, in torch
                m.setattr(ops, "qk_norm_rope_write_kv", reference.qk_norm_rope_write_kv)
                m.setattr(ops, "paged_attention", reference.paged_attention)
                ref_out, ref_res = step(ref_k, ref_v)
            graph.replay()
            torch.cuda.synchronize()
            n = len(lens)
            assert rel_err(out[:n], ref_out[:n]) < 2e-2, (lens, rel_err(out[:n], ref_out[:n]))
            assert rel_err(res[:n], ref_res[:n]) < 1e-2  # residual + attention output
            for cache, ref in ((k_cache, ref_k), (v_cache, ref_v)):
                if fp8:  # the new tokens' K/V: a rare 1-step flip (a bf16 rounding flip of k before quantizing)
                    ulps = fp8_ulps(cache, ref)
                    assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= 64, int((ulps > 0).sum())
                else:
                    assert rel_err(cache, ref) < 1e-3
