"""Calibration sets: the shipped one, user .txt and .jsonl files, and errors for bad ones."""

import json

import pytest

from qwentrt.engine.build import load_tokenizer
from qwentrt.errors import QwentrtError
from qwentrt.quant.calib_data import calibration_blocks, read_documents


def test_shipped_set_is_multilingual_and_large_enough(tiny_ckpt):
    docs = read_documents(None)
    assert len(docs) > 100
    assert any("的" in d for d in docs)  # Chinese is a large share of what the model sees
    blocks = calibration_blocks(load_tokenizer(tiny_ckpt), None, 128, 512)
    assert blocks.shape[1] == 512 and blocks.shape[0] >= 30
    assert int(blocks.max()) < 151936 and int(blocks.min()) >= 0


def test_user_files(tmp_path, tiny_ckpt):
    txt = tmp_path / "c.txt"
    txt.write_text("first document\n\nsecond one, 第二个\n\n\nthird")
    assert read_documents(txt) == ["first document", "second one, 第二个", "third"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n\n" +
                     json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    docs = read_documents(jsonl)
    assert docs[0] == "hello" and docs[1] == "<|im_start|>user\nhi<|im_end|>"
    # A short set is repeated up to one block rather than refused.
    blocks = calibration_blocks(load_tokenizer(tiny_ckpt), jsonl, 8, 64)
    assert blocks.shape == (1, 64)


def test_bad_files(tmp_path):
    with pytest.raises(QwentrtError, match="no such file"):
        read_documents(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(QwentrtError, match=r"bad.jsonl:2: expected an object with a 'text'"):
        read_documents(bad)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QwentrtError, match="not UTF-8"):
        read_documents(binary)
