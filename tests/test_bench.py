"""`qwentrt bench` on the CPU: the statistics and cost math, the NVML sampler without a GPU, a quick
engine-direct run through the CLI (records, report table, plots), a failing point that does not stop the
run, one served run against a real tritonserver, and the HF peer on the tiny checkpoint."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwentrt.bench import report
from qwentrt.bench.grid import BenchConfig, pair_lengths, parse_ints
from qwentrt.bench.nvml import NvmlSampler
from qwentrt.bench.stats import RequestRecord, cost_per_million_tokens, inter_token_gaps, percentiles, summarize
from qwentrt.cli import main
from qwentrt.errors import QwentrtError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- statistics and cost ----------------------------------------------------------------------------
def test_percentiles_match_numpy_linear_interpolation():
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert p["p50"] == pytest.approx(5.5) and p["p90"] == pytest.approx(9.1) and p["p99"] == pytest.approx(9.91)
    assert p["mean"] == pytest.approx(5.5)
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_inter_token_gaps_split_multi_token_outputs():
    # outputs at 1.0 (2 tokens), 1.3 (1), 1.9 (3): gaps 0 (came with the first), 0.3, then 0.2 x 3
    gaps = inter_token_gaps([1.0, 1.3, 1.9], [2, 1, 3])
    assert gaps == pytest.approx([0.0, 0.3, 0.2, 0.2, 0.2])
    assert len(gaps) == 6 - 1 and sum(gaps) == pytest.approx(1.9 - 1.0)
    assert inter_token_gaps([], []) == []


def _record(i, arrival, times, end, error=None):
    r = RequestRecord(i, arrival, error=error)
    for t in times:
        r.add(t, 1)
    r.end = end
    return r


def test_summary_latencies_and_throughput_over_the_window():
    recs = [_record(0, 0.0, [0.1, 0.2, 0.3], 0.3), _record(1, 0.0, [0.2, 0.4, 0.6], 0.6),
            _record(2, 0.3, [0.5], 0.5, error="engine: boom")]
    s = summarize(recs)
    assert s["requests"] == 3 and s["ok"] == 2 and s["errors"] == 1 and s["error_kinds"] == {"engine": 1}
    assert s["window_s"] == pytest.approx(0.6)
    assert s["ttft_ms"]["p50"] == pytest.approx(150.0)  # 100 and 200 ms
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)  # gaps 100, 100, 200, 200 ms
    assert s["e2e_ms"]["p50"] == pytest.approx(450.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(150.0)  # (0.3-0.1)/2 and (0.6-0.2)/2
    assert s["output_tokens"] == 7 and s["output_tok_s"] == pytest.approx(7 / 0.6)
    assert s["requests_s"] == pytest.approx(2 / 0.6)


def test_cost_per_million_output_tokens():
    # 36 yuan/hour = 0.01 yuan/s; at 1000 tok/s a million tokens take 1000 s -> 10 yuan
    assert cost_per_million_tokens(36.0, 1000.0) == pytest.approx(10.0)
    assert cost_per_million_tokens(20.0, 5000.0) == pytest.approx(20.0 / 3600 / 5000 * 1e6)
    assert cost_per_million_tokens(20.0, 0.0) is None and cost_per_million_tokens(20.0, None) is None


def test_grid_options():
    assert parse_ints(("1,16", "64", "16"), "--concurrency") == [1, 16, 64]
    with pytest.raises(QwentrtError, match="--isl"):
        parse_ints(("1,x",), "--isl")
    with pytest.raises(QwentrtError, match=">= 1"):
        parse_ints("0", "--osl")
    assert pair_lengths([128, 1000], [128, 1000]) == [(128, 128), (1000, 1000)]
    assert pair_lengths([1000], [128, 1000]) == [(1000, 128), (1000, 1000)]
    assert pair_lengths([1, 2], [3, 4, 5]) == [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]
    cfg = BenchConfig(Path("e"), [(16, 8)], [1, 64])
    assert [p.num_requests for p in cfg.points()] == [8, 128] and cfg.modes == ["engine", "served"]
    with pytest.raises(QwentrtError, match="--mode"):
        BenchConfig(Path("e"), [(16, 8)], [1], mode="fast")


# ---- NVML ---------------------------------------------------------------------------------------------
def test_nvml_sampler_degrades_on_cpu():
    with NvmlSampler("cpu", interval_s=0.01) as s:
        assert not s.available and "no GPU" in s.note
        figures = s.summary(s.mark())
    assert figures["power_avg_w"] is None and figures["energy_j"] is None and figures["mem_used_peak_bytes"] is None
    assert figures["samples"] == 0 and figures["note"] == s.note


def test_nvml_sampler_degrades_without_a_driver(monkeypatch):
    fake = types.ModuleType("pynvml")

    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = NvmlSampler("cuda").start()
    assert not s.available and "NVML unavailable" in s.note
    assert s.summary(s.mark())["energy_j"] is None
    s.close()


def test_nvml_sampler_figures_from_a_fake_gpu(monkeypatch):
    fake = types.ModuleType("pynvml")
    energy = {"mj": 1_000_000}

    def power(_h):
        energy["mj"] += 5_000  # each reading: 5 J more
        return 250_000  # mW

    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    fake.nvmlDeviceGetName = lambda h: "Fake H100"
    fake.nvmlSystemGetDriverVersion = lambda: "999.1"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30, used=10 << 30)
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: energy["mj"]
    fake.nvmlDeviceGetPowerUsage = power
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=90)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlSampler("cuda:0", interval_s=0.005) as s:
        assert s.available and s.gpu_name == "Fake H100" and s.driver == "999.1"
        mark = s.mark()
        import time
        time.sleep(0.05)
        f = s.summary(mark)
    assert f["power_avg_w"] == pytest.approx(250.0) and f["util_avg_pct"] == pytest.approx(90.0)
    assert f["mem_used_peak_bytes"] == 10 << 30 and f["energy_source"] == "nvml-counter"
    assert f["energy_j"] > 0 and f["samples"] >= 2


# ---- the CLI, engine-direct ------------------------------------------------------------------------------
def _bench(args):
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    return result


def _table_rows(md: str) -> list[list[str]]:
    """The rows of the report's main table (the first one; the ratios table starts with ISL)."""
    all_lines = md.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith("| "))
    lines = []
    for line in all_lines[start:]:
        if not line.startswith("| "):
            break
        lines.append(line)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == report.COLUMNS
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]
            if not line.startswith(("| ISL", "| ---"))]  # the ratios table, when there is one, starts with ISL


@pytest.fixture(scope="module")
def quick_run(tiny_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    result = _bench([tiny_engine, "--quick", "--mode", "engine", "--device", "cpu", "-o", out])
    assert result.exit_code == 0, result.output
    return out, result


def test_quick_engine_run_records(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    env = doc["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["engine"]["weights"] == "int4-awq" and env["date"]
    assert "bench" in env["command"] and "--quick" in env["command"]
    points = doc["points"]
    assert [(p["mode"], p["isl"], p["osl"], p["concurrency"]) for p in points] == [
        ("engine", 16, 8, 1), ("engine", 16, 8, 4)]
    for p in points:
        assert p["status"] == "ok" and p["error"] is None
        assert len(p["records"]) == p["num_requests"] == 8
        for r in p["records"]:
            assert r["error"] is None and r["finish_reason"] == "length"
            assert r["output_tokens"] == 8 and sum(r["token_counts"]) == 8 and r["input_tokens"] == 16
            times = [r["arrival"], *r["token_times"]]
            assert all(a < b for a, b in zip(times, times[1:]))  # arrival < first token < ... strictly
            assert r["token_times"][-1] <= r["end"] and r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"]
        side = p["engine_side"]  # the engine's own counters: every token came from a step, a step's time split
        assert side["engine_tok_s"] * side["window_s"] == pytest.approx(64, rel=0.01), side
        assert side["wait_ms_per_step"] >= 0 and side["host_ms_per_step"] > 0 and side["loop_ms_per_step"] >= 0
        assert 0 <= side["host_cpu_ms_per_step"] <= side["host_ms_per_step"] * 1.1 + 0.5  # CPU time <= wall time
        s = p["summary"]
        assert s["ok"] == 8 and s["output_tokens"] == 64 and s["output_tok_s"] > 0
        assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] and s["itl_ms"]["p50"] > 0
        assert p["cost_per_mtok"] == pytest.approx(20.0 / 3600 / s["output_tok_s"] * 1e6)
        assert p["gpu"]["power_avg_w"] is None and p["gpu"]["note"]  # no GPU here
    # the closed loop keeps C in flight: at C=4 four requests start at once
    c4 = points[1]["records"]
    assert sum(r["arrival"] < c4[0]["token_times"][0] for r in c4) == 4


def test_quick_engine_run_report_and_plots(quick_run):
    out, result = quick_run
    md = (out / "report.md").read_text()
    rows = _table_rows(md)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [("engine", "16", "8", "1", "8/8"),
                                                             ("engine", "16", "8", "4", "8/8")]
    col = report.COLUMNS.index("out tok/s")
    assert all(r[col] != "-" and float(r[col]) > 0 for r in rows)
    assert "| mode | ISL | OSL | C |" in result.output  # the table is printed at the end
    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        import matplotlib.image
        assert matplotlib.image.imread(out / name).shape[0] > 100
        assert f"]({name})" in md


def test_a_failing_point_is_recorded_and_the_run_goes_on(tiny_engine, tmp_path):
    # ISL 5000 + OSL 4 exceeds the engine's max_seq_len (4096): that point fails, the other runs.
    out = tmp_path / "b"
    result = _bench([tiny_engine, "--mode", "engine", "--isl", "5000,16", "--osl", "4", "-c", "2", "-n", "2",
                     "--warmup", "0", "--device", "cpu", "-o", out])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    bad, good = doc["points"]
    assert bad["isl"] == 5000 and bad["status"] == "error" and "max_seq_len" in bad["error"]
    assert good["status"] == "ok" and len(good["records"]) == 2
    assert "max_seq_len" in (out / "report.md").read_text()


def test_bad_options_are_one_line_errors(tiny_engine, tmp_path):
    result = _bench([tiny_engine, "--concurrency", "4,zero", "-o", tmp_path / "x"])
    assert result.exit_code == 2 and "--concurrency" in result.output


# ---- served ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_served_run_against_tritonserver(tiny_engine, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from qwentrt.serving.server import ServerError, find_tritonserver
    try:
        find_tritonserver()
    except ServerError as e:
        pytest.skip(str(e))
    out = tmp_path / "served"
    result = _bench([tiny_engine, "--mode", "served", "--isl", "16", "--osl", "6", "-c", "3", "-n", "6",
                     "--device", "cpu", "--perf-analyzer", "--served-param", "cancel_polls_per_s=500", "-o", out])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    (p,) = doc["points"]
    assert p["mode"] == "served" and p["status"] == "ok", p["error"]
    assert len(p["records"]) == 6
    for r in p["records"]:
        assert r["error"] is None and r["output_tokens"] == 6 and r["input_tokens"] == 16
        assert r["finish_reason"] == "length" and r["arrival"] < r["token_times"][0] <= r["end"]
    assert doc["perf_analyzer"]["status"] in ("ok", "skipped", "partial")
    assert (out / "served" / "tritonserver.log").is_file()
    side = p["engine_side"]  # the server's own counters over the point: the engine made the tokens the client saw
    assert side["samples"] >= 2 and side["engine_steps_s"] > 0 and side["host_ms_per_step"] > 0, side
    # (the model exports its counters every 0.2 s: in a point this short, some of the warmup's tokens may be
    # counted in the window and some of the point's after it: a loose bound)
    assert 0 < side["engine_tok_s"] * side["window_s"] <= 2 * 6 * 6, side
    assert "Where the engine's time went" in (out / "report.md").read_text()
    config = (out / "served" / "model_repository" / "qwen3" / "config.pbtxt").read_text()
    assert 'key: "cancel_polls_per_s"\n  value: { string_value: "500" }' in config


def test_served_params_are_checked_before_anything_runs(tiny_engine, tmp_path):
    for bad, why in (("nope=1", "unknown qwen3 model parameter"), ("novalue", "expected KEY=VALUE")):
        result = _bench([tiny_engine, "--mode", "served", "--served-param", bad, "-o", tmp_path / "x"])
        assert result.exit_code != 0 and why in result.output, result.output


# ---- the HF peer ------------------------------------------------------------------------------------------
def test_peer_checkpoint_defaults_to_the_engines_source(tiny_engine, tiny_ckpt):
    from qwentrt.bench.peer_hf import default_checkpoint
    assert Path(default_checkpoint(tiny_engine)) == Path(tiny_ckpt)


@pytest.mark.slow
def test_hf_peer_on_the_tiny_checkpoint(tiny_engine, tiny_ckpt, tmp_path):
    out = tmp_path / "peer"
    result = _bench([tiny_engine, "--mode", "engine", "--peer", "hf", "--peer-checkpoint", tiny_ckpt,
                     "--peer-max-batch", "2", "--isl", "12", "--osl", "5", "-c", "1,3", "-n", "3", "--warmup", "0",
                     "--device", "cpu", "-o", out])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    peer = [p for p in doc["points"] if p["mode"] == "hf-peer"]
    assert [(p["concurrency"], p["peer_batch"], p["status"]) for p in peer] == [(1, 1, "ok"), (3, 2, "ok")]
    for p in peer:
        assert len(p["records"]) == p["peer_batch"]
        for r in p["records"]:
            assert r["output_tokens"] == 5 and r["input_tokens"] == 12 and r["ttft_s"] > 0
        assert p["summary"]["itl_ms"]["p50"] > 0 and p["summary"]["output_tok_s"] > 0
    comps = {c["concurrency"]: c for c in doc["comparisons"]}
    for c in (1, 3):
        eng = next(p for p in doc["points"] if p["mode"] == "engine" and p["concurrency"] == c)
        pr = next(p for p in peer if p["concurrency"] == c)
        assert comps[c]["engine_over_peer_tok_s"] == pytest.approx(
            eng["summary"]["output_tok_s"] / pr["summary"]["output_tok_s"])
        assert math.isfinite(comps[c]["engine_over_peer_itl_p50"])
    md = (out / "report.md").read_text()
    assert "## Ratios" in md and "batch 2" in md


def test_merge_runs_into_one_report_with_ratios(quick_run, tmp_path):
    from qwentrt.bench.merge import merge

    out, _ = quick_run
    # a second run: the same points as if the peer had made them, at half the throughput
    doc = json.loads((out / "results.json").read_text())
    for p in doc["points"]:
        p["mode"], p["peer_batch"] = "hf-peer", p["concurrency"]
        p["summary"]["output_tok_s"] /= 2
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    (peer_dir / "results.json").write_text(json.dumps(doc))
    merged, files = merge([out, peer_dir], tmp_path / "merged")
    assert len(merged["points"]) == 4 and len(merged["merged_from"]) == 2
    assert all(c["engine_over_peer_tok_s"] == pytest.approx(2.0) for c in merged["comparisons"])
    md = files["markdown"].read_text()
    assert "## Ratios" in md and "2.00x" in md and (tmp_path / "merged" / "throughput.png").is_file()
