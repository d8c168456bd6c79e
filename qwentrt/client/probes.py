"""Load probes: many concurrent streamed generations, then latency percentiles and throughput.

>>> records = asyncio.run(run_probe("localhost:8001", n=200, concurrency=32, prompt_len=512, output_len=128))
>>> print(format_table(summarize(records)))
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from qwentrt.bench.prompts import synthetic_prompt
from qwentrt.client.grpc_client import AsyncClient, GenerateParams, ServerError

def percentiles(values: Sequence[float], ps: Sequence[float] = (50, 90, 99)) -> dict[float, float]:
    """{p: value} with linear interpolation; NaN for no values."""
    if len(values) == 0:
        return {p: math.nan for p in ps}
    return {p: float(v) for p, v in zip(ps, np.percentile(np.asarray(values, dtype=float), ps))}


@dataclass
class ProbeRecord:
    """One request of a probe. Times in seconds; `start`/`end` are time.perf_counter readings."""

    start: float
    end: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None  # "CODE: message" when the request failed


async def run_probe(url: str, n: int, concurrency: int, prompt_len: int | None = 128,
                    output_len: int = 128, prompts: Sequence[str] | None = None,
                    model: str = "qwen3", params: GenerateParams | None = None,
                    timeout: float | None = None) -> list[ProbeRecord]:
    """Send `n` streamed generations, at most `concurrency` at a time.

    Prompts: `prompts` (cycled) if given, else synthetic ones of exactly `prompt_len` tokens (each request
    its own, so they share no cached prefix). Lengths are
    forced with min_tokens = max_tokens = output_len (there is no ignore_eos input); pass `params`
    to override (its max_tokens/min_tokens are then replaced by output_len)."""
    gen = replace(params or GenerateParams(), max_tokens=output_len, min_tokens=output_len)
    sem = asyncio.Semaphore(concurrency)

    async def one(client: AsyncClient, i: int) -> ProbeRecord:
        prompt = prompts[i % len(prompts)] if prompts else synthetic_prompt(prompt_len or 1, seed=i)
        async with sem:
            start = time.perf_counter()
            try:
                g = await client.generate(prompt, params=gen, timeout=timeout)
            except ServerError as e:
                return ProbeRecord(start, time.perf_counter(), error=str(e))
            t = g.timings
            return ProbeRecord(start, t.end, t.ttft_s, t.inter_token_s, t.e2e_s, g.num_input_tokens,
                               g.num_output_tokens, g.finish_reason)

    async with AsyncClient(url, model) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(n))))


def summarize(records: Sequence[ProbeRecord], wall_s: float | None = None) -> dict:
    """Percentiles of TTFT, ITL and E2E in ms (over successful requests; ITL over all their tokens),
    output tokens/s and requests/s over `wall_s` (default: first start to last end), error count."""
    ok = [r for r in records if r.error is None]
    if wall_s is None:
        wall_s = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    ms = lambda xs: {f"p{p:g}": v * 1e3 for p, v in percentiles(xs).items()}  # noqa: E731
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            code = r.error.split(":", 1)[0]
            errors[code] = errors.get(code, 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_codes": errors,
        "wall_s": wall_s,
        "ttft_ms": ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else math.nan,
        "requests_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "mean_input_tokens": float(np.mean([r.input_tokens for r in ok if r.input_tokens is not None] or [math.nan])),
        "mean_output_tokens": out_tokens / len(ok) if ok else math.nan,
    }


def format_table(summary: dict) -> str:
    """The summary as a table (rich if installed, else aligned plain text)."""
    lat = [(name, summary[key]) for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))]
    cols = list(lat[0][1])  # p50, p90, p99
    footer = (f"{summary['ok']}/{summary['requests']} ok, {summary['errors']} errors"
              + (f" {summary['error_codes']}" if summary["error_codes"] else "")
              + f"; {summary['output_tok_s']:.1f} output tok/s, {summary['requests_s']:.2f} req/s"
              + f" over {summary['wall_s']:.2f} s")
    try:
        import io

        from rich.console import Console
        from rich.table import Table
    except ImportError:
        rows = [["latency (ms)", *cols]] + [[name, *(f"{v[c]:.2f}" for c in cols)] for name, v in lat]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join(lines + [footer])
    table = Table(title="latency (ms)")
    table.add_column("")
    for c in cols:
        table.add_column(c, justify="right")
    for name, v in lat:
        table.add_row(name, *(f"{v[c]:.2f}" for c in cols))
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=False).print(table)
    return buf.getvalue().rstrip() + "\n" + footer
