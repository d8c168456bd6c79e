"""Inflight batching: every step mixes the running sequences' decodes (and unfinished prefill chunks)
with prefill chunks of waiting requests, up to max_num_tokens tokens and max_batch_size sequences
(chunked prefill). New requests are admitted every step. When KV pages run out, the newest running
sequence is preempted: its pages are freed and it is recomputed later (its tokens are kept).
With async scheduling (inflight.py) a sequence's token still in flight counts as known."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwentrt.engine.block_manager import BlockManager
from qwentrt.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Does this step reach the sequence's last token (so a new token is sampled)? A token still in
        flight (async scheduling) counts as the sequence's."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_tokens == seq.num_tokens + seq.num_pending


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_tokens: int, max_batch_size: int,
                 max_prefill_chunk: int | None = None):
        self.block_manager = block_manager
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.max_prefill_chunk = max_prefill_chunk or max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_tokens
        scheduled: list[ScheduledSeq] = []
        bm = self.block_manager
        # 1. Running sequences, oldest first: a decode token each, or the next chunk of their prefill.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and seq.num_output_tokens + seq.num_pending >= seq.params.max_tokens:
                i += 1  # its token in flight is its last (max_tokens): nothing more to compute
                continue
            n = min(seq.num_tokens + seq.num_pending - seq.num_computed_tokens, budget, self.max_prefill_chunk)
            while not bm.try_append_slots(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                break  # seq itself was the newest and got preempted
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        # 2. Waiting requests, first come first served, while budget and batch slots remain.
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending or not bm.can_allocate(seq.token_ids):
                break  # (a preempted sequence waits for its token in flight: prompts hold known tokens only)
            cached = bm.allocate(seq.seq_id, seq.token_ids)
            seq.num_computed_tokens = cached
            seq.num_cached_tokens = cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - cached, budget, self.max_prefill_chunk)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Free the pages of a running sequence and send it back to the front of the queue; its prompt
        and output so far are recomputed when it is readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished, aborted or failed): its pages are freed at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
