"""What the server itself says during a served point: its Prometheus metrics (the metrics port), scraped at
the start and end of the point and sampled in between, so that a served figure below the engine-direct one
says where the time went:

- engine tok/s (qwentrt_engine_tokens_total over the window) near engine-direct while the client sees less:
  the responses lag the engine (the Python backend's sender, the stub, the client);
- engine tok/s itself low with `running` near the concurrency: the engine steps slower behind the server
  (its host loop, the GIL, the engine process);
- `running` well under the concurrency: requests wait before the engine (queueing, slow adds).
"""

from __future__ import annotations

import threading
import time
import urllib.request

COUNTERS = ("qwentrt_engine_tokens_total", "qwentrt_engine_steps_total", "qwentrt_generated_tokens_total")
GAUGES = ("qwentrt_running", "qwentrt_waiting")


def parse(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Prometheus text exposition -> {name: value summed over its label sets} for the names asked for."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return values


def scrape(url: str, names: tuple[str, ...] = COUNTERS + GAUGES, timeout_s: float = 2.0) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return parse(r.read().decode("utf-8", "replace"), names)


class ServerSide:
    """Scrapes `url` now, every `every_s` until stop(), and at stop(); summary() gives the point's figures.
    Never raises: a server without these metrics gives an empty summary."""

    def __init__(self, url: str, every_s: float = 0.5):
        self.url, self.every_s = url, every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qwentrt-bench-server-side", daemon=True)

    def _take(self) -> None:
        try:
            self.samples.append((time.perf_counter(), scrape(self.url)))
        except Exception:  # noqa: BLE001 (the server may be busy or gone: figures are best effort)
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._take()

    def start(self) -> "ServerSide":
        self._take()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        self._take()
        return self.summary()

    def summary(self) -> dict:
        return summarize(self.samples)


def summarize(samples: list[tuple[float, dict[str, float]]]) -> dict:
    """Rates of the counters between the first and last sample, and the gauges' means over the samples."""
    if len(samples) < 2:
        return {}
    (t0, first), (t1, last) = samples[0], samples[-1]
    dt = t1 - t0
    out: dict = {"window_s": round(dt, 3), "samples": len(samples)}
    if dt <= 0:
        return out
    for name, key in (("qwentrt_engine_tokens_total", "engine_tok_s"), ("qwentrt_engine_steps_total", "engine_steps_s"),
                      ("qwentrt_generated_tokens_total", "sent_tok_s")):
        if name in first and name in last:
            out[key] = round((last[name] - first[name]) / dt, 1)
    for name, key in (("qwentrt_running", "mean_running"), ("qwentrt_waiting", "mean_waiting")):
        vals = [s[name] for _, s in samples if name in s]
        if vals:
            out[key] = round(sum(vals) / len(vals), 1)
    if out.get("engine_steps_s"):
        out["engine_ms_per_step"] = round(1000.0 / out["engine_steps_s"], 2)
    return out
