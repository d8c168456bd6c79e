"""Served: the engine behind a real tritonserver (repository written, free ports), driven over gRPC by
the asyncio client at concurrency C, closed loop, with the engine runner's prompts. Lengths are forced
with min_tokens = max_tokens = OSL (the Triton interface has no ignore_eos), greedy. Times are the
client's: when each streamed response arrived."""

from __future__ import annotations

import secrets

import asyncio
import time
from pathlib import Path
from typing import Callable

from qwentrt.bench.grid import BenchConfig, Point
from qwentrt.bench.nvml import NvmlSampler
from qwentrt.bench.runner_engine import _error_text, brief
from qwentrt.bench.server_side import ServerSide
from qwentrt.bench.stats import RequestRecord, point_result
from qwentrt.bench.workload import WARMUP_OUTPUT_TOKENS, Prompts

Log = Callable[[str], None]


class Served:
    """tritonserver serving the engine for the length of a `with` block."""

    def __init__(self, cfg: BenchConfig, folder: Path, device: str):
        self.cfg, self.folder, self.device = cfg, folder, device
        self.server = None

    def __enter__(self) -> "Served":
        from qwentrt.serving.repository import write_repository
        from qwentrt.serving.server import ServerOptions, TritonServer, free_ports

        self.folder.mkdir(parents=True, exist_ok=True)
        repo = write_repository(self.cfg.engine_dir, self.folder / "model_repository", device=self.device,
                                params=self.cfg.served_params or None)
        self.api_key = secrets.token_urlsafe(16)  # perf_analyzer reads the model config (a restricted group)
        self.server = TritonServer(ServerOptions(repo, *free_ports(3),
                                                 restricted_key=self.api_key),
                                   log_file=self.folder / "tritonserver.log")
        self.server.start()
        try:
            self.server.wait_ready(("qwen3",), self.cfg.server_timeout_s)
        except BaseException:
            self.server.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return self.server.grpc_url

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


async def _closed_loop(url: str, n: int | None, duration: float | None, concurrency: int,
                       prompt: Callable[[int], str], osl: int, timeout: float,
                       records: list[RequestRecord] | None = None, state: dict | None = None
                       ) -> tuple[list[RequestRecord], float, float]:
    """Closed loop; returns (records, t0, window). `records` and `state["t0"]` fill as it runs."""
    from qwentrt.client.grpc_client import AsyncClient, GenerateParams, ServerError

    params = GenerateParams(max_tokens=osl, min_tokens=osl, temperature=0.0)
    records = [] if records is None else records
    state = {} if state is None else state
    state["issued"] = 0
    async with AsyncClient(url) as client:
        t0 = state["t0"] = time.perf_counter()
        deadline = t0 + timeout

        async def worker() -> None:
            while True:
                now = time.perf_counter() - t0
                i = state["issued"]
                if (duration is not None and now >= duration) or (duration is None and i >= n):
                    return
                if time.perf_counter() >= deadline:
                    return
                state["issued"] += 1
                text = prompt(i)
                rec = RequestRecord(i, time.perf_counter() - t0)
                records.append(rec)
                try:
                    async for d in client.stream(text, params=params,
                                                 timeout=max(0.001, deadline - time.perf_counter())):
                        rec.add(time.perf_counter() - t0, d.num_output_tokens - rec.output_tokens)
                        if d.num_input_tokens is not None:
                            rec.input_tokens = d.num_input_tokens
                        rec.finish_reason = d.finish_reason or rec.finish_reason
                    if rec.finish_reason == "error":
                        rec.error = "server: finish_reason error"
                except ServerError as e:
                    rec.error = str(e)[:500]
                except Exception as e:  # a client-side fault fails this request, not the point
                    rec.error = _error_text(e)
                rec.end = time.perf_counter() - t0

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    ends = [r.end for r in records if r.end is not None]
    return records, t0, (max(ends) if ends else time.perf_counter() - t0)


def run_point(cfg: BenchConfig, url: str, point: Point, sampler: NvmlSampler, metrics_url: str | None = None) -> dict:
    prompts = Prompts(point, cfg.seed)
    prompts.prefetch(point.num_requests if cfg.duration_s is None else 2 * point.concurrency)
    extra = {"num_requests": point.num_requests}
    try:
        c = point.concurrency
        for r in range(cfg.warmup):
            asyncio.run(_closed_loop(url, c, None, c, lambda i, r=r: prompts.warmup(r * c + i),
                                     min(point.osl, WARMUP_OUTPUT_TOKENS), cfg.point_timeout_s))
        mark = sampler.mark()
        records: list[RequestRecord] = []
        state: dict = {"t0": time.perf_counter()}
        server_side = ServerSide(metrics_url).start() if metrics_url else None
        try:
            records, t0, window = asyncio.run(_closed_loop(url, point.num_requests, cfg.duration_s, c,
                                                           prompts.measured, point.osl, cfg.point_timeout_s,
                                                           records, state))
        except KeyboardInterrupt:  # keep what the point measured, then stop the run
            if server_side is not None:
                extra["engine_side"] = server_side.stop()
            done = [r for r in records if r.end is not None and r.error is None]
            return point_result("served", point.isl, point.osl, c, done, time.perf_counter() - state["t0"],
                                sampler.summary(mark), cfg.price_per_gpu_hour,
                                error=None if done else "interrupted before a request finished", interrupted=True,
                                **extra)
        if server_side is not None:
            extra["engine_side"] = server_side.stop()
        gpu = sampler.summary(mark, t0 + window)
        return point_result("served", point.isl, point.osl, c, records, window, gpu, cfg.price_per_gpu_hour,
                            **extra)
    except Exception as e:
        return point_result("served", point.isl, point.osl, point.concurrency, [], None, None,
                            cfg.price_per_gpu_hour, error=_error_text(e), **extra)


def run(cfg: BenchConfig, points: list[Point], sampler: NvmlSampler, log: Log, on_result: Callable[[dict], None],
        device: str, out: Path) -> tuple[list[dict], dict | None]:
    """Every point through a server started once; then perf_analyzer's sweep when asked for.
    Returns (point results, perf_analyzer's outcome or None)."""
    results: list[dict] = []
    pa: dict | None = None
    try:
        log(f"served: starting tritonserver (log: {out / 'served' / 'tritonserver.log'})")
        with Served(cfg, out / "served", device) as served:
            log(f"served: ready at {served.url}")
            for p in points:
                log(f"served: {p.label}, {p.num_requests if cfg.duration_s is None else f'{cfg.duration_s:g} s of'} "
                    "requests")
                r = run_point(cfg, served.url, p, sampler, served.server.metrics_url)
                log("served:   " + brief(r))
                results.append(r)
                on_result(r)
                if r.get("interrupted"):
                    raise KeyboardInterrupt
            if cfg.perf_analyzer:
                pa = run_perf_analyzer(cfg, served.url, out / "perf_analyzer", log, served.api_key)
    except Exception as e:
        log(f"served: {_error_text(e)}")
        done = {(r["isl"], r["osl"], r["concurrency"]) for r in results}
        for p in points:
            if (p.isl, p.osl, p.concurrency) not in done:
                r = point_result("served", p.isl, p.osl, p.concurrency, [], None, None, cfg.price_per_gpu_hour,
                                 error=f"server: {_error_text(e)}", num_requests=p.num_requests)
                results.append(r)
                on_result(r)
        if cfg.perf_analyzer and pa is None:
            pa = {"status": "error", "error": f"no server: {_error_text(e)}"}
    return results, pa


def run_perf_analyzer(cfg: BenchConfig, url: str, out: Path, log: Log, api_key: str | None = None) -> dict:
    """perf_analyzer's streaming sweep over the same grid, kept beside the results (its CSVs and logs)."""
    import shutil

    from qwentrt.bench import perf_analyzer

    if shutil.which("perf_analyzer") is None:
        msg = ("perf_analyzer is not on PATH, skipped (pip install perf-analyzer, whose wheel needs glibc 2.38; "
               "on the GPU machine .carry/setup.sh puts it on PATH)")
        log(f"perf_analyzer: {msg}")
        return {"status": "skipped", "error": msg}
    runs = []
    for isl, osl in cfg.lengths:
        folder = out / f"isl{isl}_osl{osl}"
        log(f"perf_analyzer: ISL {isl} / OSL {osl}, concurrency {cfg.concurrency} -> {folder}")
        try:
            rows = perf_analyzer.run(url, folder, cfg.concurrency, isl, osl, measurement_ms=cfg.perf_analyzer_ms,
                                     api_key=api_key)
            runs.append({"isl": isl, "osl": osl, "dir": str(folder), "rows": rows})
        except Exception as e:
            runs.append({"isl": isl, "osl": osl, "dir": str(folder), "error": _error_text(e)})
            log(f"perf_analyzer: {_error_text(e)}")
    return {"status": "ok" if all("error" not in r for r in runs) else "partial", "runs": runs}
