#!/bin/bash
# On the GPU machine (device tool), with .carry carried: synth the 4b checkpoint, a quick INT4-AWQ +
# FP8-KV build, the kernel/runtime GPU tests, then scripts/device/speed_check.py (WHAT= selects parts).
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -x $TESTS 2>&1 | tail -${TEST_LINES:-8} &
  TESTPID=$!
fi
[ -f /tmp/ckpt-4b/config.json ] || python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
[ -n "${TESTS:-}" ] && wait $TESTPID  # not while tuning: the timings must have the GPU to themselves
[ -f /tmp/engine-4b/engine.json ] || python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force \
  --calib-samples 8 --calib-seqlen 256 ${BUILD_ARGS:-} 2>&1 | grep -v "it/s\|s/it\|awq \|layers:" | tail -${BUILD_LINES:-60}
if [ -n "${KERNELS:-}" ]; then  # kernel configs tuned earlier on this GPU model (e.g. scripts/device/h100_kernels.json)
  python3 -c "import json,sys; p='/tmp/engine-4b/engine.json'; e=json.load(open(p)); e['kernels']=json.load(open(sys.argv[1])); json.dump(e,open(p,'w'),indent=1)" "$KERNELS"
fi
cp /tmp/engine-4b/engine.json "$OUT/engine.json"
python3 scripts/device/speed_check.py /tmp/engine-4b ${WHAT:-agree,itl,ttft,linears,profile,throughput} 2>&1 | grep -v Warning
