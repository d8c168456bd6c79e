"""Memory attribution for soaks (diagnostics only: tracemalloc slows the process down).

With QWENTRT_MEMTRACE=<dir> in tritonserver's environment, the qwen3 model's stub starts tracemalloc and
writes <dir>/memtrace-<pid>.txt every QWENTRT_MEMTRACE_S seconds (default 60), each report replacing the
last: resident memory (anonymous / file / shared), glibc's heap (in use vs free: free-but-kept memory
is fragmentation, not a leak), the sizes of the backend's and the engine's per-request state (which
must return to 0 when idle), and the allocations that grew most since the first snapshot, by
traceback. Python allocations only: what torch, CUDA, xgrammar or the Python backend allocate
natively shows as RSS or heap growth without a Python traceback.

    QWENTRT_MEMTRACE=/tmp/memtrace qwentrt soak ENGINE --minutes 3 ...
"""

from __future__ import annotations

import ctypes
import linecache
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV, ENV_INTERVAL = "QWENTRT_MEMTRACE", "QWENTRT_MEMTRACE_S"


def start_from_env(state: Callable[[], dict[str, int]]) -> threading.Thread | None:
    """Start the reporter if QWENTRT_MEMTRACE is set; `state` returns the sizes of per-request state."""
    out = os.environ.get(ENV)
    if not out:
        return None
    interval = float(os.environ.get(ENV_INTERVAL, "60"))
    tracemalloc.start(12)
    path = Path(out) / f"memtrace-{os.getpid()}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = threading.Thread(target=_loop, args=(path, interval, state), name="qwentrt-memtrace", daemon=True)
    t.start()
    return t


def _loop(path: Path, interval: float, state: Callable[[], dict[str, int]]) -> None:
    first, t0, n = _snapshot(), time.monotonic(), 0
    while True:
        time.sleep(interval)
        if not tracemalloc.is_tracing():  # stopped by whoever started it (tests)
            return
        n += 1
        try:
            text = report(first, time.monotonic() - t0, n, state())
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        except Exception as e:  # diagnostics must never hurt serving
            print(f"qwentrt: memtrace failed: {type(e).__name__}: {e}", file=sys.stderr)


def report(first: tracemalloc.Snapshot, elapsed_s: float, n: int, state: dict[str, Any], top: int = 25) -> str:
    snap = _snapshot()
    current, peak = tracemalloc.get_traced_memory()
    lines = [f"report {n} at {elapsed_s:.0f} s", f"rss: {rss_kib()}", f"malloc: {heap()}",
             f"python traced: {current >> 20} MiB (peak {peak >> 20} MiB)",
             "state: " + " ".join(f"{k}={v}" for k, v in state.items()), f"top {top} growth since start:"]
    for stat in snap.compare_to(first, "traceback")[:top]:
        lines.append(f"  {stat.size_diff / 1024:+.0f} KiB ({stat.count_diff:+d} blocks), "
                     f"now {stat.size / 1024:.0f} KiB")
        lines += [f"      {line.strip()}" for line in stat.traceback.format()[-8:] if line.strip()]
    return "\n".join(lines) + "\n"


def _snapshot() -> tracemalloc.Snapshot:
    """Without the reporter's own allocations (tracemalloc, the source lines it reads) and imports."""
    return tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")])


def rss_kib() -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of this process, KiB (Linux)."""
    out = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "RssShmem", "VmRSS")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap() -> dict[str, int]:
    """glibc's heap, MiB: in_use (allocated), free (kept by malloc: fragmentation), mmapped. {} if not glibc."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    m = fn()
    return {"in_use": m.uordblks >> 20, "free": m.fordblks >> 20, "mmapped": m.hblkhd >> 20}
