"""Overload on loopback: a tritonserver whose `qwen3` model runs at most 8 requests, queues at most 8 more
and has 12 KV pages (384 tokens) for them, offered 3x what it can hold for a bounded time. Past the
queue, requests are refused with UNAVAILABLE at once; KV exhaustion preempts (and recomputes) instead
of failing; every accepted request gets its final response: lost == 0."""

import asyncio
import random
import statistics
import time

import pytest

pytest.importorskip("tritonclient.grpc")
from qwentrt.client import AsyncClient, GenerateParams, ServerError  # noqa: E402
from tests.serving_util import is_ready, metrics, record, start_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

RUNNING, QUEUED, PAGES = 8, 8, 12
CLIENTS = 3 * (RUNNING + QUEUED)
LOAD_S = 12
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    params = {"max_batch_size": str(RUNNING), "max_queue_size": str(QUEUED), "num_kv_blocks": str(PAGES)}
    with start_server(tiny_engine, tmp_path_factory.mktemp("overload"), params=params) as srv:
        yield srv


async def _offer_load(url: str, seconds: float, clients: int, seed: int = 0) -> dict:
    counts = {"tried": 0, "accepted": 0, "rejected": 0, "completed": 0, "failed": 0, "lost": 0, "invalid": 0}
    reject_s: list[float] = []
    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds

    async def one_client(client: AsyncClient) -> None:
        while time.monotonic() < stop_at:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            params = GenerateParams(max_tokens=rng.randint(4, 40), temperature=0.0)
            counts["tried"] += 1
            start, got_data, reason = time.monotonic(), False, ""
            try:
                async for delta in client.stream(prompt, params=params, timeout=180):
                    got_data = True
                    reason = delta.finish_reason or reason
            except ServerError as e:
                if e.code == "UNAVAILABLE" and not got_data:
                    counts["rejected"] += 1
                    reject_s.append(time.monotonic() - start)
                    await asyncio.sleep(0.2)  # a polite client backs off, then tries again
                    continue
                if e.code == "INVALID_ARGUMENT":
                    counts["invalid"] += 1
                    continue
                counts["accepted"] += 1
                counts["lost" if e.code in ("DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN") else "failed"] += 1
                continue
            counts["accepted"] += 1
            counts["completed" if reason in ("length", "stop") else "lost"] += 1

    async with AsyncClient(url) as client:
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
    counts["reject_latency_p50_ms"] = round(1000 * statistics.median(reject_s), 1) if reject_s else None
    counts["reject_latency_max_ms"] = round(1000 * max(reject_s), 1) if reject_s else None
    return counts


def test_overload_refuses_at_once_preempts_and_loses_nothing(server):
    before = metrics(server)
    start = time.monotonic()
    counts = asyncio.run(_offer_load(server.grpc_url, LOAD_S, CLIENTS))
    wall = time.monotonic() - start
    idle_s = wait_idle(server, 60)
    after = metrics(server)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in (
        "qwentrt_requests_total", "qwentrt_requests_rejected_total", "qwentrt_requests_failed_total",
        "qwentrt_preemptions", "qwentrt_step_faults_total")}
    record("overload", {**counts, "clients": CLIENTS, "capacity": RUNNING + QUEUED, "kv_pages": PAGES,
                        "load_s": LOAD_S, "wall_s": round(wall, 1), "preemptions": delta["qwentrt_preemptions"],
                        "server_accepted": delta["qwentrt_requests_total"],
                        "server_rejected": delta["qwentrt_requests_rejected_total"], "idle_after_s": round(idle_s, 2)})
    assert counts["lost"] == 0 and counts["failed"] == 0 and counts["invalid"] == 0, counts
    assert counts["accepted"] == counts["completed"] > 0
    assert counts["rejected"] > 0 and counts["tried"] == counts["accepted"] + counts["rejected"]
    assert counts["reject_latency_p50_ms"] < 500, counts  # refused at once, not after a wait
    # The server counts the same: every accepted request once, every refusal once.
    assert delta["qwentrt_requests_total"] == counts["accepted"]
    assert delta["qwentrt_requests_rejected_total"] == counts["rejected"]
    assert delta["qwentrt_preemptions"] > 0, "KV pages never ran out: the test does not exercise preemption"
    assert delta["qwentrt_requests_failed_total"] == 0 and delta["qwentrt_step_faults_total"] == 0
    assert is_ready(server)
