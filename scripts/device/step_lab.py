"""Decode steps at a batch of B requests, as engine-direct sends them (ignore_eos) and as the served bench
sends them (min_tokens = max_tokens), in one process (GPU lab, not a test): ms per step, the part spent
waiting for the device and the host's part, and the calls inside step() that synchronize the stream
(torch.cuda.set_sync_debug_mode "warn", with the line that made each). With async scheduling a decode step
should wait for the device for most of its time; a step that waits ~0 and spends the GPU's time on the host has
a synchronizing call in it.

    python3 scripts/device/step_lab.py ENGINE_DIR [BATCH] [PROMPT_TOKENS]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, ".")
from qwentrt.config import SamplingParams  # noqa: E402
from qwentrt.engine.engine import LLMEngine  # noqa: E402
from qwentrt.engine.sampler import Sampler  # noqa: E402
from qwentrt.engine.transfer import to_device  # noqa: E402

ENGINE = sys.argv[1]
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 256
PROMPT = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
STEPS = 40
CUDA = torch.cuda.is_available()

eng = LLMEngine(ENGINE, allow_gpu_mismatch=True, max_batch_size=BATCH)
VARIANTS = {
    "ignore_eos (engine-direct)": SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
    "min_tokens = max_tokens (served)": SamplingParams(max_tokens=400, min_tokens=400, temperature=0.0),
    "served + end_id": SamplingParams(max_tokens=400, min_tokens=400, temperature=0.0, stop_token_ids=[151645]),
}


def run(name: str, params: SamplingParams, tag: str) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(BATCH):
        eng.add_request(f"{tag}{i}", prompt_ids=torch.randint(1000, 100000, (PROMPT,), generator=g).tolist(),
                        params=params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng._seqs.values()):
        eng.step()
    for _ in range(5):
        eng.step()
    wall, wait, cpu = [], [], []
    for _ in range(STEPS):
        w0, c0, t = eng.wait_seconds, eng.host_cpu_seconds, time.perf_counter()
        eng.step()
        wall.append((time.perf_counter() - t) * 1e3)
        wait.append((eng.wait_seconds - w0) * 1e3)
        cpu.append((eng.host_cpu_seconds - c0) * 1e3)
    syncs = []
    if CUDA:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    eng.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sorted({f"{w.filename.split('/qwentrt/')[-1]}:{w.lineno}" for w in caught
                        if "synchroniz" in str(w.message).lower()})
    med = statistics.median
    print(f"{name:34s} B {BATCH}: step {med(wall):6.2f} ms, device wait {med(wait):6.2f}, host "
          f"{med(wall) - med(wait):6.2f} (CPU {med(cpu):6.2f}); syncing calls in 3 steps: {syncs or 'none'}",
          flush=True)
    for seq in list(eng._seqs.values()):
        eng.abort(seq.request_id)
    while eng.has_unfinished():
        eng.step()


def hold_by_setitem(self, logits, seqs):
    """min_tokens as session 7 wrote it: `logits[rows, ids] = float("-inf")` (for comparison)."""
    groups = {}
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.min_tokens and seq.num_output_tokens + seq.num_pending < p.min_tokens:
            groups.setdefault(tuple(p.stop_token_ids), []).append(i)
    for extra, rows in groups.items():
        ids = to_device(self.eos_ids + list(extra), torch.long, logits.device)
        logits[to_device(rows, torch.long, logits.device)[:, None], ids[None, :]] = float("-inf")


for k, (name, params) in enumerate(VARIANTS.items()):
    run(name, params, f"v{k}-")
now = Sampler._hold_stop_tokens
Sampler._hold_stop_tokens = hold_by_setitem
run("served, min_tokens by setitem", VARIANTS["min_tokens = max_tokens (served)"], "old-")
Sampler._hold_stop_tokens = now
run("ignore_eos again", VARIANTS["ignore_eos (engine-direct)"], "again-")
