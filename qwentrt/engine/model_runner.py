"""Runs the model for one scheduled step: builds the flat token batch and its AttentionMetadata from
the block tables, owns the paged KV cache tensors, and returns the logits of the sequences that sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qwentrt.config import EngineConfig
from qwentrt.engine.block_manager import BlockManager
from qwentrt.engine.cuda_graphs import DecodeGraphs, TableRows
from qwentrt.engine.inflight import resolve_placeholders
from qwentrt.engine.kernels.prefill_attention import PrefillBatch, prefill_layout, varlen_available
from qwentrt.engine.model import AttentionMetadata, load_model
from qwentrt.engine.prefill_graphs import PrefillGraphs, capture_fitting, prefill_buckets
from qwentrt.engine.scheduler import ScheduledSeq
from qwentrt.engine.sequence import Sequence
from qwentrt.engine.transfer import to_device

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
        if device.type == "cuda":  # probe the one-call prefill attention now, not inside the first prefill step
            varlen_available(self.kv_caches[0][0].device, dtype, cfg.num_attention_heads, cfg.num_key_value_heads,
                             cfg.head_dim)
        self.graphs: DecodeGraphs | None = None  # capture_cuda_graphs() on CUDA
        self.prefill_graphs: PrefillGraphs | None = None  # capture_prefill_graphs() on CUDA
        self._table_rows = TableRows(0, self.max_pages)  # the eager path's block tables (grown on demand)

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

    def capture_prefill_graphs(self, max_tokens: int) -> None:
        """Graphs of a lone whole prompt's prefill up to max_tokens tokens (prefill_graphs.py), in the decode
        graphs' pool; fewer tokens if that does not fit, none if nothing does (a warning says so): slower first
        tokens, same results."""
        if not prefill_buckets(max_tokens):
            return
        def make(t: int) -> PrefillGraphs:
            return PrefillGraphs(self.model, self.kv_caches, t, self.block_size, self.device)
        if self.device.type != "cuda":
            self.prefill_graphs = make(max_tokens)  # (runs its padded forward eagerly: what the CPU tests check)
            return
        pool = self.graphs.pool if self.graphs is not None else None
        self.prefill_graphs = capture_fitting(make, max_tokens, lambda graphs: graphs.capture(pool))

    @staticmethod
    def order(batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Decodes (one new token) first, as AttentionMetadata lays a batch out; stable otherwise."""
        return sorted(batch, key=lambda item: item.num_tokens > 1)

    def _host_inputs(self, batch: list[ScheduledSeq], bm: BlockManager):
        """Host lists of the batch's inputs: input ids of every token, positions and slots of the decodes (the
        first len(positions) sequences: `prepare` derives the prefill tokens' from the block tables, numpy),
        cu (token offsets), context lengths and block tables of every sequence. A token still in flight (async
        scheduling) is the placeholder ~row (inflight.resolve_placeholders), row being its row in the previous
        step's sampled tokens."""
        input_ids, positions, slots, cu, ctx, tables = [], [], [], [0], [], []
        bs = self.block_size
        total = 0
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            end = start + n
            known = seq.token_ids
            table = bm.block_table(seq.seq_id)
            if n == 1:  # a decode: no slices, ranges or generators
                input_ids.append(known[start] if start < len(known) else ~seq.pending_row)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(known[start:end])
                if end > len(known):  # (only the last token can be in flight)
                    input_ids.append(~seq.pending_row)
            total += n
            cu.append(total)
            ctx.append(end)
            tables.append(table)
        return input_ids, positions, slots, cu, ctx, tables

    def prepare(self, batch: list[ScheduledSeq], bm: BlockManager, host=None) -> tuple[torch.Tensor, AttentionMetadata]:
        """The flat token batch and its metadata, built once per step (every layer reads the same); one upload
        of the step's integers and one of its block tables. batch must be in `order` (host: its `_host_inputs`)."""
        input_ids, positions, slots, cu, ctx, tables = host or self._host_inputs(batch, bm)
        b = len(batch)
        d = len(positions)  # the decodes, first
        if any(item.num_tokens == 1 for item in batch[d:]):
            raise ValueError("ModelRunner.prepare: the batch must be in ModelRunner.order (decodes first)")
        if b > len(self._table_rows.np):
            self._table_rows = TableRows(max(b, 2 * len(self._table_rows.np)), self.max_pages)
        self._table_rows.fill(tables)
        rows = self._table_rows.np
        width = max(len(t) for t in tables)
        logits_idx = [cu[i + 1] - 1 for i, item in enumerate(batch) if item.samples]
        layout = None
        parts = [np.asarray(input_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)]
        if d < b:
            layout = prefill_layout(rows[d:b], cu[d:], ctx[d:], self.block_size)
            parts += [layout.positions, np.asarray(slots, dtype=np.int64), layout.slots]
        else:
            parts.append(np.asarray(slots, dtype=np.int64))
        parts.append(np.asarray(cu + ctx + logits_idx, dtype=np.int64))
        if layout is not None:
            parts += [layout.kv_slots, layout.cu_seq_q, layout.cu_seq_k]
        dev = self.device
        flat = to_device(np.concatenate(parts), torch.long, dev)
        t = len(input_ids)
        sizes = [t, t, t, b + 1, b, len(logits_idx)]
        if layout is not None:
            sizes += [len(layout.kv_slots), 2 * (b - d + 1)]
        ids, pos, slot, cu_t, ctx_t, logits_t, *rest = flat.split(sizes)
        prefill = None
        if layout is not None:
            kv_slots, offsets = rest
            offsets = offsets.to(torch.int32)
            prefill = PrefillBatch(layout.spans, kv_slots, offsets[:b - d + 1], offsets[b - d + 1:], layout.max_q,
                                   layout.max_k)
        meta = AttentionMetadata(positions=pos, slot_mapping=slot,
                                 block_tables=to_device(rows[:b, :width], torch.int32, dev),
                                 cu_seqlens_q=cu_t, context_lens=ctx_t, logits_indices=logits_t,
                                 num_decodes=d, prefill=prefill)
        return ids, meta

    @torch.no_grad()
    def run(self, batch: list[ScheduledSeq], bm: BlockManager, prev_tokens: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[Sequence]]:
        """-> (logits [n, V] float32, the n sequences they belong to: those whose step reaches their last
        token, in the order the batch ran). Queues device work only: never waits for the GPU.
        prev_tokens: the sampled tokens of the step in flight, which the batch's placeholders read."""
        batch = self.order(batch)
        sampling = [item.seq for item in batch if item.samples]
        host = self._host_inputs(batch, bm)
        input_ids, positions, slots, _, ctx, tables = host
        if min(input_ids) >= 0:
            prev_tokens = None  # no placeholder to resolve
        elif prev_tokens is None or not len(prev_tokens):
            raise RuntimeError("a token in flight is an input, but no step in flight was given (prev_tokens)")
        if self.graphs is not None and batch[-1].num_tokens == 1 and \
                self.graphs.can_run(len(batch), max(len(t) for t in tables)):
            logits = self.graphs.run(input_ids, positions, slots, ctx, tables, prev_tokens)
            if len(sampling) < len(batch):
                rows = [i for i, item in enumerate(batch) if item.samples]
                logits = logits[to_device(rows, torch.long, self.device)]
            return logits, sampling
        if self.prefill_graphs is not None and len(batch) == 1 and prev_tokens is None:
            item = batch[0]  # one whole prompt, nothing of it cached: a captured prefill
            if item.seq.num_computed_tokens == 0 and self.prefill_graphs.can_run(item.num_tokens):
                logits = self.prefill_graphs.run(input_ids, tables[0])
                return (logits if item.samples else logits[:0]), sampling
        input_ids, meta = self.prepare(batch, bm, host)
        if prev_tokens is not None:
            input_ids = resolve_placeholders(input_ids, prev_tokens)
        hidden = self.model(input_ids, meta, self.kv_caches)
        return self.model.compute_logits(hidden), sampling

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            for k, v in self.kv_caches:
                for cache in (k, v):
                    raw = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
                    raw[dst].copy_(raw[src])
