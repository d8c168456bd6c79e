"""The GPU memory budget of an engine, and the KV-cache capacity it leaves (planned at build time,
so a 24 GiB card knows how many tokens it can hold before the server starts)."""

from __future__ import annotations

from qwentrt.config import KVCacheDtype, MemoryPlan, Qwen3Config

MiB = 1 << 20
GiB = 1 << 30
CUDA_CONTEXT = 600 * MiB  # CUDA context, cuBLAS/Triton workspaces and the allocator's slack
CUDA_GRAPHS = 256 * MiB  # captured decode graphs' shared private pool (plus their logits buffer, below)
PREFILL_GRAPH_TOKENS = 2048  # the longest prompt whose prefill is a CUDA graph (in the same pool: its activations)
HEADROOM = 0.04  # of the budget: allocator fragmentation, the driver's own use on a desktop card


def activation_bytes(cfg: Qwen3Config, max_num_tokens: int, max_batch_size: int) -> int:
    """Peak transient memory of one step of max_num_tokens tokens (bf16 activations), plus the
    float32 logits of max_batch_size rows and the sampler's sort buffer."""
    t = max_num_tokens
    widest = max(cfg.q_size + 2 * cfg.kv_size, 2 * cfg.intermediate_size)
    per_token = 2 * (2 * cfg.hidden_size + widest + cfg.intermediate_size + cfg.q_size)
    logits = max_batch_size * cfg.vocab_size * (4 + 4 + 8)  # logits, probabilities, sort indices
    return t * per_token + logits


def plan(cfg: Qwen3Config, budget_bytes: int, weight_bytes: int, kv_dtype: KVCacheDtype, block_size: int,
         max_num_tokens: int, max_batch_size: int) -> tuple[MemoryPlan, int]:
    """(the plan, number of KV blocks). Raises nothing: a budget too small gives zero blocks, which
    the caller reports."""
    act = activation_bytes(cfg, max_num_tokens, max_batch_size)
    headroom = int(budget_bytes * HEADROOM)
    # + the prefill graphs' activations (prefill_graphs.py) + the float32 logits rows the graphs write
    prefill = activation_bytes(cfg, min(PREFILL_GRAPH_TOKENS, max_num_tokens), 1)
    graphs = CUDA_GRAPHS + prefill + (max_batch_size + 1) * cfg.vocab_size * 4
    left = budget_bytes - headroom - weight_bytes - act - graphs - CUDA_CONTEXT
    block_bytes = cfg.kv_bytes_per_token(kv_dtype) * block_size
    blocks = max(0, left // block_bytes)
    return MemoryPlan(budget=budget_bytes, weights=weight_bytes, activations=act,
                      cuda_graphs_and_workspace=graphs, cuda_context=CUDA_CONTEXT, headroom=headroom,
                      kv_cache=blocks * block_bytes), blocks
