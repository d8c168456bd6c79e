#!/bin/bash
# On the GPU machine (device tool), with .carry carried: the whole suite, the runtime tests again on
# cuda (float32), and the gpu-marked tests (serving precision).
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tail -6
QWENTRT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_engine.py 2>&1 | tail -6
