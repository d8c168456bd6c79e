"""Random requests through gRPC to a real tritonserver (hypothesis): random subsets of the `qwen3` inputs
with random data types, shapes and values, unknown names and request parameters. Every reply must be a
success or a clean refusal (INVALID_ARGUMENT, UNAVAILABLE) with a message: never INTERNAL, never a
hang. Afterwards the server is ready, nothing failed inside the engine and its KV pages are idle.

Successful requests are cancelled after their first response, or after 2 s without one (a non-streamed
request of 4000 tokens), which exercises cancellation too. Examples: QWENTRT_FUZZ_EXAMPLES (300);
QWENTRT_FUZZ_RANDOM=1 draws new ones each run (CI replays the same derandomized set)."""

import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwentrt.client.grpc_client import to_server_error  # noqa: E402
from qwentrt.serving.request import INPUTS  # noqa: E402
from tests.serving_util import is_ready, metrics, record, run, tensor, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("QWENTRT_FUZZ_EXAMPLES", "300"))
SPECIAL = {"seed": np.uint64}
PROPER = {"text": np.object_, "texts": np.object_, "int": np.int32, "float": np.float32, "bool": np.bool_}
OTHER_DTYPES = [np.object_, np.int32, np.int64, np.float32, np.float64, np.bool_, np.uint64, np.uint8, np.float16]

SCHEMAS = [b'{"type": "object"}', b'{"type": "string", "maxLength": 3}', b"false", b'{"not": {}}', b"{", b"[]",
           b'{"type": "nonsense"}', b'{"enum": []}', b'{"type": "integer", "minimum": 5, "maximum": 1}']
MESSAGES = [json.dumps(m).encode() for m in (
    [{"role": "user", "content": "hi"}], [], {}, [{"role": "x"}], [{"role": "user", "content": ["a"]}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "text", None, 5,
    [{"role": "assistant", "content": "", "tool_calls": [1]}])] + [b"[[[", b"\xff"]
TEXTS = st.one_of(
    st.sampled_from([b"", b"hello", b"\xff\xfe", b"a" * 5000, b"json_schema", b"json", b"regex", b"ebnf_grammar",
                     b"[a-z]+", b"root ::= \"x\"", b"(", b"\xc3(", b"stop,words", b"\x00"] + SCHEMAS + MESSAGES),
    st.binary(max_size=40), st.text(max_size=40).map(lambda s: s.encode("utf-8")))
INTS = st.one_of(st.sampled_from([-2**31, -1, 0, 1, 2, 4, 151645, 4095, 4096, 2**31 - 1]), st.integers(-5, 64))
FLOATS = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 0.5, 1.0, 1.5, 2.5, 1e30]),
                   st.floats(-3, 3, allow_nan=False))
SHAPES = st.sampled_from([(1, 1)] * 8 + [(1, 2), (2, 1), (1, 0), (1, 1, 1), (1, 3)])


def _values(dtype, n):
    if dtype is np.object_:
        return st.lists(TEXTS, min_size=n, max_size=n)
    if dtype is np.bool_:
        return st.lists(st.booleans(), min_size=n, max_size=n)
    if dtype in (np.int32, np.int64, np.uint8):
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        return st.lists(INTS.map(lambda v: int(np.clip(v, lo, hi))), min_size=n, max_size=n)
    if dtype is np.uint64:
        return st.lists(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]), min_size=n, max_size=n)
    return st.lists(FLOATS, min_size=n, max_size=n)


VALID = {"text_input": st.sampled_from([b"hello", "你好 world".encode(), b"{", b"a b c " * 50]),
         "max_tokens": st.integers(1, 12), "stream": st.booleans(), "temperature": st.sampled_from([0.0, 0.7, 1.0]),
         "top_k": st.sampled_from([0, 1, 5, 10**6]), "top_p": st.sampled_from([0.1, 0.9, 1.0]),
         "seed": st.integers(0, 2**63 - 1), "min_tokens": st.integers(0, 1),
         "repetition_penalty": st.sampled_from([0.5, 1.0, 1.3]), "presence_penalty": st.sampled_from([-2.0, 0.0, 1.0]),
         "frequency_penalty": st.sampled_from([-1.0, 0.0, 2.0]), "stop_words": st.sampled_from([b"", b"a,b", b"x"]),
         "bad_words": st.sampled_from([b"", b"the"]), "end_id": st.sampled_from([151645, 0, -1]),
         "exclude_input_in_output": st.booleans(), "return_log_probs": st.booleans(),
         "beam_width": st.just(1), "num_return_sequences": st.just(1)}


@st.composite
def mutated_valid_request(draw):
    """A valid request with random extra options, then one input replaced by a random one."""
    names = ["text_input", "max_tokens"] + draw(st.lists(st.sampled_from(sorted(set(VALID) - {"text_input", "max_tokens"})),
                                                         max_size=6, unique=True))
    guide = draw(st.sampled_from([None, (b"json_schema", b'{"type": "object"}'), (b"json", None), (b"regex", b"[ab]+"),
                                  (b"ebnf_grammar", b'root ::= "yes" | "no"')]))
    inputs = {n: tensor(n, draw(VALID[n]), SPECIAL.get(n, PROPER[INPUTS[n][0]])) for n in names}
    if guide is not None:
        inputs["guided_decoding_guide_type"] = tensor("guided_decoding_guide_type", guide[0], np.object_)
        if guide[1] is not None:
            inputs["guided_decoding_guide"] = tensor("guided_decoding_guide", guide[1], np.object_)
    if draw(st.booleans()):  # the mutation
        name = draw(st.sampled_from(sorted(INPUTS)))
        dtype = draw(st.sampled_from([SPECIAL.get(name, PROPER[INPUTS[name][0]])] * 3 + OTHER_DTYPES))
        shape = draw(SHAPES)
        inputs[name] = tensor(name, np.array(draw(_values(dtype, int(np.prod(shape)))), dtype=dtype).reshape(shape), None)
    return list(inputs.values()), None


@st.composite
def random_request(draw):
    names = draw(st.lists(st.sampled_from(sorted(INPUTS)), max_size=8, unique=True))
    # Most requests carry a prompt and max_tokens, so that the deeper checks are reached too.
    if draw(st.integers(0, 9)) < 8:
        names = list(dict.fromkeys(["text_input", "max_tokens", *names]))
    if draw(st.integers(0, 19)) == 0:
        names.append("frobnicate")
    inputs = []
    for name in names:
        kind = INPUTS.get(name, ("int", False))[0]
        dtype = PROPER[kind] if draw(st.integers(0, 9)) < 8 else draw(st.sampled_from(OTHER_DTYPES))
        if name == "seed" and dtype is np.int32:
            dtype = np.uint64
        shape = draw(SHAPES)
        n = int(np.prod(shape))
        values = draw(_values(dtype, n))
        inputs.append(tensor(name, np.array(values, dtype=dtype).reshape(shape), None))
    parameters = draw(st.sampled_from([None] * 9 + [{"temperature": 0.1}, {"x": "y"}]))
    return inputs, parameters


@pytest.fixture(scope="module")
def server(triton_server):
    triton_server.fuzz = {"tried": 0, "succeeded": 0, "refused": 0, "cancelled_after_2s": 0, "codes": {}}
    before = metrics(triton_server)
    start = time.monotonic()
    yield triton_server
    after = metrics(triton_server)
    record("fuzz", {**triton_server.fuzz, "seconds": round(time.monotonic() - start, 1),
                    "step_faults_delta": after.get("qwentrt_step_faults_total", 0) - before.get("qwentrt_step_faults_total", 0),
                    "failed_delta": after.get("qwentrt_requests_failed_total", 0) - before.get("qwentrt_requests_failed_total", 0)})


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=os.environ.get("QWENTRT_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=st.one_of(random_request(), mutated_valid_request()))
def test_random_requests_get_a_success_or_a_clean_error(server, req):
    inputs, parameters = req
    figures = server.fuzz
    figures["tried"] += 1
    try:
        responses, err = run(server.grpc_url, inputs, parameters=parameters, timeout=2, cancel_after=1)
    except Exception as e:  # queue.Empty: no response within 2 s; the request was cancelled on the way out
        assert type(e).__name__ == "Empty", repr(e)
        figures["cancelled_after_2s"] += 1
        return
    if err is None:
        figures["succeeded"] += 1
        assert responses
        return
    code = to_server_error(err).code
    figures["refused"] += 1
    figures["codes"][code] = figures["codes"].get(code, 0) + 1
    assert code in ("INVALID_ARGUMENT", "UNAVAILABLE"), err.message()
    assert len(err.message()) > 10


def test_after_fuzzing_the_server_is_ready_and_idle_and_nothing_failed(server):
    assert is_ready(server)
    idle_s = wait_idle(server, 60)
    server.fuzz["idle_after_s"] = round(idle_s, 2)
    m = metrics(server)
    assert m.get("qwentrt_requests_failed_total", 0) == 0 and m.get("qwentrt_step_faults_total", 0) == 0
    assert server.fuzz["tried"] >= min(EXAMPLES, 50) and server.fuzz["refused"] > 0
