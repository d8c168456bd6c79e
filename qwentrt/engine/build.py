"""`qwentrt build`: a HF checkpoint becomes an engine folder.

    checkpoint ─ validate ─ calibration tokens ─ layer by layer:
        full-precision forward (records each linear's inputs and the layer's K/V range)
        └─ AWQ: scale search + clip search, folded in ─ pack to AutoAWQ GEMM int4
    ─ FP8 KV scales ─ memory plan (KV capacity for the GPU budget) ─ engine.json + tokenizer

Only one decoder layer is on the device at a time. The folder appears whole or not at all.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from qwentrt import __version__
from qwentrt.checkpoint import Checkpoint, load
from qwentrt.config import (ENGINE_FORMAT_VERSION, BuildConfig, BuildInfo, EngineConfig, KVCacheSpec, Limits,
                            WeightsSpec, default_max_batch_size)
from qwentrt.engine import memory_plan
from qwentrt.engine.kernels.configs import default_kernel_configs
from qwentrt.engine.target import GiB, resolve_target
from qwentrt.errors import BuildError
from qwentrt.fsutil import staged_folder
from qwentrt.quant.awq import awq_decoder_layer, pseudo_quantize
from qwentrt.quant.calib_data import calibration_blocks
from qwentrt.quant.dense_qwen3 import DecoderLayer, rope_cos_sin
from qwentrt.quant.kv import KVRangeObserver
from qwentrt.quant.pack import dequantize_awq, pack_awq

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"--device {name}: no CUDA GPU visible to torch here (use --device cpu or auto)")
    return dev


def load_tokenizer(folder: Path):
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


class LayerSource:
    """Reads one decoder layer of a checkpoint as dense weights (dequantizing an AWQ checkpoint)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def dense(self, i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = {f"{n}.weight": self.ckpt.get(p + n + ".weight") for n in NORMS}
        for lin in LINEARS:
            out[lin + ".weight"] = self.linear(p + lin)
        return out

    def linear(self, name: str) -> torch.Tensor:
        if name + ".weight" in self.ckpt:
            return self.ckpt.get(name + ".weight")
        awq = self.ckpt.awq
        return dequantize_awq(self.ckpt.get(name + ".qweight"), self.ckpt.get(name + ".qzeros"),
                              self.ckpt.get(name + ".scales"), awq.group_size, torch.float32)

    def awq_tensors(self, i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = {}
        for lin in LINEARS:
            for suffix in ("qweight", "qzeros", "scales"):
                out[p + lin + "." + suffix] = self.ckpt.get(p + lin + "." + suffix).contiguous()
        return out


def build(checkpoint: str | Path, out: str | Path, options: BuildConfig = BuildConfig(), force: bool = False,
          progress: bool = True, log=print) -> EngineConfig:
    """Build an engine folder from a checkpoint folder or hub id. Returns the engine config written."""
    options.validate()
    started = time.perf_counter()
    device = pick_device(options.device)
    target = resolve_target(options.target)
    ckpt = load(checkpoint)
    cfg = ckpt.config
    if options.max_seq_len > cfg.max_position_embeddings:
        raise BuildError(f"--max-seq-len {options.max_seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if options.weights == "int4-awq":
        for name, (n, k) in cfg.linear_shapes().items():
            if k % options.group_size or n % 8:
                raise BuildError(f"{name}: in_features {k} is not a multiple of group size {options.group_size} "
                                 f"(or out_features {n} of 8); use --weights bf16 or another --group-size")
    take_awq = options.weights == "int4-awq" and ckpt.awq is not None
    if take_awq and ckpt.awq.group_size != options.group_size:
        log(f"note: the checkpoint is AWQ with group {ckpt.awq.group_size}; keeping it (not {options.group_size})")
        options = replace(options, group_size=ckpt.awq.group_size)
    search_awq = options.weights == "int4-awq" and not take_awq
    calibrate = search_awq or options.kv_cache == "fp8-e4m3"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = LayerSource(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    awq_stats: list[dict[str, list[float]]] = []
    observer = KVRangeObserver(cfg.num_hidden_layers)
    calib_info: dict[str, Any] = {}

    with staged_folder(Path(out), force=force) as tmp:
        embed = ckpt.get("model.embed_tokens.weight")
        tensors["model.embed_tokens.weight"] = embed.to(torch.bfloat16).contiguous()
        tensors["model.norm.weight"] = ckpt.get("model.norm.weight").to(torch.bfloat16)
        if not cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = ckpt.get("lm_head.weight").to(torch.bfloat16)
        x = cos = sin = None
        if calibrate:
            blocks = calibration_blocks(load_tokenizer(ckpt.folder), options.calib, options.calib_samples,
                                        options.calib_seqlen)
            calib_info = {"source": options.calib or "qwentrt/data/calibration.txt", "samples": blocks.shape[0],
                          "seqlen": blocks.shape[1], "tokens": blocks.numel()}
            log(f"calibration: {blocks.shape[0]} samples x {blocks.shape[1]} tokens on {device}")
            x = embed[blocks].to(device=device, dtype=dtype)
            pos = torch.arange(blocks.shape[1], device=device)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
        del embed
        what = "AWQ" if search_awq else "calibrate" if calibrate else "convert"
        for i in tqdm(range(cfg.num_hidden_layers), desc=f"{what} layers", unit="layer", disable=not progress):
            p = f"model.layers.{i}."
            dense = source.dense(i)
            for n in NORMS:
                tensors[p + n + ".weight"] = dense[n + ".weight"].to(torch.bfloat16)
            layer = None
            if calibrate:
                layer = DecoderLayer(cfg).to(device=device, dtype=dtype)
                layer.load({k: v.to(device=device, dtype=dtype) for k, v in dense.items()})
                layer.self_attn.kv_observer = observer.observer(i)
                with torch.no_grad():
                    x, feats = _forward_collect(layer, x, cos, sin, need_feats=search_awq)
                layer.self_attn.kv_observer = None
            if search_awq:
                awq_stats.append(awq_decoder_layer(layer, feats, cos, sin, batch=x.shape[0],
                                                   group_size=options.group_size, n_grid=options.awq_grid))
                del feats
                sd = layer.state_dict()
                for n in NORMS:  # AWQ folded scales into the layernorms
                    tensors[p + n + ".weight"] = sd[n + ".weight"].to("cpu", torch.bfloat16)
                for lin in LINEARS:
                    w = sd[lin + ".weight"].float()
                    _, scales, zeros = pseudo_quantize(w, options.group_size)
                    packed = pack_awq(w, scales, zeros, options.group_size)
                    for suffix, t in packed.items():
                        tensors[p + lin + "." + suffix] = t.cpu()
            elif take_awq:
                tensors.update(source.awq_tensors(i))
            else:
                for lin in LINEARS:
                    tensors[p + lin + ".weight"] = dense[lin + ".weight"].to(torch.bfloat16).contiguous()
            del layer, dense
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "qwentrt": __version__})
        for f in ckpt.tokenizer_files():
            shutil.copyfile(f, tmp / f.name)

        budget = int((options.gpu_memory_gib or target.memory_gib) * GiB)
        max_batch = options.max_batch_size or default_max_batch_size(budget / GiB)
        mem, blocks_n = memory_plan.plan(cfg, budget, weight_bytes, options.kv_cache, options.kv_block_size,
                                         options.max_num_tokens, max_batch)
        capacity = blocks_n * options.kv_block_size
        if capacity < options.max_seq_len:
            raise BuildError(
                f"the GPU budget of {budget / GiB:.1f} GiB leaves KV room for {capacity} tokens, fewer than "
                f"--max-seq-len {options.max_seq_len} (weights {weight_bytes / GiB:.2f} GiB, activations "
                f"{mem.activations / GiB:.2f} GiB): raise --gpu-memory, or lower --max-seq-len / --max-num-tokens")
        k_scales, v_scales = observer.scales() if options.kv_cache == "fp8-e4m3" else ([], [])
        kernels = default_kernel_configs(target.compute_capability)
        if _should_tune(options, device, target):
            from qwentrt.engine.tuning import tune
            log(f"tuning W4A16 kernel configs on {torch.cuda.get_device_name(device)}")
            kernels.update(tune(cfg, options.group_size, device, log=log))
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        engine = EngineConfig(
            format_version=ENGINE_FORMAT_VERSION,
            model=cfg,
            weights=WeightsSpec(format=options.weights, group_size=options.group_size,
                                source="awq-search" if search_awq else "checkpoint-awq" if take_awq else "checkpoint",
                                bytes=weight_bytes),
            kv_cache=KVCacheSpec(dtype=options.kv_cache, block_size=options.kv_block_size, num_blocks=blocks_n,
                                 bytes_per_token=cfg.kv_bytes_per_token(options.kv_cache),
                                 k_scales=k_scales, v_scales=v_scales),
            limits=Limits(max_batch_size=max_batch, max_num_tokens=options.max_num_tokens,
                          max_seq_len=options.max_seq_len, max_input_len=options.max_seq_len - 1),
            target=target,
            memory=mem,
            kernels=kernels,
            build=BuildInfo(qwentrt_version=__version__,
                            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            checkpoint=str(checkpoint), device=str(device), wall_s=round(wall, 2),
                            peak_gpu_memory_bytes=int(peak), calibration=calib_info,
                            awq=_summarize(awq_stats)),
        )
        engine.save(tmp)
    ckpt.close()
    return engine


def _should_tune(options: BuildConfig, device: torch.device, target) -> bool:
    if options.tune == "off" or options.weights != "int4-awq":
        return False
    here = (f"{torch.cuda.get_device_capability(device)[0]}.{torch.cuda.get_device_capability(device)[1]}"
            if device.type == "cuda" else None)
    if options.tune == "on":
        if here is None:
            raise BuildError("--tune on needs a CUDA GPU: kernel configs are timed on the GPU the engine is for")
        if here != target.compute_capability:
            raise BuildError(f"--tune on: this GPU is sm {here} but the target is {target.name} (sm "
                             f"{target.compute_capability}); tune on the target GPU, or --tune off")
        return True
    return here is not None and here == target.compute_capability


def _forward_collect(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     need_feats: bool, chunk: int = 16):
    """Run the layer over all samples in chunks; concatenate outputs (and features when needed)."""
    outs, feats = [], []
    for i in range(0, x.shape[0], chunk):
        if need_feats:
            o, f = layer.forward_with_features(x[i:i + chunk], cos, sin)
            feats.append(f)
        else:
            o = layer(x[i:i + chunk], cos, sin)
        outs.append(o)
    out = torch.cat(outs, dim=0)
    if not need_feats:
        return out, None
    from qwentrt.quant.dense_qwen3 import LayerFeatures
    merged = LayerFeatures(*(torch.cat([getattr(f, k) for f in feats], dim=0)
                             for k in ("attn_in", "o_in", "mlp_in", "down_in")))
    return out, merged


def _summarize(stats: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Per group: mean output-error ratio AWQ / round-to-nearest, and the chosen grid ratios."""
    if not stats:
        return {}
    summary: dict[str, Any] = {}
    for group in stats[0]:
        rows = [s[group] for s in stats]
        ratios = [r[1] / r[2] for r in rows if r[2] > 0]
        summary[group] = {"mean_loss_vs_rtn": round(sum(ratios) / max(1, len(ratios)), 4),
                          "grid_ratio": [r[0] for r in rows]}
    return summary
