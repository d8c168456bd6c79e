"""The served bench's server-side figures: Prometheus text parsed, rates and means over samples."""

from qwentrt.bench import server_side

TEXT = """# HELP qwentrt_engine_tokens_total Tokens the engine generated
# TYPE qwentrt_engine_tokens_total counter
qwentrt_engine_tokens_total{model="qwen3"} 1200
qwentrt_engine_steps_total{model="qwen3"} 30
qwentrt_engine_step_seconds_total{model="qwen3"} 1.5
qwentrt_generated_tokens_total{model="qwen3"} 1100
qwentrt_running{model="qwen3"} 7
qwentrt_running{model="other"} 1
nv_inference_count{model="qwen3",version="1"} 5
qwentrt_waiting{model="qwen3"} not-a-number
"""


def test_parse_sums_label_sets_and_skips_what_it_cannot_read():
    got = server_side.parse(TEXT, server_side.COUNTERS + server_side.GAUGES)
    assert got == {"qwentrt_engine_tokens_total": 1200, "qwentrt_engine_steps_total": 30,
                   "qwentrt_engine_step_seconds_total": 1.5, "qwentrt_generated_tokens_total": 1100,
                   "qwentrt_running": 8}


def test_summarize_rates_means_and_where_a_step_went():
    a = {"qwentrt_engine_tokens_total": 1000.0, "qwentrt_engine_steps_total": 10.0,
         "qwentrt_engine_step_seconds_total": 0.3, "qwentrt_engine_wait_seconds_total": 0.2,
         "qwentrt_generated_tokens_total": 900.0, "qwentrt_running": 4.0, "qwentrt_waiting": 0.0}
    b = dict(a, qwentrt_engine_tokens_total=3000.0, qwentrt_engine_steps_total=60.0,
             qwentrt_engine_step_seconds_total=1.8, qwentrt_engine_wait_seconds_total=1.2,
             qwentrt_generated_tokens_total=2500.0, qwentrt_running=8.0, qwentrt_waiting=2.0)
    s = server_side.summarize([(10.0, a), (11.0, dict(a, qwentrt_running=6.0)), (12.0, b)])
    assert s["engine_tok_s"] == 1000.0 and s["engine_steps_s"] == 25.0 and s["sent_tok_s"] == 800.0
    assert s["mean_running"] == 6.0 and s["mean_waiting"] == 0.7
    # 50 steps in 2 s: 40 ms each = 20 ms waiting for the device + 10 ms host in step() + 10 ms outside it
    assert (s["ms_per_step"], s["wait_ms_per_step"], s["host_ms_per_step"], s["loop_ms_per_step"]) == (40, 20, 10, 10)
    assert server_side.summarize([(1.0, a)]) == {}


def test_engine_figures_from_stats_of_an_engine_direct_run():
    first = {"engine_tokens": 0, "engine_steps": 0, "engine_step_seconds": 0.0, "engine_wait_seconds": 0.0,
             "running": 3}
    last = {"engine_tokens": 400, "engine_steps": 100, "engine_step_seconds": 0.9, "engine_wait_seconds": 0.5,
            "running": 0}
    f = server_side.engine_figures(first, last, 1.0)
    assert f == {"window_s": 1.0, "engine_tok_s": 400.0, "engine_steps_s": 100.0, "ms_per_step": 10.0,
                 "wait_ms_per_step": 5.0, "host_ms_per_step": 4.0, "loop_ms_per_step": 1.0}
    f = server_side.engine_figures(dict(first, engine_host_cpu_seconds=0.0), dict(last, engine_host_cpu_seconds=0.1), 1.0)
    assert f["host_cpu_ms_per_step"] == 1.0  # 4 ms of host wall time a step, 1 ms of it on the CPU: held up


def test_a_server_that_does_not_answer_gives_an_empty_summary():
    side = server_side.ServerSide("http://127.0.0.1:9/metrics", every_s=0.05).start()  # port 9: discard, closed
    assert side.stop() == {}
