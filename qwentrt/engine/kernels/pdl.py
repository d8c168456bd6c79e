"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the kernel before it in
the stream is still running, and waits (`griddepcontrol.wait`) for that kernel to complete, its memory visible,
before it reads anything the kernel before may have written.

At one token a decode step is ~320 kernels in a CUDA graph, each a few microseconds, and the W4A16 GEMV spends
~5 us a call that does not scale with its weights (docs/KERNEL_NOTES.md, session 10: a fit of the four linears'
times against their bytes): launch latency, the first DRAM round trip, the split-K tail. With PDL the GEMV is
launched as the kernel before it starts, prefetches its first group of weight rows into L2 (weights are never
written by a step), and waits only before it loads x; the small kernels around it (norms, SiLU-mul, q/k-norm +
RoPE + KV write, the decode attention) are launched the same way and let the next kernel launch at once
(`griddepcontrol.launch_dependents` first thing), so their launches overlap too.

Correctness does not depend on where a kernel triggers: `griddepcontrol.wait` returns only once the kernel before
has completed, and that one completed only after its own wait returned, so completion is transitive down the
stream; every kernel launched with PDL waits before touching memory another kernel writes (activations, the
split-K workspaces and counters, the KV cache). A kernel launched without PDL (cuBLAS, torch ops) serializes as
always. Graph capture keeps the launch attribute (programmatic edges, CUDA >= 12.3).

Where the GEMV lets the next kernel launch: `"pdl": true` at its start (measured slower, session 11: the next
GEMV's programs become resident and sit in their wait, holding registers and warp slots the running GEMV's later
waves need), `"pdl": "late"` after its main loop (only the split-K epilogue is left when the dependents come in,
and they prefetch their first weights into L2 while it drains). The small kernels trigger first thing either way.

Off unless the engine's kernel configs say `"pdl": true` or `"late"` (`QWENTRT_PDL=1` / `late` / `0` overrides
either way), and only on CUDA devices of compute capability 9.0 or newer with a Triton that has `launch_pdl` and
`gdc_wait`.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    TRITON_HAS_PDL = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
except ImportError:  # no triton, or one without PDL
    TRITON_HAS_PDL = False

_wanted = {"on": False, "late": False}


def configure(kernel_configs: dict) -> None:
    """The engine's kernel configs decide (`"pdl"`: false, true or "late"); the QWENTRT_PDL environment variable
    (0, 1, late) overrides."""
    env = os.environ.get("QWENTRT_PDL")
    value = (kernel_configs or {}).get("pdl", False) if env is None else {"0": False, "late": "late"}.get(env, True)
    if value not in (True, False, "late"):
        raise ValueError(f'kernel config "pdl" must be true, false or "late", got {value!r}')
    _wanted["on"] = bool(value)
    _wanted["late"] = value == "late"


def late_trigger() -> bool:
    """The GEMV lets its dependents launch after its main loop, not at its start ("pdl": "late")."""
    return _wanted["late"]


@functools.lru_cache(maxsize=None)
def _device_has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Launch this call's kernels with PDL (and compile them with the waits)?"""
    return _wanted["on"] and TRITON_HAS_PDL and device.type == "cuda" and _device_has_pdl(device)


def launch_kwargs(device: torch.device) -> dict:
    """A kernel's launch keywords for PDL: its `PDL` constexpr, and `launch_pdl` where enabled (one check a launch:
    `kernel[grid](..., **pdl.launch_kwargs(x.device))`)."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


if TRITON_HAS_PDL:

    @triton.jit
    def start(PDL: tl.constexpr):
        """First thing in a small kernel launched with PDL: let the next kernel launch, then wait for the one
        before (nothing is read before it). No-op without PDL."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

    @triton.jit
    def wait(PDL: tl.constexpr):
        if PDL:
            gdc_wait()

    @triton.jit
    def launch_dependents(PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs, PDL: tl.constexpr):
        """Ask L2 for the lines of these addresses (prefetch.global.L2: no registers, no wait), under PDL only."""
        if PDL:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                      is_pure=False, pack=1)

elif triton is not None:  # the same names as no-ops, so kernels compile (and the interpreter runs) without PDL

    @triton.jit
    def start(PDL: tl.constexpr):
        pass

    @triton.jit
    def wait(PDL: tl.constexpr):
        pass

    @triton.jit
    def launch_dependents(PDL: tl.constexpr):
        pass

    @triton.jit
    def prefetch_l2(ptrs, PDL: tl.constexpr):
        pass
