"""Runs the model for one scheduled step: builds the flat token batch and its AttentionMetadata from
the block tables, owns the paged KV cache tensors, and returns the logits of the sequences that sample."""

from __future__ import annotations

from pathlib import Path

import torch

from qwentrt.config import EngineConfig
from qwentrt.engine.block_manager import BlockManager
from qwentrt.engine.cuda_graphs import DecodeGraphs, pad_tables
from qwentrt.engine.model import AttentionMetadata, load_model
from qwentrt.engine.scheduler import ScheduledSeq
from qwentrt.engine.sequence import Sequence

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
        self.max_pages = -(-engine.limits.max_seq_len // self.block_size)
        self.graphs: DecodeGraphs | None = None  # capture_cuda_graphs() on CUDA

    def _fit_blocks(self, planned: int, kv_dtype: torch.dtype) -> int:
        """The plan is for the engine's budget; never take more than this GPU has free now, keeping room
        for one step's activations."""
        free, _ = torch.cuda.mem_get_info(self.device)
        mem = self.engine.memory
        reserve = mem.activations + mem.cuda_graphs_and_workspace + mem.headroom
        cfg = self.engine.model
        block_bytes = 2 * cfg.num_hidden_layers * self.block_size * cfg.kv_size * torch.finfo(kv_dtype).bits // 8
        return max(0, min(planned, (free - reserve) // block_bytes))

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_batch_size, self.max_pages, self.device)
        self.graphs.capture()

    @staticmethod
    def order(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Decodes (one new token) first, as AttentionMetadata lays a batch out; stable otherwise."""
        return sorted(batch, key=lambda item: item.num_tokens > 1)

    def _host_inputs(self, batch: list[ScheduledSeq], bm: BlockManager):
        input_ids, positions, slots, cu, ctx, tables = [], [], [], [0], [], []
        bs = self.block_size
        total = 0
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            end = start + n
            table = bm.block_table(seq.seq_id)
            if n == 1:  # a decode: no slices, ranges or generators
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            total += n
            cu.append(total)
            ctx.append(end)
            tables.append(table)
        return input_ids, positions, slots, cu, ctx, tables

    def prepare(self, batch: list[ScheduledSeq], bm: BlockManager) -> tuple[torch.Tensor, AttentionMetadata]:
        """The flat token batch and its metadata; batch must be in `order`."""
        input_ids, positions, slots, cu, ctx, tables = self._host_inputs(batch, bm)
        num_decodes = sum(1 for item in batch if item.num_tokens == 1)
        spans = [(b, cu[b], cu[b + 1], ctx[b]) for b in range(num_decodes, len(batch))]
        logits_idx = [cu[b + 1] - 1 for b, item in enumerate(batch) if item.samples]
        dev = self.device
        flat = torch.tensor(input_ids + positions + slots + cu + ctx + logits_idx, dtype=torch.long).to(
            dev, non_blocking=True)
        t, b = len(input_ids), len(batch)
        ids, pos, slot, cu_t, ctx_t, logits_t = flat.split([t, t, t, b + 1, b, len(logits_idx)])
        meta = AttentionMetadata(positions=pos, slot_mapping=slot,
                                 block_tables=torch.from_numpy(pad_tables(tables)).to(dev, non_blocking=True),
                                 cu_seqlens_q=cu_t, context_lens=ctx_t, logits_indices=logits_t,
                                 num_decodes=num_decodes, prefill_spans=spans)
        return ids, meta

    @torch.no_grad()
    def run(self, batch: list[ScheduledSeq], bm: BlockManager) -> tuple[torch.Tensor, list[Sequence]]:
        """-> (logits [n, V] float32, the n sequences they belong to: those whose step reaches their last
        token, in the order the batch ran)."""
        batch = self.order(batch)
        sampling = [item.seq for item in batch if item.samples]
        if self.graphs is not None and batch[-1].num_tokens == 1:
            input_ids, positions, slots, _, ctx, tables = self._host_inputs(batch, bm)
            if self.graphs.can_run(len(batch), max(len(t) for t in tables)):
                logits = self.graphs.run(input_ids, positions, slots, ctx, tables)
                if len(sampling) < len(batch):
                    rows = [i for i, item in enumerate(batch) if item.samples]
                    logits = logits[torch.tensor(rows, device=self.device)]
                return logits, sampling
        input_ids, meta = self.prepare(batch, bm)
        hidden = self.model(input_ids, meta, self.kv_caches)
        return self.model.compute_logits(hidden), sampling

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            for k, v in self.kv_caches:
                for cache in (k, v):
                    raw = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
                    raw[dst].copy_(raw[src])
