"""perf_analyzer over the qwen3 model: its --input-data JSON, its command line for a streaming
concurrency sweep, and its CSV kept beside the run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

from qwentrt.bench.prompts import synthetic_prompt
from qwentrt.errors import QwentrtError


def input_data(prompt_len: int, output_len: int, variants: int = 16) -> dict:
    """perf_analyzer's --input-data: `variants` prompts of prompt_len tokens, each forced to output_len
    tokens (min_tokens = max_tokens), streamed. Shapes exclude the batch dimension."""
    rows = []
    for i in range(variants):
        rows.append({
            "text_input": {"content": [synthetic_prompt(prompt_len, seed=i)], "shape": [1]},
            "max_tokens": {"content": [output_len], "shape": [1]},
            "min_tokens": {"content": [output_len], "shape": [1]},
            "stream": {"content": [True], "shape": [1]},
        })
    return {"data": rows}


def command(url: str, data_file: Path, csv_file: Path, concurrency: int, model: str = "qwen3",
            measurement_ms: int = 20000, api_key: str | None = None) -> list[str]:
    """api_key: the server's restricted-protocol key (perf_analyzer reads the model's config, a restricted
    group under `qwentrt serve`), sent as a gRPC header."""
    from qwentrt.serving.server import GRPC_KEY_HEADER

    headers = ["-H", f"{GRPC_KEY_HEADER}:{api_key}"] if api_key else []
    return ["perf_analyzer", *headers, "-m", model, "-u", url, "-i", "grpc", "--streaming", "-b", "1",
            f"--input-data={data_file}", f"--concurrency-range={concurrency}:{concurrency}",
            "--measurement-mode=time_windows", f"--measurement-interval={measurement_ms}",
            "--stability-percentage=999", "-f", str(csv_file), "--verbose-csv"]


def run(url: str, out_dir: Path, concurrency: list[int], prompt_len: int, output_len: int,
        model: str = "qwen3", measurement_ms: int = 20000, api_key: str | None = None) -> list[dict[str, str]]:
    """Write the input data, run perf_analyzer once per concurrency, return the CSV rows (each with its
    concurrency; the CSVs, logs and commands stay in out_dir)."""
    if shutil.which("perf_analyzer") is None:
        raise QwentrtError("perf_analyzer is not on PATH (pip install perf-analyzer; its wheel needs glibc 2.38)")
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / "input_data.json"
    data_file.write_text(json.dumps(input_data(prompt_len, output_len)), encoding="utf-8")
    rows: list[dict[str, str]] = []
    for c in concurrency:
        csv_file, log_file = out_dir / f"perf_analyzer_c{c}.csv", out_dir / f"perf_analyzer_c{c}.log"
        cmd = command(url, data_file, csv_file, c, model, measurement_ms, api_key)
        with open(out_dir / "commands.txt", "a", encoding="utf-8") as f:
            f.write(" ".join(cmd).replace(api_key or "\0", "<key>") + "\n")
        with open(log_file, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise QwentrtError(f"perf_analyzer failed at concurrency {c} (exit {proc.returncode}): "
                               f"{' | '.join(tail)} (log: {log_file})")
        with open(csv_file, newline="") as f:
            rows += [dict(row, concurrency=str(c)) for row in csv.DictReader(f)]
    return rows
