#!/bin/bash
# On the GPU machine (carry [".carry"]), after an engine exists at /tmp/engine-4b: the TTFT point (2,048-token
# prompt, batch 1, engine-direct) REPEAT times in fresh processes, each request's TTFT listed, to tell a noisy
# host from a slow engine (session 9 saw 38.8 and 53.7 ms medians in two runs back to back). Env: REPEAT, N, LIMIT,
# ISL (prompt tokens, default 2048), TAG (report name prefix); QWENTRT_PREFILL_GRAPHS=0 runs the prefill eagerly.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for i in $(seq 1 ${REPEAT:-3}); do
  timeout -s INT ${LIMIT:-80} python3 -m qwentrt.cli bench /tmp/engine-4b --isl ${ISL:-2048} --osl 16 -c 1 -n ${N:-16} \
    --mode engine -o /tmp/bench-ttft-$i 2>&1 | grep "ok,"
  python3 - /tmp/bench-ttft-$i/results.json <<'PY'
import json, sys
def walk(o):
    if isinstance(o, dict):
        if "ttft_s" in o and "token_times" in o:
            yield o
        for v in o.values():
            yield from walk(v)
    elif isinstance(o, list):
        for v in o:
            yield from walk(v)
reqs = sorted(walk(json.load(open(sys.argv[1]))), key=lambda r: r["index"])
print("  TTFT ms by request:", " ".join(f"{r['ttft_s'] * 1e3:.1f}" for r in reqs if r["ttft_s"] is not None))
PY
  grep "^| engine | ${ISL:-2048}" /tmp/bench-ttft-$i/report.md | tail -1
  cp /tmp/bench-ttft-$i/report.md "$OUT/ttft-${TAG:-}$i.md"
done
