"""Host time per engine step at steady-state decode, with the model stubbed out so only host work is timed.

    python scripts/host_overhead.py                       # batch 64 and 256, CUDA-graph path emulated
    python scripts/host_overhead.py --batch 256 --eager   # the eager (non-graph) input path instead
    python scripts/host_overhead.py --batch 0 64 --prefill 2048   # prefill / mixed steps (eager path)
    python scripts/host_overhead.py --batch 0 --prefill 2048 --real-model   # ... with the tiny model's forward

Builds the tiny CPU engine the tests use (cached under --cache), replaces the model's forward and logits
by stubs (logits: a bank of random [batch, --vocab] rows, so tokens vary and the detokenizer does real
work) and, unless --eager, emulates the CUDA-graph decode path on the CPU (the static input buffers are
filled exactly as on the GPU; replay is a no-op). All requests are admitted and prefilled, then
--steps pure-decode steps are timed (ignore_eos, long max_tokens).

--prefill N: every timed step also admits a new request of N prompt tokens (max_tokens 1, fresh random ids:
no prefix-cache hits), so each step is a mixed step (the --batch decodes plus one N-token prefill; --batch 0:
a lone prefill), which runs the eager path. --real-model keeps the tiny engine's model (its CPU forward, torch
reference kernels: compute included, 2 layers) instead of the stub, and reports its forward as "model" and
the lm_head as "logits" (input prep is then the runner's run() minus both).

Prints milliseconds per step: schedule, input prep (host inputs, block tables, tensors; the runner's
whole run() minus the stubbed model), sampler, bookkeeping (mark computed, append, detokenize, stop
checks, outputs: the rest of step()), and their sum (host). Device work on the CPU (the sampler's argmax
over [batch, --vocab], ~0.45 ms at 256 x 2048) is inside "sampler". With --gpu-ms, each step also takes
that long on a simulated device: "wait" is the time step() waits for it, "total" the wall time per step,
"gpu idle" = total - gpu-ms, the host time left on the critical path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwentrt.config import BuildConfig, SamplingParams  # noqa: E402
from qwentrt.engine.engine import LLMEngine  # noqa: E402

FAST = BuildConfig(calib_samples=4, calib_seqlen=128, awq_grid=10, device="cpu", max_seq_len=4096,
                   target="sm_89", tune="off")


def tiny_engine(cache: Path) -> Path:
    from qwentrt.engine.build import build
    from qwentrt.synth import synth

    out = cache / "tiny-awq"
    if not (out / "engine.json").is_file():
        ckpt = cache / "tiny-ckpt"
        if not (ckpt / "config.json").is_file():
            synth(ckpt, "tiny", seed=0, progress=False, force=True)
        build(ckpt, out, FAST, progress=False, log=lambda *_: None)
    return out


STAT = "median"


class Timer:
    def __init__(self):
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.on = False

    def wrap(self, owner, name: str, label: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self.on:
                    self.ms[label].append((time.perf_counter() - t) * 1e3)

        setattr(owner, name, timed)


class StubModel:
    """The model's forward and logits, free: logits rows come from a fixed random bank."""

    def __init__(self, max_rows: int, vocab: int, banks: int = 8):
        g = torch.Generator().manual_seed(0)
        self.bank = torch.randn(banks, max_rows, vocab, generator=g)
        self.lm_head = torch.empty(vocab, 0)  # its shape sizes DecodeGraphs' logits buffer
        self.i = 0

    def next_logits(self, n: int) -> torch.Tensor:
        self.i += 1
        return self.bank[self.i % len(self.bank), :n].clone()  # the sampler may edit logits in place

    def __call__(self, input_ids, meta, kv_caches):  # (a fresh row per sequence that samples)
        return torch.empty(len(meta.logits_indices), 1)

    def compute_logits(self, hidden, out=None):
        logits = self.next_logits(hidden.shape[0])
        return logits if out is None else out.copy_(logits)


class FakeGraph:
    """Stands for a captured CUDA graph: replay() publishes the next bank of logits as the graph's output."""

    def __init__(self, graphs, bs: int, stub: StubModel):
        self.graphs, self.bs, self.stub = graphs, bs, stub

    def replay(self):
        self.graphs.logits_out[:self.bs].copy_(self.stub.next_logits(self.bs))


def emulate_graphs(engine: LLMEngine, stub: StubModel) -> None:
    from qwentrt.engine.cuda_graphs import DecodeGraphs

    runner = engine.runner
    graphs = DecodeGraphs(stub, runner.kv_caches, engine.max_batch_size, runner.max_pages, runner.device)
    for bs in graphs.sizes:
        graphs.graphs[bs] = FakeGraph(graphs, bs, stub)
    runner.graphs = graphs


class SimulatedGPU:
    """--gpu-ms: each launched step takes that long on a pretend device, queued after the one before; waiting
    for a step's tokens sleeps until it is done. Shows what async scheduling hides: the wall time per step
    is ~max(host, GPU) with it, host + GPU without."""

    def __init__(self, engine: LLMEngine, ms: float, timer: "Timer"):
        from qwentrt.engine.inflight import InFlightStep

        self.seconds, self.busy_until = ms / 1e3, 0.0
        launch = engine._launch

        def launched(batch):
            step = launch(batch)
            start = max(time.perf_counter(), self.busy_until)
            self.busy_until = step.done_at = start + self.seconds
            return step

        engine._launch = launched
        self.cls, self.result = InFlightStep, InFlightStep.result

        def result(step):
            time.sleep(max(0.0, getattr(step, "done_at", 0.0) - time.perf_counter()))
            return self.result(step)

        InFlightStep.result = result
        timer.wrap(InFlightStep, "result", "wait")

    def close(self) -> None:
        self.cls.result = self.result


def measure(engine_dir: Path, batch: int, steps: int, prompt_len: int, vocab: int, eager: bool,
            sampling: bool, async_scheduling: bool | None, gpu_ms: float = 0.0, prefill: int = 0,
            real_model: bool = False, served: bool = False) -> dict[str, float]:
    block = 32
    pages = batch * (-(-(prompt_len + steps + 64) // block) + 1) + 2 * (-(-prefill // block) + 1)
    kw = {} if async_scheduling is None else {"async_scheduling": async_scheduling}
    engine = LLMEngine(engine_dir, device="cpu", dtype=torch.float32, allow_gpu_mismatch=True, num_blocks=pages,
                       max_batch_size=batch + (2 if prefill else 0), max_num_tokens=max(8192, batch + prefill), **kw)
    timer = Timer()
    if real_model:
        vocab = engine.config.model.vocab_size
        timer.wrap(engine.runner.model, "forward", "model")
        timer.wrap(engine.runner.model, "compute_logits", "logits")
    else:
        stub = StubModel(max(batch, 8) + 2, vocab)
        engine.runner.model = stub
        if not eager:
            emulate_graphs(engine, stub)
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "run", "input prep")
    if hasattr(engine.sampler, "sample"):
        timer.wrap(engine.sampler, "sample", "sampler")
    else:  # __call__ is looked up on the type: put a timed wrapper in front of the sampler
        inner = engine.sampler
        engine.sampler = type("TimedSampler", (), {"__call__": lambda self, *a, **k: self.fn(*a, **k)})()
        engine.sampler.fn = inner.__call__
        timer.wrap(engine.sampler, "fn", "sampler")
    timer.wrap(engine, "step", "total")
    gpu = SimulatedGPU(engine, gpu_ms, timer) if gpu_ms else None
    params = SamplingParams(max_tokens=3000, ignore_eos=not served, min_tokens=3000 if served else 0,
                            temperature=0.8 if sampling else 0.0, top_p=0.95 if sampling else 1.0)
    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        engine.add_request(f"r{i}", params=params, prompt_ids=torch.randint(0, vocab, (prompt_len,), generator=g).tolist())
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine._seqs.values()) or \
            len(engine.scheduler.running) < batch:
        engine.step()
    for _ in range(5):  # warm-up decodes
        engine.step()
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=params.temperature, top_p=params.top_p)
    timer.on = True
    for i in range(steps):
        if prefill:
            engine.add_request(f"p{i}", params=one, prompt_ids=torch.randint(0, vocab, (prefill,), generator=g).tolist())
        engine.step()
    timer.on = False
    if gpu is not None:
        gpu.close()
    assert batch <= len(engine.scheduler.running) <= batch + bool(prefill) and not engine.scheduler.waiting
    stat = statistics.median if STAT == "median" else min
    med = {k: stat(v) for k, v in timer.ms.items()}
    med.setdefault("wait", 0.0)
    if real_model:
        med["input prep"] -= med["model"] + med["logits"]
    med["bookkeeping"] = (med["total"] - med["schedule"] - med["input prep"] - med["sampler"] - med["wait"]
                          - med.get("model", 0.0) - med.get("logits", 0.0))
    med["host"] = med["total"] - med["wait"]
    med["gpu idle"] = med["total"] - gpu_ms if gpu_ms else 0.0
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3, help="runs per batch size; the fastest run is shown")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=2048, help="columns of the stub logits")
    ap.add_argument("--eager", action="store_true", help="the eager input path instead of the CUDA-graph one")
    ap.add_argument("--sampling", action="store_true", help="temperature 0.8, top_p 0.95 instead of greedy")
    ap.add_argument("--served", action="store_true",
                    help="requests as the served bench sends them: min_tokens = max_tokens instead of ignore_eos")
    ap.add_argument("--sync", action="store_true", help="turn async scheduling off (where the engine has it)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per column over the timed steps; min is steadier on a busy machine")
    ap.add_argument("--gpu-ms", type=float, default=0.0,
                    help="pretend each step takes this long on a device (SimulatedGPU): adds wall and GPU-idle columns")
    ap.add_argument("--prefill", type=int, default=0,
                    help="each timed step also prefills a new prompt of this many tokens (mixed / prefill steps)")
    ap.add_argument("--real-model", action="store_true",
                    help="keep the tiny model's CPU forward (timed as 'model') instead of the stub")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qwentrt-host-overhead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    global STAT
    STAT = args.stat
    engine_dir = tiny_engine(args.cache)
    cols = ["schedule", "input prep"] + (["model", "logits"] if args.real_model else []) + ["sampler", "bookkeeping", "host"]
    if args.gpu_ms:
        cols += ["wait", "total", "gpu idle"]
    path = "eager" if args.eager or args.prefill else "cuda-graph (emulated)"
    kind = f"mixed step (decodes + one {args.prefill}-token prefill)" if args.prefill else "decode step"
    print(f"host ms per {kind} ({args.stat} of {args.steps}, best of {args.repeat} runs), {path} path, "
          f"{'sampling' if args.sampling else 'greedy'}, prompt {args.prompt_len}, "
          f"async scheduling {'off' if args.sync else 'as the engine defaults'}"
          + (f", simulated GPU step {args.gpu_ms} ms" if args.gpu_ms else ""))
    print(f"{'batch':>6} " + " ".join(f"{c:>12}" for c in cols))
    for b in args.batch:
        runs = [measure(engine_dir, b, args.steps, args.prompt_len, args.vocab, args.eager, args.sampling,
                        False if args.sync else None, args.gpu_ms, args.prefill, args.real_model, args.served)
                for _ in range(args.repeat)]
        med = min(runs, key=lambda m: m["host"])  # (a shared machine: the least disturbed run)
        print(f"{b:>6} " + " ".join(f"{med[c]:>12.2f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
