"""Synthetic prompts of an exact token length under the Qwen3 tokenizer: random common words, each one
token with its leading space, so ISL/OSL grids mean what they say."""

from __future__ import annotations

import random
from functools import lru_cache


@lru_cache(maxsize=1)
def _word_tokens() -> tuple[list[str], object]:
    from tokenizers import Tokenizer

    from qwentrt.synth import tokenizer_source

    tok = Tokenizer.from_file(str(tokenizer_source() / "tokenizer.json"))
    words = []
    for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])[:20000]:
        if token.startswith("Ġ") and token[1:].isascii() and token[1:].isalpha() and len(token) > 3:
            words.append(token[1:])
    return sorted(set(words)), tok


def synthetic_prompt(num_tokens: int, seed: int = 0) -> str:
    """A prompt of exactly num_tokens tokens (re-encoded with the Qwen3 tokenizer)."""
    words, tok = _word_tokens()
    rng = random.Random(seed)
    text = " ".join(rng.choice(words) for _ in range(num_tokens))
    ids = tok.encode(text, add_special_tokens=False).ids
    while len(ids) < num_tokens:  # rare merges shortened it: pad
        text += " " + rng.choice(words)
        ids = tok.encode(text, add_special_tokens=False).ids
    return tok.decode(ids[:num_tokens])
