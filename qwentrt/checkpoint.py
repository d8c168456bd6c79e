"""HF checkpoints in: find them (local folder or hub id), validate them against their config, and
read their tensors lazily (one layer at a time, so a 4B model never has to sit in memory whole)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qwentrt.config import Qwen3Config
from qwentrt.errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class AwqInfo:
    """quantization_config of an AutoAWQ checkpoint (GEMM layout)."""

    bits: int
    group_size: int
    zero_point: bool
    version: str
    modules_to_not_convert: tuple[str, ...]

    @classmethod
    def from_hf(cls, qc: dict[str, Any], source: str) -> "AwqInfo":
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        zero = bool(qc.get("zero_point", True))
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{source}: AWQ version {version!r} is not supported, only 'gemm' "
                                  "(re-export with AutoAWQ's GEMM version, or build from the unquantized model)")
        if bits != 4 or not zero or group not in (32, 64, 128):
            raise CheckpointError(f"{source}: AWQ with bits={bits}, zero_point={zero}, group_size={group} is not "
                                  "supported (4-bit, zero point, group 32/64/128)")
        return cls(bits, group, zero, version, tuple(qc.get("modules_to_not_convert") or ()))

    def quantized(self, linear_name: str) -> bool:
        return not any(m in linear_name for m in self.modules_to_not_convert)


def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder, or a hub id downloaded with huggingface-hub (from its cache when offline)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: is a file; pass the checkpoint folder (the one with config.json)")
        return path
    text = str(source)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(f"{source}: no such folder (and not a Hugging Face Hub id like 'Qwen/Qwen3-4B-Instruct-2507')")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{repo_id}: not found on the Hugging Face Hub or not accessible "
                              f"({type(e).__name__}); check the id, or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision {revision!r} not found on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"{repo_id}: cannot download from the Hugging Face Hub and it is not in the local "
                              f"cache (offline? {type(e).__name__}); pass a local checkpoint folder instead") from None
    except Exception as e:  # requests/httpx connection errors vary between versions
        raise CheckpointError(f"{repo_id}: download from the Hugging Face Hub failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}; pass a local checkpoint folder instead") from None


class Checkpoint:
    """A validated HF Qwen3 checkpoint folder: config, tensor index, lazy tensor reads."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hf_config = _read_json(self.folder / "config.json", "config.json")
        try:
            self.config = Qwen3Config.from_hf(self.hf_config, str(self.folder / "config.json"))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        qc = self.hf_config.get("quantization_config")
        self.awq: AwqInfo | None = None
        if qc:
            method = qc.get("quant_method")
            if method != "awq":
                raise CheckpointError(f"{self.folder}/config.json: quantization {method!r} is not supported "
                                      "(only AutoAWQ 'awq' GEMM, or unquantized bf16/fp16/fp32)")
            self.awq = AwqInfo.from_hf(qc, f"{self.folder}/config.json")
        self._index = self._build_index()
        self._handles: dict[Path, Any] = {}
        self.validate()

    # ---- files -------------------------------------------------------------------------------
    def _build_index(self) -> dict[str, Path]:
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = _read_json(index_file, "model.safetensors.index.json").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_file}: no weight_map")
            files = {f: self.folder / f for f in set(weight_map.values())}
            for name, path in files.items():
                if not path.is_file():
                    raise CheckpointError(f"{self.folder}: shard {name} named in model.safetensors.index.json is missing")
            for path in files.values():  # the index may lie: trust the headers
                self._check_header(path)
            return {k: files[v] for k, v in weight_map.items()}
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            extra = " (only PyTorch .bin weights found: convert them to safetensors)" if any(
                self.folder.glob("*.bin")) else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors weights{extra}")
        index: dict[str, Path] = {}
        for path in shards:
            for name in self._check_header(path):
                index[name] = path
        return index

    @staticmethod
    def _check_header(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._index[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing")
        try:
            return self._handle(self._index[name]).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self._index[name]}: cannot read tensor {name} (corrupt file? "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    # ---- validation --------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self.config.tensor_shapes()
        if self.awq is None:
            return shapes
        g = self.awq.group_size
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            linear = name.removesuffix(".weight")
            if name.startswith("model.layers.") and len(shape) == 2 and self.awq.quantized(linear):
                n, k = shape
                if k % g or n % 8:
                    raise CheckpointError(f"{linear}: in_features {k} / out_features {n} do not fit AWQ group {g}")
                out[linear + ".qweight"] = (k, n // 8)
                out[linear + ".qzeros"] = (k // g, n // 8)
                out[linear + ".scales"] = (k // g, n)
            else:
                out[name] = shape
        return out

    def validate(self) -> None:
        expected = self.expected_shapes()
        missing = [n for n in expected if n not in self._index]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.folder}: missing tensor(s) {', '.join(missing[:3])}{more} "
                                  f"(config.json says {self.config.num_hidden_layers} layers)")
        for name, shape in expected.items():
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(f"{name}: shape {list(got)} but config.json implies {list(shape)} "
                                      f"({self._index[name].name})")
        if not (self.folder / "tokenizer.json").is_file() and not (
                (self.folder / "vocab.json").is_file() and (self.folder / "merges.txt").is_file()):
            raise CheckpointError(f"{self.folder}: no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                                  "the engine needs the checkpoint's tokenizer")

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file()]

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._index.values()))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {what} (is this a Hugging Face checkpoint folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    return Checkpoint(resolve(source, revision))
