"""Long prompts are encoded in pieces (prompt_encoder.py): the joined ids must be the whole text's, for any text,
with the real Qwen3 tokenizer; tokenizers whose splitting differs are encoded whole."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer

from qwentrt.bench.prompts import synthetic_prompt
from qwentrt.engine.prompt_encoder import PromptEncoder, splittable
from qwentrt.synth import tokenizer_source

TOKENIZER = Tokenizer.from_file(str(tokenizer_source() / "tokenizer.json"))
ENCODER = PromptEncoder(TOKENIZER)
WHOLE = lambda text: TOKENIZER.encode(text, add_special_tokens=False).ids  # noqa: E731

# letters (ASCII, accented, Greek, CJK, Hangul), digits, whitespace of every kind, punctuation, apostrophes
# (contractions), combining marks, emoji, and special tokens written in the text
ALPHABET = st.sampled_from(list("abcXYZéüßΩж中文한") + list("0123456789") + [" ", "  ", "\n", "\r\n", "\t", "\u00a0",
                           "\u3000"] + list(".,;!?()-_'\"/<>|") + ["'s", "'LL", "\u0301", "\u0308", "😀", "<|im_start|>",
                           "<|im_end|>", "<think>", "word", " word", "Word "])


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, min_size=1, max_size=120), st.integers(1, 12))
def test_pieces_give_the_whole_texts_ids(parts, piece_chars):
    text = "".join(parts)
    encoder = ENCODER
    encoder.piece_chars = piece_chars
    assert "".join(encoder.pieces(text)) == text
    assert encoder(text) == WHOLE(text)


def test_a_long_prompt_is_cut_into_pieces_and_keeps_its_ids():
    text = synthetic_prompt(2048)
    encoder = PromptEncoder(TOKENIZER)
    assert encoder.splittable
    assert len(encoder.pieces(text)) >= len(text) // encoder.piece_chars - 1 > 4
    assert encoder(text) == WHOLE(text)
    assert len(encoder(text)) == 2048


def test_other_tokenizers_are_encoded_whole():
    spec = json.loads(TOKENIZER.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\S+|\s+"
    other = Tokenizer.from_str(json.dumps(spec))
    assert splittable(TOKENIZER) and not splittable(other)
    encoder = PromptEncoder(other, piece_chars=4)
    text = "a long text of several words " * 10
    assert encoder(text) == other.encode(text, add_special_tokens=False).ids


def test_added_tokens_that_strip_spaces_keep_a_prompt_whole():
    stripping = Tokenizer.from_file(str(tokenizer_source() / "tokenizer.json"))
    stripping.add_special_tokens([AddedToken("<stripped>", rstrip=True)])
    assert not splittable(stripping)
