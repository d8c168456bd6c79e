"""One request inside the engine: its tokens, how far the KV cache has computed them, its sampling
parameters and per-request state (RNG, grammar matcher, detokenizer). `token_ids` holds the tokens the
host knows; with async scheduling up to two more may be in flight (`num_pending`)."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from qwentrt.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    matcher: Any = None  # xgrammar GrammarMatcher for guided requests
    detokenizer: Any = None
    cum_logprob: float = 0.0
    logprobs: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    bad_word_ids: list[list[int]] = field(default_factory=list)
    # Async scheduling: tokens sampled on the device whose values the host does not know yet (0 or 1 when
    # a step is scheduled; 2 while the next step is launched and the last one not yet processed), and the
    # row of the latest one in its step's sampled tokens (the next step's input reads it on the device).
    num_pending: int = 0
    pending_row: int = -1

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @functools.cached_property
    def needs_host_tokens(self) -> bool:
        """Does sampling read this request's past tokens on the host (penalties, bad words of several
        tokens, a grammar)? Such a request's steps run synchronously. (Read once it is scheduled.)"""
        p = self.params
        return (self.matcher is not None or p.repetition_penalty != 1.0 or bool(p.presence_penalty)
                or bool(p.frequency_penalty) or any(len(w) > 1 for w in self.bad_word_ids))

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)
