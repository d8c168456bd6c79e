"""Faults on a real tritonserver, injected with QWENTRT_FAULT_INJECT (qwentrt/serving/faults.py, tests only).

- every 25th engine step fails: the requests in that step end with INTERNAL and a message, the others
  complete, the faults are counted (qwentrt_step_faults_total, qwentrt_requests_failed_total), nothing
  is lost and the model stays ready;
- every step fails after a while (an engine that cannot recover): after 3 failed steps in a row the model
  refuses new requests with UNAVAILABLE and stops tritonserver, whose readiness turns false at once, and
  which exits within its exit timeout;
- shutdown while streams run: short streams complete (Triton drains them), long ones get a final
  UNAVAILABLE response once the exit timeout has passed; nothing hangs."""

import asyncio
import random
import signal
import time

import pytest

pytest.importorskip("tritonclient.grpc")
from qwentrt.client import AsyncClient, GenerateParams, ServerError  # noqa: E402
from tests.serving_util import is_ready, metrics, record, request, run, start_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

N_REQUESTS = 32


@pytest.fixture(scope="module")
def faulty(tiny_engine, tmp_path_factory):
    with start_server(tiny_engine, tmp_path_factory.mktemp("faulty"), env={"QWENTRT_FAULT_INJECT": "step:every=25"},
                      exit_timeout_s=5) as srv:
        yield srv


async def _many(url: str, n: int) -> dict:
    rng = random.Random(1)
    out = {"tried": n, "completed": 0, "failed_internal": 0, "other": [], "messages": set()}

    async def one(i: int, client: AsyncClient) -> None:
        await asyncio.sleep(rng.random() * 6)  # staggered: requests join running batches
        try:
            g = await client.generate(f"request {i}: " + "words " * rng.randint(1, 40),
                                      params=GenerateParams(max_tokens=rng.randint(2, 24), temperature=0.0), timeout=120)
            if g.finish_reason in ("length", "stop"):
                out["completed"] += 1
            else:
                out["other"].append(g.finish_reason)
        except ServerError as e:
            if e.code == "INTERNAL":
                out["failed_internal"] += 1
                out["messages"].add(e.message)
            else:
                out["other"].append(f"{e.code}: {e.message}")

    async with AsyncClient(url) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return out


def test_step_faults_fail_only_their_requests_are_counted_and_the_model_stays_ready(faulty):
    before = metrics(faulty)
    out = asyncio.run(_many(faulty.grpc_url, N_REQUESTS))
    idle_s = wait_idle(faulty, 30)
    after = metrics(faulty)
    faults = after["qwentrt_step_faults_total"] - before.get("qwentrt_step_faults_total", 0)
    failed = after["qwentrt_requests_failed_total"] - before.get("qwentrt_requests_failed_total", 0)
    record("faults_every_25th_step", {"tried": out["tried"], "completed": out["completed"],
                                     "failed_internal": out["failed_internal"], "lost": len(out["other"]),
                                     "step_faults": faults, "idle_after_s": round(idle_s, 2)})
    assert not out["other"], out["other"]  # every request: completed, or a final INTERNAL error
    assert out["completed"] + out["failed_internal"] == N_REQUESTS
    assert out["completed"] > 0 and out["failed_internal"] > 0 and faults > 0
    assert failed == out["failed_internal"]
    assert all(m.startswith("generation failed: InjectedFault: injected fault (step:every=25") for m in out["messages"])
    assert after["qwentrt_engine_healthy"] == 1 and is_ready(faulty)
    for _ in range(5):  # still serving (a request may itself land on a 25th step)
        responses, err = run(faulty.grpc_url, request("still here", 3, False))
        if err is None:
            break
    assert err is None and responses


def test_an_engine_that_cannot_recover_refuses_requests_and_stops_the_server(tiny_engine, tmp_path):
    with start_server(tiny_engine, tmp_path, env={"QWENTRT_FAULT_INJECT": "step:after=6"}, exit_timeout_s=5) as srv:
        assert is_ready(srv)
        errors, t_dead = [], None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                responses, err = run(srv.grpc_url, request("hello", 4), timeout=20)
            except Exception as e:  # the server went away under the request
                err = e
            if err is not None:
                errors.append(getattr(err, "message", lambda: str(err))())
            if not is_ready(srv):
                t_dead = time.monotonic()
                break
        assert t_dead is not None, f"still ready after the engine failed: {errors}"
        # The requests in the failed steps got INTERNAL with the fault; the engine then reported itself dead.
        assert any(e.startswith("[INTERNAL] generation failed: InjectedFault") for e in errors), errors
        assert srv.process.wait(timeout=60) is not None
        exited_s = time.monotonic() - t_dead
    log = (tmp_path / "triton.log").read_text(errors="replace")
    assert "qwentrt: the engine cannot go on: 3 engine steps failed in a row" in log
    assert "qwentrt: stopping tritonserver" in log
    record("faults_unrecoverable", {"requests_until_not_ready": len(errors), "exit_after_not_ready_s": round(exited_s, 1),
                                    "errors": sorted(set(e[:90] for e in errors))})


DRAIN_S = 4  # the qwen3 model's shutdown_drain_s: how long shutdown lets requests in flight finish
EXIT_S = 10  # tritonserver --exit-timeout-secs (more than the drain)


async def _streams_through_shutdown(srv, short: int, long: int) -> list[tuple[str, str, float]]:
    """Start `short` + `long` streams, stop the server once every stream has its first response; each
    stream's (kind, outcome, seconds from the stop to its end)."""
    everyone_started = asyncio.Event()
    started: set[int] = set()
    stopped_at: list[float] = []

    async def one(i: int, client: AsyncClient) -> tuple[str, str, float]:
        kind = "short" if i < short else "long"
        # short: ~2 s of decoding at this machine's ~0.17 s a step for 12 streams (2 CPU cores), half the drain
        # window (24 tokens left no margin: 21 done when the window closed, once in a while)
        params = GenerateParams(max_tokens=12 if kind == "short" else 2000, temperature=0.0)
        outcome = "no final response"
        try:
            async for delta in client.stream(f"{kind} {i}: go", params=params, timeout=EXIT_S + 60):
                started.add(i)
                if len(started) == short + long:
                    everyone_started.set()
                if delta.finish_reason:
                    outcome = f"completed ({delta.finish_reason})"
        except ServerError as e:
            outcome = f"{e.code}: {e.message[:70]}"
        return kind, outcome, time.monotonic() - stopped_at[0]

    async def stopper() -> None:
        await asyncio.wait_for(everyone_started.wait(), 90)
        stopped_at.append(time.monotonic())
        srv.process.send_signal(signal.SIGTERM)  # what `qwentrt serve` does on Ctrl-C

    async with AsyncClient(srv.grpc_url) as client:
        results = await asyncio.gather(stopper(), *(one(i, client) for i in range(short + long)))
    return results[1:]


def test_shutdown_drains_short_streams_and_ends_long_ones_with_a_final_response(tiny_engine, tmp_path):
    with start_server(tiny_engine, tmp_path, params={"shutdown_drain_s": str(DRAIN_S)}, exit_timeout_s=EXIT_S) as srv:
        results = asyncio.run(_streams_through_shutdown(srv, 4, 8))
        srv.process.wait(timeout=EXIT_S + 30)
    record("shutdown_drain", {"exit_timeout_s": EXIT_S, "streams": len(results),
                              "outcomes": sorted({f"{k}: {o}" for k, o, _ in results}),
                              "last_stream_ended_after_stop_s": round(max(t for *_, t in results), 1)})
    for kind, outcome, after_s in results:
        assert after_s < EXIT_S + 15, results  # nothing hangs
        if kind == "short":  # in flight when the stop came: drained to their end
            assert outcome.startswith("completed"), results
        else:  # still running at the exit timeout: a final response from the model, not a dropped socket
            assert outcome.startswith("UNAVAILABLE: the server is shutting down"), results


def _proc_stat(pid: str) -> tuple[str, str, int] | None:
    """(name, state, parent pid) of a process from /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    return name, state, int(ppid)


def test_the_model_process_exits_when_tritonserver_dies(tiny_engine, tmp_path):
    """A stub whose tritonserver was killed must not live on as an orphan holding the engine's memory."""
    import os

    with start_server(tiny_engine, tmp_path) as srv:
        server = srv.process.pid
        stubs = [p for p in os.listdir("/proc") if p.isdigit() and (st := _proc_stat(p)) and st[2] == server
                 and st[0].startswith("triton_python")]
        assert stubs, "no Python-backend stub found under tritonserver"
        srv.process.kill()
        srv.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = stubs
        while alive and time.monotonic() < deadline:
            time.sleep(0.25)
            alive = [p for p in stubs if (st := _proc_stat(p)) and st[1] != "Z"]
        assert not alive, f"stubs still running after tritonserver died: {alive}"
