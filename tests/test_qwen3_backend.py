"""The qwen3 Triton model's logic without Triton: a fake triton_python_backend_utils records responses."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from qwentrt.serving.qwen3_backend import Qwen3Backend

FINAL = 1


class FakeError:
    INVALID_ARG, UNAVAILABLE, INTERNAL = 3, 14, 13

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeMetric:
    def __init__(self):
        self.value = 0.0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        pass


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2

    def __init__(self, **kw):
        pass

    def Metric(self, **kw):
        return FakeMetric()


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


FakePb = SimpleNamespace(
    TritonError=FakeError, MetricFamily=FakeFamily, InferenceResponse=FakeResponse,
    Tensor=lambda name, array: SimpleNamespace(name=name, array=array),
    TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL)


class FakeSender:
    def __init__(self, slow=0.0):
        self.sent, self.cancelled, self.slow = [], False, slow

    def send(self, response=None, flags=0):
        time.sleep(self.slow)
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancelled

    def done(self):
        return any(flags == FINAL for _, flags in self.sent)


class FakeRequest:
    def __init__(self, sender, **tensors):
        self.sender, self.tensors = sender, tensors

    def get_response_sender(self):
        return self.sender

    def inputs(self):
        return [SimpleNamespace(name=lambda n=n: n, as_numpy=lambda v=v: v) for n, v in self.tensors.items()]

    def request_id(self):
        return "t"


def req(sender, prompt, max_tokens, stream=True, **extra):
    return FakeRequest(sender, text_input=np.array([[prompt.encode()]], dtype=object),
                       max_tokens=np.array([[max_tokens]], dtype=np.int32), stream=np.array([[stream]]),
                       temperature=np.array([[0.0]], dtype=np.float32), **extra)


def wait(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def backend(tiny_engine):
    b = Qwen3Backend({"engine_dir": str(tiny_engine), "device": "cpu", "allow_gpu_mismatch": "true"}, FakePb)
    yield b
    b.shutdown()


def texts(sender):
    return [r.outputs["text_output"].reshape(-1)[0].decode() for r, _ in sender.sent if r is not None and r.outputs]


def test_slow_sender_gets_coalesced_responses(backend):
    fast, slow = FakeSender(), FakeSender(slow=0.2)  # a response that costs 200 ms to send
    backend.execute([req(fast, "Hello", 30)])
    wait(fast.done)
    backend.execute([req(slow, "Hello", 30)])
    wait(slow.done)
    assert "".join(texts(slow)) == "".join(texts(fast))
    # Several tokens per response when sending falls behind (not compared with `fast`, which a loaded CPU
    # may coalesce too): 30 tokens at 200 ms a response would take 6 s one by one.
    assert len(texts(slow)) < 30
    last = slow.sent[-1][0].outputs
    assert int(last["num_output_tokens"].reshape(-1)[0]) == 30 and last["finish_reason"].reshape(-1)[0] == b"length"


def test_streams_are_paced_past_the_response_budget(backend):
    """At 2 responses/s for one stream (interval 0.5 s) a 40-token stream is sent in far fewer responses:
    its first token at once, the last with the final flag, the text the same as sent one by one."""
    free = FakeSender()
    backend.execute([req(free, "Pace me", 40)])
    wait(free.done)
    backend.max_responses_per_s = 2.0
    paced = FakeSender()
    backend.execute([req(paced, "Pace me", 40)])
    wait(paced.done)
    assert "".join(texts(paced)) == "".join(texts(free))
    counts = [int(r.outputs["num_output_tokens"].reshape(-1)[0]) for r, _ in paced.sent]
    assert counts[0] == 1 and counts[-1] == 40 and paced.sent[-1][1] == FINAL
    assert len(paced.sent) < len(free.sent) and len(paced.sent) < 40


@pytest.mark.parametrize("value", ["0", "-5", "fast", "inf", "nan"])
def test_a_bad_response_budget_is_refused_before_the_engine_loads(value):
    with pytest.raises(ValueError, match="max_responses_per_s: expected a positive number"):
        Qwen3Backend({"engine_dir": "/nonexistent", "max_responses_per_s": value}, FakePb)


def test_non_streamed_sends_one_response_with_the_prompt(backend):
    s = FakeSender()
    backend.execute([req(s, "Hi there", 5, stream=False)])
    wait(s.done)
    assert len(s.sent) == 1 and texts(s)[0].startswith("Hi there")


def test_bad_input_and_overload_are_refused_at_once(backend):
    s = FakeSender()
    backend.execute([req(s, "x", 5, top_p=np.array([[2.0]], dtype=np.float32))])
    (resp, flags), = s.sent
    assert flags == FINAL and resp.error.code == FakeError.INVALID_ARG and resp.error.message.startswith("[INVALID_ARG] top_p")
    backend.max_queue = 0
    s2 = FakeSender()
    backend.execute([req(s2, "x", 5)])
    (resp, _), = s2.sent
    assert resp.error.code == FakeError.UNAVAILABLE and "busy" in resp.error.message


def test_cancelled_request_is_aborted(backend):
    s = FakeSender()
    backend.execute([req(s, "Hello", 3000)])
    wait(lambda: len(s.sent) >= 2)
    s.cancelled = True
    wait(s.done)
    wait(lambda: backend.service.stats()["running"] == 0 and backend.service.stats()["kv_pages_used"] == 0, 5)
    assert backend.metrics.cancelled.value == 1


def _backend(tiny_engine, **params):
    return Qwen3Backend({"engine_dir": str(tiny_engine), "device": "cpu", "allow_gpu_mismatch": "true", **params},
                        FakePb)


def _error(sender):
    (resp, flags), = [(r, f) for r, f in sender.sent if r is not None and r.error is not None]
    assert flags == FINAL
    return resp.error


def test_step_faults_fail_their_requests_with_internal_and_are_counted(tiny_engine):
    b = _backend(tiny_engine, fault_inject="step:every=3")
    try:
        senders = [FakeSender() for _ in range(3)]
        for s in senders:
            b.execute([req(s, "Hello", 20)])
            wait(s.done)
        errors = [_error(s) for s in senders if any(r is not None and r.error for r, _ in s.sent)]
        assert errors and all(e.code == FakeError.INTERNAL and e.message.startswith(
            "[INTERNAL] generation failed: InjectedFault: injected fault (step:every=3") for e in errors)
        wait(lambda: b.metrics.step_faults.value > 0, 5)
        assert b.metrics.failed.value == len(errors) and b.service.healthy and b.metrics.healthy.value == 1
    finally:
        b.shutdown()


@pytest.mark.parametrize("spec,why", [("step:after=1", "3 engine steps failed in a row"),
                                      ("loop:after=1", "the engine loop failed: InjectedFault")])
def test_an_engine_that_cannot_go_on_fails_requests_in_flight_and_refuses_new_ones(tiny_engine, spec, why):
    b = _backend(tiny_engine, fault_inject=spec, engine_failure="reject")
    try:
        for _ in range(6):  # step:after=1: each request's steps fail, until 3 in a row stop the engine
            s = FakeSender()
            b.execute([req(s, "Hello", 200)])
            wait(s.done)
            assert _error(s).code == FakeError.INTERNAL and "generation failed" in _error(s).message
            time.sleep(0.1)
            if not b.service.healthy:
                break
        assert not b.service.healthy
        wait(lambda: b.metrics.healthy.value == 0, 5)
        late = FakeSender()
        b.execute([req(late, "Hello", 5)])
        error = _error(late)
        assert error.code == FakeError.UNAVAILABLE and why in error.message and "needs a restart" in error.message
    finally:
        b.shutdown()


def test_drain_lets_short_requests_finish_and_ends_long_ones_with_unavailable(backend):
    short, long = FakeSender(), FakeSender()
    backend.execute([req(short, "Hello", 8), req(long, "Hello", 3000)])
    wait(lambda: len(long.sent) >= 1)
    backend.drain_s = 1.5
    backend.begin_drain("test")
    refused = FakeSender()
    backend.execute([req(refused, "Hello", 5)])
    assert _error(refused).code == FakeError.UNAVAILABLE and "shutting down" in _error(refused).message
    wait(short.done)
    assert short.sent[-1][0].outputs["finish_reason"].reshape(-1)[0] == b"length"
    wait(long.done)
    error = _error(long)
    assert error.code == FakeError.UNAVAILABLE and error.message.startswith("[UNAVAILABLE] the server is shutting down")
    wait(lambda: backend.service.stats()["kv_pages_used"] == 0, 5)


def test_server_watch_reads_tritonserver_arguments():
    from qwentrt.serving.lifecycle import ServerWatch

    w = ServerWatch.of_args(["tritonserver", "--http-port=8123", "--exit-timeout-secs=12"])
    assert w.ready_url == "http://127.0.0.1:8123/v2/health/ready" and w.exit_timeout_s == 12
    assert ServerWatch.of_args(["--http-address=10.0.0.2"]).ready_url == "http://10.0.0.2:8000/v2/health/ready"
    assert ServerWatch.of_args(["--allow-http=false"]).ready_url is None
    assert ServerWatch.of_args(["--http-port=1"]).ready() is False  # refused: nothing listens there


def test_fault_rules_are_checked():
    from qwentrt.serving import faults

    assert faults.parse("step:every=7; loop:after=3") == [("step", "every", 7), ("loop", "after", 3)]
    for bad in ("step:every=0", "kernel:every=2", "step=3"):
        with pytest.raises(ValueError, match="QWENTRT_FAULT_INJECT"):
            faults.parse(bad)


def test_cancellation_polls_stay_within_their_budget_and_reach_every_stream():
    """Past cancel_polls_per_s * POLL_S streams a round, the rounds take turns: each round asks at most the
    budget, and consecutive rounds together ask every stream (no stream is never polled)."""
    from qwentrt.serving import qwen3_backend as qb
    b = qb.Qwen3Backend.__new__(qb.Qwen3Backend)  # only the round robin's state, no engine
    b.cancel_polls_per_s, b._poll_cursor = 2000, 0
    budget = int(2000 * qb.POLL_S)
    few = list(range(budget))
    assert b._poll_round(few) == few  # all fit: every stream, every round
    live = list(range(3 * budget + 7))
    seen = []
    for _ in range(4):
        got = b._poll_round(live)
        assert len(got) == budget
        seen += got
    assert set(seen) == set(live)
    assert seen[:budget] == live[:budget] and seen[budget] == live[budget]  # in order, continuing the cursor


def test_cancel_polls_per_s_must_be_positive():
    with pytest.raises(ValueError, match="cancel_polls_per_s: expected a positive number"):
        Qwen3Backend({"engine_dir": "/nonexistent", "cancel_polls_per_s": "0"}, FakePb)
