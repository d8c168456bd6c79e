#!/bin/bash
# On the GPU machine (device tool), from the repo root, with .carry carried:
#   synth the 4b checkpoint, build the INT4-AWQ + FP8-KV engine, report wall time, peak GPU memory
#   (torch's and the whole process's, sampled by nvidia-smi) and the engine's size; then the gpu tests.
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
(while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) > "$OUT/nvsmi_mem.txt" &
SAMPLER=$!
/usr/bin/time -f "synth wall %e s, max RSS %M KB" python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | grep -v "it/s\]" | tail -3
du -sh /tmp/ckpt-4b
/usr/bin/time -f "build wall %e s, max RSS %M KB" python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet ${BUILD_ARGS:-} 2>&1 | tee "$OUT/build.log"
kill $SAMPLER
echo "peak GPU memory used by the process (nvidia-smi, MiB): $(sort -n "$OUT/nvsmi_mem.txt" | tail -1)"
du -sh /tmp/engine-4b; ls -la /tmp/engine-4b
cp /tmp/engine-4b/engine.json "$OUT/engine.json"
python3 -m qwentrt.cli info /tmp/engine-4b
if [ -n "${GPU_TESTS:-}" ]; then python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -15; fi
