"""One request's timings as every runner records them, and a point's summary: percentiles of TTFT,
ITL and end-to-end latency, throughput over the measured window, and cost per million output tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One measured request. Times are seconds since the start of its point's measured window (a
    time.perf_counter reading): `arrival` when it was submitted, `token_times[i]` when the i-th output
    carrying tokens arrived with `token_counts[i]` new tokens, `end` when it finished."""

    index: int
    arrival: float
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None

    def add(self, t: float, new_tokens: int) -> None:
        if new_tokens > 0:
            self.token_times.append(t)
            self.token_counts.append(new_tokens)
            self.output_tokens += new_tokens

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft_s(self) -> float | None:
        return None if not self.token_times else self.token_times[0] - self.arrival

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.arrival

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last token - first token) / (tokens - 1)."""
        if self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return inter_token_gaps(self.token_times, self.token_counts)

    def to_dict(self) -> dict:
        """As JSON keeps it: times rounded to the microsecond (a 256 x 1000-token point stays a few MB)."""
        us = lambda t: None if t is None else round(t, 6)  # noqa: E731
        return {"index": self.index, "arrival": us(self.arrival), "end": us(self.end), "ttft_s": us(self.ttft_s),
                "e2e_s": us(self.e2e_s), "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "finish_reason": self.finish_reason, "error": self.error,
                "token_times": [us(t) for t in self.token_times], "token_counts": self.token_counts}


def inter_token_gaps(times: Sequence[float], counts: Sequence[int]) -> list[float]:
    """One gap per token after the first (len = tokens - 1): an output carrying k tokens after a gap g
    counts k gaps of g / k; extra tokens of the first output count 0 (they came with it). Thus the mean
    gap is the time per output token, (last - first) / (tokens - 1)."""
    if not counts:
        return []
    out = [0.0] * (counts[0] - 1)
    for prev, t, k in zip(times, times[1:], counts[1:]):
        out += [(t - prev) / k] * k
    return out


def percentiles(values: Sequence[float], ps: Sequence[float] = PERCENTILES) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ...} (numpy, linear interpolation); None when empty."""
    if len(values) == 0:
        return {**{f"p{p:g}": None for p in ps}, "mean": None}
    arr = np.asarray(values, dtype=float)
    return {**{f"p{p:g}": float(v) for p, v in zip(ps, np.percentile(arr, ps))}, "mean": float(arr.mean())}


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    return {k: (None if v is None else v * 1e3) for k, v in percentiles(values).items()}


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float | None) -> float | None:
    """Money per million output tokens when one GPU at `price_per_hour` makes `tokens_per_s`."""
    if not tokens_per_s or tokens_per_s <= 0 or not math.isfinite(tokens_per_s):
        return None
    return price_per_hour / 3600.0 / tokens_per_s * 1e6


def summarize(records: Sequence[RequestRecord], window_s: float | None = None) -> dict:
    """A point's figures. Latencies over the requests that finished without error (ITL over all their
    tokens); throughput = output tokens (of every request, finished or not) / the measured window,
    which runs from the first submission to the last finish unless `window_s` is given."""
    ok = [r for r in records if r.error is None and r.end is not None]
    if window_s is None:
        ends = [r.end for r in records if r.end is not None]
        window_s = (max(ends) - min(r.arrival for r in records)) if ends else 0.0
    out_tokens = sum(r.output_tokens for r in records)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            key = r.error.split(":", 1)[0][:60]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "window_s": window_s,
        "ttft_ms": _ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _ms([g for r in ok for g in r.itl_s]),
        "tpot_ms": _ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": _ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / window_s if window_s > 0 else None,
        "requests_s": len(ok) / window_s if window_s > 0 else None,
        "mean_input_tokens": float(np.mean([r.input_tokens for r in ok if r.input_tokens is not None]))
        if any(r.input_tokens is not None for r in ok) else None,
        "mean_output_tokens": (sum(r.output_tokens for r in ok) / len(ok)) if ok else None,
        # outputs (responses) that carried tokens: below mean_output_tokens when several tokens share one
        "mean_outputs_per_request": float(np.mean([len(r.token_counts) for r in ok])) if ok else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def point_result(mode: str, isl: int, osl: int, concurrency: int, records: Sequence[RequestRecord],
                 window_s: float | None, gpu: dict | None, price_per_gpu_hour: float,
                 error: str | None = None, **extra) -> dict:
    """Everything one point of one mode produced: its summary, GPU figures, cost, status and records.
    status: "ok" (every request finished), "partial" (some failed or were cut off) or "error"."""
    records = list(records)
    summary = summarize(records, window_s) if records else None
    gpu = dict(gpu or {})
    tok_s = summary["output_tok_s"] if summary else None
    tokens = summary["output_tokens"] if summary else 0
    energy = gpu.get("energy_j")
    gpu["j_per_token"] = energy / tokens if energy is not None and tokens else None
    if error is None and summary is not None and summary["ok"] == 0:
        error = "no request finished: " + ", ".join(f"{k} x{v}" for k, v in summary["error_kinds"].items())
    status = "error" if error is not None or summary is None else ("ok" if summary["errors"] == 0 else "partial")
    return {"mode": mode, "isl": isl, "osl": osl, "concurrency": concurrency, "status": status, "error": error,
            "summary": summary, "gpu": gpu,
            "cost_per_mtok": cost_per_million_tokens(price_per_gpu_hour, tok_s) if status != "error" else None,
            **extra, "records": [r.to_dict() for r in records]}
