"""Where does the host time of a long eager prefill go? (H100 lab for the TTFT target, not a test.)

For a 2,048-token prompt (token ids: no tokenizer) at batch 1, on an engine already warm for that length:
- the tokenizer's time for a 2,048-token text prompt (what add_request adds when given text);
- step() wall time unsynchronized and with a synchronize after it (host vs device);
- the device work of the step alone (torch.profiler: sum of kernel times) and the 20 heaviest CPU ops;
- synchronizing calls made during the step (torch.cuda.set_sync_debug_mode "warn": each one is a warning);
- cProfile of one step: the 30 functions with the most own time, and the cumulative time of the callers
  that matter (Triton's launcher, torch ops, our kernels' wrappers).
Usage: python scripts/device/prefill_profile.py ENGINE_DIR [TOKENS]"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings

import torch

from qwentrt.bench.prompts import synthetic_prompt
from qwentrt.config import SamplingParams
from qwentrt.engine.engine import LLMEngine

ENGINE = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
eng = LLMEngine(ENGINE, allow_gpu_mismatch=True)
params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
seed = [100]
CUDA = eng.device.type == "cuda"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def prompt_ids():
    g = torch.Generator().manual_seed(seed[0])
    seed[0] += 1
    return torch.randint(1000, 100000, (N,), generator=g).tolist()


def first_step(profile=None):
    """add a fresh prompt, run the step that prefills it; -> host seconds of that step()."""
    eng.add_request(f"p{seed[0]}", prompt_ids=prompt_ids(), params=params)
    sync()
    t = time.perf_counter()
    if profile is not None:
        with profile:
            eng.step()
    else:
        eng.step()
    host = time.perf_counter() - t
    sync()
    wall = time.perf_counter() - t
    while eng.has_unfinished():
        eng.step()
    return host, wall


for _ in range(3):
    first_step()

text = synthetic_prompt(N, seed=5)
tok = []
for _ in range(5):
    t = time.perf_counter()
    eng.tokenizer.encode(text, add_special_tokens=False)
    tok.append((time.perf_counter() - t) * 1e3)
print(f"tokenize {N}-token text: median {statistics.median(tok):.1f} ms {[round(x, 1) for x in tok]}")
tok = []
for _ in range(5):
    t = time.perf_counter()
    eng.encode_prompt(text)
    tok.append((time.perf_counter() - t) * 1e3)
print(f"tokenize it in pieces (PromptEncoder): median {statistics.median(tok):.1f} ms {[round(x, 1) for x in tok]}")

runs = [first_step() for _ in range(5)]
print(f"prefill step() of {N} tokens: host {statistics.median(r[0] for r in runs) * 1e3:.1f} ms, host+sync "
      f"{statistics.median(r[1] for r in runs) * 1e3:.1f} ms (medians of 5) "
      f"{[(round(a * 1e3, 1), round(b * 1e3, 1)) for a, b in runs]}")

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if CUDA:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        first_step()
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
syncs = [str(w.message).splitlines()[0] for w in caught if "synchron" in str(w.message).lower()]
print(f"synchronizing calls in a prefill step (+ its drain): {len(syncs)}")
for s in sorted(set(syncs))[:10]:
    print("   ", s[:200])

from torch.profiler import ProfilerActivity, profile  # noqa: E402

prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
first_step(prof)
events = prof.key_averages()
gpu_us = sum(e.self_device_time_total for e in events)
print(f"device time of the step's kernels: {gpu_us / 1e3:.1f} ms")
print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))

pr = cProfile.Profile()
first_step(pr)
s = io.StringIO()
st = pstats.Stats(pr, stream=s)
st.sort_stats("tottime").print_stats(30)
st.sort_stats("cumulative").print_stats(40)
print("\n".join(line[:180] for line in s.getvalue().splitlines() if line.strip()))
