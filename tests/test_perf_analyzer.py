"""perf_analyzer's input data and command (perf_analyzer itself runs only on the GPU machine)."""

import json

from qwentrt.bench import perf_analyzer
from qwentrt.bench.prompts import _word_tokens, synthetic_prompt


def test_synthetic_prompts_have_the_exact_token_length():
    _, tok = _word_tokens()
    for n in (1, 7, 300):
        assert len(tok.encode(synthetic_prompt(n, seed=n), add_special_tokens=False).ids) == n
    assert synthetic_prompt(20, seed=1) == synthetic_prompt(20, seed=1) != synthetic_prompt(20, seed=2)


def test_input_data_and_command(tmp_path):
    data = perf_analyzer.input_data(12, 34, variants=3)
    assert len(data["data"]) == 3
    row = data["data"][0]
    assert row["max_tokens"] == {"content": [34], "shape": [1]} == row["min_tokens"]
    assert row["stream"]["content"] == [True]
    json.dumps(data)  # serializable
    cmd = perf_analyzer.command("127.0.0.1:8001", tmp_path / "d.json", tmp_path / "o.csv", 64)
    assert "--streaming" in cmd and "--concurrency-range=64:64" in cmd and "-i" in cmd and "grpc" in cmd


def test_command_sends_the_restricted_protocol_key_as_a_header(tmp_path):
    from qwentrt.bench.perf_analyzer import command
    from qwentrt.serving.server import GRPC_KEY_HEADER

    cmd = command("127.0.0.1:8001", tmp_path / "d.json", tmp_path / "c.csv", 64, api_key="s3cret")
    assert cmd[cmd.index("-H") + 1] == f"{GRPC_KEY_HEADER}:s3cret" and "--streaming" in cmd
    assert "-H" not in command("127.0.0.1:8001", tmp_path / "d.json", tmp_path / "c.csv", 64)
