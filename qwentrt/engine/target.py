"""Target GPUs: what an engine is built for (name, compute capability, memory), and the check that
refuses to run an engine on a GPU of another compute capability."""

from __future__ import annotations

import torch

from qwentrt.config import TargetGPU
from qwentrt.errors import ConfigError

GiB = 1 << 30

# The cards we plan for; `--target sm_XX` picks one; `auto` reads the GPU doing the build.
KNOWN_TARGETS: dict[str, TargetGPU] = {
    "sm_80": TargetGPU("NVIDIA A100-SXM4-80GB", "8.0", 80.0),
    "sm_86": TargetGPU("NVIDIA GeForce RTX 3090", "8.6", 24.0),
    "sm_89": TargetGPU("NVIDIA GeForce RTX 4090", "8.9", 24.0),
    "sm_90": TargetGPU("NVIDIA H100 80GB HBM3", "9.0", 80.0),
}
DEFAULT_TARGET = "sm_89"


def local_gpu() -> TargetGPU | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return TargetGPU(p.name, f"{p.major}.{p.minor}", round(p.total_memory / GiB, 2))


def resolve_target(target: str) -> TargetGPU:
    """`auto`: the GPU doing the build, else the default target (sm_89, the RTX 4090)."""
    if target == "auto":
        return local_gpu() or KNOWN_TARGETS[DEFAULT_TARGET]
    key = target.lower()
    if key.startswith("sm") and not key.startswith("sm_"):
        key = "sm_" + key[2:]
    if key not in KNOWN_TARGETS:
        raise ConfigError(f"--target {target!r} is not known: choose auto or one of {', '.join(KNOWN_TARGETS)}")
    return KNOWN_TARGETS[key]


def check_runs_on(target: TargetGPU, device: torch.device, allow_mismatch: bool = False) -> None:
    """Refuse an engine built for one compute capability on another, saying why and how to proceed."""
    if device.type != "cuda" or allow_mismatch:
        return
    p = torch.cuda.get_device_properties(device)
    here = f"{p.major}.{p.minor}"
    if here != target.compute_capability:
        raise ConfigError(
            f"this engine was built for {target.name} (compute capability {target.compute_capability}) but "
            f"this GPU is {p.name} ({here}): its kernel configs and memory plan are for the other card. "
            f"Rebuild with `qwentrt build --target auto`, or pass --allow-gpu-mismatch to run it anyway")
