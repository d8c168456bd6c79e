"""Streaming detokenization: generated token ids in, text deltas out, with stop strings.

Qwen3's tokenizer is byte-level BPE: a token can hold some of the UTF-8 bytes of a character, and
the tokenizer decodes bytes that do not (yet) form a character as '\ufffd'. The detokenizer decodes
only a small window of recent tokens (vLLM's prefix_offset / read_offset technique): a few tokens
of context whose text was already accounted for, then the tokens not yet settled. Text of the window
is settled except a trailing '\ufffd', which may be the first bytes of a character that the next
tokens complete; it is held back until then (or until finish()). Whenever the window's text ends on
a whole character and has grown past CUT_AT_TOKENS, it is cut back to its last few tokens, so each
step costs O(window) and one decode (plus one more at each cut).

The deltas joined, plus finish(), equal `tokenizer.decode(generated ids)` exactly: lossy UTF-8
decoding restarts cleanly after a whole character, so decoding the window and dropping the text
already accounted for gives the same characters as decoding everything.

Stop strings act on the settled text: the first stop string to complete ends the stream, cut right
before it (when two complete at the same character, the one that starts earlier wins). Settled text
whose end could still begin a stop string is held back, at most len(longest stop) - 1 characters.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

CONTEXT_TOKENS = 5  # tokens kept as decoding context (vLLM's initial prefix offset)
CUT_AT_TOKENS = 16  # the window is cut back to CONTEXT_TOKENS past this: one decode per token, not two
_PARTIAL = "\ufffd"


def _token_ids(values: Iterable[int], name: str) -> list[int]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of integer token ids, not {type(values).__name__}")
    try:
        ids = [operator.index(v) for v in values]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integer token ids") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{name} holds a negative token id: {min(ids)}")
    return ids


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas for streaming. `tokenizer` is a
    `tokenizers.Tokenizer` (or anything with the same `decode(ids, skip_special_tokens=...)`);
    `prompt_ids` only gives decoding context: the text emitted is generated text alone."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()):
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("tokenizer must have a decode(ids, skip_special_tokens=...) method")
        if not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be True or False, not {skip_special_tokens!r}")
        if isinstance(stop, str) or not isinstance(stop, Iterable):
            raise ValueError(f"stop must be a list of strings, not {type(stop).__name__} (wrap one in a list)")
        stop = list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a list of strings: got {[type(s).__name__ for s in stop]}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stops = tuple(dict.fromkeys(s for s in stop if s))  # empty ones ignored, order kept
        self._max_hold = max(map(len, self._stops), default=1) - 1
        # The window: context tokens, then tokens not yet settled. The first `_done` characters of
        # its decoded text were already emitted (or are the prompt's).
        self._window = _token_ids(prompt_ids, "prompt_ids")[-CONTEXT_TOKENS:]
        context = self._decode(self._window)
        if context.endswith(_PARTIAL):  # the prompt ends inside a character: no context
            self._window, context = [], ""
        self._done = len(context)
        self._held = ""  # settled text that could be the start of a stop string
        self._chunks: list[str] = []
        self._stopped: str | None = None
        self._finished = False
        self.num_tokens = 0  # generated tokens taken in (up to and including a stop)

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, else None."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_ids: Sequence[int]) -> str:
        """Takes one or more new tokens; returns the text that became safe to emit (maybe "")."""
        if type(token_ids) is list and len(token_ids) == 1 and type(token_ids[0]) is int and token_ids[0] >= 0:
            ids = token_ids  # the engine's one token per step: nothing to convert
        else:
            ids = _token_ids(token_ids, "token_ids")
        if self._finished:
            raise RuntimeError("add() after finish()")
        if self._stopped is not None or not ids:
            return ""
        self.num_tokens += len(ids)
        self._window += ids
        return self._emit(self._settle(final=False), final=False)

    def finish(self) -> str:
        """End of generation: releases held-back text (an incomplete trailing character decodes as
        the tokenizer decodes it, '\ufffd'), unless a stop string matched. Later calls return ""."""
        if self._finished:
            return ""
        self._finished = True
        if self._stopped is not None:
            return ""
        return self._emit(self._settle(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _settle(self, final: bool) -> str:
        """The window's newly settled text; cuts the window back when it ends on a whole character."""
        text = self._decode(self._window)
        open_char = not final and text.endswith(_PARTIAL)  # maybe the first bytes of a character
        end = len(text) - open_char
        new = text[self._done:end]
        self._done = max(self._done, end)
        if not open_char and len(self._window) > CUT_AT_TOKENS:
            self._window = self._window[-CONTEXT_TOKENS:]
            self._done = len(self._decode(self._window))
        return new

    def _emit(self, new: str, final: bool) -> str:
        if not self._stops:  # nothing is ever held back
            self._chunks.append(new)
            return new
        text = self._held + new
        hits = [(i + len(s), i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            _, cut, self._stopped = min(hits)
            out, self._held, self._window = text[:cut], "", []
        else:
            keep = 0 if final else self._stop_prefix_len(text)
            out, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self._chunks.append(out)
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            if any(s.startswith(text[-k:]) for s in self._stops):
                return k
        return 0
