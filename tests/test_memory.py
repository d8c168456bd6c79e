"""Per-request state does not outlive its request: after a mixed load through the qwen3 model's logic
(fake Triton, tests/test_qwen3_backend.py), nothing of a finished, cancelled or refused request is left
(streams, engine callbacks, sequences, outputs, KV pages) and the prefix cache stays within the KV pages.
The memory diagnostics (QWENTRT_MEMTRACE) write their report."""

import gc
import random
import time

import numpy as np
import pytest

from qwentrt.engine.detokenizer import IncrementalDetokenizer
from qwentrt.engine.engine import RequestOutput
from qwentrt.engine.sequence import Sequence
from qwentrt.serving import memtrace
from qwentrt.serving.qwen3_backend import Qwen3Backend, Stream
from tests.test_qwen3_backend import FakePb, FakeRequest, FakeSender, wait

WORDS = ["alpha", "beta", "gamma", "delta", "the", "quick", "brown", "fox"]
TRACKED = (Stream, Sequence, RequestOutput, IncrementalDetokenizer, FakeSender)


def _live(types=TRACKED) -> dict[str, int]:
    gc.collect()
    counts = {t.__name__: 0 for t in types}
    for o in gc.get_objects():
        if type(o) in types:  # not isinstance: some objects' __class__ warns when read
            counts[type(o).__name__] += 1
    return counts


def _mixed_load(backend, n: int, rng: random.Random, concurrency: int = 8) -> None:
    """n requests: streamed and not, seeded sampling, distinct prompts, some cancelled mid-stream, some refused."""
    live = []
    for i in range(n):
        s = FakeSender()
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        kind = i % 10
        extra = {"seed": np.array([[rng.randrange(2**31)]], dtype=np.int64)} if kind % 2 else {}
        if kind == 9:  # refused at once (bad input)
            extra = {"top_p": np.array([[2.0]], dtype=np.float32)}
        max_tokens = rng.randint(20, 40) if kind == 0 else rng.randint(2, 8)
        backend.execute([FakeRequest(s, text_input=np.array([[prompt.encode()]], dtype=object),
                                     max_tokens=np.array([[max_tokens]], dtype=np.int32),
                                     stream=np.array([[kind != 3]]),
                                     temperature=np.array([[0.7 if kind % 2 else 0.0]], dtype=np.float32), **extra)])
        live.append((s, kind == 0))
        while sum(not x.done() for x, _ in live) >= concurrency:
            for x, cancel in live:
                if cancel and x.sent:
                    x.cancelled = True
            time.sleep(0.005)
    for x, cancel in live:
        x.cancelled = x.cancelled or cancel
    wait(lambda: all(x.done() for x, _ in live), 60)


@pytest.fixture
def small_kv_backend(tiny_engine):
    # 24 pages of 32 tokens: the prefix cache must evict to stay within them.
    b = Qwen3Backend({"engine_dir": str(tiny_engine), "device": "cpu", "allow_gpu_mismatch": "true",
                      "num_kv_blocks": "24", "engine_process": "false"}, FakePb)  # (the engine's state, read here)
    yield b
    b.shutdown()


def test_nothing_of_a_finished_request_is_left(small_kv_backend):
    b, rng = small_kv_backend, random.Random(0)
    before = _live()
    _mixed_load(b, 30, rng)
    wait(lambda: b.memory_state()["running"] == 0 and b.service.stats()["kv_pages_used"] == 0, 10)
    state = b.memory_state()
    assert {k: v for k, v in state.items() if k not in ("prefix_cache_pages", "kv_pages")} == {
        "streams": 0, "engine_callbacks": 0, "engine_seqs": 0, "waiting": 0, "running": 0, "kv_seqs": 0}
    assert 0 < state["prefix_cache_pages"] <= state["kv_pages"] == 24
    b.engine.block_manager.check_invariants()
    after = _live()
    # Nothing of a finished request stays referenced; the engine thread's loop may still hold its last
    # sequence and output in its locals until the next step (one, never more).
    assert after["Stream"] == before["Stream"] and after["FakeSender"] == before["FakeSender"], after
    assert all(after[k] - before[k] <= 1 for k in ("Sequence", "RequestOutput", "IncrementalDetokenizer")), after
    assert b.metrics.cancelled.value >= 1 and b.metrics.rejected.value >= 1


def test_memtrace_report(small_kv_backend, tmp_path, monkeypatch):
    monkeypatch.setenv(memtrace.ENV, str(tmp_path))
    monkeypatch.setenv(memtrace.ENV_INTERVAL, "0.2")
    was_tracing = memtrace.tracemalloc.is_tracing()
    try:
        assert memtrace.start_from_env(small_kv_backend.memory_state) is not None
        _mixed_load(small_kv_backend, 4, random.Random(1))
        path = tmp_path / f"memtrace-{memtrace.os.getpid()}.txt"
        wait(path.is_file, 10)
        text = path.read_text()
    finally:
        if not was_tracing:
            memtrace.tracemalloc.stop()
    assert "rss: {" in text and "malloc: " in text and "streams=" in text and "top 25 growth" in text
