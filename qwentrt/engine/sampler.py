"""From logits to next tokens, per request: repetition / presence / frequency penalties, bad words,
min_tokens, the grammar mask, then greedy (temperature 0) or temperature + top-k + top-p sampling.
A request with a seed draws from its own generator, so the same seed gives the same output whatever
else is in the batch."""

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
        if self.guided is not None:
            self.guided.apply(logits, [s.matcher for s in seqs])
        tokens, logprobs = [], []
        for i, seq in enumerate(seqs):
            token, lp = self._sample_row(logits[i], seq)
            tokens.append(token)
            logprobs.append(lp)
        return tokens, logprobs

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

    def _sample_row(self, row: torch.Tensor, seq: Sequence) -> tuple[int, float]:
        p = seq.params
        if p.temperature == 0:
            token = int(row.argmax())
            return token, float(torch.log_softmax(row, -1)[token]) if p.logprobs else 0.0
        row = row / p.temperature
        if p.top_k and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = row.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            row = row.scatter(0, idx[drop], float("-inf"))
        probs = row.softmax(-1)
        gen = seq.generator if seq.generator is not None else self.generator
        token = int(torch.multinomial(probs, 1, generator=gen))
        return token, float(torch.log(probs[token])) if p.logprobs else 0.0
