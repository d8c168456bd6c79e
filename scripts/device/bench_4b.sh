#!/bin/bash
# On the GPU machine (device tool, carry [".carry"]), from the repo root: `qwentrt bench` on the 4B engine
# (Qwen3-4B-Instruct-2507's shape, random weights, INT4 AWQ + FP8 KV) against the HF peer.
#
# One device command may run 10 minutes, so the work is split into stages, one call each; the machine
# stays warm between calls and keeps /tmp (checkpoint, engine, every stage's results):
#   STAGE=build   synth /tmp/ckpt-4b and build /tmp/engine-4b (skipped when they exist)
#   STAGE=quick   a smoke test of every mode and the peer on a tiny grid (ISL 16, OSL 8, C 1,4)
#   STAGE=engine  engine-direct grid (LLMEngine in-process)
#   STAGE=served  the same grid through tritonserver + the gRPC client (PA=1: also perf_analyzer)
#   STAGE=peer    HF transformers generate, bf16, on the same weights
#   STAGE=report  all stages merged: one report.md / results.json / plots with the ratios
#   STAGE=all     everything in one call (only where no time limit applies)
# The grid: ISL, OSL, CONC (defaults 1000, 1000, 1,16,64,256); per point the bench keeps issuing
# requests for DURATION seconds (default 20; in-flight ones finish) and aborts what is left after
# POINT_TIMEOUT (default 150). More options: BENCH_ARGS. Each stage is interrupted after LIMIT seconds
# (default 520) and still writes what it measured. Files come back under $OUT/bench-<stage>/.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QWENTRT_TRITONSERVER=$(command -v run-tritonserver)
OUT=${OUT:-/tmp/out}
STAGE=${STAGE:-all}
ISL=${ISL:-1000} OSL=${OSL:-1000} CONC=${CONC:-1,16,64,256}
DURATION=${DURATION:-20} POINT_TIMEOUT=${POINT_TIMEOUT:-150} LIMIT=${LIMIT:-520}
CKPT=/tmp/ckpt-4b ENGINE=/tmp/engine-4b RUNS=/tmp/bench-4b
mkdir -p "$OUT" "$RUNS"

keep() {  # $1: a run folder -> $OUT/bench-<name>/ (report, gzipped results, plots, log: under 8 files)
  local src=$1 dst="$OUT/bench-$(basename "$1")"
  mkdir -p "$dst"
  for f in report.md throughput.png latency.png bench.log; do [ -f "$src/$f" ] && cp "$src/$f" "$dst/"; done
  [ -f "$src/results.json" ] && gzip -c "$src/results.json" > "$dst/results.json.gz"
  [ -f "$src/served/tritonserver.log" ] && tail -c 2000000 "$src/served/tritonserver.log" > "$dst/tritonserver.log"
  ls -la "$dst"
}

bench() {  # $1: stage name, then qwentrt bench options
  local name=$1; shift
  rm -rf "${RUNS:?}/$name"; mkdir -p "$RUNS/$name"
  [ -f "$ENGINE/engine.json" ] || { echo "no engine at $ENGINE: run STAGE=build first"; return 2; }
  timeout -s INT -k 60 "$LIMIT" python3 -m qwentrt.cli bench "$ENGINE" --isl "$ISL" --osl "$OSL" -c "$CONC" \
    --duration "$DURATION" --point-timeout "$POINT_TIMEOUT" -o "$RUNS/$name" "$@" ${BENCH_ARGS:-} \
    2> >(tee "$RUNS/$name/bench.log" >&2)
  echo "qwentrt bench exit $?"
  keep "$RUNS/$name"
}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ -f "$CKPT/config.json" ] || python3 -m qwentrt.cli synth "$CKPT" --preset 4b --force 2>&1 | tail -1
  # Random weights: calibration quality does not matter to speed, so a small calibration keeps it quick.
  [ -f "$ENGINE/engine.json" ] || python3 -m qwentrt.cli build "$CKPT" -o "$ENGINE" --force --quiet \
    --calib-samples "${CALIB:-8}" ${BUILD_ARGS:-}
  python3 -m qwentrt.cli info "$ENGINE"
}

case "$STAGE" in
  build) build ;;
  quick) ISL=16 OSL=8 CONC=1,4 DURATION=5 bench quick --mode both --peer hf --peer-checkpoint "$CKPT" ;;
  engine) bench engine --mode engine ;;
  served) bench served --mode served ${PA:+--perf-analyzer} ;;
  peer) bench peer --mode none --peer hf --peer-checkpoint "$CKPT" ;;
  report)
    runs=(); for s in engine served peer; do [ -f "$RUNS/$s/results.json" ] && runs+=("$RUNS/$s"); done
    python3 -m qwentrt.bench.merge "$RUNS/report" "${runs[@]}" && keep "$RUNS/report" ;;
  all)
    build && bench all --mode both --peer hf --peer-checkpoint "$CKPT" ${PA:+--perf-analyzer} ;;
  *) echo "STAGE must be build, engine, served, peer, report or all (got $STAGE)"; exit 2 ;;
esac
