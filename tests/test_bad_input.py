"""Every kind of bad input to the `qwen3` model (and `json_validator`) through a real tritonserver, one
row each: the reply is INVALID_ARGUMENT with a message naming the field and its limit. After the table
the server is still ready, a normal request works and the engine's KV pages are idle.

Rows marked TRITON are refused by Triton itself before the model runs (unknown input names, data types
and shapes that contradict config.pbtxt); their messages are Triton's own, which also name the input."""

import json

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from qwentrt.client.grpc_client import to_server_error  # noqa: E402
from tests.serving_util import is_ready, metric, record, request, run, tensor, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow

B, I32, F32, BOOL, U64 = np.object_, np.int32, np.float32, np.bool_, np.uint64
TRITON = "triton"  # refused by Triton, never reaches the model
MAX_SEQ_LEN = 4096  # tests/conftest.py FAST


def guided(kind, guide, **extra):
    return request("x", 8, guided_decoding_guide_type=(kind.encode(), B), guided_decoding_guide=(guide.encode(), B),
                   **extra)


def chat(messages, **extra):
    raw = messages if isinstance(messages, bytes) else json.dumps(messages).encode()
    return [tensor("messages", raw, B), tensor("max_tokens", 8, I32)] + [tensor(k, v, t) for k, (v, t) in extra.items()]


# (id, inputs, [substrings the message must hold], who refuses it)
ROWS = [
    # prompt
    ("empty prompt", lambda: request("", 8), ["text_input", "empty", "at least 1 token"], "model"),
    ("no prompt", lambda: [tensor("max_tokens", 8, I32)], ["text_input: required"], "model"),
    ("prompt longer than max_seq_len", lambda: request("hello " * 5000, 8),
     ["text_input", "tokens, over the limit of 4095", "max_seq_len 4096"], "model"),
    ("prompt plus max_tokens over max_seq_len", lambda: request("hello " * 3000, 2000),
     ["max_tokens", "plus max_tokens (2000)", "max_seq_len 4096"], "model"),
    ("prompt over 4 MiB", lambda: request("a" * (4 << 20 | 1), 8), ["text_input", "over the limit of 4194304"], "model"),
    ("non-UTF-8 prompt", lambda: request(b"ok \xff\xfe", 8), ["text_input", "not valid UTF-8", "byte 3"], "model"),
    # max_tokens
    ("max_tokens 0", lambda: request("x", 0), ["max_tokens", "integer >= 1", "got 0"], "model"),
    ("max_tokens negative", lambda: request("x", -5), ["max_tokens", ">= 1", "got -5"], "model"),
    ("max_tokens over the limit", lambda: request("x", 5000), ["max_tokens", "5000 exceeds the limit 4095"], "model"),
    ("max_tokens missing", lambda: [tensor("text_input", b"x", B)], ["max_tokens: required"], "model"),
    ("min_tokens over max_tokens", lambda: request("x", 4, min_tokens=(9, I32)),
     ["min_tokens", "within 0..max_tokens (4)", "got 9"], "model"),
    # dtypes and shapes
    ("max_tokens as FP32", lambda: [tensor("text_input", b"x", B), tensor("max_tokens", 8.0, F32)],
     ["'max_tokens'", "FP32", "expects 'INT32'"], TRITON),
    ("temperature as INT32", lambda: request("x", 8, temperature=(1, I32)), ["'temperature'", "expects 'FP32'"], TRITON),
    ("stream as BYTES", lambda: request("x", 8, top_k=(b"1", B)), ["'top_k'", "BYTES", "expects 'INT32'"], TRITON),
    ("text_input of shape [1, 2]", lambda: [tensor("text_input", [b"a", b"b"], B), tensor("max_tokens", 8, I32)],
     ["'text_input'", "Expected [-1,1], got [1,2]"], TRITON),
    ("text_input of rank 3", lambda: [tensor("text_input", np.array([[[b"a"]]], dtype=B), None),
                                      tensor("max_tokens", 8, I32)],
     ["'text_input'", "got [1,1,1]"], TRITON),
    ("batch of two", lambda: [tensor("text_input", np.array([[b"a"], [b"b"]], dtype=B), None),
                              tensor("max_tokens", np.array([[8], [8]], dtype=I32), None)],
     ["text_input", "one value per request (shape [1, 1])", "[2, 1]"], "model"),
    ("batch sizes differ", lambda: [tensor("text_input", np.array([[b"a"], [b"b"]], dtype=B), None),
                                    tensor("max_tokens", 8, I32)],
     ["'text_input'", "batch size does not match"], TRITON),
    # sampling
    ("temperature negative", lambda: request("x", 8, temperature=(-1.0, F32)),
     ["temperature", "finite number >= 0", "-1.0"], "model"),
    ("temperature NaN", lambda: request("x", 8, temperature=(np.nan, F32)), ["temperature", "finite", "nan"], "model"),
    ("temperature inf", lambda: request("x", 8, temperature=(np.inf, F32)), ["temperature", "finite", "inf"], "model"),
    ("top_p above 1", lambda: request("x", 8, top_p=(1.5, F32)), ["top_p", "in (0, 1]", "1.5"], "model"),
    ("top_p 0 with top_k 5", lambda: request("x", 8, top_p=(0.0, F32), top_k=(5, I32)),
     ["top_p", "in (0, 1]", "0.0"], "model"),
    ("top_p negative", lambda: request("x", 8, top_p=(-0.5, F32)), ["top_p", "in (0, 1]", "-0.5"], "model"),
    ("top_k negative", lambda: request("x", 8, top_k=(-1, I32)), ["top_k", ">= 0", "-1"], "model"),
    ("seed over 2^63", lambda: request("x", 8, seed=(2**64 - 1, U64)), ["seed", "0..2^63-1"], "model"),
    ("repetition_penalty 0", lambda: request("x", 8, repetition_penalty=(0.0, F32)),
     ["repetition_penalty", "positive", "0.0"], "model"),
    ("presence_penalty 5", lambda: request("x", 8, presence_penalty=(5.0, F32)),
     ["presence_penalty", "within [-2, 2]", "5.0"], "model"),
    ("beam_width 2", lambda: request("x", 8, beam_width=(2, I32)), ["beam_width", "only 1", "got 2"], "model"),
    ("num_return_sequences 3", lambda: request("x", 8, num_return_sequences=(3, I32)),
     ["num_return_sequences", "only 1", "got 3"], "model"),
    # stop / bad words
    ("65 stop words", lambda: request("x", 8, stop_words=([b"w%d" % i for i in range(65)], B)),
     ["stop_words", "at most 64", "got 65"], "model"),
    ("a stop word of 300 characters", lambda: request("x", 8, stop_words=([b"a" * 300, b"b"], B)),
     ["stop_words", "at most 256 characters"], "model"),
    ("10000 bad words", lambda: request("x", 8, bad_words=([b"w"] * 10000, B)),
     ["bad_words", "at most 64", "got 10000"], "model"),
    ("non-UTF-8 stop word", lambda: request("x", 8, stop_words=([b"\xc3("], B)), ["stop_words", "UTF-8"], "model"),
    # messages
    ("messages not JSON", lambda: chat(b"[{role: user}"), ["messages", "not valid JSON"], "model"),
    ("messages not a list", lambda: chat({"role": "user", "content": "hi"}),
     ["messages", "non-empty list of {\"role\": str, \"content\": str}"], "model"),
    ("messages empty", lambda: chat([]), ["messages", "non-empty list"], "model"),
    ("messages content not a string", lambda: chat([{"role": "user", "content": 5}]),
     ["messages", "\"content\": str"], "model"),
    ("messages unknown role", lambda: chat([{"role": "wizard", "content": "hi"}]),
     ["messages", "unknown role 'wizard'", "system, user, assistant, tool"], "model"),
    ("messages malformed tool_calls", lambda: chat([{"role": "assistant", "content": "", "tool_calls": [{"x": 1}]}]),
     ["messages", "chat template cannot render"], "model"),
    ("messages nested too deeply", lambda: chat(b"[" * 100000 + b"]" * 100000), ["messages", "nested"], "model"),
    ("messages and text_input", lambda: chat([{"role": "user", "content": "hi"}], text_input=(b"x", B)),
     ["text_input or messages, not both"], "model"),
    ("messages over max_seq_len", lambda: chat([{"role": "user", "content": "hello " * 5000}]),
     ["text_input", "over the limit of 4095"], "model"),
    # guided decoding
    ("unknown guide type", lambda: guided("yaml", "x"),
     ["guided_decoding_guide_type", "'yaml'", "json_schema, json, regex, ebnf_grammar"], "model"),
    ("guide without a type", lambda: request("x", 8, guided_decoding_guide=(b"{}", B)),
     ["guided_decoding_guide", "needs guided_decoding_guide_type"], "model"),
    ("regex without a guide", lambda: request("x", 8, guided_decoding_guide_type=(b"regex", B)),
     ["guided_decoding_guide", "required for guide type regex"], "model"),
    ("schema not JSON", lambda: guided("json_schema", "{type: object"), ["guided_decoding_guide", "not valid JSON"],
     "model"),
    ("schema a list", lambda: guided("json_schema", "[1]"), ["guided_decoding_guide", "object or a boolean"], "model"),
    ("invalid JSON schema", lambda: guided("json_schema", '{"type": "nonsense"}'),
     ["guided_decoding_guide", "invalid JSON schema", "'nonsense'"], "model"),
    ("schema false", lambda: guided("json_schema", "false"), ["guided_decoding_guide", "admits no value"], "model"),
    ("schema not {}", lambda: guided("json_schema", '{"not": {}}'),
     ["guided_decoding_guide", "admits no value", "\"not\""], "model"),
    ("schema const of the wrong type", lambda: guided("json_schema", '{"type": "string", "const": 5}'),
     ["guided_decoding_guide", "admits no value", "\"const\""], "model"),
    ("schema allOf string and integer", lambda: guided("json_schema", '{"allOf": [{"type": "string"}, {"type": "integer"}]}'),
     ["guided_decoding_guide", "admits no value", "allOf"], "model"),
    ("schema required property false", lambda: guided(
        "json_schema", '{"type": "object", "properties": {"a": false}, "required": ["a"]}'),
     ["guided_decoding_guide", "admits no value", "properties/a"], "model"),
    ("schema minLength over maxLength", lambda: guided("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'),
     ["guided_decoding_guide", "minLength 5 is greater than maxLength 2"], "model"),
    ("empty enum", lambda: guided("json_schema", '{"enum": []}'), ["guided_decoding_guide", "admits no value", '"enum" is empty'], "model"),
    ("bad regex", lambda: guided("regex", "(ab"), ["guided_decoding_guide", "cannot compile the regex"], "model"),
    ("bad EBNF", lambda: guided("ebnf_grammar", "root ::= ("), ["guided_decoding_guide", "cannot compile the ebnf_grammar"],
     "model"),
    # unknown names
    ("unknown input tensor", lambda: request("x", 8, frobnicate=(1, I32)),
     ["unexpected inference input 'frobnicate'", "'qwen3'"], TRITON),
    ("unknown request parameter", lambda: (request("x", 8), {"temperature": 0.5, "foo": 1}),
     ["parameters", "unknown request parameter(s) 'foo', 'temperature'", "input tensors"], "model"),
]


@pytest.fixture(scope="module")
def server(triton_server):
    before = metric(triton_server, "qwentrt_requests_rejected_total")
    triton_server.bad_input_rows = []
    yield triton_server
    record("bad_input", {"rows": len(triton_server.bad_input_rows),
                         "refused_by_model": sum(1 for r in triton_server.bad_input_rows if r == "model"),
                         "refused_by_triton": sum(1 for r in triton_server.bad_input_rows if r == TRITON),
                         "rejected_counter_delta": metric(triton_server, "qwentrt_requests_rejected_total") - before})


@pytest.mark.parametrize("make,needles,who", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_invalid_argument_naming_field_and_limit(server, make, needles, who):
    made = make()
    inputs, parameters = made if isinstance(made, tuple) else (made, None)
    responses, err = run(server.grpc_url, inputs, parameters=parameters, timeout=60)
    assert err is not None and not responses, "accepted"
    assert isinstance(err, InferenceServerException)
    message = err.message()
    assert to_server_error(err).code == "INVALID_ARGUMENT", message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if who == "model":  # our messages start with Triton's code (a gRPC stream carries no status)
        assert message.startswith("[INVALID_ARG] ")
    server.bad_input_rows.append(who)


def _validate(server, text, schema, shape=(1, 1)):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = [tensor(n, np.array([v] * int(np.prod(shape)), dtype=B).reshape(shape), None)
                  for n, v in (("text", text), ("schema", schema)) if v is not None]
        result = client.infer("json_validator", inputs)
        valid = [bool(v) for v in result.as_numpy("valid").reshape(-1)]
        errors = [e.decode() for e in result.as_numpy("errors").reshape(-1)]
        return (valid[0], errors[0]) if shape[0] == 1 else (valid, errors)
    finally:
        client.close()


@pytest.mark.parametrize("text,schema,shape,needles", [
    (b"{}", b"{type: object", (1, 1), ["schema: not valid JSON"]),
    (b"{}", b'{"type": "nonsense"}', (1, 1), ["schema: invalid JSON schema", "'nonsense'"]),
    (b"\xff{}", b'{"type": "object"}', (1, 1), ["text: not valid UTF-8", "row 0, byte 0"]),
    (b"{}", b"\xc3(", (1, 1), ["schema: not valid UTF-8"]),
    (b"{}", None, (1, 1), ["expected 2 inputs but got 1", "json_validator"]),
    (b"{}", b'{"type": "object"}', (1, 2), ["unexpected shape for input", "Expected [-1,1], got [1,2]"]),
], ids=["schema not JSON", "invalid schema", "text not UTF-8", "schema not UTF-8", "schema missing", "shape [1, 2]"])
def test_json_validator_bad_input_is_invalid_argument(server, text, schema, shape, needles):
    with pytest.raises(InferenceServerException) as e:
        _validate(server, text, schema, shape)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value.message()
    for needle in needles:
        assert needle in e.value.message()


def test_json_validator_answers_invalid_text_without_an_error(server):
    assert _validate(server, b"not json", b'{"type": "object"}') == (False, "text is not JSON: Expecting value at 0")
    valid, errors = _validate(server, b'{"a": "x"}', b'{"properties": {"a": {"type": "integer"}}}')
    assert not valid and errors.startswith("a: 'x' is not of type 'integer'")
    assert _validate(server, b'{"a": 1}', b'{"properties": {"a": {"type": "integer"}}}', (3, 1)) == ([True] * 3, [""] * 3)


def test_after_the_table_the_server_is_ready_serves_and_its_pages_are_idle(server):
    assert is_ready(server)
    responses, err = run(server.grpc_url, request("still fine?", 6, False, temperature=(0.0, F32)))
    assert err is None and len(responses) == 1
    assert int(responses[0].as_numpy("num_output_tokens").reshape(-1)[0]) == 6
    wait_idle(server, 30)
    model_rows = sum(1 for r in server.bad_input_rows if r == "model")
    assert metric(server, "qwentrt_requests_rejected_total") >= model_rows
