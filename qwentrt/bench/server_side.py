"""What the engine itself says during a point (results.json `engine_side`, report section "Where the engine's
time went"): in served runs its Prometheus metrics (the metrics port), scraped at the start and end of the
point and sampled in between; in engine-direct runs `LLMEngine.stats()` before and after. So a served figure
below the engine-direct one says where the time went:

- engine tok/s near engine-direct while the client sees less: the responses lag the engine (the Python
  backend's sender, the stub, the client);
- engine tok/s itself low: the engine steps slower behind the server; ms per step splits into waiting for the
  device, host work inside step(), and time outside step() (the loop around it: delivering outputs, the GIL);
  host CPU ms (the stepping thread's CPU time in step() outside the device wait) well below host ms means the
  thread was held up by something else (another thread's GIL, a CPU quota), not by its own work;
- `running` well under the concurrency: requests wait before the engine (queueing, slow adds, KV pages full).
"""

from __future__ import annotations

import threading
import time
import urllib.request

# Prometheus names -> the engine's stats() keys (LLMEngine.stats), so both modes share `engine_figures`
METRICS = {"qwentrt_engine_tokens_total": "engine_tokens", "qwentrt_engine_steps_total": "engine_steps",
           "qwentrt_engine_step_seconds_total": "engine_step_seconds",
           "qwentrt_engine_wait_seconds_total": "engine_wait_seconds",
           "qwentrt_engine_host_cpu_seconds_total": "engine_host_cpu_seconds",
           "qwentrt_generated_tokens_total": "sent_tokens", "qwentrt_running": "running", "qwentrt_waiting": "waiting"}
COUNTERS = tuple(k for k in METRICS if k.endswith("_total"))
GAUGES = tuple(k for k in METRICS if not k.endswith("_total"))


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
    """Scraped samples (Prometheus names) -> `engine_figures` between the first and the last, with the means
    of the gauges over all of them."""
    if len(samples) < 2:
        return {}
    keyed = [(t, {METRICS[k]: v for k, v in s.items() if k in METRICS}) for t, s in samples]
    (t0, first), (t1, last) = keyed[0], keyed[-1]
    out = {"samples": len(samples), **engine_figures(first, last, t1 - t0)}
    for key in ("running", "waiting"):
        vals = [s[key] for _, s in keyed if key in s]
        if vals:
            out[f"mean_{key}"] = round(sum(vals) / len(vals), 1)
    return out


def engine_figures(first: dict, last: dict, window_s: float) -> dict:
    """From two readings of the engine's counters (stats() keys) `window_s` apart: tokens and steps per second,
    and where a step's time goes: ms per step (the window over the steps), of which in step() waiting for the
    device (wait), in step() on the host (host), and outside step() (loop: delivering outputs, the caller)."""
    out: dict = {"window_s": round(window_s, 3)}
    if window_s <= 0:
        return out
    delta = {k: last[k] - first[k] for k in last if k in first and not k.startswith(("running", "waiting"))}
    if "engine_tokens" in delta:
        out["engine_tok_s"] = round(delta["engine_tokens"] / window_s, 1)
    if "sent_tokens" in delta:
        out["sent_tok_s"] = round(delta["sent_tokens"] / window_s, 1)
    steps = delta.get("engine_steps", 0)
    if steps > 0:
        out["engine_steps_s"] = round(steps / window_s, 2)
        out["ms_per_step"] = round(1000 * window_s / steps, 2)
        if "engine_step_seconds" in delta and "engine_wait_seconds" in delta:
            in_step, wait = delta["engine_step_seconds"], delta["engine_wait_seconds"]
            out["wait_ms_per_step"] = round(1000 * wait / steps, 2)
            out["host_ms_per_step"] = round(1000 * (in_step - wait) / steps, 2)
            out["loop_ms_per_step"] = round(1000 * (window_s - in_step) / steps, 2)
        if "engine_host_cpu_seconds" in delta:  # the host part's CPU time: below host ms, the thread was held up
            out["host_cpu_ms_per_step"] = round(1000 * delta["engine_host_cpu_seconds"] / steps, 2)
    return out
