#!/bin/bash
# On the GPU machine, one call (carry [".carry"]): synth + build the 4b engine without tuning, take the
# kernel configs tuned on this H100 in an earlier build (scripts/device/h100_kernels.json, from
# `qwentrt build --tune`), then `qwentrt bench` engine-direct and served at 1000/1000 over the
# concurrency sweep, and perf_analyzer at concurrency 64 (PA=0 skips it; TTFT=1 adds the 2,048-token batch-1
# TTFT point). Results under $OUT/bench-*. Env: CONC (concurrency list), MODE (engine|served|both), DURATION,
# KERNELS (a kernel-config JSON instead of h100_kernels.json), BUILD_ARGS (e.g. "--max-batch-size 512"), BENCH_EXTRA, LIMIT1/2/3/4 (seconds per part).
# ENGINE_PROCESS=1 / 0: the served qwen3 model runs its engine loop in its own process / in a thread of the
# Triton stub (QWENTRT_ENGINE_PROCESS; unset: the model's default, a process on CUDA); ENGINE_PROCESS=both: the
# main bench with 1, then served-only with 0 at CONC_THREAD (default: CONC) into $OUT/bench-thread.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QWENTRT_TRITONSERVER=$(command -v run-tritonserver)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --tune off --calib-samples 8 \
  --calib-seqlen 256 ${BUILD_ARGS:-} | head -3
python3 - <<'PY'
import json
p = "/tmp/engine-4b/engine.json"
e = json.load(open(p))
import os
e["kernels"] = json.load(open(os.environ.get("KERNELS", "scripts/device/h100_kernels.json")))
json.dump(e, open(p, "w"), indent=1)
PY
keep() { mkdir -p "$OUT/$2"; cp "$1"/report.md "$1"/*.png "$OUT/$2/" 2>/dev/null; gzip -c "$1/results.json" > "$OUT/$2/results.json.gz"; }
case "${ENGINE_PROCESS:-}" in
  "") ;;
  both) export QWENTRT_ENGINE_PROCESS=1 ;;
  *) export QWENTRT_ENGINE_PROCESS=$ENGINE_PROCESS ;;
esac
timeout -s INT ${LIMIT1:-380} python3 -m qwentrt.cli bench /tmp/engine-4b --isl 1000 --osl 1000 -c ${CONC:-1,16,64,256} \
  --duration ${DURATION:-6} --point-timeout 120 --mode ${MODE:-both} ${BENCH_EXTRA:-} -o /tmp/bench-main 2>&1 | grep -v "Warning\|warn" | tail -40
keep /tmp/bench-main bench-main
if [ "${ENGINE_PROCESS:-}" = both ]; then  # the same load served with the engine loop in the stub's thread
  QWENTRT_ENGINE_PROCESS=0 timeout -s INT ${LIMIT4:-200} python3 -m qwentrt.cli bench /tmp/engine-4b --isl 1000 \
    --osl 1000 -c ${CONC_THREAD:-${CONC:-1,16,64,256}} --duration ${DURATION:-6} --point-timeout 120 --mode served \
    ${BENCH_EXTRA:-} -o /tmp/bench-thread 2>&1 | grep -v "Warning\|warn" | tail -20
  keep /tmp/bench-thread bench-thread
fi
if [ "${TTFT:-0}" = 1 ]; then  # the issue's TTFT point: a 2,048-token prompt at batch 1, engine-direct
  timeout -s INT ${LIMIT3:-120} python3 -m qwentrt.cli bench /tmp/engine-4b --isl 2048 --osl 16 -c 1 -n 8 --mode engine \
    -o /tmp/bench-ttft 2>&1 | grep -v "Warning\|warn" | tail -6
  keep /tmp/bench-ttft bench-ttft
fi
[ "${PA:-1}" = 0 ] || timeout -s INT ${LIMIT2:-130} python3 -m qwentrt.cli bench /tmp/engine-4b --isl 1000 --osl 200 -c 64 -n 64 --mode served \
  --perf-analyzer --perf-analyzer-ms 8000 -o /tmp/bench-pa 2>&1 | grep -v "Warning\|warn" | tail -25
keep /tmp/bench-pa bench-pa
for f in /tmp/bench-pa/perf_analyzer/*/*.log /tmp/bench-pa/perf_analyzer/*/*.csv; do [ -f "$f" ] && cp "$f" "$OUT/bench-pa/"; done; tail -5 /tmp/bench-pa/perf_analyzer/*/*.log 2>/dev/null
ls -R "$OUT" | head -30
