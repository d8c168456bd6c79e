"""`qwentrt soak` smoke test (20 s on the session's tritonserver): the report has its figures and nothing
accepted is lost. The real soak (`make soak`, 10 minutes on a GPU) is not part of the test run."""

import json

import pytest

pytest.importorskip("tritonclient.grpc")
from qwentrt.bench.soak import SoakConfig, passed, run_soak, summary  # noqa: E402
from tests.serving_util import record, wait_idle  # noqa: E402

pytestmark = pytest.mark.slow


def test_soak_smoke_reports_errors_ttft_drift_and_memory(triton_server):
    cfg = SoakConfig(minutes=20 / 60, concurrency=6, prompt_tokens=(8, 256), output_tokens=(4, 24),
                     cancel_fraction=0.2, guided_fraction=0.15, unstreamed_fraction=0.15, sample_s=2)
    r = run_soak(triton_server.grpc_url, cfg, metrics_url=triton_server.metrics_url,
                 server_pid=triton_server.process.pid, log=lambda m: None)
    json.dumps(r)  # JSON-able
    q = r["requests"]
    record("soak_smoke", {"duration_s": r["duration_s"], **q, "errors_by_code": r["errors_by_code"],
                          "ttft_p99_drift": r["ttft_s"]["p99_drift"], "server_rss_mb": r["memory"]["server_rss_mb"]})
    assert passed(r), summary(r)
    assert q["tried"] == q["accepted"] + q["rejected"] and q["completed"] > 0 and q["cancelled"] > 0
    assert q["accepted"] == q["completed"] + q["cancelled"] + q["failed"] + q["lost"]
    assert r["by_kind"]["guided"] > 0 and r["ttft_s"]["first_window"]["n"] > 0 and r["ttft_s"]["last_window"]["n"] > 0
    assert r["memory"]["server_rss_mb"]["first"] > 100  # tritonserver + the stub holding the engine
    assert len(r["samples"]) >= 5 and "qwentrt_kv_pages_used" in r["samples"][-1]["metrics"]
    assert "TTFT p99" in summary(r)
    wait_idle(triton_server, 60)


def test_soak_cli_refuses_bad_ranges():
    from click.testing import CliRunner

    from qwentrt.cli import main
    result = CliRunner().invoke(main, ["soak", "127.0.0.1:1", "--prompt-tokens", "9,3"])
    assert result.exit_code == 2 and "LOW,HIGH" in result.output
