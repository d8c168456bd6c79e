#!/bin/bash
# On the GPU machine, one call (carry [".carry"]): the kernel's GPU tests named by TESTS (a pytest -k
# expression), the paged-attention lab at 512 sequences (QUICK=1 attn_variants.py), then the bench of
# bench_h100.sh (synth + untuned build + the H100's kernel configs; its env: CONC, MODE, TTFT, PA, ...).
# Each part can be skipped: TESTS=, ATTN=0, BENCH=0.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_LIMIT:-120} python3 -m pytest -q -p no:cacheprovider -x tests/test_paged_attention_kernel.py -k "$TESTS" 2>&1 | tail -4
fi
if [ "${ATTN:-1}" = 1 ]; then
  QUICK=1 timeout ${ATTN_LIMIT:-120} python3 scripts/device/attn_variants.py ${ATTN_BATCH:-512} 2>&1 | tee $OUT/attn.log | tail -14
fi
[ "${BENCH:-1}" = 1 ] && bash scripts/device/bench_h100.sh
# ENGINE_LABS: ';'-separated commands run last, with the bench's engine at /tmp/engine-4b
# (e.g. "python3 scripts/device/prefill_profile.py /tmp/engine-4b"), LAB_LIMIT seconds each
if [ -n "${ENGINE_LABS:-}" ] && [ -f /tmp/engine-4b/engine.json ]; then
  IFS=';' read -ra LABS <<< "$ENGINE_LABS"
  for lab in "${LABS[@]}"; do echo "== $lab"; timeout ${LAB_LIMIT:-90} bash -c "$lab" 2>&1 | grep -v "Warning\|warn(" | tee -a $OUT/labs.log | tail -${LAB_LINES:-45}; done
fi
