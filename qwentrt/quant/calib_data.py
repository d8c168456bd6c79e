"""Calibration token blocks for AWQ and the FP8 KV scales: text (the set shipped in the package,
or a user's .txt / .jsonl file) run through the checkpoint's tokenizer, concatenated and cut into
`samples` blocks of `seqlen` tokens, as AutoAWQ does."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from qwentrt.errors import QwentrtError

DOC_SEPARATOR = "<|doc|>"


def read_documents(path: str | Path | None) -> list[str]:
    """Documents from the shipped set (None), a .jsonl file (a "text" field, or "messages" chats), or
    a text file (documents separated by lines holding `<|doc|>`, else by blank lines)."""
    if path is None:
        text = resources.files("qwentrt.data").joinpath("calibration.txt").read_text(encoding="utf-8")
        return _split_text(text)
    p = Path(path)
    if not p.is_file():
        raise QwentrtError(f"--calib {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwentrtError(f"--calib {path}: not UTF-8 text ({e})") from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QwentrtError(f"--calib {path}:{i}: not JSON ({e})") from None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                docs.append(rec["text"])
            elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                docs.append("\n".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>"
                                      for m in rec["messages"] if isinstance(m, dict)))
            else:
                raise QwentrtError(f"--calib {path}:{i}: expected an object with a 'text' string or a 'messages' list")
        return docs
    return _split_text(text)


def _split_text(text: str) -> list[str]:
    if DOC_SEPARATOR in text:
        parts = text.split(DOC_SEPARATOR)
    else:
        parts = text.split("\n\n")
    return [p.strip() for p in parts if p.strip()]


def calibration_blocks(tokenizer, path: str | Path | None, samples: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] int64 token ids, n = min(samples, tokens available // seqlen) (at least one block:
    a short set is repeated rather than refused)."""
    docs = read_documents(path)
    if not docs:
        raise QwentrtError(f"calibration set {path or '(shipped)'} has no text")
    ids: list[int] = []
    eos = tokenizer.token_to_id("<|endoftext|>") if hasattr(tokenizer, "token_to_id") else None
    for doc in docs:
        ids.extend(tokenizer.encode(doc).ids if hasattr(tokenizer, "token_to_id") else tokenizer.encode(doc))
        if eos is not None:
            ids.append(eos)
    while len(ids) < seqlen:
        ids = ids + ids
    n = min(samples, len(ids) // seqlen)
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)
