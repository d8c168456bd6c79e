"""From logits to next tokens for a whole batch at once: min_tokens (one indexed write per distinct set of
stop tokens in the batch), repetition / presence / frequency penalties, bad words and the grammar mask
(row by row, only for the rows that ask for them), then greedy (temperature 0) or temperature + top-k +
top-p sampling, vectorized across rows.

min_tokens is vectorized because clients set it on every request to fix the output length (Triton's
interface has no ignore_eos; perf_analyzer runs do): row by row it cost a host-to-device copy and a
launch per request per step, 512 of each per step at 512 requests.

Sampling draws with the exponential race (argmax of p / E, E ~ Exp(1): a draw from p) rather than
torch.multinomial, so the whole step stays on the device: `sample` queues it and returns device tensors
without waiting for the GPU (the engine copies them to the host behind the step, transfer.HostCopy);
`__call__` also brings them to the host. A request with a seed draws its noise from its own generator,
so the same seed gives the same output whatever else is in the batch.

Rows whose processing reads the request's past tokens on the host (penalties, bad words of several
tokens, grammars: `Sequence.needs_host_tokens`) are sampled only when those tokens are all known (the
engine runs such steps synchronously); min_tokens counts the tokens still in flight (`num_pending`)."""

from __future__ import annotations

import torch

from qwentrt.engine.sequence import Sequence
from qwentrt.engine.transfer import to_device


class Sampler:
    def __init__(self, eos_ids: list[int], device: torch.device, guided=None):
        self.eos_ids = eos_ids
        self.device = device
        self.guided = guided
        self.generator = torch.Generator(device=device)
        self.generator.seed()
        self._stop_ids: dict[tuple[int, ...], torch.Tensor] = {}  # a request's stop tokens, on the device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits [n, V] float32 (modified in place) -> (token per sequence, its log probability), on the host."""
        tokens, logprobs = self.sample(logits, seqs)
        if logprobs is None:
            return tokens.tolist(), [0.0] * len(seqs)
        return self.to_host(tokens.tolist(), logprobs.tolist(), seqs)

    @staticmethod
    def to_host(tokens: list[int], logprobs: list[float] | None, seqs: list[Sequence]
                ) -> tuple[list[int], list[float]]:
        """The host lists of `sample`'s tensors: logprobs 0.0 where a request did not ask for them."""
        if logprobs is None:
            return tokens, [0.0] * len(seqs)
        return tokens, [lp if s.params.logprobs else 0.0 for lp, s in zip(logprobs, seqs)]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [n, V] float32 (modified in place) -> (tokens [n] int64, logprobs [n] float32 or None when
        no request asked for them), on the device, without waiting for it."""
        self._hold_stop_tokens(logits, seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.bad_word_ids or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                self._process_row(logits[i], seq)
        if self.guided is not None and any(s.matcher is not None for s in seqs):
            self.guided.apply(logits, [s.matcher for s in seqs])
        params = [s.params for s in seqs]
        want_logprobs = any(p.logprobs for p in params)
        if all(p.temperature == 0 for p in params):
            tokens = logits.argmax(-1)
            logprobs = self._logprobs(torch.log_softmax(logits, -1), tokens) if want_logprobs else None
        else:
            tokens, logprobs = self._sample(logits, seqs, want_logprobs)
        return tokens, logprobs

    @staticmethod
    def _logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return log_probs.gather(1, tokens[:, None])[:, 0]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], want_logprobs: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = [s.params for s in seqs]
        n, vocab = logits.shape
        dev = logits.device
        greedy = to_device([p.temperature == 0 for p in params], torch.bool, dev)
        temperature = to_device([p.temperature or 1.0 for p in params], logits.dtype, dev)
        scaled = logits / temperature[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(q < 1.0 for q in top_p):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev)[None, :]
            drop = ranks >= to_device(top_k, torch.long, dev)[:, None]
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            # keep the smallest prefix whose probability reaches top_p (the first token always stays)
            drop |= probs.cumsum(-1) - probs > to_device(top_p, probs.dtype, dev)[:, None]
            scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
        if not want_logprobs:
            return tokens, None
        log_probs = torch.where(greedy[:, None], torch.log_softmax(logits, -1), probs.log())
        return tokens, self._logprobs(log_probs, tokens)

    def _hold_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: a request short of it (counting its tokens in flight) cannot stop, so its end and
        stop tokens get -inf; one write for all the rows that share the same stop tokens."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.min_tokens and seq.num_output_tokens + seq.num_pending < p.min_tokens:
                groups.setdefault(tuple(p.stop_token_ids), []).append(i)
        for extra, rows in groups.items():
            ids = self._stop_ids.get(extra)
            if ids is None:
                if len(self._stop_ids) >= 256:  # requests with their own stop tokens: keep the cache small
                    self._stop_ids.clear()
                ids = self._stop_ids[extra] = to_device(self.eos_ids + list(extra), torch.long, logits.device)
            # index_fill_ takes the value as a scalar: `logits[r, c] = float("-inf")` may make a 0-dim tensor of
            # it on the host and copy it up, which synchronizes the stream (the GPU runs ahead of this step)
            rows_t = to_device(rows, torch.long, logits.device)
            if logits.is_contiguous():
                flat = rows_t[:, None] * logits.shape[1] + ids[None, :]
                logits.view(-1).index_fill_(0, flat.view(-1), float("-inf"))
            else:
                logits.index_put_((rows_t[:, None], ids[None, :]), logits.new_full((), float("-inf")))

    def _process_row(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if seq.output_ids and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            out = to_device(seq.output_ids, torch.long, row.device)
            if p.repetition_penalty != 1.0:
                seen = to_device(seq.token_ids, torch.long, row.device).unique()
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        for word in seq.bad_word_ids:
            if len(word) == 1 or seq.output_ids[-(len(word) - 1):] == word[:-1]:
                row[word[-1]] = float("-inf")
