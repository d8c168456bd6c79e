"""Async scheduling: the host prepares and launches step N+1 while the GPU runs step N, then waits for
step N's sampled tokens and does its bookkeeping (append, detokenize, stop checks) while the GPU runs
N+1, as vLLM v1's async scheduling and SGLang's overlap scheduler do. The GPU then never waits for the
host as long as the host's work per step is shorter than the GPU's.

How N+1 is scheduled without N's tokens:
- a sequence whose step N samples has one token in flight (`Sequence.num_pending`); the scheduler
  counts it as known: the sequence decodes it at N+1, and its KV slot is allocated as usual;
- that token's input id at N+1 is a placeholder ~row (< 0): `resolve_placeholders` replaces it on the
  device by row `row` of step N's sampled tokens (inside the CUDA graph on the decode path), so the
  host never reads them to launch N+1;
- when step N is processed, a sequence that ended there (a stop, max_tokens, an abort between steps)
  may already be in N+1: its N+1 token is dropped when N+1 is processed (`Sequence.is_finished`), and
  its pages were freed at once (later GPU work that reuses them is queued after N+1). A sequence that
  will end by length at N is not scheduled into N+1 at all;
- sampling that reads a request's past tokens on the host (penalties, grammars, multi-token bad words:
  `Sequence.needs_host_tokens`) cannot run ahead: a step that samples such a request is processed
  right after its launch (synchronously), so the next step is scheduled with every token known;
- block hashes (prefix caching) need real token ids: pages are hashed once their tokens are known;
- a preempted sequence with a token in flight waits for it before it is admitted again.

On the CPU the same code runs: the "device" work is done by the time `launch` returns, and waiting for
a step costs nothing. LLMEngine(async_scheduling=False) or QWENTRT_ASYNC_SCHEDULING=0 processes every
step right after its launch (the synchronous engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwentrt.engine.sequence import Sequence
from qwentrt.engine.transfer import HostCopy


def resolve_placeholders(input_ids: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """input_ids with each placeholder ~row (< 0) replaced by prev_tokens[row]: device ops only (no host
    read, CUDA-graph safe). prev_tokens must not be empty."""
    return torch.where(input_ids < 0, prev_tokens.index_select(0, (~input_ids).clamp_(min=0)), input_ids)


@dataclass
class InFlightStep:
    """A launched step: what it computed and its sampled tokens, on their way to the host."""
    seqs: list[Sequence]  # the step's sequences
    sampling: list[Sequence]  # the sequences that sampled, in the order of the rows of `tokens`
    tokens: torch.Tensor  # [len(sampling)] int64 on the device: the next step's placeholders read it
    copy: HostCopy  # tokens (and logprobs, if asked for) to the host
    sync: bool  # must be processed before the next step is scheduled

    def result(self) -> tuple[list[int], list[float] | None]:
        """Waits for the step; -> (sampled tokens, logprobs or None), host lists in row order."""
        host = self.copy.wait()
        return host[0].tolist(), (host[1].tolist() if len(host) > 1 else None)
