"""FP8 E4M3 KV-cache scales: per layer, one scale for K and one for V, from the largest magnitude
seen in calibration (K after q/k-norm and RoPE, as it is stored). Stored value = x / scale, so the
observed range maps onto E4M3's +-448 and dequantization is fp8 * scale."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FP8_E4M3_MAX = 448.0


@dataclass
class KVRangeObserver:
    """Running max |K| and |V| per layer; `observer(layer)` gives the hook for Attention.kv_observer."""

    num_layers: int
    k_amax: list[float] = field(default_factory=list)
    v_amax: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.k_amax = [0.0] * self.num_layers
        self.v_amax = [0.0] * self.num_layers

    def observer(self, layer: int):
        def observe(k: torch.Tensor, v: torch.Tensor) -> None:
            self.k_amax[layer] = max(self.k_amax[layer], float(k.detach().abs().amax()))
            self.v_amax[layer] = max(self.v_amax[layer], float(v.detach().abs().amax()))
        return observe

    def scales(self) -> tuple[list[float], list[float]]:
        return [fp8_scale(a) for a in self.k_amax], [fp8_scale(a) for a in self.v_amax]


def fp8_scale(amax: float) -> float:
    """The smallest scale whose E4M3 range covers amax (1.0 for an unobserved or all-zero layer)."""
    if not amax > 0 or amax != amax or amax == float("inf"):
        return 1.0
    return float(amax) / FP8_E4M3_MAX


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference KV quantization (what the KV-write kernel must match)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x.float() * scale).to(dtype)
