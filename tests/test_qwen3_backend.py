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
