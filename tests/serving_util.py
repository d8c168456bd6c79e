"""Helpers for the tests that talk to a real tritonserver: start one on free loopback ports, send
requests over gRPC, read the metrics, wait for the engine's pages to be idle, record figures."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

TEST_KEY = "test-restricted-key"  # the session server's key for the restricted protocol groups
DTYPES = {np.object_: "BYTES", np.int32: "INT32", np.int64: "INT64", np.float32: "FP32", np.float64: "FP64",
          np.bool_: "BOOL", np.uint64: "UINT64", np.uint8: "UINT8", np.int8: "INT8", np.float16: "FP16"}


@contextlib.contextmanager
def start_server(engine_dir, root: Path, key: str | None = None, params: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, exit_timeout_s: int = 30, models=("qwen3", "json_validator")):
    """A tritonserver serving `engine_dir` on free 127.0.0.1 ports; skips the test if there is none."""
    from qwentrt.serving.repository import write_repository
    from qwentrt.serving.server import ServerError, ServerOptions, TritonServer, find_tritonserver, free_ports

    try:
        find_tritonserver()
    except ServerError as e:
        pytest.skip(str(e))
    repo = write_repository(engine_dir, root / "repo", device="cpu", params=params)
    srv = TritonServer(ServerOptions(repo, *free_ports(3), restricted_key=key,
                                     exit_timeout_s=exit_timeout_s, env=env or {}),
                       log_file=root / "triton.log")
    srv.start()
    try:
        srv.wait_ready(models, 240)
        yield srv
    finally:
        srv.stop()


def tensor(name: str, value, dtype):
    import tritonclient.grpc as grpcclient

    arr = value if isinstance(value, np.ndarray) else np.array([value if isinstance(value, list) else [value]],
                                                               dtype=dtype)
    t = grpcclient.InferInput(name, list(arr.shape), DTYPES[arr.dtype.type])
    t.set_data_from_numpy(arr)
    return t


def request(prompt, max_tokens, stream=True, **extra):
    """text_input, max_tokens and stream, plus extra NAME=(value, numpy dtype) tensors."""
    inputs = [tensor("text_input", prompt if isinstance(prompt, bytes) else prompt.encode(), np.object_),
              tensor("max_tokens", max_tokens, np.int32), tensor("stream", stream, np.bool_)]
    return inputs + [tensor(name, value, dtype) for name, (value, dtype) in extra.items()]


def run(url: str, inputs, model: str = "qwen3", parameters=None, timeout: float = 120, cancel_after=None):
    """One request over a gRPC stream: (data responses, error or None)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True, parameters=parameters)
        responses, error = [], None
        deadline = time.monotonic() + timeout
        while True:
            result, err = results.get(timeout=max(0.0, deadline - time.monotonic()))
            if err is not None:
                return responses, err
            resp = result.get_response()
            if resp.outputs:
                responses.append(result)
            if cancel_after is not None and len(responses) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return responses, None
            if resp.parameters["triton_final_response"].bool_param:
                return responses, error
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def metrics(srv) -> dict[str, float]:
    """qwentrt_* and nv_* metrics of the qwen3 model as {name: value} (labels dropped)."""
    body = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#") or 'model="qwen3"' not in line:
            continue
        name = line.split("{", 1)[0]
        if name.endswith(("_bucket", "_sum", "_count")):
            continue
        out[name] = float(line.rsplit(" ", 1)[1])
    return out


def metric(srv, name: str) -> float:
    m = metrics(srv)
    assert name in m, f"{name} not in metrics"
    return m[name]


def wait_idle(srv, timeout: float = 60) -> float:
    """Seconds until the engine holds no request and no KV page (gauges refresh every 0.2 s)."""
    start = time.monotonic()
    while True:
        m = metrics(srv)
        if m.get("qwentrt_kv_pages_used") == 0 and m.get("qwentrt_running") == 0 and m.get("qwentrt_waiting") == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"engine not idle after {timeout} s: {m}"
        time.sleep(0.05)


def is_ready(srv) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        return client.is_server_ready() and client.is_model_ready("qwen3")
    except Exception:
        return False
    finally:
        client.close()


def record(name: str, figures: dict) -> None:
    """Print a test's figures; with QWENTRT_RELIABILITY_DIR set, also write them there as NAME.json."""
    figures = {"test": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    print(f"\nRELIABILITY {json.dumps(figures)}")
    out = os.environ.get("QWENTRT_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
