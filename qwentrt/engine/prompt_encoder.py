"""Prompt text -> token ids, a long prompt in pieces encoded in parallel.

The tokenizer's Rust code encodes one text on one core: about 5 us a token for the Qwen3 tokenizer (10 ms for
a 2,048-token prompt, a fifth of the TTFT we aim at). `encode_batch` encodes several texts on several cores
(and releases the GIL while it does), so a long prompt is cut into pieces at points where the tokenizer's own
splitting would cut it anyway, and the pieces' ids are joined: the same ids as the whole text's.

A safe cut: before a space that follows a non-space character and precedes a letter (" word"). Qwen3's
pre-tokenizer regex (GPT-4's, below) never puts a space after a non-space character inside one piece, so a
piece always starts at such a space and BPE never merges across it; NFC never composes across a space (a
starter); added (special) tokens are matched before that, and none of Qwen3's contains a space or strips
spaces around it. Any other tokenizer (another regex, another normalizer, added tokens that contain or strip
spaces) is encoded whole."""

from __future__ import annotations

import json
import re

QWEN3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPACE_BEFORE_WORD = re.compile(r"(?<=\S) (?=\w)")  # candidates, found at C speed (a text may have none)
PIECE_CHARS = 1024  # ~200 tokens of English: pieces big enough that a thread's start-up does not show


class PromptEncoder:
    def __init__(self, tokenizer, piece_chars: int = PIECE_CHARS):
        self.tokenizer = tokenizer
        self.piece_chars = piece_chars
        self.splittable = splittable(tokenizer)

    def __call__(self, text: str) -> list[int]:
        pieces = self.pieces(text) if self.splittable and len(text) >= 2 * self.piece_chars else [text]
        encodings = self.tokenizer.encode_batch(pieces, add_special_tokens=False)
        if len(encodings) == 1:
            return encodings[0].ids
        return [t for e in encodings for t in e.ids]

    def pieces(self, text: str) -> list[str]:
        """text cut at safe points (module doc) about every piece_chars characters."""
        cuts = [0]
        n = len(text)
        at = _SPACE_BEFORE_WORD.search(text, self.piece_chars)
        while at is not None:
            i = at.start()
            if text[i + 1].isalpha():  # (\w also takes digits of other scripts and marks: letters only)
                cuts.append(i)
                at = _SPACE_BEFORE_WORD.search(text, i + self.piece_chars)
            else:
                at = _SPACE_BEFORE_WORD.search(text, i + 1)
        cuts.append(n)
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def splittable(tokenizer) -> bool:
    """Does cutting text before " <letter>" keep this tokenizer's ids? (Qwen3's pre-tokenizer and normalizer,
    and no added token that contains whitespace or strips it.)"""
    try:
        pre = json.loads(tokenizer.pre_tokenizer.__getstate__()) if tokenizer.pre_tokenizer else {}
        normalizer = json.loads(tokenizer.normalizer.__getstate__()) if tokenizer.normalizer else None
        added = list(tokenizer.get_added_tokens_decoder().values())
    except Exception:  # noqa: BLE001 (a tokenizer that cannot describe itself: encode whole)
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) != 2:
        return False
    split, byte_level = steps
    if not (split.get("type") == "Split" and split.get("pattern") == {"Regex": QWEN3_SPLIT}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex")
            and not byte_level.get("add_prefix_space")):
        return False
    if normalizer is not None and normalizer.get("type") != "NFC":
        return False
    return not any(any(c.isspace() for c in t.content) or t.lstrip or t.rstrip or t.single_word for t in added)
