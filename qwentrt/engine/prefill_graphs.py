"""CUDA graphs for a lone prompt's prefill: the time to first token at low load.

An eager prefill step launches ~600 kernels, and a Triton launch costs tens of microseconds of host time: on the
H100's host ~30 ms a step whatever the prompt's length, so a short prompt's first token waits on Python, and a
2,048-token prompt's (~34 ms of kernels) on whichever of the two is late (docs/KERNEL_NOTES.md). When a step is
one sequence's whole prompt with nothing of it cached (a request reaching an idle engine), it replays instead a
graph captured for the smallest bucket of BUCKETS that holds the prompt:

- the prompt is padded at its end; padding tokens have slot -1 (their K/V are not written) and read K/V slot 0
  (any valid row), and under the causal mask no real token sees a padding token, so the real tokens' results
  are the eager step's (up to the GEMMs' choice of algorithm for another row count);
- the inputs are one upload (ids, slots and the index of the last token, through pinned memory); the float32
  logits of that last token land in a buffer outside the graphs' memory pool.

The graphs share the decode graphs' memory pool (cuda_graphs.py): graphs run one at a time and keep nothing in
the pool between replays, so the pool is the largest graph's, not the sum. Without CUDA (tests) `run` executes
the same padded forward eagerly, which is what the CPU tests check against the eager step.
"""

from __future__ import annotations

import bisect
import warnings
from typing import Callable

import numpy as np
import torch

from qwentrt.engine.cuda_graphs import capture_sizes
from qwentrt.engine.kernels.prefill_attention import PrefillBatch
from qwentrt.engine.model import AttentionMetadata, Qwen3Model

BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # prompt lengths a graph is captured for


def prefill_buckets(max_tokens: int) -> list[int]:
    """The buckets a prompt of up to max_tokens tokens can use (none: max_tokens below the smallest)."""
    return [b for b in BUCKETS if b <= max_tokens]


class PrefillGraphs:
    def __init__(self, model: Qwen3Model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_tokens: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = prefill_buckets(max_tokens)
        if not self.sizes:
            raise ValueError(f"prefill graphs: no bucket fits {max_tokens} tokens (the smallest is {BUCKETS[0]})")
        t = self.max_tokens = self.sizes[-1]
        # One flat buffer: input ids [T], slots [T], the last real token's index [1].
        self.inputs = torch.zeros(2 * t + 1, dtype=torch.long, device=device)
        self.positions = torch.arange(t, dtype=torch.long, device=device)
        self.cu = {b: torch.tensor([0, b], dtype=torch.int32, device=device) for b in self.sizes}
        self.cu_long = {b: torch.tensor([0, b], dtype=torch.long, device=device) for b in self.sizes}
        self.context_lens = {b: torch.tensor([b], dtype=torch.long, device=device) for b in self.sizes}
        self.block_tables = torch.zeros((1, 1), dtype=torch.int32, device=device)  # (a prefill reads no table)
        self.logits_out = torch.empty((1, model.lm_head.shape[0]), dtype=torch.float32, device=device)
        pin = device.type == "cuda"
        self._staging = [torch.zeros(2 * t + 1, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._offsets = np.arange(block_size, dtype=np.int64)

    def _metadata(self, b: int) -> AttentionMetadata:
        t = self.max_tokens
        slots = self.inputs[t:t + b]
        kv_slots = slots.clamp(min=0)  # padding reads row 0, which no real token sees
        prefill = PrefillBatch([(0, b, 0, b)], kv_slots, self.cu[b], self.cu[b], b, b)
        return AttentionMetadata(positions=self.positions[:b], slot_mapping=slots, block_tables=self.block_tables,
                                 cu_seqlens_q=self.cu_long[b], context_lens=self.context_lens[b],
                                 logits_indices=self.inputs[2 * t:], num_decodes=0, prefill=prefill)

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.inputs[:b], self._metadata(b), self.kv_caches)
        return self.model.compute_logits(hidden, out=self.logits_out)

    @torch.no_grad()
    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first, into `pool` (the decode graphs' pool; None: a new one). The
        inputs are padding (no K/V written), so capturing leaves the cache untouched."""
        t = self.max_tokens
        self.inputs.zero_()
        self.inputs[t:2 * t].fill_(-1)
        capture_sizes(self.sizes, self._forward, self.graphs, pool)

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def slots(self, table: list[int], n: int) -> np.ndarray:
        """The flat cache slots of positions 0..n-1 of a sequence with this block table."""
        bs = self.block_size
        pages = np.asarray(table[:-(-n // bs)], dtype=np.int64)
        return (pages[:, None] * bs + self._offsets).ravel()[:n]

    @torch.no_grad()
    def run(self, input_ids: list[int], table: list[int]) -> torch.Tensor:
        """The prefill of one whole prompt (positions 0..n-1, nothing cached, every id known); -> the float32
        logits of its last token [1, V], a view valid until the next run."""
        n = len(input_ids)
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        t = self.max_tokens
        i = self._turn
        self._turn ^= 1
        if self._copied[i] is not None:  # the copy queued from this buffer two runs ago has run (normally long done)
            self._copied[i].synchronize()
        host = self._staging[i].numpy()
        host[:n] = input_ids
        host[n:b] = 0
        host[t:t + n] = self.slots(table, n)
        host[t + n:t + b] = -1
        host[2 * t] = n - 1
        if self.inputs.device.type == "cuda":
            self.inputs.copy_(self._staging[i], non_blocking=True)
            self._copied[i] = torch.cuda.Event()
            self._copied[i].record()
        else:
            self.inputs.copy_(self._staging[i])
        if b in self.graphs:
            self.graphs[b].replay()
        else:  # not captured (no CUDA): the same padded forward, eagerly
            self._forward(b)
        return self.logits_out


def capture_fitting(make: Callable[[int], PrefillGraphs], max_tokens: int,
                    capture: Callable[[PrefillGraphs], None]) -> PrefillGraphs | None:
    """make(t) captured by capture(): for max_tokens, or, out of GPU memory, for half as many tokens and so on down
    to the smallest bucket (a warning says what was left out); None (prefills stay eager, a warning says why) if
    nothing fits or the capture fails otherwise: the engine starts either way, with slower first tokens at worst."""
    t = max_tokens
    while prefill_buckets(t):
        graphs = make(t)
        try:
            capture(graphs)
        except torch.cuda.OutOfMemoryError as e:
            del graphs
            torch.cuda.empty_cache()
            reason = str(e).splitlines()[0] if str(e) else "out of memory"
            t = prefill_buckets(t // 2)[-1] if prefill_buckets(t // 2) else 0
            if t:
                warnings.warn(f"prefill CUDA graphs up to {max_tokens} tokens do not fit ({reason}); trying {t}",
                              stacklevel=2)
            continue
        except Exception as e:  # a kernel that cannot be captured here: the eager prefill is the same math
            warnings.warn(f"prefill CUDA graphs not captured ({type(e).__name__}: {e}); prefills run eagerly",
                          stacklevel=2)
            return None
        return graphs
    warnings.warn("prefill CUDA graphs not captured (out of GPU memory even for the smallest bucket); prefills run "
                  "eagerly", stacklevel=2)
    return None
