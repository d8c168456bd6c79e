"""Security defaults, on the session's tritonserver (started as `qwentrt serve` starts it, with a key):
Triton's repository, model-config, shared-memory, logging and trace protocols refuse callers without the
key (gRPC header triton-grpc-protocol-qwentrt-key, HTTP header qwentrt-key); models cannot be loaded or
unloaded even with it (model control mode none); inference, health and metadata stay open; the server
listens on loopback only; without a key the restricted groups are locked by a random one."""

from pathlib import Path
import urllib.error
import urllib.request

import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from qwentrt.serving.server import GRPC_KEY_HEADER, KEY_HEADER, RESTRICTED  # noqa: E402
from tests.serving_util import TEST_KEY, is_ready, request, run  # noqa: E402

pytestmark = pytest.mark.slow

CALLS = {
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "model-config": lambda c, h: c.get_model_config("qwen3", headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
}


@pytest.fixture
def client(triton_server):
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()


@pytest.mark.parametrize("group", sorted(CALLS))
def test_restricted_grpc_calls_need_the_key(client, group):
    for headers in (None, {GRPC_KEY_HEADER: "wrong"}, {KEY_HEADER: TEST_KEY}):  # the bare name is not enough on gRPC
        with pytest.raises(InferenceServerException) as e:
            CALLS[group](client, headers)
        assert "This protocol is restricted" in e.value.message() and GRPC_KEY_HEADER in e.value.message()
    CALLS[group](client, {GRPC_KEY_HEADER: TEST_KEY})  # with the key it works


@pytest.mark.parametrize("method,path", [("POST", "/v2/repository/index"), ("GET", "/v2/logging"),
                                         ("GET", "/v2/trace/setting"), ("GET", "/v2/models/qwen3/config"),
                                         ("GET", "/v2/systemsharedmemory/status")])
def test_restricted_http_calls_need_the_key(triton_server, method, path):
    def call(headers):
        req = urllib.request.Request(f"http://{triton_server.http_url}{path}", method=method, headers=headers,
                                     data=b"{}" if method == "POST" else None)
        return urllib.request.urlopen(req, timeout=10).status

    for headers in ({}, {KEY_HEADER: "wrong"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            call(headers)
        assert e.value.code == 403 and "restricted" in e.value.read().decode()
    assert call({KEY_HEADER: TEST_KEY}) == 200


def test_models_cannot_be_loaded_or_unloaded_even_with_the_key(client, triton_server):
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as e:
            call("qwen3", headers={GRPC_KEY_HEADER: TEST_KEY})
        assert "explicit model load / unload is not allowed" in e.value.message()
    assert is_ready(triton_server)


def test_inference_health_and_metadata_stay_open(client, triton_server):
    assert client.is_server_live() and client.is_model_ready("qwen3")
    meta = client.get_model_metadata("qwen3")
    assert {i.name for i in meta.inputs} >= {"text_input", "max_tokens"}
    responses, err = run(triton_server.grpc_url, request("hi", 2, False))
    assert err is None and responses


def test_the_server_listens_on_loopback_only(triton_server):
    cmd = triton_server.command()
    assert "--grpc-address=127.0.0.1" in cmd and "--http-address=127.0.0.1" in cmd
    assert "--model-control-mode=none" in cmd
    # What the kernel says is listening on those ports: 127.0.0.1 only (not 0.0.0.0).
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) in (triton_server.options.grpc_port, triton_server.options.http_port):
                listening.add(addr)
    assert listening and all(a.endswith("0100007F") for a in listening), listening  # 127.0.0.1 (or ::ffff:127.0.0.1)


def test_without_a_key_the_restricted_groups_are_locked_and_limits_are_in_config(tiny_engine, tmp_path):
    from qwentrt.serving.repository import write_repository
    from qwentrt.serving.server import ServerOptions, TritonServer

    repo = write_repository(tiny_engine, tmp_path / "repo", device="cpu")
    cmd = TritonServer(ServerOptions(repo)).command()
    flags = [a for a in cmd if a.startswith(("--grpc-restricted-protocol=", "--http-restricted-api="))]
    assert len(flags) == 2 and all(f.split("=", 1)[1].startswith(f"{RESTRICTED}:{KEY_HEADER}=") for f in flags)
    assert len(flags[0].rsplit("=", 1)[1]) >= 32  # a random key nobody was told
    assert TritonServer(ServerOptions(repo)).command() != cmd  # a new one every start
    config = (repo / "qwen3" / "config.pbtxt").read_text()
    for name in ("text_input", "max_tokens", "messages", "temperature"):  # one value per request
        assert f'name: "{name}"\n    data_type: ' in config
    assert 'name: "text_input"\n    data_type: TYPE_STRING\n    dims: [ 1 ]' in config
    assert 'name: "max_tokens"\n    data_type: TYPE_INT32\n    dims: [ 1 ]' in config


def test_serve_defaults_to_loopback_and_takes_the_key_from_the_environment():
    from qwentrt.cli import main

    params = {p.name: p for p in main.commands["serve"].params}
    assert params["host"].default == "127.0.0.1"
    assert params["api_key"].envvar == "QWENTRT_API_KEY"
