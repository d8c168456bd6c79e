"""Guided decoding with xgrammar: a request's JSON schema, JSON, regex or EBNF grammar becomes a
token mask applied before sampling, so every sampled token keeps the output inside the grammar."""

from __future__ import annotations

import json
from functools import lru_cache

import torch


class GuideError(ValueError):
    """The guide (schema, regex, grammar) is invalid: a bad request, not a server fault."""


class GuidedDecoding:
    def __init__(self, hf_tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compile = lru_cache(maxsize=64)(self._compile_uncached)

    def _compile_uncached(self, guide_type: str, guide: str | None):
        c = self.compiler
        if guide_type == "json_schema":
            try:
                schema = json.loads(guide)
            except (TypeError, json.JSONDecodeError) as e:
                raise GuideError(f"guided_decoding_guide: not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise GuideError("guided_decoding_guide: a JSON schema must be an object")
            from jsonschema import Draft202012Validator, SchemaError
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as e:
                raise GuideError(f"guided_decoding_guide: invalid JSON schema: {e.message}") from None
            return c.compile_json_schema(guide, any_whitespace=False)
        if guide_type == "json":
            return c.compile_builtin_json_grammar()
        if guide_type == "regex":
            return c.compile_regex(guide)
        if guide_type == "ebnf_grammar":
            return c.compile_grammar(guide)
        raise GuideError(f"guided_decoding_guide_type: {guide_type!r} is not one of json_schema, json, regex, "
                         "ebnf_grammar")

    def matcher(self, guide_type: str, guide: str | None):
        try:
            compiled = self._compile(guide_type, guide)
        except GuideError:
            raise
        except Exception as e:  # xgrammar's own parse errors
            raise GuideError(f"guided_decoding_guide: cannot compile the {guide_type}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return self.xgr.GrammarMatcher(compiled)

    def apply(self, logits: torch.Tensor, matchers: list) -> None:
        """Mask, in place, the rows of logits [n, V] whose matcher is not None."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        sub = logits[rows]
        self.xgr.apply_token_bitmask_inplace(sub, bitmask[rows].to(logits.device))
        logits[rows] = sub
