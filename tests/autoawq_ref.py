"""A third party's AWQ checkpoint, written the way AutoAWQ writes one (its loops, not our code)."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_loop(intweight: torch.Tensor) -> torch.Tensor:
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + PACK_ORDER[i]].to(torch.int32) << (i * 4)
    return packed


def quantize_linear(w: torch.Tensor, group: int):
    """AutoAWQ's pseudo_quantize_tensor + WQLinear_GEMM.from_linear -> (qweight, qzeros, scales, W_deq)."""
    n, k = w.shape
    g = w.float().reshape(-1, group)
    mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = (mx - mn).clamp(min=1e-5) / 15
    zeros = (-torch.round(mn / scales)).clamp(0, 15)
    scales, zeros = scales.reshape(n, -1), zeros.reshape(n, -1)
    intweight = torch.empty(n, k, dtype=torch.int32)
    for idx in range(k):
        gi = idx // group
        intweight[:, idx] = torch.round((w[:, idx].float() + zeros[:, gi] * scales[:, gi]) / scales[:, gi]).to(torch.int32)
    intweight = intweight.clamp(0, 15)
    scales16 = scales.to(torch.float16)
    deq = torch.empty(n, k)
    for idx in range(k):
        gi = idx // group
        deq[:, idx] = (intweight[:, idx].float() - zeros[:, gi]) * scales16[:, gi].float()
    return pack_loop(intweight.t().contiguous()), pack_loop(zeros.to(torch.int32).t().contiguous()), \
        scales16.t().contiguous(), deq


def write_awq_checkpoint(src: Path, dst: Path, group: int = 128) -> dict[str, torch.Tensor]:
    """Quantize every decoder linear of the checkpoint in `src` into `dst`; returns the dequantized weights."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if name.startswith("model.layers.") and t.dim() == 2:
            base = name.removesuffix(".weight")
            qw, qz, sc, deq = quantize_linear(t, group)
            out[base + ".qweight"], out[base + ".qzeros"], out[base + ".scales"] = qw, qz, sc
            dequantized[base] = deq
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dequantized
