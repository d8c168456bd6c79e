"""On the GPU machine: quick engine-level speed and correctness checks of the 4b engine (working tool for
issue 5; user-facing figures come from `qwentrt bench`). Prints and writes $OUT/speed.json:
graphs-vs-eager agreement, batch-1 decode ITL (graphs and eager), TTFT of a 2,048-token prompt (bare, then
1,000 and 2,048-token text prompts through the bench's loop and by hand with a per-step breakdown: ttft_probe.py),
the 36 layers' linears at 1 token under a CUDA graph, closed-batch throughput with async scheduling off and
on, and a profile of one decode step (top kernels)."""

import gc
import json
import os
import statistics
import sys
import time

import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.engine import LLMEngine
from qwentrt.engine.tuning import time_in_graph

ENGINE = sys.argv[1]
WHAT = set((sys.argv[2] if len(sys.argv) > 2 else "agree,itl,ttft,linears,profile,throughput").split(","))
OUT = os.environ.get("OUT", "/tmp")
res: dict = {"gpu": torch.cuda.get_device_name()}


def save():
    with open(os.path.join(OUT, "speed.json"), "w") as f:
        json.dump(res, f, indent=1)


def rand_prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 100000, (n,), generator=g).tolist()


def free(engine):
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def timed_steps(eng, sync=True):
    """Seconds per step; sync=False leaves the GPU queue alone (async scheduling overlaps consecutive steps:
    a step's time is then its share of the wall time)."""
    times = []
    while eng.has_unfinished():
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        for o in outs:
            if o.finish_reason == "error":
                raise RuntimeError(f"step fault in the measurement: {o.error}")
    return times


if "agree" in WHAT:  # one decode step through the CUDA graph vs eager, same cache state
    eng = LLMEngine(ENGINE, num_blocks=512, max_batch_size=16, async_scheduling=False)  # no tokens in flight below
    for i, n in enumerate((20, 77, 300)):
        eng.add_request(f"a{i}", prompt_ids=rand_prompt(n, i),
                        params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for _ in range(4):
        eng.step()
    batch = eng.scheduler.schedule()
    graphed = eng.runner.run(batch, eng.block_manager)[0].clone()
    graphs, eng.runner.graphs = eng.runner.graphs, None
    eager = eng.runner.run(batch, eng.block_manager)[0]
    r = float((graphed - eager).norm() / eager.norm())
    res["graph_vs_eager_decode_logits_rel"] = r
    print(f"graph vs eager decode logits: rel {r:.2e}, argmax equal {(graphed.argmax(-1) == eager.argmax(-1)).tolist()}",
          flush=True)
    free(eng)
    save()

eng = LLMEngine(ENGINE)
print("engine ready:", eng.runner.num_blocks, "pages; graphs", eng.runner.graphs.sizes if eng.runner.graphs else None,
      flush=True)
res["kv_tokens"] = eng.runner.num_blocks * eng.runner.block_size
k = eng.config.kernels
print("kernels: tuned", k.get("tuned"), "gemv up to", k.get("w4a16_gemv_max_tokens"), "tokens, dequantize+cuBLAS from",
      k.get("w4a16_prefill_min_tokens"), flush=True)

if "itl" in WHAT:
    for mode in ("graphs", "eager"):
        graphs = eng.runner.graphs
        if mode == "eager":
            eng.runner.graphs = None
        eng.add_request(f"itl-{mode}", prompt_ids=rand_prompt(128, 7), params=SamplingParams(
            max_tokens=200, temperature=0.0, ignore_eos=True))
        # gaps between the steps that returned tokens (with async scheduling a step() returns as soon as
        # the next step is queued, so its own duration is host time, not the token interval)
        stamps = []
        while eng.has_unfinished():
            if any(o.token_ids for o in eng.step()):
                stamps.append(time.perf_counter())
        times = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        eng.runner.graphs = graphs
        res[f"itl_batch1_{mode}_ms"] = statistics.median(times) * 1e3
        print(f"batch-1 decode ITL ({mode}): median {statistics.median(times) * 1e3:.3f} ms, "
              f"p90 {sorted(times)[int(len(times) * .9)] * 1e3:.3f} ms", flush=True)
    save()

if "ttft" in WHAT:
    ttfts = []
    for i in range(6):
        eng.add_request(f"ttft-{i}", prompt_ids=rand_prompt(2048, 100 + i), params=SamplingParams(max_tokens=1))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        ttfts.append(time.perf_counter() - t)
    res["ttft_2048_ms"] = statistics.median(ttfts[1:]) * 1e3
    print(f"TTFT 2048-token prompt, batch 1: median {res['ttft_2048_ms']:.1f} ms ({[round(x*1e3,1) for x in ttfts]})",
          flush=True)
    save()
    # As `qwentrt bench` measures it (text prompt, add_request, step() until the first token, its own loop, its
    # NVML thread), then by hand with the host time of each phase of each step() and a synchronized breakdown
    # (ttft_probe.py). TTFT_OSL=1,64,1000 adds the bench's C 1 point's OSL (slow: 3 s of decode per request).
    from ttft_probe import ttft_report
    osls = tuple(int(x) for x in os.environ.get("TTFT_OSL", "1,64").split(","))
    ttft_report(eng, lengths=(1000, 2048), osls=osls, repeats=int(os.environ.get("TTFT_REPEATS", "5")), out=res)
    save()

if "linears" in WHAT:
    layers = eng.runner.model.layers
    cfg = eng.config.model
    for m in (1, 8, 16, 32, 64, 128, 256):
        xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in (cfg.hidden_size, cfg.q_size,
                                                                                  cfg.intermediate_size)}

        def run_all():
            for layer in layers:
                layer.qkv_proj(xs[cfg.hidden_size])
                layer.o_proj(xs[cfg.q_size])
                layer.gate_up_proj(xs[cfg.hidden_size])
                layer.down_proj(xs[cfg.intermediate_size])
        ms = time_in_graph(run_all, replays=20)
        res[f"linears_graph_ms_m{m}"] = ms
        print(f"36 layers' linears at {m} tokens, CUDA graph: {ms:.3f} ms", flush=True)
    save()

if "profile" in WHAT:
    from torch.profiler import ProfilerActivity, profile
    for batch in (1, 64):
        for i in range(batch):
            eng.add_request(f"prof-{batch}-{i}", prompt_ids=rand_prompt(200, 1000 + i),
                            params=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        for _ in range(8):
            eng.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eng.step()
            torch.cuda.synchronize()
        print(f"--- profile, batch {batch}, 5 decode steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        while eng.has_unfinished():
            eng.step()

if "prefill_profile" in WHAT:  # where a 2,048-token prefill's time goes (TTFT)
    from torch.profiler import ProfilerActivity, profile
    eng.add_request("pp-warm", prompt_ids=rand_prompt(2048, 77), params=SamplingParams(max_tokens=1))
    while eng.has_unfinished():
        eng.step()
    eng.add_request("pp", prompt_ids=rand_prompt(2048, 78), params=SamplingParams(max_tokens=1))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print(f"--- profile, one 2,048-token prefill ({wall * 1e3:.1f} ms under the profiler)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))

if "hostprof" in WHAT:  # where the host time of an eager (prefill) step goes: cProfile, by own time
    import cProfile
    import pstats
    for n in (16, 2048):
        eng.add_request(f"hp-warm-{n}", prompt_ids=rand_prompt(n, 90 + n), params=SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        eng.add_request(f"hp-{n}", prompt_ids=rand_prompt(n, 91 + n), params=SamplingParams(max_tokens=1))
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        while eng.has_unfinished():
            eng.step()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- host profile, one {n}-token prefill step: {(time.perf_counter() - t) * 1e3:.1f} ms wall")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)

if "throughput" in WHAT:
    for conc, isl, osl in ((64, 1000, 300), (256, 1000, 300)):
        for overlap in (False, True):  # async scheduling off / on (qwentrt/engine/inflight.py)
            eng.async_scheduling = overlap
            p = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
            for i in range(conc):
                eng.add_request(f"tp-{conc}-{int(overlap)}-{i}", prompt_ids=rand_prompt(isl, 5000 + conc * 1000 + i),
                                params=p)
            torch.cuda.synchronize()
            t = time.perf_counter()
            steps = timed_steps(eng, sync=False)
            wall = time.perf_counter() - t
            tok = conc * osl
            decode = sorted(steps)[len(steps) // 2]
            name = "async" if overlap else "sync"
            res[f"throughput_c{conc}_isl{isl}_osl{osl}_{name}"] = {
                "wall_s": wall, "out_tok_s": tok / wall, "median_step_ms": decode * 1e3, "steps": len(steps)}
            print(f"closed batch of {conc} x ({isl} in, {osl} out), {name} scheduling: {tok / wall:.0f} out tok/s, "
                  f"wall {wall:.1f} s, median step {decode * 1e3:.2f} ms ({conc / decode:.0f} tok/s at that step)",
                  flush=True)
    save()
print(json.dumps(res))
