"""CUDA graphs for pure-decode steps (every sequence of the batch has one new token).

A decode step launches a few hundred small kernels; launched one by one from Python, the launch gaps
dominate a small batch's step. So the decode forward (model + lm_head) is captured once per batch size
in GRAPH_BATCH_SIZES up to the engine's max_batch_size, over static input buffers, and replayed: a
batch of n runs the graph of the smallest captured size >= n, the padding rows having slot -1 (their
K/V are not written) and context length 0 (their attention is zeros).

Everything inside a captured forward must read device values on the device only (no host syncs, no
data-dependent shapes): the kernels in qwentrt/engine/kernels are written that way, and the block table
is kept at its full width (max_seq_len / block_size pages) so its shape never changes. Its host copy
is written incrementally (TableRows) and only the batch's widest table is copied up each step. With async
scheduling an input id may be a placeholder for the previous step's sampled token: the graph resolves it
from a static buffer the step's tokens are copied into on the device (inflight.resolve_placeholders).
"""

from __future__ import annotations

import numpy as np
import torch

from qwentrt.engine.inflight import resolve_placeholders
from qwentrt.engine.model import AttentionMetadata, Qwen3Model


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class TableRows:
    """Block tables as rows of an int32 array [n, max_pages], kept from step to step: a row that holds the
    same sequence's table as last time gets only its new pages written (a decode step adds one page per
    block_size tokens, if any). Past a table's length a row holds stale page ids, which nothing reads."""

    def __init__(self, n: int, max_pages: int, pin: bool = False):
        self.tables = torch.zeros((n, max_pages), dtype=torch.int32, pin_memory=pin)
        self.np = self.tables.numpy()
        self._row_table: list[list[int] | None] = [None] * n  # the table list each row was written from
        self._row_len = [0] * n  # how much of it

    def fill(self, tables: list[list[int]]) -> None:
        """Rows 0..len(tables)-1 hold the given tables."""
        bt, row_table, row_len = self.np, self._row_table, self._row_len
        for i, t in enumerate(tables):
            n, done = len(t), row_len[i]
            if row_table[i] is not t:  # another sequence (or a new allocation): block tables only ever grow
                bt[i, :n] = t
                row_table[i], row_len[i] = t, n
            elif done != n:
                bt[i, done:n] = t[done:]
                row_len[i] = n


class _Staging:
    """Host buffers a replay's inputs are copied from (pinned on CUDA, so the copies are asynchronous)."""

    def __init__(self, n: int, max_pages: int, pin: bool):
        self.inputs = torch.zeros((4, n), dtype=torch.long, pin_memory=pin)
        self.inputs_np = self.inputs.numpy()
        self.rows = TableRows(n, max_pages, pin)
        self._pinned = pin  # (on CUDA)
        self._copied = None  # CUDA event after the last copies out of these buffers

    def wait_copied(self) -> None:
        """Before writing: the copies queued from these buffers last time have run (normally long done: the
        engine waited for that step's tokens; this covers a step dropped without a wait)."""
        if self._copied is not None:
            self._copied.synchronize()

    def copies_queued(self) -> None:
        if self._pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()


class DecodeGraphs:
    def __init__(self, model: Qwen3Model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch_size: int,
                 max_pages: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = n = self.sizes[-1]
        self.max_pages = max_pages
        # Rows: input_ids, positions, slot_mapping, context_lens.
        self.inputs = torch.zeros((4, n), dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, max_pages), dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.long, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.long, device=device)
        # The previous step's sampled tokens, which placeholder input ids read (inflight.py): the graph
        # resolves them itself, so a replay never needs them on the host.
        self.prev_tokens = torch.zeros(n, dtype=torch.long, device=device)
        # Two sets of host staging buffers, used in turn: with async scheduling the next step's inputs are
        # written while the copies of the step before may not have run yet (those of the one before that have:
        # the engine waited for its tokens; an event per set checks it).
        pin = device.type == "cuda"
        self._staging = [_Staging(n, max_pages, pin), _Staging(n, max_pages, pin)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        # Every graph writes its float32 logits into rows of this one buffer, outside the graphs' shared pool:
        # one output per graph kept alive in the pool would hold sum(sizes) rows of the vocabulary
        # (5 GiB at max batch 512, when the engine's memory plan counts 256 MiB for all the graphs).
        self.logits_out = torch.empty((n, model.lm_head.shape[0]), dtype=torch.float32, device=device)

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(positions=self.inputs[1, :bs], slot_mapping=self.inputs[2, :bs],
                                 block_tables=self.block_tables[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
                                 context_lens=self.inputs[3, :bs], logits_indices=self.logits_indices[:bs],
                                 num_decodes=bs)

    def _forward(self, bs: int) -> torch.Tensor:
        input_ids = resolve_placeholders(self.inputs[0, :bs], self.prev_tokens)
        hidden = self.model(input_ids, self._metadata(bs), self.kv_caches)
        return self.model.compute_logits(hidden, out=self.logits_out[:bs])

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every batch size, largest first, sharing one memory pool. The inputs are padding (no
        K/V written, zero attention), so capturing leaves the cache untouched."""
        self.inputs.zero_()
        self.inputs[2].fill_(-1)
        self.pool = capture_sizes(self.sizes, self._forward, self.graphs)  # (the prefill graphs share it)

    def can_run(self, num_seqs: int, max_pages: int) -> bool:
        return 0 < num_seqs <= self.max_batch_size and max_pages <= self.max_pages

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            tables: list[list[int]], prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the decode forward for n sequences; -> logits [n, V] float32 (a view of the graph's output,
        valid until the next replay). prev_tokens: the device tensor that placeholder ids (< 0) index."""
        n = len(input_ids)
        bs = next(s for s in self.sizes if s >= n)
        stage = self._staging[self._turn]
        self._turn ^= 1
        stage.wait_copied()
        host = stage.inputs_np
        host[0, :n] = input_ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[3, :n] = context_lens
        host[:, n:bs] = 0
        host[2, n:bs] = -1
        width = max(len(t) for t in tables)
        stage.rows.fill(tables)
        self.inputs[:, :bs].copy_(stage.inputs[:, :bs], non_blocking=True)
        self.block_tables[:n, :width].copy_(stage.rows.tables[:n, :width], non_blocking=True)
        stage.copies_queued()
        if prev_tokens is not None:
            self.prev_tokens[:len(prev_tokens)].copy_(prev_tokens, non_blocking=True)
        self.graphs[bs].replay()
        return self.logits_out[:n]


def capture_sizes(sizes: list[int], forward, graphs: dict[int, torch.cuda.CUDAGraph], pool=None):
    """Capture forward(size) for every size, largest first, into graphs[size], all in one memory pool (`pool`, or
    a new one); -> the pool. Each capture follows an eager warm-up run (Triton compiles, allocations sized)."""
    for size in sorted(sizes, reverse=True):
        forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward(size)
        pool = graph.pool() if pool is None else pool
        graphs[size] = graph
    torch.cuda.synchronize()
    return pool


def pad_tables(tables: list[list[int]]) -> np.ndarray:
    width = max(len(t) for t in tables)
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out
