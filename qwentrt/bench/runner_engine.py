"""Engine-direct: an LLMEngine in this process, a closed loop keeping C requests in flight (a new one as
soon as one finishes), greedy, ignore_eos so that every output has OSL tokens. A token's time is when
the step that made it returned."""

from __future__ import annotations

import gc
import time
from typing import Callable

from qwentrt.bench.grid import BenchConfig, Point
from qwentrt.bench.nvml import NvmlSampler
from qwentrt.bench.server_side import engine_figures
from qwentrt.bench.stats import RequestRecord, point_result
from qwentrt.bench.workload import WARMUP_OUTPUT_TOKENS, Prompts
from qwentrt.config import SamplingParams

Log = Callable[[str], None]


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


class EngineRunner:
    def __init__(self, cfg: BenchConfig, sampler: NvmlSampler, log: Log, allow_gpu_mismatch: bool = False):
        from qwentrt.engine.engine import LLMEngine

        self.cfg, self.sampler, self.log = cfg, sampler, log
        self.engine = LLMEngine(cfg.engine_dir, device=cfg.device, allow_gpu_mismatch=allow_gpu_mismatch)
        self.device = self.engine.device
        self._ids = 0

    def close(self) -> None:
        import torch

        for rid in list(self.engine._seqs):
            self.engine.abort(rid)
        self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _rid(self) -> str:
        self._ids += 1
        return f"bench-{self._ids}"

    def _drain(self, in_flight: dict[str, RequestRecord], t0: float,
               why: str = "aborted: the point ran past --point-timeout") -> None:
        """Abort what is still running (after a timeout or a fault) so the next point starts empty."""
        now = time.perf_counter() - t0
        for rid, rec in in_flight.items():
            self.engine.abort(rid)
            if rec.error is None:
                rec.error = why
            rec.end = now
        in_flight.clear()

    def _loop(self, n: int | None, duration: float | None, concurrency: int, prompt: Callable[[int], str],
              params: SamplingParams, timeout: float, records: list[RequestRecord] | None = None
              ) -> tuple[list[RequestRecord], float, float]:
        """Closed loop; returns (records, t0, window seconds). `records` fills as requests are submitted
        (so that an interrupted loop's caller still has them); `self.t0` is the window's start."""
        engine = self.engine
        records = [] if records is None else records
        in_flight: dict[str, RequestRecord] = {}
        t0 = self.t0 = time.perf_counter()
        issued = 0

        def more(now: float) -> bool:
            return now < duration if duration is not None else issued < n

        try:
            while True:
                now = time.perf_counter() - t0
                while len(in_flight) < concurrency and more(now):
                    text = prompt(issued)
                    rid = self._rid()
                    rec = RequestRecord(issued, time.perf_counter() - t0)
                    issued += 1
                    records.append(rec)
                    engine.add_request(rid, text, params)  # RequestError: the whole point cannot run
                    in_flight[rid] = rec
                if not in_flight:
                    break
                outputs = engine.step()
                now = time.perf_counter() - t0
                for out in outputs:
                    rec = in_flight.get(out.request_id)
                    if rec is None:
                        continue
                    rec.add(now, out.num_output_tokens - rec.output_tokens)
                    rec.input_tokens = out.num_prompt_tokens
                    if out.finished:
                        rec.end, rec.finish_reason = now, out.finish_reason or ""
                        if out.error or out.finish_reason == "error":
                            rec.error = f"engine: {out.error or 'finish_reason error'}"
                        del in_flight[out.request_id]
                if now > timeout:
                    self._drain(in_flight, t0)
                    break
                if not outputs and not engine.has_unfinished() and in_flight:
                    for rec in in_flight.values():
                        rec.error = "engine: request vanished without a final output"
                    self._drain(in_flight, t0)
        except KeyboardInterrupt:
            self._drain(in_flight, t0, "aborted: the run was interrupted")
            raise
        finally:
            self._drain(in_flight, t0)
        ends = [r.end for r in records if r.end is not None]
        return records, t0, (max(ends) if ends else time.perf_counter() - t0)

    def run_point(self, point: Point) -> dict:
        import torch

        cfg = self.cfg
        prompts = Prompts(point, cfg.seed)
        prompts.prefetch(point.num_requests if cfg.duration_s is None else 2 * point.concurrency)
        cuda = self.device.type == "cuda"
        extra = {"num_requests": point.num_requests}
        try:
            if cfg.warmup:
                warm = SamplingParams(max_tokens=min(point.osl, WARMUP_OUTPUT_TOKENS), temperature=0.0,
                                      ignore_eos=True)
                for r in range(cfg.warmup):
                    c = point.concurrency
                    self._loop(c, None, c, lambda i, r=r, c=c: prompts.warmup(r * c + i), warm, cfg.point_timeout_s)
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            params = SamplingParams(max_tokens=point.osl, temperature=0.0, ignore_eos=True)
            mark = self.sampler.mark()
            records: list[RequestRecord] = []
            before, t_before = self.engine.stats(), time.perf_counter()
            try:
                records, t0, window = self._loop(point.num_requests, cfg.duration_s, point.concurrency,
                                                 prompts.measured, params, cfg.point_timeout_s, records)
                extra["engine_side"] = engine_figures(before, self.engine.stats(), time.perf_counter() - t_before)
            except KeyboardInterrupt:  # keep what the point measured, then stop the run
                window = time.perf_counter() - self.t0
                done = [r for r in records if r.end is not None]
                ok = any(r.error is None for r in done)
                return point_result("engine", point.isl, point.osl, point.concurrency, done, window,
                                    self.sampler.summary(mark), cfg.price_per_gpu_hour,
                                    error=None if ok else "interrupted before a request finished", interrupted=True,
                                    **extra)
            gpu = self.sampler.summary(mark, t0 + window)
            if cuda:
                gpu["torch_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            gpu["kv"] = self.engine.stats()
            return point_result("engine", point.isl, point.osl, point.concurrency, records, window, gpu,
                                cfg.price_per_gpu_hour, **extra)
        except Exception as e:  # OOM, a request the engine refuses, a kernel fault: record it, go on
            if cuda:
                torch.cuda.empty_cache()
            return point_result("engine", point.isl, point.osl, point.concurrency, [], None, None,
                                cfg.price_per_gpu_hour, error=_error_text(e), **extra)


def run(cfg: BenchConfig, points: list[Point], sampler: NvmlSampler, log: Log,
        on_result: Callable[[dict], None], allow_gpu_mismatch: bool = False) -> list[dict]:
    results = []
    try:
        log(f"engine: loading {cfg.engine_dir}")
        runner = EngineRunner(cfg, sampler, log, allow_gpu_mismatch)
    except Exception as e:
        log(f"engine: cannot load the engine: {_error_text(e)}")
        for p in points:
            r = point_result("engine", p.isl, p.osl, p.concurrency, [], None, None, cfg.price_per_gpu_hour,
                             error=f"engine did not load: {_error_text(e)}", num_requests=p.num_requests)
            results.append(r)
            on_result(r)
        return results
    try:
        for p in points:
            log(f"engine: {p.label}, {p.num_requests if cfg.duration_s is None else f'{cfg.duration_s:g} s of'} "
                "requests")
            r = runner.run_point(p)
            log("engine:   " + brief(r))
            results.append(r)
            on_result(r)
            if r.get("interrupted"):
                raise KeyboardInterrupt
    finally:
        runner.close()
    return results


def brief(r: dict) -> str:
    """One progress line for a point result."""
    if r["status"] == "error":
        return f"error: {r['error']}"
    s = r["summary"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"{s['ok']}/{s['requests']} ok, {fmt(s['output_tok_s'], '.1f')} tok/s, TTFT p50 "
            f"{fmt(s['ttft_ms']['p50'], '.1f')} ms, ITL p50 {fmt(s['itl_ms']['p50'], '.2f')} ms"
            + (f" [{r['status']}]" if r["status"] != "ok" else ""))
