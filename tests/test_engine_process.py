"""The `qwen3` model's engine_process option (qwentrt/serving/engine_process.py): the engine loop in its own
process. How the option is chosen; a real tritonserver serving through it: answers, refuses bad input,
survives the engine process's death with clear errors (engine_failure: reject) and leaves no process behind
when it stops or is killed. (The whole serving suite also passes with QWENTRT_ENGINE_PROCESS=1.)"""

import os
import signal
import subprocess
import sys
import time

import pytest

from qwentrt.serving import engine_process
from qwentrt.serving.engine_process import EngineClient, EngineProcessError, wanted


@pytest.mark.parametrize("param, env, device, expected", [
    ("true", None, "cpu", True), ("false", None, "cuda", False), ("auto", None, "cuda", True),
    ("auto", None, "cpu", False), (None, None, "cuda:0", True), ("auto", "1", "cpu", True), ("auto", "0", "cuda", False),
    ("false", "1", "cuda", False), ("true", "0", "cpu", True), (" TRUE ", None, "cpu", True),
])
def test_the_option_param_wins_then_the_environment_then_the_device(monkeypatch, param, env, device, expected):
    if env is None:
        monkeypatch.delenv(engine_process.ENV, raising=False)
    else:
        monkeypatch.setenv(engine_process.ENV, env)
    assert wanted(param, device) is expected


@pytest.mark.parametrize("param, env, message", [
    ("maybe", None, "config.pbtxt parameter engine_process: 'maybe' is not true, false or auto"),
    ("auto", "2", "$QWENTRT_ENGINE_PROCESS: '2' is not true, false or auto"),
])
def test_a_bad_option_is_refused_with_its_source(monkeypatch, param, env, message):
    monkeypatch.delenv(engine_process.ENV, raising=False)
    if env:
        monkeypatch.setenv(engine_process.ENV, env)
    with pytest.raises(ValueError) as e:
        wanted(param, "cpu")
    assert str(e.value) == message


def test_an_engine_that_cannot_load_says_why_and_leaves_no_process(tmp_path):
    with pytest.raises(EngineProcessError) as e:
        EngineClient({"engine_dir": str(tmp_path / "missing"), "device": "cpu"})
    assert str(e.value).startswith("the engine process could not start: ")
    assert "missing" in str(e.value)


def test_the_client_adds_refuses_and_ends_requests(tiny_engine):
    import threading

    from qwentrt.config import SamplingParams
    from qwentrt.engine.async_engine import EngineUnavailable
    from qwentrt.engine.engine import RequestError

    client = EngineClient({"engine_dir": str(tiny_engine), "device": "cpu"})
    try:
        done, outs = threading.Event(), []

        def on_output(out):
            outs.append(out)
            if out.finished:
                done.set()

        client.add("a", on_output, "hello", SamplingParams(max_tokens=5, temperature=0.0))
        assert done.wait(60)
        assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finish_reason == "length"
        deadline = time.monotonic() + 30  # nothing of the finished request is left on either side
        while time.monotonic() < deadline and not (client.memory_state().get("engine_seqs") == 0 and
                                                   client.memory_state().get("engine_process_callbacks") == 0):
            time.sleep(0.05)
        state = client.memory_state()
        assert state["engine_callbacks"] == state["engine_seqs"] == state["engine_process_callbacks"] == 0, state
        assert client.stats()["kv_pages_used"] == 0
        with pytest.raises(RequestError, match="text_input: the prompt is empty"):
            client.add("b", on_output, "", SamplingParams(max_tokens=5))
        # the process dies while a request runs: the request ends with an error that says so, new ones are refused
        done.clear()
        outs.clear()
        client.add("c", on_output, "hello", SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
        os.kill(client.pid, signal.SIGKILL)
        assert done.wait(60)
        assert outs[-1].finish_reason == "error" and "exited unexpectedly (signal 9)" in outs[-1].error
        assert not client.healthy
        with pytest.raises(EngineUnavailable, match="exited unexpectedly"):
            client.add("d", on_output, "hello", SamplingParams(max_tokens=5))
        assert client.memory_state()["engine_callbacks"] == 0
    finally:
        client.shutdown()
    assert client.process.poll() is not None


# ---- a real tritonserver ---------------------------------------------------------------------------------
pytest.importorskip("tritonclient.grpc")
from tests.serving_util import is_ready, request, run, start_server, wait_idle  # noqa: E402


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _engine_processes(server_pid: int) -> list[int]:
    """The engine processes under tritonserver's Python-backend stubs."""
    return [c for stub in _children(server_pid) for c in _children(stub)
            if "qwentrt.serving.engine_process" in _cmdline(c)]


def _gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.25)
        alive = [p for p in alive if _alive(p)]
    return alive



@pytest.mark.slow
def test_served_through_the_engine_process_and_no_process_left_after_a_clean_stop(tiny_engine, tmp_path):
    # (the default exit timeout: on a loaded 2-core CI machine unloading both models has taken over 10 s once; a
    # stop that hangs writes every thread's stack to the log, shown below when the exit is not clean)
    with start_server(tiny_engine, tmp_path, params={"engine_process": "true"}, exit_timeout_s=30) as srv:
        engines = _engine_processes(srv.process.pid)
        assert len(engines) == 1, "no engine process under the qwen3 model's stub"
        responses, err = run(srv.grpc_url, request("hello there", 6))
        assert err is None and int(responses[-1].as_numpy("num_output_tokens").reshape(-1)[0]) == 6
        _, err = run(srv.grpc_url, request("", 6))
        assert err is not None and "[INVALID_ARG] text_input: the prompt is empty" in err.message()
        _, err = run(srv.grpc_url, request("hello", 4), cancel_after=1)
        wait_idle(srv)
        stubs = _children(srv.process.pid)
    log = (tmp_path / "triton.log").read_text(errors="replace")
    assert srv.process.returncode == 0, f"tritonserver did not stop cleanly; the end of its log:\n{log[-6000:]}"
    assert not _gone(engines + stubs), "processes left after tritonserver stopped"
    assert "qwentrt: the engine runs in its own process" in log


@pytest.mark.slow
def test_no_engine_process_outlives_a_killed_tritonserver(tiny_engine, tmp_path):
    with start_server(tiny_engine, tmp_path, params={"engine_process": "true"}) as srv:
        engines = _engine_processes(srv.process.pid)
        assert engines, "no engine process under the qwen3 model's stub"
        srv.process.kill()
        srv.process.wait(timeout=30)
        assert not _gone(engines), f"engine process(es) {engines} still running after tritonserver was killed"


@pytest.mark.slow
def test_a_dead_engine_process_gives_clear_errors_and_the_server_stays_up(tiny_engine, tmp_path):
    params = {"engine_process": "true", "engine_failure": "reject"}
    with start_server(tiny_engine, tmp_path, params=params) as srv:
        engine = _engine_processes(srv.process.pid)[0]
        os.kill(engine, signal.SIGKILL)
        assert not _gone([engine])
        _, err = run(srv.grpc_url, request("hello", 4))
        deadline = time.monotonic() + 30
        while err is None and time.monotonic() < deadline:  # (the stub learns of the death from the socket)
            time.sleep(0.2)
            _, err = run(srv.grpc_url, request("hello", 4))
        assert err is not None
        assert err.message().startswith("[UNAVAILABLE] the engine has stopped (the engine process (pid "), err.message()
        assert "exited unexpectedly (signal 9)" in err.message() and "the server needs a restart" in err.message()
        assert is_ready(srv) and srv.process.poll() is None


def test_a_stop_that_hangs_leaves_every_threads_stack_and_a_quick_one_nothing():
    code = ("import time\nfrom qwentrt.serving.lifecycle import stacks_later\n"
            "stacks_later(0.3)\ntime.sleep({})\nstacks_later(None)\ntime.sleep(0.5)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    def run_it(sleep_s: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code.format(sleep_s)], cwd=root, capture_output=True, text=True,
                              timeout=60)

    slow = run_it(1.0)
    assert "most recent call first" in slow.stderr and "line 4" in slow.stderr
    quick = run_it(0.0)
    assert quick.returncode == 0 and quick.stderr == ""
