"""Runs the model for one scheduled step: builds the flat token batch and its AttentionMetadata from
the block tables, owns the paged KV cache tensors, and returns the logits of the sequences that sample."""

from __future__ import annotations

from pathlib import Path

import torch

from qwentrt.config import EngineConfig
from qwentrt.engine.block_manager import BlockManager
from qwentrt.engine.model import AttentionMetadata, load_model
from qwentrt.engine.scheduler import ScheduledSeq

KV_DTYPES = {"fp8-e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16}


class ModelRunner:
    def __init__(self, engine_dir: str | Path, engine: EngineConfig, device: torch.device, dtype: torch.dtype,
                 num_blocks: int):
        self.engine = engine
        self.device = device
        self.dtype = dtype
        cfg = engine.model
        self.block_size = engine.kv_cache.block_size
        self.model = load_model(engine_dir, engine, device, dtype, engine.limits.max_seq_len + 1)
        kv_dtype = KV_DTYPES[engine.kv_cache.dtype]
        if kv_dtype == torch.bfloat16:
            kv_dtype = dtype  # unquantized KV is kept in the compute dtype (float32 in CPU tests)
        if device.type == "cuda":
            num_blocks = self._fit_blocks(num_blocks, kv_dtype)
        self.num_blocks = num_blocks
        shape = (num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=device),
                           torch.zeros(shape, dtype=kv_dtype, device=device)) for _ in range(cfg.num_hidden_layers)]

    def _fit_blocks(self, planned: int, kv_dtype: torch.dtype) -> int:
        """The plan is for the engine's budget; never take more than this GPU has free now, keeping room
        for one step's activations."""
        free, _ = torch.cuda.mem_get_info(self.device)
        mem = self.engine.memory
        reserve = mem.activations + mem.cuda_graphs_and_workspace + mem.headroom
        cfg = self.engine.model
        block_bytes = 2 * cfg.num_hidden_layers * self.block_size * cfg.kv_size * torch.finfo(kv_dtype).bits // 8
        return max(0, min(planned, (free - reserve) // block_bytes))

    def prepare(self, batch: list[ScheduledSeq], bm: BlockManager) -> tuple[torch.Tensor, AttentionMetadata]:
        input_ids, positions, slots, cu, ctx, tables, logits_idx = [], [], [], [0], [], [], []
        bs = self.block_size
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            table = bm.block_table(seq.seq_id)
            input_ids.extend(seq.token_ids[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            tables.append(table)
            if item.samples:
                logits_idx.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        dev = self.device
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        meta = AttentionMetadata(
            positions=as_tensor(positions), slot_mapping=as_tensor(slots),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            cu_seqlens_q=as_tensor(cu), context_lens=as_tensor(ctx), logits_indices=as_tensor(logits_idx))
        return as_tensor(input_ids), meta

    @torch.no_grad()
    def run(self, batch: list[ScheduledSeq], bm: BlockManager) -> torch.Tensor:
        """Logits [n_sampling, V] float32 for the sequences whose step reaches their last token."""
        input_ids, meta = self.prepare(batch, bm)
        hidden = self.model(input_ids, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            for k, v in self.kv_caches:
                for cache in (k, v):
                    raw = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
                    raw[dst].copy_(raw[src])
