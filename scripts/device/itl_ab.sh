#!/bin/bash
# On the GPU machine (carry [".carry"]), after an engine exists at /tmp/engine-4b (bench_h100.sh builds one): the
# batch-1 decode (ITL) and a short prompt's TTFT under each of several environment settings, each in a fresh process,
# in turn, ROUNDS times (A B A B ...: a host that changes speed between processes shows as spread, not as a
# difference). Env: VARIANTS (';'-separated, each a space-separated list of VAR=VALUE; default: PDL off / on),
# ROUNDS (2), ISL (128), OSL (256), N (4 requests a process), LIMIT (seconds a process).
#   VARIANTS="QWENTRT_PDL=0;QWENTRT_PDL=1" bash scripts/device/itl_ab.sh
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
IFS=';' read -ra variants <<< "${VARIANTS:-QWENTRT_PDL=0;QWENTRT_PDL=1}"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for i in "${!variants[@]}"; do
    v=${variants[$i]}
    dir=/tmp/itl-ab-$round-$i
    env $v timeout -s INT "${LIMIT:-60}" python3 -m qwentrt.cli bench /tmp/engine-4b --isl "${ISL:-128}" \
      --osl "${OSL:-256}" -c 1 -n "${N:-4}" --mode engine -o "$dir" > "$dir.log" 2>&1
    line=$(grep "^| engine | ${ISL:-128}" "$dir/report.md" 2>/dev/null | head -1)
    # columns: TTFT p50 ($7), ITL p50 ($9), ITL p99 ($10)
    echo "round $round [$v]: $(echo "$line" | awk -F'|' '{printf "TTFT p50 %s ms, ITL p50 %s ms, ITL p99 %s ms", $7, $9, $10}')"
    [ -n "$line" ] || tail -3 "$dir.log"
    cp "$dir/report.md" "$OUT/itl-ab-$round-$i.md" 2>/dev/null
  done
done
