#!/bin/bash
# On the GPU machine: synth the 4b checkpoint, a quick INT4-AWQ + FP8-KV build (small calibration), and
# one streamed generation through the runtime (torch reference kernels: correctness, not speed).
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -f /tmp/ckpt-4b/config.json ] || python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --calib-samples ${CALIB:-8} ${BUILD_ARGS:-} | head -3
python3 -m qwentrt.cli generate /tmp/engine-4b "Write a haiku about autumn." --max-tokens 64 --ignore-eos --seed 0
python3 -m qwentrt.cli generate /tmp/engine-4b "Give me a JSON object" --max-tokens 64 --json-schema scripts/device/person.schema.json --seed 0
nvidia-smi --query-gpu=memory.used --format=csv,noheader
