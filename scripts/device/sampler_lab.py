"""The sampler's host cost per decode step at 512 requests with min_tokens (what the served bench sends), on the
GPU (lab, not a test): the row-by-row min_tokens of before session 7 (a pinned to_device and an index_fill_ per
row) against `Sampler._hold_stop_tokens` (one write per distinct stop-token set), and the whole `Sampler.sample`
with and without min_tokens. Host ms are the time to queue the work; "+sync" waits for the GPU too.

    python3 scripts/device/sampler_lab.py [ROWS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from qwentrt.config import SamplingParams  # noqa: E402
from qwentrt.engine.sampler import Sampler  # noqa: E402
from qwentrt.engine.sequence import Sequence  # noqa: E402
from qwentrt.engine.transfer import to_device  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 512
VOCAB = 151936
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sampler = Sampler([151645, 151643], dev)
logits = torch.randn(ROWS, VOCAB, device=dev)


def seqs(min_tokens: int) -> list[Sequence]:
    return [Sequence(i, f"r{i}", [1, 2, 3], SamplingParams(max_tokens=1000, min_tokens=min_tokens, temperature=0.0))
            for i in range(ROWS)]


def row_by_row(batch: list[Sequence]) -> None:
    for i, seq in enumerate(batch):
        logits[i].index_fill_(0, to_device(sampler.eos_ids + list(seq.params.stop_token_ids), torch.long, dev),
                              float("-inf"))


def timed(fn, reps: int = 20) -> tuple[float, float]:
    host, full = [], []
    for _ in range(reps + 3):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        h = time.perf_counter() - t
        if dev.type == "cuda":
            torch.cuda.synchronize()
        host.append(h * 1e3)
        full.append((time.perf_counter() - t) * 1e3)
    return statistics.median(host[3:]), statistics.median(full[3:])


with_min, without = seqs(1000), seqs(0)
for name, fn in [("min_tokens row by row (before)", lambda: row_by_row(with_min)),
                 ("min_tokens in one write (now)", lambda: sampler._hold_stop_tokens(logits, with_min)),
                 ("sample(), min_tokens on every row", lambda: sampler.sample(logits, with_min)),
                 ("sample(), no min_tokens", lambda: sampler.sample(logits, without))]:
    h, f = timed(fn)
    print(f"{ROWS} rows, {name:36s}: host {h:7.2f} ms, +sync {f:7.2f} ms", flush=True)
