"""Cancellation and disconnects against the session's tritonserver: hundreds of streams cancelled mid-way
(the client closes its stream), dropped (the client closes its whole connection), or cancelled before
their first token. Every one is aborted in the engine (qwentrt_requests_cancelled_total) and the KV
pages return to idle; the server then serves a normal request."""

import asyncio
import contextlib
import random
import time

import pytest

pytest.importorskip("tritonclient.grpc")
from qwentrt.client import AsyncClient, GenerateParams  # noqa: E402
from tests.serving_util import is_ready, metrics, record, request, run, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

MID_STREAM, DROPPED, EARLY = 120, 100, 30
LONG = GenerateParams(max_tokens=2000, temperature=0.0)


async def _cancel_mid_stream(client: AsyncClient, i: int, rng: random.Random) -> int:
    """Read a few responses, then close the stream (cancels the request). Returns responses read."""
    stop_after, n = rng.randint(1, 3), 0
    async with contextlib.aclosing(client.stream(f"story {i}: once upon a time", params=LONG, timeout=120)) as it:
        async for _ in it:
            n += 1
            if n >= stop_after:
                break
    return n


async def _read_until_dropped(client: AsyncClient, i: int, started: asyncio.Event, seen: list) -> None:
    """Read until the connection is closed under us."""
    try:
        async for _ in client.stream(f"dropped {i}: tell me everything", params=LONG, timeout=120):
            if not seen[i]:
                seen[i] = True
                if all(seen):
                    started.set()
    except Exception:
        pass  # the channel was closed: that is the point


async def _cancel_early(client: AsyncClient, i: int) -> None:
    task = asyncio.ensure_future(_consume(client.stream(f"early {i}", params=LONG, timeout=120)))
    await asyncio.sleep(0.01 * (i % 5))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _consume(stream) -> None:
    async for _ in stream:
        pass


async def _scenario(url: str) -> dict:
    rng = random.Random(0)
    out = {}
    async with AsyncClient(url) as client:
        t0 = time.monotonic()
        reads = await asyncio.gather(*(_cancel_mid_stream(client, i, rng) for i in range(MID_STREAM)))
        out["mid_stream_cancelled"] = len(reads)
        out["mid_stream_responses_read"] = sum(reads)
        out["mid_stream_s"] = round(time.monotonic() - t0, 2)
        await asyncio.gather(*(_cancel_early(client, i) for i in range(EARLY)))
    # Dropped connections: a separate channel, closed while all its streams are running.
    dropper = AsyncClient(url)
    started, seen = asyncio.Event(), [False] * DROPPED
    tasks = [asyncio.ensure_future(_read_until_dropped(dropper, i, started, seen)) for i in range(DROPPED)]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(started.wait(), 90)
    out["dropped_streams_running"] = sum(seen)
    await dropper.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out["last_cancel_at"] = time.monotonic()
    return out


def test_hundreds_of_cancelled_and_dropped_streams_free_their_pages(triton_server):
    srv = triton_server
    wait_idle(srv, 60)
    before = metrics(srv)
    out = asyncio.run(_scenario(srv.grpc_url))
    idle_s = wait_idle(srv, 60)
    since_last_cancel_ms = round(1000 * (time.monotonic() - out.pop("last_cancel_at")), 0)
    after = metrics(srv)
    cancelled = after["qwentrt_requests_cancelled_total"] - before["qwentrt_requests_cancelled_total"]
    accepted = after["qwentrt_requests_total"] - before["qwentrt_requests_total"]
    record("cancellation", {**out, "tried": MID_STREAM + DROPPED + EARLY, "accepted": accepted,
                            "cancelled_in_engine": cancelled, "pages_idle_after_s": round(idle_s, 2),
                            "pages_idle_since_last_cancel_ms": since_last_cancel_ms,
                            "gauge_refresh_ms": 200})
    assert out["mid_stream_responses_read"] >= MID_STREAM
    assert out["dropped_streams_running"] == DROPPED
    # Every accepted request was cancelled: none of them ran to its 2000 tokens.
    assert cancelled == accepted >= MID_STREAM + DROPPED
    assert after["qwentrt_kv_pages_used"] == 0 and after["qwentrt_running"] == 0
    assert after.get("qwentrt_requests_failed_total", 0) == before.get("qwentrt_requests_failed_total", 0)
    assert is_ready(srv)
    responses, err = run(srv.grpc_url, request("after the storm", 5, False))
    assert err is None and int(responses[0].as_numpy("num_output_tokens").reshape(-1)[0]) == 5
