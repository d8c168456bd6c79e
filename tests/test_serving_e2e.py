"""End to end on the CPU: a real tritonserver on free ports serving a tiny engine, talked to over gRPC
the way TensorRT-LLM's clients do."""

import json
import queue
import time
import urllib.request

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from qwentrt.serving.server import free_ports  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(triton_server):
    return triton_server  # the session's server (tests/conftest.py)


def tensor(name, value, dtype):
    arr = np.array([value if isinstance(value, list) else [value]], dtype=dtype)
    t = tritonclient.InferInput(name, list(arr.shape), {np.object_: "BYTES", np.int32: "INT32", np.float32: "FP32",
                                                        np.bool_: "BOOL", np.uint64: "UINT64"}[dtype])
    t.set_data_from_numpy(arr)
    return t


def request(prompt, max_tokens, stream=True, **extra):
    inputs = [tensor("text_input", prompt.encode(), np.object_), tensor("max_tokens", max_tokens, np.int32),
              tensor("stream", stream, np.bool_)]
    for name, (value, dtype) in extra.items():
        inputs.append(tensor(name, value, dtype))
    return inputs


def run(server, inputs, model="qwen3", cancel_after=None):
    """Send one request over a gRPC stream; returns (responses, error)."""
    client = tritonclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    responses, error = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        result, err = results.get(timeout=120)
        if err is not None:
            error = err
            break
        resp = result.get_response()
        if resp.outputs:
            responses.append(result)
        if cancel_after is not None and len(responses) >= cancel_after:
            client.stop_stream(cancel_requests=True)
            client.close()
            return responses, None
        if resp.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return responses, error


def text_of(result):
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def metric(server, name):
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


GREEDY = dict(temperature=(0.0, np.float32))


def test_stream_concatenates_to_the_non_streamed_result(server):
    streamed, err = run(server, request("Once upon a time", 24, True, **GREEDY))
    assert err is None and len(streamed) >= 2
    final = streamed[-1]
    assert final.get_response().parameters["triton_final_response"].bool_param
    assert final.as_numpy("finish_reason").reshape(-1)[0] == b"length"
    assert int(final.as_numpy("num_output_tokens").reshape(-1)[0]) == 24
    whole, err = run(server, request("Once upon a time", 24, False, **GREEDY))
    assert err is None and len(whole) == 1
    # Non-streamed text starts with the prompt (TensorRT-LLM's default, exclude_input_in_output false).
    assert text_of(whole[0]) == "Once upon a time" + "".join(text_of(r) for r in streamed)
    excluded, _ = run(server, request("Once upon a time", 24, False, exclude_input_in_output=(True, np.bool_), **GREEDY))
    assert text_of(excluded[0]) == "".join(text_of(r) for r in streamed)


def test_cancel_mid_stream_frees_pages(server):
    responses, _ = run(server, request("Tell me a long story", 2000, True, **GREEDY), cancel_after=3)
    assert len(responses) >= 3
    deadline = time.monotonic() + 10
    while metric(server, "qwentrt_requests_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "qwentrt_requests_cancelled_total") >= 1
    time.sleep(1.2)  # the gauges refresh every 0.5 s
    assert metric(server, "qwentrt_kv_pages_used") == 0 and metric(server, "qwentrt_running") == 0
    assert metric(server, "qwentrt_kv_pages_free") > 0


def test_schema_guided_request_returns_valid_json(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    responses, err = run(server, request("A person as JSON:", 64, False, seed=(7, np.uint64),
                                         guided_decoding_guide_type=(b"json_schema", np.object_),
                                         guided_decoding_guide=(json.dumps(schema).encode(), np.object_),
                                         exclude_input_in_output=(True, np.bool_)))
    assert err is None
    out = responses[-1]
    doc = json.loads(text_of(out))
    assert set(doc) == {"name", "age"}
    assert bool(out.as_numpy("json_valid").reshape(-1)[0]) is True


def test_invalid_schema_is_invalid_arg(server):
    _, err = run(server, request("x", 8, False, guided_decoding_guide_type=(b"json_schema", np.object_),
                                 guided_decoding_guide=(b'{"type": "nonsense"}', np.object_)))
    assert isinstance(err, InferenceServerException)
    # A gRPC stream carries only the message: it starts with Triton's code.
    assert err.message().startswith("[INVALID_ARG] guided_decoding_guide: invalid JSON schema")


@pytest.mark.parametrize("inputs,needle", [
    (lambda: request("x", 0), "max_tokens: must be an integer >= 1"),
    (lambda: request("", 8), "text_input: the prompt is empty"),
    (lambda: request("x", 8, beam_width=(2, np.int32)), "beam_width: only 1 is supported"),
    (lambda: request("x", 8, top_p=(1.5, np.float32)), "top_p"),
])
def test_bad_requests_are_invalid_arg_and_the_server_stays_up(server, inputs, needle):
    _, err = run(server, inputs())
    assert err is not None and err.message().startswith("[INVALID_ARG]") and needle in err.message()
    ok, err = run(server, request("still alive?", 4, False))
    assert err is None and ok


def test_a_tensorrt_llm_style_request_works_unchanged(server):
    # As TensorRT-LLM's end_to_end_grpc_client.py builds it, against the default model name "ensemble".
    inputs = [tensor("text_input", b"What is machine learning?", np.object_), tensor("max_tokens", 16, np.int32),
              tensor("bad_words", b"", np.object_), tensor("stop_words", b"", np.object_),
              tensor("end_id", 151645, np.int32), tensor("pad_id", 151643, np.int32),
              tensor("top_k", 1, np.int32), tensor("top_p", 0.0, np.float32), tensor("temperature", 1.0, np.float32),
              tensor("repetition_penalty", 1.0, np.float32), tensor("presence_penalty", 0.0, np.float32),
              tensor("frequency_penalty", 0.0, np.float32), tensor("beam_width", 1, np.int32),
              tensor("stream", True, np.bool_), tensor("return_log_probs", True, np.bool_)]
    responses, err = run(server, inputs, model="ensemble")
    assert err is None and responses
    text = "".join(text_of(r) for r in responses)
    last = responses[-1]
    assert last.as_numpy("finish_reason").reshape(-1)[0] in (b"length", b"stop") and text
    assert np.isfinite(last.as_numpy("cum_log_probs")).all()


def test_http_generate_keeps_the_error_code(server):
    import urllib.error

    def post(body):
        req = urllib.request.Request(f"http://{server.http_url}/v2/models/qwen3/generate",
                                     data=json.dumps(body).encode(), method="POST")
        return urllib.request.urlopen(req, timeout=60)

    with pytest.raises(urllib.error.HTTPError) as e:
        post({"text_input": "x", "max_tokens": 0})
    assert e.value.code == 400 and "max_tokens" in e.value.read().decode()
    ok = json.loads(post({"text_input": "hi", "max_tokens": 3}).read())
    assert ok["num_output_tokens"] == 3 and ok["text_output"].startswith("hi")


def test_probe_cli_writes_json(server, tmp_path):
    from click.testing import CliRunner

    from qwentrt.cli import main
    out = tmp_path / "probe.json"
    result = CliRunner().invoke(main, ["probe", server.grpc_url, "-n", "6", "-c", "3", "--prompt-len", "20",
                                       "--output-len", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert len(data["records"]) == 6 and all(r["error"] is None for r in data["records"])
    assert all(r["output_tokens"] == 8 and r["input_tokens"] == 20 for r in data["records"])
    assert all(r["ttft_s"] <= r["e2e_s"] and len(r["itl_s"]) == 7 for r in data["records"])
    assert "TTFT" in result.output or "ttft" in result.output.lower()


def test_qwentrt_serve_starts_answers_and_stops_on_ctrl_c(tiny_engine, tmp_path):
    import signal
    import subprocess
    import sys

    grpc_port, http_port, metrics_port = free_ports(3)
    cmd = [sys.executable, "-m", "qwentrt.cli", "serve", str(tiny_engine), "--repo", str(tmp_path / "repo"),
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "ready:" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        assert f"127.0.0.1:{grpc_port}" in line
        srv = type("S", (), {"grpc_url": f"127.0.0.1:{grpc_port}"})()
        responses, err = run(srv, request("hello", 4, False))
        assert err is None and responses
    finally:
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=90)
    assert proc.returncode == 0, errs
    assert "stopping tritonserver" in errs
    assert (tmp_path / "repo" / "qwen3" / "config.pbtxt").is_file() and (tmp_path / "tritonserver.log").is_file()


def test_repo_and_serve_refuse_bad_input(tmp_path):
    from click.testing import CliRunner

    from qwentrt.cli import main
    result = CliRunner().invoke(main, ["repo", str(tmp_path / "missing"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no engine.json" in result.output
    result = CliRunner().invoke(main, ["serve", "--repo", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a qwentrt model repository" in result.output


def test_the_stub_gets_the_standard_library_of_the_python_it_links(tmp_path):
    """The Python-backend stub's embedded Python takes the first `python3` on PATH as its home; in an activated
    virtual environment of another build of the same version, that build's compiled modules failed to load in
    the stub (`_ssl`: undefined symbol). find_tritonserver puts a `python3` matching the stub's libpython first."""
    import subprocess

    from qwentrt.serving.server import ServerError, find_tritonserver

    try:
        binary = find_tritonserver()
    except ServerError as e:
        pytest.skip(str(e))
    if binary.backend_dir is None or "PATH" not in binary.env:
        pytest.skip("not nvidia-pytriton's server, or its stub links no libpython3.X")
    first = binary.env["PATH"].split(":")[0]
    python3 = f"{first}/python3"
    out = subprocess.run([python3, "-c", "import ssl, sys; print(sys.version_info[:2])"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import sys
    assert out.stdout.strip() == str(tuple(sys.version_info[:2]))
