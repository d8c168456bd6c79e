"""`qwentrt soak`: hold a mixed load on a served qwen3 for N minutes and report what drifts.

The load: `concurrency` clients, each sending one request after another: streamed generations of varied
prompt and output lengths, some cancelled mid-stream, some schema-guided JSON, some non-streamed. The
report: requests tried / accepted / rejected / completed / cancelled / failed / lost, errors by code,
TTFT percentiles in the first and the last window (p99 drift = last / first), throughput, and memory
over time: the server's resident memory (tritonserver and its Python-backend stub, when the process is
known) and GPU memory in use (NVML, when there is one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@dataclass
class SoakConfig:
    minutes: float = 10.0
    concurrency: int = 64
    prompt_tokens: tuple[int, int] = (16, 2048)  # drawn log-uniformly
    output_tokens: tuple[int, int] = (16, 512)
    cancel_fraction: float = 0.1  # streams cancelled after a few responses
    guided_fraction: float = 0.1  # schema-guided JSON
    unstreamed_fraction: float = 0.1
    window_fraction: float = 0.2  # first / last window for the drift figures
    sample_s: float = 5.0
    seed: int = 0
    request_timeout_s: float = 600.0


@dataclass
class Record:
    start_s: float  # since the soak began
    kind: str  # stream | cancel | guided | unstreamed
    outcome: str  # completed | cancelled | rejected | lost | a gRPC code
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0


@dataclass
class Sample:
    t_s: float
    server_rss_mb: float | None = None
    gpu_used_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def process_tree_rss_mb(pid: int) -> float | None:
    """Resident memory of a process and its descendants (tritonserver + its Python-backend stubs), MiB."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="utf-8") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            if p == pid:
                return None
    return total / 1024


class _Gpu:
    def __init__(self):
        self.handle = self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # no pynvml, no driver, no GPU
            pass

    def used_mb(self) -> float | None:
        if self.handle is None:
            return None
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20


def _server_metrics(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in body.splitlines():
        if line.startswith("qwentrt_") and 'model="qwen3"' in line and "_bucket" not in line:
            name = line.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "p50": round(q(0.5), 4), "p99": round(q(0.99), 4)}


async def _client_loop(client, cfg: SoakConfig, rng: random.Random, prompts: Callable[[int], str],
                       t0: float, stop_at: float, records: list[Record]) -> None:
    from qwentrt.client import GenerateParams, ServerError

    lo, hi = cfg.prompt_tokens
    while time.monotonic() < stop_at:
        r = rng.random()
        kind = ("cancel" if r < cfg.cancel_fraction else "guided" if r < cfg.cancel_fraction + cfg.guided_fraction
                else "unstreamed" if r < cfg.cancel_fraction + cfg.guided_fraction + cfg.unstreamed_fraction
                else "stream")
        n_in = int(round(lo * (hi / lo) ** rng.random()))
        n_out = rng.randint(*cfg.output_tokens)
        params = GenerateParams(max_tokens=n_out, temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(2**31))
        if kind == "guided":
            params.guide_type, params.guide, params.max_tokens = "json_schema", SCHEMA, min(n_out, 128)
        rec = Record(time.monotonic() - t0, kind, "lost")
        start = time.monotonic()
        stop_after = rng.randint(1, 4) if kind == "cancel" else None
        try:
            if kind == "unstreamed":
                g = await client.generate(prompts(n_in), params=params, timeout=cfg.request_timeout_s)
                rec.outcome = "completed" if g.finish_reason in ("length", "stop") else "lost"
                rec.ttft_s = g.timings.ttft_s
                rec.output_tokens = g.num_output_tokens
            else:
                responses = 0
                stream = client.stream(prompts(n_in), params=params, timeout=cfg.request_timeout_s)
                async with contextlib.aclosing(stream) as it:
                    async for delta in it:
                        responses += 1
                        if rec.ttft_s is None and delta.num_output_tokens:
                            rec.ttft_s = time.monotonic() - start
                        rec.output_tokens = delta.num_output_tokens
                        if delta.finish_reason in ("length", "stop"):
                            rec.outcome = "completed"
                        if stop_after is not None and responses >= stop_after and not delta.finish_reason:
                            rec.outcome = "cancelled"
                            break
        except ServerError as e:
            rec.outcome = "rejected" if e.code == "UNAVAILABLE" and rec.ttft_s is None else e.code
            if rec.outcome == "rejected":
                await asyncio.sleep(0.1)
        rec.e2e_s = time.monotonic() - start
        records.append(rec)


def run_soak(url: str, cfg: SoakConfig, metrics_url: str | None = None, server_pid: int | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Hold the load on the gRPC `url` for cfg.minutes; the report (a JSON-able dict)."""
    from qwentrt.bench.prompts import synthetic_prompt
    from qwentrt.client import AsyncClient

    pool: dict[int, list[str]] = {}

    def prompts(n: int) -> str:  # a few different prompts per length bucket (prefix caching stays realistic)
        bucket = max(1, n)
        if len(pool.setdefault(bucket, [])) < 3:
            pool[bucket].append(synthetic_prompt(bucket, seed=len(pool[bucket]) + 7 * bucket))
        return random.choice(pool[bucket])

    gpu = _Gpu()
    samples: list[Sample] = []
    records: list[Record] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while True:
            samples.append(Sample(round(time.monotonic() - t0, 1),
                                  process_tree_rss_mb(server_pid) if server_pid else None, gpu.used_mb(),
                                  _server_metrics(metrics_url)))
            done = len(records)
            log(f"soak: {samples[-1].t_s:7.0f} s  requests {done}  rss {samples[-1].server_rss_mb or 0:.0f} MiB  "
                f"gpu {samples[-1].gpu_used_mb or 0:.0f} MiB")
            if stop.wait(cfg.sample_s):
                return

    thread = threading.Thread(target=sampler, name="qwentrt-soak-sampler", daemon=True)
    thread.start()

    async def main() -> None:
        stop_at = time.monotonic() + 60 * cfg.minutes
        async with AsyncClient(url) as client:
            await asyncio.gather(*(_client_loop(client, cfg, random.Random(cfg.seed * 1000 + i), prompts, t0, stop_at,
                                                records) for i in range(cfg.concurrency)))

    asyncio.run(main())
    duration = time.monotonic() - t0
    stop.set()
    thread.join(timeout=10)
    samples.append(Sample(round(duration, 1), process_tree_rss_mb(server_pid) if server_pid else None, gpu.used_mb(),
                          _server_metrics(metrics_url)))
    return report(records, samples, cfg, duration, url)


def report(records: list[Record], samples: list[Sample], cfg: SoakConfig, duration: float, url: str) -> dict:
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    rejected = outcomes.get("rejected", 0)
    errors = {k: v for k, v in outcomes.items() if k not in ("completed", "cancelled", "rejected", "lost")}
    window = cfg.window_fraction * duration
    first = [r.ttft_s for r in records if r.ttft_s is not None and r.start_s < window]
    last = [r.ttft_s for r in records if r.ttft_s is not None and r.start_s >= duration - window]
    p_first, p_last = _percentiles(first), _percentiles(last)

    def series(key: str) -> dict:
        values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        if not values:
            return {"first": None, "last": None, "max": None, "growth": None}
        return {"first": round(values[0], 1), "last": round(values[-1], 1), "max": round(max(values), 1),
                "growth": round(values[-1] - values[0], 1)}

    # Memory after warm-up: the first sample is taken before the server has seen any load.
    warm = [s for s in samples if s.t_s >= window] or samples
    completed = [r for r in records if r.outcome == "completed"]
    return {
        "url": url, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "duration_s": round(duration, 1),
        "config": {k: v for k, v in asdict(cfg).items()},
        "requests": {"tried": len(records), "accepted": len(records) - rejected, "rejected": rejected,
                     "completed": outcomes.get("completed", 0), "cancelled": outcomes.get("cancelled", 0),
                     "failed": sum(errors.values()), "lost": outcomes.get("lost", 0)},
        "errors_by_code": errors,
        "by_kind": {k: sum(1 for r in records if r.kind == k) for k in ("stream", "cancel", "guided", "unstreamed")},
        "ttft_s": {"first_window": p_first, "last_window": p_last,
                   "p99_drift": round(p_last["p99"] / p_first["p99"], 3) if p_first["p99"] and p_last["p99"] else None,
                   "all": _percentiles([r.ttft_s for r in records if r.ttft_s is not None])},
        "throughput": {"completed_per_s": round(len(completed) / duration, 3),
                       "output_tok_per_s": round(sum(r.output_tokens for r in records) / duration, 1)},
        "memory": {"server_rss_mb": series("server_rss_mb"), "gpu_used_mb": series("gpu_used_mb"),
                   "server_rss_growth_after_warmup_mb": (round(warm[-1].server_rss_mb - warm[0].server_rss_mb, 1)
                                                         if warm and warm[0].server_rss_mb is not None
                                                         and warm[-1].server_rss_mb is not None else None)},
        "final_metrics": samples[-1].metrics if samples else {},
        "samples": [asdict(s) for s in samples],
    }


def write(report_: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_, indent=2) + "\n")
    return path


def summary(r: dict) -> str:
    q, t, m = r["requests"], r["ttft_s"], r["memory"]
    return (f"soak {r['duration_s']:.0f} s: tried {q['tried']}, accepted {q['accepted']}, rejected {q['rejected']}, "
            f"completed {q['completed']}, cancelled {q['cancelled']}, failed {q['failed']}, lost {q['lost']}; "
            f"errors {r['errors_by_code'] or 'none'}\n"
            f"TTFT p99 first window {t['first_window']['p99']} s, last {t['last_window']['p99']} s "
            f"(drift x{t['p99_drift']}); server RSS {m['server_rss_mb']}, GPU used {m['gpu_used_mb']} (MiB); "
            f"{r['throughput']['output_tok_per_s']} output tok/s")


def passed(r: dict) -> bool:
    """The soak's criterion: no accepted request lost, none failed."""
    return r["requests"]["lost"] == 0 and r["requests"]["failed"] == 0
