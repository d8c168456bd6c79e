#!/bin/bash
# On the GPU machine: kernel tests, kernel timings, and batch-1 decode of the 4b engine end to end.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_w4a16_kernel.py tests/test_paged_attention_kernel.py \
  tests/test_gpu_engine.py -k "not interpreted" 2>&1 | tail -3
python3 scripts/device/bench_kernels.py 2>&1 | grep -v "^paged attention decode"
python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --calib-samples 8 | head -2
python3 -m qwentrt.cli generate /tmp/engine-4b "Write a haiku about autumn." --raw --max-tokens 128 --ignore-eos --seed 0 >/dev/null
