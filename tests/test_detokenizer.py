"""Streaming detokenization with the real Qwen3 tokenizer: the joined deltas equal a full decode,
no delta splits a character (Chinese, emoji with modifiers / flags / ZWJ, random ids that form
invalid UTF-8), stop strings cut the text right before the first one to complete, special tokens
and prompt context, and the cost per token stays bounded."""

import functools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from qwentrt.engine.detokenizer import CUT_AT_TOKENS, IncrementalDetokenizer
from qwentrt.synth import tokenizer_source

IM_START, IM_END = 151644, 151645
NUM_BYTE_LEVEL = 151643  # ids below are byte-level BPE tokens; from here on, added tokens
NUM_TOKENS = 151669

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "Wave 👋🏽 flags 🇨🇳🇯🇵🇺🇸 family 👨‍👩‍👧‍👦 and 🧑🏿‍💻 coder ❤️‍🔥!",
    "Привет мир — こんにちは、世界 — 안녕하세요 — مرحبا — नमस्ते — ∑x² → ∞ — naïve café",
    "混合 text with 数字 12345 and emoji 🎉🎉 and code `print('好')`\n\t done 😀",
    "𠀀𠀁𪚥 rare CJK ext-B, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, e\u0301 combining, \u200b zero width",
]


@functools.cache
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_source() / "tokenizer.json"))


def encode(text: str) -> list[int]:
    return tok().encode(text, add_special_tokens=False).ids


def decode(ids, skip=True) -> str:
    return tok().decode(ids, skip_special_tokens=skip)


def chunked(ids, sizes):
    """`ids` split into chunks whose sizes cycle through `sizes`."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(ids[i:i + n])
        i, k = i + n, k + 1
    return out


def stream(ids, sizes=(1,), check_settled=True, **kwargs):
    """Feeds `ids` in chunks; returns (deltas incl. finish(), detokenizer). With no stop strings it
    checks after every chunk that the emitted text is the decode of the ids so far, less only a
    trailing '\ufffd' (an incomplete character): never a partial character that later completes,
    and nothing more held back than that."""
    d = IncrementalDetokenizer(tok(), **kwargs)
    deltas, fed = [], []
    for chunk in chunked(ids, list(sizes)):
        deltas.append(d.add(chunk))
        fed += chunk
        if check_settled and not kwargs.get("stop"):
            so_far = decode(fed, kwargs.get("skip_special_tokens", True))
            settled = so_far[:-1] if so_far.endswith("\ufffd") else so_far
            assert "".join(deltas) == settled
    deltas.append(d.finish())
    assert d.text == "".join(deltas)
    return deltas, d


def random_text(rng: random.Random, n: int) -> str:
    pools = [
        (0x20, 0x7E), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0400, 0x04FF),
        (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x20000, 0x2A6DF), (0x0600, 0x06FF),
    ]
    extras = ["👋🏽", "🇨🇳", "👨‍👩‍👧‍👦", "\u200d", "\ufe0f", " ", " ", "\n", "é", "e\u0301"]
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(extras))
        else:
            lo, hi = rng.choice(pools)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# --- joined deltas == full decode, no split characters -------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_texts_one_token_at_a_time_and_in_chunks(text):
    ids = encode(text)
    rng = random.Random(os.urandom(8))
    for sizes in [(1,), (2,), (3,), [rng.randint(1, 6) for _ in range(20)], (len(ids),)]:
        deltas, d = stream(ids, sizes)
        assert "".join(deltas) == decode(ids)
        assert d.num_tokens == len(ids) and d.stopped is None
        if "\ufffd" not in text:
            assert not any("\ufffd" in delta for delta in deltas)


def test_split_characters_are_held_until_complete():
    ids = encode(" 🇨🇳")
    assert decode(ids[:2]) == " \ufffd" and decode(ids[:3]) == " 🇨"  # 🇨's bytes span 3 tokens
    d = IncrementalDetokenizer(tok())
    assert [d.add([i]) for i in ids] == [" ", "", "🇨", "🇳"]
    # An incomplete character at the end is released by finish() as the tokenizer decodes it.
    d = IncrementalDetokenizer(tok())
    assert d.add(ids[:2]) == " " and d.finish() == "\ufffd"
    assert d.finish() == ""
    with pytest.raises(RuntimeError):
        d.add([1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 120),
       sizes=st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_random_mixed_script_texts(seed, n, sizes):
    text = random_text(random.Random(seed), n)
    ids = encode(text)
    deltas, _ = stream(ids, sizes)
    assert "".join(deltas) == decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, NUM_BYTE_LEVEL - 1), max_size=60),
       sizes=st.lists(st.integers(1, 6), min_size=1, max_size=10))
def test_random_ids_from_the_whole_vocab(ids, sizes):
    """Random ids make invalid UTF-8 too: the stream must still equal the full decode, '\ufffd' and
    all, and (checked in stream) never emit a partial character that later completes."""
    deltas, d = stream(ids, sizes)
    assert "".join(deltas) == decode(ids)
    assert d.num_tokens == len(ids)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(0, NUM_TOKENS - 1), st.integers(124, 255)), max_size=40),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6), skip=st.booleans())
def test_random_ids_with_special_and_single_byte_tokens(ids, sizes, skip):
    deltas, _ = stream(ids, sizes, skip_special_tokens=skip)
    assert "".join(deltas) == decode(ids, skip)


def test_cost_per_token_is_bounded():
    """Each step decodes a window of a few tokens, not everything generated so far."""
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tok().decode(ids, skip_special_tokens=skip_special_tokens)

    ids = encode(" ".join(TEXTS) * 20)
    assert len(ids) > 2000
    d = IncrementalDetokenizer(Counting(), prompt_ids=encode("Say something."))
    out = "".join(d.add([i]) for i in ids) + d.finish()
    assert out == decode(ids)
    assert max(lengths) <= CUT_AT_TOKENS + 8
    assert len(lengths) <= 1.25 * len(ids) + 3  # one decode per token, one more per cut


# --- stop strings ----------------------------------------------------------------------------------

def feed_one_by_one(text, stop, finish=True, **kwargs):
    ids = encode(text)
    d = IncrementalDetokenizer(tok(), stop=stop, **kwargs)
    deltas = [d.add([i]) for i in ids]
    if finish:
        deltas.append(d.finish())
    assert "".join(deltas) == d.text
    return d, deltas, ids


def test_single_token_stop():
    ids = encode("The answer is 42. Done here")
    done = encode(" Done")
    assert len(done) == 1 and done[0] in ids
    d, deltas, _ = feed_one_by_one("The answer is 42. Done here", [" Done"], finish=False)
    assert d.text == "The answer is 42." and d.stopped == " Done"
    assert d.add(encode(" more")) == "" and d.finish() == "" and d.text == "The answer is 42."
    assert d.num_tokens == ids.index(done[0]) + 1


def test_stop_spanning_tokens():
    text, stop = "Compute: the value is 12345, so that is it.", "is 12345,"
    assert not any(stop in decode([i]) for i in encode(text))
    d, _, _ = feed_one_by_one(text, [stop])
    assert d.text == "Compute: the value " and d.stopped == stop


def test_stop_at_the_very_start():
    d, deltas, _ = feed_one_by_one("STOP and more text", ["STOP"])
    assert deltas == [""] * len(deltas) and d.text == "" and d.stopped == "STOP"


def test_diverging_stop_prefix_is_released():
    text, stop = "a </ans and then more", "</answer>"
    ids = encode(text)
    d = IncrementalDetokenizer(tok(), stop=[stop])
    seen, was_held = "", False
    for k, i in enumerate(ids, 1):
        seen += d.add([i])
        if decode(ids[:k]).endswith("</ans"):
            assert seen == "a "  # "</ans" could begin the stop string: held back
            was_held = True
    assert was_held and seen == text  # released once it diverged, before finish()
    assert d.finish() == "" and d.stopped is None


def test_held_text_never_exceeds_longest_stop_minus_one():
    text = "<<<<<<<<<< a <<<< b <<<<<<<"
    d = IncrementalDetokenizer(tok(), stop=["<<<<<X", "<<Y"])
    fed = []
    for i in encode(text):
        d.add([i])
        fed.append(i)
        assert len(decode(fed)) - len(d.text) <= 5
    assert d.text + d.finish() == text


def test_multiple_stops_earliest_wins():
    d, _, _ = feed_one_by_one("alpha beta gamma delta", ["delta", "gamma", "beta"])
    assert d.text == "alpha " and d.stopped == "beta"
    # Overlapping stops: the first to complete wins; at the same end, the one that starts earlier.
    d, _, _ = feed_one_by_one("xx abcd yy", ["abcd", "bc"])
    assert d.text == "xx a" and d.stopped == "bc"
    d, _, _ = feed_one_by_one("xx abcd yy", ["cd", "abcd"])
    assert d.text == "xx " and d.stopped == "abcd"


def test_chinese_and_emoji_stops():
    d, _, _ = feed_one_by_one("你好，世界！再见，朋友。", ["再见"])
    assert d.text == "你好，世界！" and d.stopped == "再见"
    d, _, _ = feed_one_by_one("wave 👋🏽 bye", ["👋🏽"])
    assert d.text == "wave " and d.stopped == "👋🏽"
    d, _, _ = feed_one_by_one("flag 🇨🇳🇯🇵 end", ["🇯🇵"])
    assert d.text == "flag 🇨🇳" and d.stopped == "🇯🇵"


def test_empty_stops_are_ignored_and_a_prefix_at_the_end_is_released():
    d, _, _ = feed_one_by_one("ends with </ans", ["", "</answer>"])
    assert d.text == "ends with </ans" and d.stopped is None


def reference_stop(text, stops):
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    _, start, s = min(hits)
    return text[:start], s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_random_stops_match_a_reference(data, sizes):
    alphabet = st.sampled_from(list("ab <>/") + ["好", "世", "界", "👋🏽", "🇨🇳"])
    text = data.draw(st.lists(alphabet, max_size=40).map("".join))
    ids = encode(text)
    full = decode(ids)
    stops = data.draw(st.lists(st.one_of(
        st.lists(alphabet, min_size=1, max_size=4).map("".join),
        st.integers(0, max(len(full) - 1, 0)).flatmap(
            lambda i: st.integers(i, min(i + 5, len(full))).map(lambda j: full[i:j]))),
        max_size=3))
    deltas, d = stream(ids, sizes, stop=stops)
    expected, hit = reference_stop(full, stops)
    assert d.stopped == hit and "".join(deltas) == expected
    assert not any(s and s in d.text for s in stops)


# --- special tokens, prompt context, validation ------------------------------------------------------

def test_special_tokens():
    ids = encode("Hi") + [IM_END] + encode(" there") + [IM_START]
    deltas, _ = stream(ids)
    assert "".join(deltas) == "Hi there"
    deltas, _ = stream(ids, skip_special_tokens=False)
    assert "".join(deltas) == "Hi<|im_end|> there<|im_start|>" == decode(ids, False)
    d = IncrementalDetokenizer(tok())
    assert d.add([IM_END]) == "" and d.finish() == ""


def test_prompt_context():
    prompt = encode("<|im_start|>user\nFinish the word: hello wor")
    for gen_text in ["ld! 你好", "ld", "👋🏽 done", " and more"]:
        gen = encode(gen_text)
        deltas, _ = stream(gen, prompt_ids=prompt)
        assert "".join(deltas) == decode(gen)
        assert "".join(deltas) == decode(prompt + gen)[len(decode(prompt)):]
    # A chat prompt ending in special tokens and a newline.
    prompt = encode("hi") + [IM_END] + encode("\n") + [IM_START] + encode("assistant\n")
    gen = encode("Sure, 好的。") + [IM_END]
    deltas, _ = stream(gen, prompt_ids=prompt)
    assert "".join(deltas) == "Sure, 好的。"


def test_prompt_ending_inside_a_character():
    ids = encode(" 🇨🇳好")
    for cut in range(1, len(ids)):
        deltas, _ = stream(ids[cut:], prompt_ids=ids[:cut])
        assert "".join(deltas) == decode(ids[cut:])


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop="STOP"), "stop must be a list of strings"),
    (dict(stop=["ok", 3]), "stop must be a list of strings"),
    (dict(stop=5), "stop must be a list of strings"),
    (dict(prompt_ids=[1, "2"]), "prompt_ids must be a sequence of integer token ids"),
    (dict(prompt_ids="hello"), "prompt_ids must be a sequence of integer token ids"),
    (dict(prompt_ids=[-1]), "negative token id"),
    (dict(skip_special_tokens="yes"), "skip_special_tokens must be True or False"),
])
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IncrementalDetokenizer(tok(), **kwargs)


def test_add_validation_and_tokenizer_check():
    with pytest.raises(ValueError, match="tokenizer must have a decode"):
        IncrementalDetokenizer(object())
    d = IncrementalDetokenizer(tok())
    for bad in ([1.5], 7, "abc", [-3]):
        with pytest.raises(ValueError, match="token_ids"):
            d.add(bad)
    assert d.add([]) == "" and d.num_tokens == 0
