"""qwentrt.client against a fake "qwen3": a decoupled PyTriton model with the server's tensor names
that echoes the prompt back word by word (every third response carries two words, as the real
server does when it coalesces tokens under load). The pure parts (tensors, timings, percentiles,
error mapping, response parsing) are tested without a server."""

import asyncio
import json
import os
import statistics
import sysconfig
import time

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from qwentrt.client import (AsyncClient, Client, GenerateParams, ProbeRecord, ServerError, Timings,
                            format_table, percentiles, run_probe, summarize)
from qwentrt.client.grpc_client import parse_response, to_server_error
from qwentrt.serving.server import free_port, free_ports

# ---------------------------------------------------------------------------------- pure parts


def _by_name(inputs):
    return {t.name(): t for t in inputs}


def test_to_inputs_sends_only_what_is_set():
    t = _by_name(GenerateParams(max_tokens=7).to_inputs("hi", stream=True))
    assert set(t) == {"text_input", "max_tokens", "stream"}
    assert [(n, t[n].shape(), t[n].datatype()) for n in sorted(t)] == [
        ("max_tokens", [1, 1], "INT32"), ("stream", [1, 1], "BOOL"), ("text_input", [1, 1], "BYTES")]


def test_to_inputs_shapes_and_dtypes():
    p = GenerateParams(max_tokens=5, temperature=0.7, top_k=20, top_p=0.8, seed=2**40, min_tokens=2,
                       stop=["\n\n", "END"], bad_words="bad", repetition_penalty=1.1,
                       presence_penalty=0.5, frequency_penalty=0.25, guide_type="json_schema",
                       guide={"type": "object"}, exclude_input_in_output=True, return_log_probs=True,
                       end_id=151645)
    msgs = [{"role": "user", "content": "hello"}]
    t = _by_name(p.to_inputs(messages=msgs, stream=False))
    expected = {
        "messages": ([1, 1], "BYTES"), "max_tokens": ([1, 1], "INT32"), "stream": ([1, 1], "BOOL"),
        "temperature": ([1, 1], "FP32"), "top_k": ([1, 1], "INT32"), "top_p": ([1, 1], "FP32"),
        "seed": ([1, 1], "UINT64"), "min_tokens": ([1, 1], "INT32"), "stop_words": ([1, 2], "BYTES"),
        "bad_words": ([1, 1], "BYTES"), "repetition_penalty": ([1, 1], "FP32"),
        "presence_penalty": ([1, 1], "FP32"), "frequency_penalty": ([1, 1], "FP32"),
        "guided_decoding_guide_type": ([1, 1], "BYTES"), "guided_decoding_guide": ([1, 1], "BYTES"),
        "exclude_input_in_output": ([1, 1], "BOOL"), "return_log_probs": ([1, 1], "BOOL"),
        "end_id": ([1, 1], "INT32"),
    }
    assert {n: (x.shape(), x.datatype()) for n, x in t.items()} == expected


def test_to_inputs_rejects_bad_combinations():
    with pytest.raises(ValueError):
        GenerateParams().to_inputs()
    with pytest.raises(ValueError):
        GenerateParams().to_inputs("a", messages=[])
    with pytest.raises(ValueError):
        GenerateParams(guide_type="regex").to_inputs("a")
    with pytest.raises(ValueError):
        GenerateParams(guide_type="yaml", guide="x").to_inputs("a")


def test_timings_math():
    t = Timings(start=10.0)
    for at, k in [(10.5, 2), (10.6, 1), (10.6, 0), (10.9, 3), (11.0, 1)]:
        t.add(at, k)
    t.end = 11.2
    assert t.ttft_s == pytest.approx(0.5) and t.e2e_s == pytest.approx(1.2)
    assert t.inter_token_s == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.1, 0.1])  # 7 tokens -> 6 gaps
    assert statistics.mean(t.inter_token_s) == pytest.approx(t.tpot_s)
    empty = Timings(start=1.0)
    assert empty.ttft_s is None and empty.inter_token_s == [] and empty.tpot_s is None


def test_percentiles():
    assert percentiles(list(range(101))) == {50: 50.0, 90: 90.0, 99: 99.0}
    assert percentiles([3.0], (50,)) == {50: 3.0}
    assert all(np.isnan(v) for v in percentiles([]).values())


def _records():
    ok = [ProbeRecord(start=i, end=i + 1.0, ttft_s=0.1 * (i + 1), itl_s=[0.01] * 9, e2e_s=1.0,
                      input_tokens=8, output_tokens=10, finish_reason="length") for i in range(4)]
    return ok + [ProbeRecord(start=0, end=0.5, error="INVALID_ARGUMENT: no")]


def test_summarize_and_table(monkeypatch):
    s = summarize(_records())
    assert s["requests"] == 5 and s["ok"] == 4 and s["errors"] == 1
    assert s["error_codes"] == {"INVALID_ARGUMENT": 1}
    assert s["wall_s"] == 4.0 and s["output_tok_s"] == 10.0 and s["requests_s"] == 1.0
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0) and s["itl_ms"]["p99"] == pytest.approx(10.0)
    text = format_table(s)
    assert all(w in text for w in ("TTFT", "ITL", "E2E", "p50", "p99", "250.00", "1 errors"))
    monkeypatch.setitem(__import__("sys").modules, "rich.console", None)  # plain-text fallback
    plain = format_table(s)
    assert plain.splitlines()[1].split()[:2] == ["TTFT", "250.00"]


def test_error_mapping():
    tb = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
          'pytriton.exceptions.PyTritonBadParameterError: max_tokens must be >= 1\n')
    e = to_server_error(InferenceServerException(msg=tb))
    assert (e.code, e.message) == ("INVALID_ARGUMENT", "PyTritonBadParameterError: max_tokens must be >= 1")
    assert to_server_error(InferenceServerException("down", status="StatusCode.UNAVAILABLE")).code == "UNAVAILABLE"
    assert to_server_error(InferenceServerException("RESOURCE_EXHAUSTED: kv cache full")).code == "RESOURCE_EXHAUSTED"
    assert to_server_error(InferenceServerException(
        "[request id: r] inference input 'max_tokens' data-type is 'INT64', but model 'qwen3' expects 'INT32'"
    )).code == "INVALID_ARGUMENT"
    assert to_server_error(InferenceServerException("Request for unknown model: 'x' is not found")).code == "NOT_FOUND"
    assert to_server_error(InferenceServerException("boom")).code == "INTERNAL"


def _result(final: bool, **outputs) -> InferResult:
    resp = service_pb2.ModelInferResponse(id="r")
    for name, (value, dt) in outputs.items():
        arr = np.array([[value]], dtype=object if dt == "BYTES" else {"INT32": np.int32, "FP32": np.float32}[dt])
        resp.outputs.add(name=name, datatype=dt, shape=list(arr.shape))
        resp.raw_output_contents.append(serialize_byte_tensor(arr).item() if dt == "BYTES" else arr.tobytes())
    resp.parameters["triton_final_response"].bool_param = final
    return InferResult(resp)


def test_parse_response_final_flag_on_data_and_empty_final():
    d, final = parse_response(_result(True, text_output=(b" end", "BYTES"), num_output_tokens=(9, "INT32"),
                                      num_input_tokens=(4, "INT32"), finish_reason=(b"stop", "BYTES"),
                                      cum_log_probs=(-1.5, "FP32")))
    assert final and (d.text, d.num_output_tokens, d.num_input_tokens, d.finish_reason, d.cum_log_prob) == (
        " end", 9, 4, "stop", -1.5)
    d, final = parse_response(_result(False, text_output=(b"a", "BYTES"), num_output_tokens=(1, "INT32"),
                                      finish_reason=(b"", "BYTES")))
    assert not final and d.finish_reason == "" and d.num_input_tokens is None
    assert parse_response(_result(True)) == (None, True)


def test_unreachable_server_is_unavailable():
    url = f"localhost:{free_port()}"
    with Client(url) as c:
        assert not c.is_ready()
        with pytest.raises(ServerError) as e:
            c.generate("a b", timeout=10)
        assert e.value.code == "UNAVAILABLE"

    async def go():
        async with AsyncClient(url) as c:
            await c.generate("a b", timeout=10)
    with pytest.raises(ServerError) as e:
        asyncio.run(go())
    assert e.value.code == "UNAVAILABLE"


# ---------------------------------------------------------------------------- the fake server


def _first(req, name, default=None):
    return req[name].reshape(-1)[0] if name in req else default


def _fake_qwen3(requests):
    """Echo the prompt (or the chat's contents) word by word; honour max_tokens, min_tokens (by
    cycling the words) and stop_words."""
    from pytriton.exceptions import PyTritonBadParameterError

    (req,) = requests  # no dynamic batcher: one request per call
    max_tokens = int(_first(req, "max_tokens"))
    if max_tokens <= 0:
        raise PyTritonBadParameterError(f"max_tokens must be >= 1, got {max_tokens}")
    if "messages" in req:
        words = " ".join(m["content"] for m in json.loads(_first(req, "messages"))).split()
    else:
        words = _first(req, "text_input").decode().split()
    stop = {w.decode() for w in req["stop_words"].reshape(-1)} if "stop_words" in req else set()
    n = min(max_tokens, max(len(words), int(_first(req, "min_tokens", 0))))
    out = [words[i % len(words)] for i in range(n)]
    reason = "length" if n == max_tokens else "stop"
    if hit := [i for i, w in enumerate(out) if w in stop]:
        out, reason = out[:hit[0]], "stop"

    def response(text, n_out, finish=""):
        return [{"text_output": np.array([[text.encode()]], dtype=object),
                 "num_input_tokens": np.array([[len(words)]], dtype=np.int32),
                 "num_output_tokens": np.array([[n_out]], dtype=np.int32),
                 "finish_reason": np.array([[finish.encode()]], dtype=object),
                 "cum_log_probs": np.array([[-0.5 * n_out]], dtype=np.float32)}]

    i = sent = 0
    while i < len(out):
        chunk = out[i:i + (2 if sent % 3 == 2 else 1)]
        text = (" " if i else "") + " ".join(chunk)
        i, sent = i + len(chunk), sent + 1
        time.sleep(0.002)
        yield response(text, i, reason if i == len(out) else "")
    if not out:
        yield response("", 0, reason)


def _model_tensors():
    from pytriton.model_config import Tensor

    def t(name, dtype, shape=(1,), optional=True):
        return Tensor(name=name, dtype=dtype, shape=shape, optional=optional)

    inputs = [t("text_input", bytes), t("max_tokens", np.int32, optional=False), t("stream", np.bool_),
              t("temperature", np.float32), t("top_k", np.int32), t("top_p", np.float32),
              t("seed", np.uint64), t("min_tokens", np.int32), t("repetition_penalty", np.float32),
              t("presence_penalty", np.float32), t("frequency_penalty", np.float32),
              t("stop_words", bytes, (-1,)), t("bad_words", bytes, (-1,)), t("end_id", np.int32),
              t("pad_id", np.int32), t("exclude_input_in_output", np.bool_),
              t("return_log_probs", np.bool_), t("beam_width", np.int32),
              t("num_return_sequences", np.int32), t("guided_decoding_guide_type", bytes),
              t("guided_decoding_guide", bytes), t("messages", bytes)]
    outputs = [Tensor(name="text_output", dtype=bytes, shape=(1,)),
               Tensor(name="num_input_tokens", dtype=np.int32, shape=(1,)),
               Tensor(name="num_output_tokens", dtype=np.int32, shape=(1,)),
               Tensor(name="finish_reason", dtype=bytes, shape=(1,)),
               Tensor(name="cum_log_probs", dtype=np.float32, shape=(1,))]
    return inputs, outputs


@pytest.fixture(scope="module")
def server():
    """(grpc url, metrics url) of a PyTriton Triton serving the fake "qwen3"; skips if it cannot start."""
    pytriton = pytest.importorskip("pytriton.triton")
    from pytriton.model_config import ModelConfig

    # Triton's Python stub links the system libpython3.X but runs this interpreter's stdlib; when
    # this interpreter has its own shared libpython (pyenv), the stub must load that one instead
    # (else e.g. multiprocessing fails: '_thread.RLock' object has no attribute '_recursion_count').
    old = os.environ.get("LD_LIBRARY_PATH")
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir:
        os.environ["LD_LIBRARY_PATH"] = libdir + (f":{old}" if old else "")
    grpc_port, http_port, metrics_port = free_ports(3)
    triton = None
    try:
        triton = pytriton.Triton(config=pytriton.TritonConfig(
            grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port))
        inputs, outputs = _model_tensors()
        triton.bind("qwen3", infer_func=_fake_qwen3, inputs=inputs, outputs=outputs,
                    config=ModelConfig(decoupled=True, max_batch_size=8, batcher=None))
        triton.run()
    except Exception as e:  # noqa: BLE001 - any failure to start means "cannot test here"
        if triton is not None:
            triton.stop()
        lines = str(e).splitlines() or [""]
        cause = [ln.strip() for ln in lines if "Error:" in ln][-1:]  # the root of a traceback, if any
        pytest.skip(f"PyTriton's Triton server could not start here: {type(e).__name__}: "
                    + " ... ".join([lines[0][:200], *cause]))
    finally:
        if old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = old
    yield f"localhost:{grpc_port}", f"http://localhost:{metrics_port}/metrics"
    triton.stop()


@pytest.fixture
def client(server):
    with Client(server[0]) as c:
        yield c


PROMPT = "one two three four five six seven eight nine ten"


def test_generate_equals_concatenated_stream(client):
    assert client.is_ready()
    params = GenerateParams(max_tokens=7)
    deltas = list(client.stream(PROMPT, params=params))
    g = client.generate(PROMPT, params=params)
    assert g.text == "".join(d.text for d in deltas) == "one two three four five six seven"
    assert [d.num_output_tokens for d in deltas] == [1, 2, 4, 5, 6, 7]  # every third carries two
    assert [d.finish_reason for d in deltas] == [""] * 5 + ["length"]
    assert (g.num_input_tokens, g.num_output_tokens, g.finish_reason, g.chunks) == (10, 7, "length", 6)
    assert g.cum_log_prob == pytest.approx(-3.5)


def test_finish_stop_messages_and_stop_words(client):
    g = client.generate(PROMPT, params=GenerateParams(max_tokens=100))
    assert (g.text, g.finish_reason) == (PROMPT, "stop")
    g = client.generate(messages=[{"role": "user", "content": "alpha beta"}], params=GenerateParams(max_tokens=5))
    assert g.text == "alpha beta"
    g = client.generate(PROMPT, params=GenerateParams(max_tokens=100, stop=["four"]))
    assert (g.text, g.finish_reason) == ("one two three", "stop")


def test_timings_are_consistent(client):
    g = client.generate(PROMPT, params=GenerateParams(max_tokens=10))
    t = g.timings
    assert 0 < t.ttft_s <= t.e2e_s
    assert len(t.inter_token_s) == g.num_output_tokens - 1 == 9
    assert all(x >= 0 for x in t.inter_token_s)
    assert sum(t.inter_token_s) == pytest.approx(t.token_times[-1] - t.first_token)
    assert t.token_counts == [1, 1, 2, 1, 1, 2, 1, 1] and len(t.token_times) == g.chunks == 8


def test_bad_request_is_invalid_argument_and_client_recovers(client):
    with pytest.raises(ServerError) as e:
        client.generate(PROMPT, params=GenerateParams(max_tokens=0))
    assert e.value.code == "INVALID_ARGUMENT" and "max_tokens must be >= 1" in e.value.message
    assert client.generate("a b", params=GenerateParams(max_tokens=4)).text == "a b"


def test_unknown_model_is_not_found(server):
    with Client(server[0], model="nope") as c:
        assert not c.is_ready()
        with pytest.raises(ServerError) as e:
            c.generate("a")
        assert e.value.code == "NOT_FOUND"


def test_abandoned_stream_and_timeout_leave_client_usable(client):
    for d in client.stream(PROMPT, params=GenerateParams(max_tokens=10)):
        break  # cancels the request
    with pytest.raises(ServerError) as e:
        client.generate(PROMPT, params=GenerateParams(max_tokens=2000, min_tokens=2000), timeout=0.05)
    assert e.value.code == "DEADLINE_EXCEEDED"
    assert client.generate(PROMPT, params=GenerateParams(max_tokens=3)).text == "one two three"


def test_metrics(client, server):
    m = client.metrics(server[1])
    assert any(k.startswith("nv_inference_request_success") for k in m)


def test_async_client_concurrent(server):
    async def go():
        async with AsyncClient(server[0]) as c:
            assert await c.is_ready()
            prompts = [" ".join(f"w{i}x{j}" for j in range(5 + i % 7)) for i in range(20)]
            gens = await asyncio.gather(*(c.generate(p, params=GenerateParams(max_tokens=50)) for p in prompts))
            deltas = [d async for d in c.stream(PROMPT, params=GenerateParams(max_tokens=4))]
            with pytest.raises(ServerError) as e:
                await c.generate(PROMPT, params=GenerateParams(max_tokens=-1))
            with pytest.raises(ServerError) as t:
                await c.generate(PROMPT, params=GenerateParams(max_tokens=2000, min_tokens=2000), timeout=0.05)
            return prompts, gens, deltas, e.value, t.value

    prompts, gens, deltas, err, timeout = asyncio.run(go())
    for p, g in zip(prompts, gens):
        assert (g.text, g.finish_reason, g.num_output_tokens) == (p, "stop", len(p.split()))
        assert len(g.timings.inter_token_s) == g.num_output_tokens - 1 and g.timings.ttft_s <= g.timings.e2e_s
    assert "".join(d.text for d in deltas) == "one two three four" and deltas[-1].finish_reason == "length"
    assert err.code == "INVALID_ARGUMENT"
    assert timeout.code == "DEADLINE_EXCEEDED"


def test_probe(server):
    records = asyncio.run(run_probe(server[0], n=12, concurrency=4, prompt_len=6, output_len=9))
    assert len(records) == 12 and all(r.error is None for r in records)
    # The fake counts words as tokens; synthetic prompts are 6 Qwen3 tokens (5 or 6 words).
    assert all((r.output_tokens, r.finish_reason, len(r.itl_s)) == (9, "length", 8) and 5 <= r.input_tokens <= 6
               for r in records)
    s = summarize(records)
    assert (s["ok"], s["errors"], s["output_tokens"]) == (12, 0, 108)
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]
    assert s["output_tok_s"] > 0 and s["requests_s"] > 0
    assert "TTFT" in format_table(s)
    bad = asyncio.run(run_probe(server[0], n=2, concurrency=2, prompts=["a b"], output_len=0))
    assert summarize(bad)["error_codes"] == {"INVALID_ARGUMENT": 2}


def test_qwentrt_bracketed_codes_map_to_grpc_codes():
    from tritonclient.utils import InferenceServerException

    from qwentrt.client.grpc_client import to_server_error
    err = to_server_error(InferenceServerException("[INVALID_ARG] max_tokens: must be an integer >= 1, got 0"))
    assert err.code == "INVALID_ARGUMENT" and err.message == "max_tokens: must be an integer >= 1, got 0"
    assert to_server_error(InferenceServerException("[UNAVAILABLE] server busy")).code == "UNAVAILABLE"
