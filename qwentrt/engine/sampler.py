"""From logits to next tokens for a whole batch at once: repetition / presence / frequency penalties, bad
words, min_tokens and the grammar mask (only for the rows that ask for them), then greedy (temperature
0) or temperature + top-k + top-p sampling, vectorized across rows.

Sampling draws with the exponential race (argmax of p / E, E ~ Exp(1): a draw from p) rather than
torch.multinomial, so the whole step stays on the device and the host reads the tokens once, in a single
copy at the end. A request with a seed draws its noise from its own generator, so the same seed gives
the same output whatever else is in the batch."""

from __future__ import annotations

import torch

from qwentrt.engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_ids: list[int], device: torch.device, guided=None):
        self.eos_ids = eos_ids
        self.device = device
        self.guided = guided
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits [n, V] float32 (modified in place) -> (token per sequence, its log probability)."""
        for i, seq in enumerate(seqs):
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
        if logprobs is None:
            return tokens.tolist(), [0.0] * len(seqs)
        both = torch.stack([tokens.to(torch.float64), logprobs.to(torch.float64)]).tolist()  # one copy to the host
        lps = [lp if p.logprobs else 0.0 for lp, p in zip(both[1], params)]
        return [int(t) for t in both[0]], lps

    @staticmethod
    def _logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return log_probs.gather(1, tokens[:, None])[:, 0]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], want_logprobs: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        params = [s.params for s in seqs]
        n, vocab = logits.shape
        dev = logits.device
        greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
        temperature = torch.tensor([p.temperature or 1.0 for p in params], dtype=logits.dtype, device=dev)
        scaled = logits / temperature[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(q < 1.0 for q in top_p):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev)[None, :]
            drop = ranks >= torch.tensor(top_k, device=dev)[:, None]
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            # keep the smallest prefix whose probability reaches top_p (the first token always stays)
            drop |= probs.cumsum(-1) - probs > torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
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

    def _process_row(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if seq.output_ids and (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(seq.output_ids, device=row.device)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(seq.token_ids, device=row.device).unique()
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if seq.num_output_tokens < p.min_tokens:
            row[self.eos_ids + list(p.stop_token_ids)] = float("-inf")
        for word in seq.bad_word_ids:
            if len(word) == 1 or seq.output_ids[-(len(word) - 1):] == word[:-1]:
                row[word[-1]] = float("-inf")
