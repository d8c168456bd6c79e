"""The served bench's server-side figures: Prometheus text parsed, rates and means over samples."""

from qwentrt.bench import server_side
from qwentrt.bench.report import markdown  # noqa: F401 (the report renders the section: test_bench covers it)

TEXT = """# HELP qwentrt_engine_tokens_total Tokens the engine generated
# TYPE qwentrt_engine_tokens_total counter
qwentrt_engine_tokens_total{model="qwen3"} 1200
qwentrt_engine_steps_total{model="qwen3"} 30
qwentrt_generated_tokens_total{model="qwen3"} 1100
qwentrt_running{model="qwen3"} 7
qwentrt_running{model="other"} 1
nv_inference_count{model="qwen3",version="1"} 5
qwentrt_waiting{model="qwen3"} not-a-number
"""


def test_parse_sums_label_sets_and_skips_what_it_cannot_read():
    got = server_side.parse(TEXT, server_side.COUNTERS + server_side.GAUGES)
    assert got == {"qwentrt_engine_tokens_total": 1200, "qwentrt_engine_steps_total": 30,
                   "qwentrt_generated_tokens_total": 1100, "qwentrt_running": 8}


def test_summarize_rates_and_means():
    a = {"qwentrt_engine_tokens_total": 1000.0, "qwentrt_engine_steps_total": 10.0,
         "qwentrt_generated_tokens_total": 900.0, "qwentrt_running": 4.0, "qwentrt_waiting": 0.0}
    b = dict(a, qwentrt_engine_tokens_total=3000.0, qwentrt_engine_steps_total=60.0,
             qwentrt_generated_tokens_total=2500.0, qwentrt_running=8.0, qwentrt_waiting=2.0)
    s = server_side.summarize([(10.0, a), (12.0, b)])
    assert s["engine_tok_s"] == 1000.0 and s["engine_steps_s"] == 25.0 and s["sent_tok_s"] == 800.0
    assert s["mean_running"] == 6.0 and s["mean_waiting"] == 1.0 and s["engine_ms_per_step"] == 40.0
    assert server_side.summarize([(1.0, a)]) == {}


def test_a_server_that_does_not_answer_gives_an_empty_summary():
    side = server_side.ServerSide("http://127.0.0.1:9/metrics", every_s=0.05).start()  # port 9: discard, closed
    assert side.stop() == {}
