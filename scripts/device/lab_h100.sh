#!/bin/bash
# On the GPU machine, one call (carry [".carry"]): kernel labs that need no engine first (ATTN=1:
# attn_variants.py), then, if ENGINE_LABS is set, synth + build the 4b engine (no tuning; the H100's kernel
# configs from scripts/device/h100_kernels.json) and run each ';'-separated command of ENGINE_LABS with the
# engine at /tmp/engine-4b (e.g. "python3 scripts/device/prefill_profile.py /tmp/engine-4b").
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${ATTN:-0}" = 1 ]; then timeout ${ATTN_LIMIT:-200} python3 scripts/device/attn_variants.py ${ATTN_BATCH:-512} 2>&1 | tail -${ATTN_LINES:-60}; fi
[ -n "${ENGINE_LABS:-}" ] || exit 0
python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --tune off --calib-samples 8 \
  --calib-seqlen 256 ${BUILD_ARGS:-} | head -3
python3 -c "import json; p='/tmp/engine-4b/engine.json'; e=json.load(open(p)); e['kernels']=json.load(open('scripts/device/h100_kernels.json')); json.dump(e,open(p,'w'),indent=1)"
IFS=';' read -ra LABS <<< "$ENGINE_LABS"
for lab in "${LABS[@]}"; do echo "== $lab"; timeout ${LAB_LIMIT:-240} bash -c "$lab" 2>&1 | grep -v "Warning\|warn(" | tail -${LAB_LINES:-120}; done
