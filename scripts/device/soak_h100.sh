#!/bin/bash
# The 10-minute soak on the H100 in two device calls (a call may run 10 minutes; the machine stays warm
# 30 s after one): PHASE=start synthesizes + builds the 4b engine (the H100-tuned kernel configs of
# scripts/device/h100_kernels.json) and starts `qwentrt soak` detached; PHASE=wait, called right after,
# waits for its report and prints it (files under $OUT).
set -uo pipefail
eval "$(bash .carry/setup.sh)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export QWENTRT_TRITONSERVER=$(command -v run-tritonserver)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${PHASE:-start}" = start ]; then
  python3 -m qwentrt.cli synth /tmp/ckpt-4b --preset 4b --force 2>&1 | tail -1
  python3 -m qwentrt.cli build /tmp/ckpt-4b -o /tmp/engine-4b --force --quiet --tune off --calib-samples 8 \
    --calib-seqlen 256 | head -2
  python3 -c "
import json; p='/tmp/engine-4b/engine.json'; e=json.load(open(p))
e['kernels']=json.load(open('scripts/device/h100_kernels.json')); json.dump(e, open(p,'w'), indent=1)"
  setsid nohup python3 -m qwentrt.cli soak /tmp/engine-4b --minutes ${MINUTES:-10} -c ${CONC:-256} \
    --json /tmp/soak.json > /tmp/soak.log 2>&1 < /dev/null &
  echo $! > /tmp/soak.pid
  sleep 5; echo "soak started (pid $(cat /tmp/soak.pid))"; tail -3 /tmp/soak.log
else
  [ -f /tmp/soak.pid ] || { echo "no soak started on this machine (it was not warm)"; exit 3; }
  for i in $(seq 1 ${WAIT_S:-585}); do
    [ -f /tmp/soak.json ] && ! kill -0 "$(cat /tmp/soak.pid)" 2>/dev/null && break
    kill -0 "$(cat /tmp/soak.pid)" 2>/dev/null || { echo "the soak process ended"; break; }
    sleep 1
  done
  tail -40 /tmp/soak.log; cp /tmp/soak.json /tmp/soak.log "$OUT/" 2>/dev/null
fi
