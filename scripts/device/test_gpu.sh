#!/bin/bash
# On the GPU machine (device tool), with .carry carried: the whole suite, the runtime tests again on
# cuda (float32), the gpu-marked tests (serving precision), and the demo served from the GPU.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QWENTRT_TRITONSERVER=$(command -v run-tritonserver)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tail -8
QWENTRT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_engine.py 2>&1 | tail -4
python3 -m qwentrt.cli synth /tmp/tiny --preset tiny --force >/dev/null 2>&1
python3 -m qwentrt.cli build /tmp/tiny -o /tmp/tiny-engine --force --quiet --calib-samples 4 --calib-seqlen 128 | head -4
python3 -m qwentrt.serving.demo /tmp/tiny-engine 2>&1 | tail -4
