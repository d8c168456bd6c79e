#!/bin/bash
# One GPU call (carry [".carry"]): GPU tests, a fast 4b engine with h100_kernels.json (or $KERNELS), the decode
# profile under each of $PROFILE_VARIANTS, and itl_ab.sh over $VARIANTS. Env: TESTS (0 skips), TEST_FILES, TEST_K, LINEARS=1 (the 144
# GEMVs of a step in one graph, linears_step_lab.py), STREAM=1 (stream_lab.py: the persistent GEMV, read floors;
# $OUT/stream_lab.log, $OUT/kernels-stream.json), WORDS_LAB=1 (gemv_words_lab.py with $LAB_* and
# KERNELS_OUT=$OUT/kernels.json), ENGINE (0: no engine, no profile, no A/B), OUT.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_w4a16_kernel.py tests/test_gpu_engine.py} \
    -m gpu ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -12
fi
[ "${LINEARS:-0}" = 1 ] && VARIANTS=${LINEAR_VARIANTS:-0:as built;0:deferred;0:deferred:tiled;late:deferred;late:deferred:tiled} timeout 150 python3 scripts/device/linears_step_lab.py 2>&1 | tail -12
[ "${STREAM:-0}" = 1 ] && OUT=$OUT STREAM_OUT=$OUT/kernels-stream.json timeout ${STREAM_LIMIT:-330} python3 scripts/device/stream_lab.py 2>&1 | tee "$OUT/stream_lab.log" | grep -v "^  " | tail -30
[ "${WORDS_LAB:-0}" = 1 ] && KERNELS_OUT=$OUT/kernels.json timeout ${LAB_LIMIT:-240} python3 scripts/device/gemv_words_lab.py 2>&1 | tail -40
[ "${ENGINE:-1}" = 1 ] || exit 0
python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --tune off --calib-samples 2 \
  --calib-seqlen 128 --awq-grid 2 2>&1 | tail -1
python3 - <<'PY'
import json, os
p = "/tmp/engine-4b/engine.json"
e = json.load(open(p))
e["kernels"] = json.load(open(os.environ.get("KERNELS", "scripts/device/h100_kernels.json")))
json.dump(e, open(p, "w"), indent=1)
PY
IFS=';' read -ra pv <<< "${PROFILE_VARIANTS:-QWENTRT_PDL=0}"
for i in "${!pv[@]}"; do
  echo "== decode profile [${pv[$i]}]"
  env ${pv[$i]} timeout 90 python3 scripts/device/decode_profile.py /tmp/engine-4b "$OUT/profile-$i.json" 2>&1 \
    | grep -v "Warning\|warn" | head -${PROFILE_LINES:-45}
done
[ -n "${VARIANTS:-}" ] && OUT=$OUT bash scripts/device/itl_ab.sh
true
