"""TTFT as `qwentrt bench` measures it, beside where its time goes (used by speed_check.py WHAT=ttft; runs on the
CPU too: `python scripts/device/ttft_probe.py ENGINE_DIR` with a CPU engine, for the logic only).

- bench_loop_ttft: the bench's own closed loop (qwentrt/bench/runner_engine.py EngineRunner._loop) at
  concurrency 1 over text prompts, optionally with the bench's NVML sampling thread: TTFT exactly as the bench
  computes it (perf_counter before add_request -> the step() that returned the first token).
- probe_ttft: the same sequence by hand (add_request(text), step() until an output has a token), with the host
  duration of each phase of each step() (schedule, runner.run and its model forward, sampler, the wait for the
  step in flight, bookkeeping) and, with sync=True, a device synchronize after add_request and after each step()
  (their wait = device work the host had not waited for: the "GPU tail"), plus allocator and GC counters over
  the request. Comparing the unsynchronized total with host + tails says whether host and device overlap.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.inflight import InFlightStep


def _cuda(eng) -> bool:
    return eng.device.type == "cuda"


def _sync(eng) -> None:
    if _cuda(eng):
        torch.cuda.synchronize(eng.device)


def finish_all(eng) -> None:
    while eng.has_unfinished():
        eng.step()


def bench_loop_ttft(eng, prompts: list[str], osl: int, nvml: bool = False, no_gc: bool = False) -> list[float]:
    """TTFT (ms) of each prompt through the bench's EngineRunner._loop at concurrency 1 (greedy, ignore_eos,
    max_tokens osl), the engine given (not a new one); no_gc: Python's cyclic GC off during the loop."""
    from qwentrt.bench.runner_engine import EngineRunner

    runner = EngineRunner.__new__(EngineRunner)  # its loop over our engine (its __init__ would load another)
    runner.engine, runner.device, runner._ids, runner.log = eng, eng.device, 0, print
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    sampler = None
    if nvml:
        from qwentrt.bench.nvml import NvmlSampler
        sampler = NvmlSampler(str(eng.device)).start()
    if no_gc:
        gc.collect()
        gc.disable()
    try:
        _sync(eng)
        records, _, _ = runner._loop(len(prompts), None, 1, lambda i: prompts[i], params, 600.0)
    finally:
        if no_gc:
            gc.enable()
        if sampler is not None:
            sampler.close()
    bad = [r.error for r in records if r.error]
    if bad:
        raise RuntimeError(f"the bench loop failed: {bad[0]}")
    return [r.ttft_s * 1e3 for r in records]


class StepPhases:
    """Host seconds per phase of each step() while `on`: wraps the engine's scheduler.schedule, runner.run,
    the model's forward, sampler.sample, InFlightStep.result (the wait for a step's tokens) and step itself."""

    PHASES = ("schedule", "run", "forward", "sample", "wait")

    def __init__(self, eng):
        self.eng, self.on, self.steps, self._undo = eng, False, [], []
        self._wrap(eng.scheduler, "schedule", "schedule")
        self._wrap(eng.runner, "run", "run")
        self._wrap(eng.runner.model, "forward", "forward")
        self._wrap(eng.sampler, "sample", "sample")
        self._wrap(InFlightStep, "result", "wait", cls=True)

    def _wrap(self, owner, name: str, label: str, cls: bool = False) -> None:
        original = getattr(owner, name)
        probe = self

        def timed(*args, **kwargs):
            if not probe.on or not probe.steps:
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                cur = probe.steps[-1]
                cur[label] = cur.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append((owner, name, original, cls))

    def close(self) -> None:
        for owner, name, original, cls in reversed(self._undo):
            if cls:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance attribute: the class's method shows again

    def step(self) -> tuple[list, dict]:
        self.steps.append({})
        t = time.perf_counter()
        outs = self.eng.step()
        self.steps[-1]["total"] = time.perf_counter() - t
        return outs, self.steps[-1]


def _alloc_counters(eng) -> dict[str, int]:
    if not _cuda(eng):
        return {}
    s = torch.cuda.memory_stats(eng.device)
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {k: int(s.get(k, 0)) for k in keys}


def probe_ttft(eng, prompt: str, osl: int, sync: bool) -> dict:
    """One request: add_request(prompt) then step() until an output carries its first token. -> ms figures:
    ttft, add, per step() the host phases (+ the synchronize wait after it, with sync), allocator and GC
    counters over the request."""
    phases = StepPhases(eng)
    gcs = []

    def on_gc(phase, info):
        gcs.append((info.get("generation", -1), time.perf_counter()))

    gc.callbacks.append(on_gc)
    before = _alloc_counters(eng)
    rid = f"probe-{time.monotonic_ns()}"
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    steps, tails = [], []
    try:
        _sync(eng)
        phases.on = True
        t0 = time.perf_counter()
        eng.add_request(rid, prompt, params)
        t_add = time.perf_counter() - t0
        add_tail = 0.0
        if sync:
            t = time.perf_counter()
            _sync(eng)
            add_tail = time.perf_counter() - t
        while True:
            outs, cur = phases.step()
            done = any(o.request_id == rid and o.token_ids for o in outs)
            ttft = time.perf_counter() - t0
            steps.append(cur)
            if sync:
                t = time.perf_counter()
                _sync(eng)
                tails.append(time.perf_counter() - t)
            if done or not eng.has_unfinished() or len(steps) > 16:
                break
        phases.on = False
    finally:
        gc.callbacks.remove(on_gc)
        phases.close()
    after = _alloc_counters(eng)
    finish_all(eng)
    gc_ms = sum(b[1] - a[1] for a, b in zip(gcs[::2], gcs[1::2])) * 1e3
    return {"ttft_ms": ttft * 1e3, "add_ms": t_add * 1e3, "add_sync_ms": add_tail * 1e3,
            "steps": [{k: v * 1e3 for k, v in s.items()} for s in steps], "sync_ms": [x * 1e3 for x in tails],
            "alloc": {k: after[k] - before[k] for k in after}, "gc_collections": len(gcs) // 2, "gc_ms": gc_ms,
            "gc_max_generation": max((g for g, _ in gcs), default=-1)}


def describe(r: dict) -> str:
    parts = [f"TTFT {r['ttft_ms']:.1f} ms = add {r['add_ms']:.1f}"]
    if r["sync_ms"]:
        parts[0] += f" (+sync {r['add_sync_ms']:.1f})"
    for i, s in enumerate(r["steps"]):
        inner = ", ".join(f"{k} {s[k]:.1f}" for k in StepPhases.PHASES if k in s)
        rest = s["total"] - sum(s.get(k, 0.0) for k in ("schedule", "run", "sample", "wait"))
        txt = f"step{i + 1} {s['total']:.1f} ({inner}, other {rest:.1f})"
        if r["sync_ms"]:
            txt += f" +sync {r['sync_ms'][i]:.1f}"
        parts.append(txt)
    tail = f"; gc {r['gc_collections']} ({r['gc_ms']:.1f} ms, oldest generation {r['gc_max_generation']})"
    if r["alloc"]:
        tail += "; allocator " + ", ".join(f"{k.removeprefix('num_')} +{v}" for k, v in r["alloc"].items())
    return " | ".join(parts) + tail


def ttft_report(eng, lengths=(1000, 2048), osls=(1, 64), repeats: int = 5, nvml: bool = True,
                prompt: Callable[[int, int], str] | None = None, out: dict | None = None) -> dict:
    """Everything above for each prompt length: the bench loop (OSL each of `osls`, NVML off and on), then the
    probe unsynchronized and synchronized (OSL the largest of `osls`). Prints as it goes; -> figures."""
    from qwentrt.bench.prompts import synthetic_prompt

    prompt = prompt or (lambda n, seed: synthetic_prompt(n, seed=seed))
    res = {} if out is None else out
    seed = 9000
    for n in lengths:
        def fresh(k):  # distinct prompts: no prefix-cache hits
            nonlocal seed
            seed += k
            return [prompt(n, seed - k + i) for i in range(k)]

        bench_loop_ttft(eng, fresh(1), 2)  # warm-up of this length's shapes
        for osl in osls:
            for use_nvml in ((False, True) if nvml else (False,)):
                ttfts = bench_loop_ttft(eng, fresh(repeats), osl, nvml=use_nvml)
                key = f"ttft_bench_loop_{n}_osl{osl}{'_nvml' if use_nvml else ''}_ms"
                res[key] = statistics.median(ttfts)
                print(f"TTFT {n}-token text prompt, the bench's loop (C 1, OSL {osl}, NVML sampler "
                      f"{'on' if use_nvml else 'off'}): median {res[key]:.1f} ms {[round(x, 1) for x in ttfts]}",
                      flush=True)
        ttfts = bench_loop_ttft(eng, fresh(repeats), max(osls), no_gc=True)
        key = f"ttft_bench_loop_{n}_osl{max(osls)}_nogc_ms"
        res[key] = statistics.median(ttfts)
        print(f"TTFT {n}-token text prompt, the bench's loop (C 1, OSL {max(osls)}, Python GC off): median "
              f"{res[key]:.1f} ms {[round(x, 1) for x in ttfts]}", flush=True)
        for sync in (False, True):
            runs = [probe_ttft(eng, p, max(osls), sync) for p in fresh(repeats)]
            key = f"ttft_probe_{n}_{'sync' if sync else 'async'}"
            res[key] = runs
            med = statistics.median(r["ttft_ms"] for r in runs)
            print(f"TTFT {n}-token text prompt, by hand, OSL {max(osls)}, "
                  f"{'synchronized after each call' if sync else 'unsynchronized'}: median {med:.1f} ms", flush=True)
            for r in runs:
                print("   " + describe(r), flush=True)
    return res


if __name__ == "__main__":
    import sys

    from qwentrt.engine.engine import LLMEngine

    engine = LLMEngine(sys.argv[1], allow_gpu_mismatch=True)
    ttft_report(engine, lengths=(64,), osls=(1, 4), repeats=2, nvml=False)
