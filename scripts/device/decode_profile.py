"""Where does a batch-1 decode step's time go on the device? (GPU lab for the ITL target, not a test.)

One request decodes (CUDA graphs as the engine replays them); torch.profiler records STEPS steps' kernels. For
each step: the span from its first kernel's start to its last kernel's end, the sum of kernel durations in it,
and the idle time between kernels (span - busy: launch gaps, the host). Then per kernel family (name with the
Triton specialization suffix cut): calls a step, device us a step, mean us a call, share of the step; and the
distribution of the gaps between consecutive kernels. Env: STEPS (20), CTX (prompt tokens, 128), and any QWENTRT_*
setting to compare (QWENTRT_PDL=1, QWENTRT_GEMV_DEFERRED=1).

    python3 scripts/device/decode_profile.py ENGINE_DIR [OUT_JSON]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from qwentrt.config import SamplingParams  # noqa: E402
from qwentrt.engine.engine import LLMEngine  # noqa: E402

ENGINE = sys.argv[1]
OUT_JSON = sys.argv[2] if len(sys.argv) > 2 else None
STEPS = int(os.environ.get("STEPS", "20"))
CTX = int(os.environ.get("CTX", "128"))

eng = LLMEngine(ENGINE, allow_gpu_mismatch=True, max_batch_size=8)
g = torch.Generator().manual_seed(0)
eng.add_request("p0", prompt_ids=torch.randint(1000, 100000, (CTX,), generator=g).tolist(),
                params=SamplingParams(max_tokens=STEPS + 40, temperature=0.0, ignore_eos=True))
while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng._seqs.values()):
    eng.step()
for _ in range(10):
    eng.step()
torch.cuda.synchronize()

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(STEPS):
        eng.step()
    torch.cuda.synchronize()

kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.time_range.elapsed_us() > 0 and "Memcpy" not in e.name and "Memset" not in e.name),
                 key=lambda e: e.time_range.start)
memcpys = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" in e.name]
if not kernels:
    sys.exit("no kernels recorded (does this torch's profiler see CUDA-graph kernels?)")


def family(name: str) -> str:
    name = re.sub(r"_\d+d\d+d.*$|_[0-9a-f]{6,}$", "", name)  # Triton's specialization suffixes
    return name[:70]


# Steps: every step replays the same graph (and the same few kernels around it), so STEPS equal runs of kernels
# where the count divides; else split at the STEPS-1 largest gaps (the host's turns).
gaps = [b.time_range.start - a.time_range.end for a, b in zip(kernels, kernels[1:])]
if len(kernels) % STEPS == 0:
    per_step = len(kernels) // STEPS
    steps = [kernels[i:i + per_step] for i in range(0, len(kernels), per_step)]
else:
    print(f"{len(kernels)} kernels in {STEPS} steps: not equal runs; steps split at the largest gaps")
    cut = sorted(gaps)[-STEPS + 1]
    steps, cur = [], [kernels[0]]
    for k, gap in zip(kernels[1:], gaps):
        if gap >= cut:
            steps.append(cur)
            cur = []
        cur.append(k)
    steps.append(cur)

span = [s[-1].time_range.end - s[0].time_range.start for s in steps]
busy = [sum(k.time_range.elapsed_us() for k in s) for s in steps]
inner_gaps = [b.time_range.start - a.time_range.end for s in steps for a, b in zip(s, s[1:])]
between = [b[0].time_range.start - a[-1].time_range.end for a, b in zip(steps, steps[1:])]
med = statistics.median
print(f"GPU {torch.cuda.get_device_name()}; env: "
      f"{ {k: v for k, v in os.environ.items() if k.startswith('QWENTRT_')} }")
print(f"{len(steps)} steps, kernels a step {med(len(s) for s in steps)}: span {med(span):.1f} us, kernels busy "
      f"{med(busy):.1f} us, idle inside {med(span) - med(busy):.1f} us; between steps {med(between) if between else 0:.1f} us"
      f" (step period {med(span) + (med(between) if between else 0):.1f} us); memcpys in all {len(memcpys)}")
q = sorted(inner_gaps)
print(f"gaps between consecutive kernels (us): p10 {q[len(q) // 10]:.2f}, p50 {q[len(q) // 2]:.2f}, "
      f"p90 {q[9 * len(q) // 10]:.2f}, max {q[-1]:.2f}, sum a step {sum(q) / len(steps):.1f}")

per = defaultdict(lambda: [0, 0.0])
for s in steps:
    for k in s:
        per[family(k.name)][0] += 1
        per[family(k.name)][1] += k.time_range.elapsed_us()
n = len(steps)
rows = sorted(per.items(), key=lambda kv: -kv[1][1])
print(f"{'kernel':70s} {'calls':>6s} {'us/step':>9s} {'us/call':>8s} {'share':>6s}")
for name, (calls, us) in rows:
    print(f"{name:70s} {calls / n:6.1f} {us / n:9.1f} {us / calls:8.2f} {us / n / med(span):6.1%}")

# The GEMV calls by their duration (each shape's calls group together): the fixed cost shows as a floor.
by_dur = defaultdict(list)
for s in steps[-1:]:
    for k in s:
        by_dur[family(k.name)].append(round(k.time_range.elapsed_us(), 1))
for name, durs in by_dur.items():
    if len(durs) >= 36:
        print(f"{name[:50]:50s} last step's calls (us): {durs[:12]} ...")
if OUT_JSON:
    json.dump({"span_us": med(span), "busy_us": med(busy), "between_us": med(between) if between else 0,
               "kernels": {name: {"calls_per_step": c / n, "us_per_step": us / n} for name, (c, us) in rows},
               "env": {k: v for k, v in os.environ.items() if k.startswith("QWENTRT_")}},
              open(OUT_JSON, "w"), indent=1)
