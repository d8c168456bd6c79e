"""`qwentrt repo`: an engine folder -> a Triton model repository.

    model_repository/
      qwen3/            Python backend, decoupled: the engine (TensorRT-LLM's ensemble tensor names)
      json_validator/   Python backend: does a text satisfy a JSON schema
      ensemble/         a one-step ensemble over qwen3, for clients that call TensorRT-LLM's default name
"""

from __future__ import annotations

import json
import os
import shutil
import site
import sys
from importlib import resources
from pathlib import Path

from qwentrt.config import EngineConfig
from qwentrt.errors import QwentrtError
from qwentrt.serving.request import INPUTS

DTYPES = {"text": "TYPE_STRING", "texts": "TYPE_STRING", "bool": "TYPE_BOOL", "float": "TYPE_FP32",
          "int": "TYPE_INT32"}
SPECIAL_DTYPES = {"seed": "TYPE_UINT64"}
OUTPUTS = [("text_output", "TYPE_STRING", "[ -1 ]"), ("num_input_tokens", "TYPE_INT32", "[ 1 ]"),
           ("num_output_tokens", "TYPE_INT32", "[ 1 ]"), ("finish_reason", "TYPE_STRING", "[ 1 ]"),
           ("cum_log_probs", "TYPE_FP32", "[ -1 ]"), ("output_log_probs", "TYPE_FP32", "[ -1 ]"),
           ("batch_index", "TYPE_INT32", "[ 1 ]"), ("sequence_index", "TYPE_INT32", "[ 1 ]"),
           ("json_valid", "TYPE_BOOL", "[ 1 ]"), ("json_errors", "TYPE_STRING", "[ 1 ]")]


# The `qwen3` model's parameters (config.pbtxt `parameters`), read by qwentrt.serving.qwen3_backend.
QWEN3_PARAMETERS = {
    "engine_dir": "the engine folder", "device": "cuda or cpu", "allow_gpu_mismatch": "true: run on another GPU",
    "max_queue_size": "requests waiting beyond this get UNAVAILABLE at once [4 x max_batch_size]",
    "max_batch_size": "requests running at once [the engine's limit]",
    "num_kv_blocks": "KV pages [what the memory plan gives]",
    "json_validator_model": "the model that checks schema-guided outputs",
    "engine_failure": "shutdown (stop tritonserver when the engine cannot go on) or reject (stay up, UNAVAILABLE)",
    "max_consecutive_step_faults": "failed steps in a row after which the engine counts as stopped [3]",
    "shutdown_drain_s": "at shutdown, seconds requests in flight may take to finish before a final UNAVAILABLE "
                        "[20; keep it below tritonserver's --exit-timeout-secs, 30 by default]",
    "fault_inject": "tests only: see qwentrt/serving/faults.py",
    "max_responses_per_s": "streamed responses per second across all streams the sender aims at; past it, each "
                           "response carries several tokens [1500]",
    "cancel_polls_per_s": "is_cancelled() calls per second the sender spends on noticing cancelled streams (each a "
                          "round trip to Triton); every stream is asked every 50 ms while they fit, past that in "
                          "turns [2000]",
    "engine_process": "true: the engine loop runs in its own process (its GIL is not the response sender's), "
                      "false: in a thread of the model's process; auto: $QWENTRT_ENGINE_PROCESS (1 or 0) in tritonserver's "
                      "environment if set, else a process on CUDA and a thread on the CPU [auto]",
}


def python_paths() -> list[str]:
    """Where this environment's packages live (for the backend stub's embedded Python)."""
    import qwentrt

    paths = [str(Path(qwentrt.__file__).resolve().parents[1])]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += site.getsitepackages() + [site.getusersitepackages()]
    return list(dict.fromkeys(str(Path(p).resolve()) for p in paths if Path(p).is_dir()))


def _inputs_block(optional_all: bool = True) -> str:
    rows = []
    for name, (kind, required) in INPUTS.items():
        dims = "[ -1 ]" if kind == "texts" else "[ 1 ]"
        dtype = SPECIAL_DTYPES.get(name, DTYPES[kind])
        opt = "" if required else "\n    optional: true"
        rows.append(f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {dims}{opt}\n  }}')
    return "input [\n" + ",\n".join(rows) + "\n]"


def _outputs_block() -> str:
    rows = [f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n  }}' for n, t, d in OUTPUTS]
    return "output [\n" + ",\n".join(rows) + "\n]"


def _params(params: dict[str, str]) -> str:
    return "\n".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(v)} }}\n}}'
                     for k, v in params.items())


def qwen3_config(engine: EngineConfig, engine_dir: Path, device: str, max_queue_size: int,
                 extra: dict[str, str] | None = None) -> str:
    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    params = {"engine_dir": str(engine_dir.resolve()), "device": device, "max_queue_size": str(max_queue_size),
              "json_validator_model": "json_validator", "engine_failure": "shutdown",
              "max_consecutive_step_faults": "3", "shutdown_drain_s": "20", "engine_process": "auto", **(extra or {})}
    return f"""# Written by `qwentrt repo` from {engine_dir}: the engine's limits are enforced by the model.
name: "qwen3"
backend: "python"
max_batch_size: {engine.limits.max_batch_size}
model_transaction_policy {{ decoupled: true }}
{_inputs_block()}
{_outputs_block()}
instance_group [ {{ count: 1, kind: {kind} }} ]
{_params(params)}
"""


def ensemble_config(engine: EngineConfig) -> str:
    maps_in = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n in INPUTS)
    maps_out = "\n".join(f'      output_map {{ key: "{n}" value: "{n}" }}' for n, _, _ in OUTPUTS)
    return f"""# TensorRT-LLM's clients call "ensemble" by default: one step over qwen3.
name: "ensemble"
platform: "ensemble"
max_batch_size: {engine.limits.max_batch_size}
{_inputs_block()}
{_outputs_block()}
ensemble_scheduling {{
  step [
    {{
      model_name: "qwen3"
      model_version: -1
{maps_in}
{maps_out}
    }}
  ]
}}
"""


VALIDATOR_CONFIG = """name: "json_validator"
backend: "python"
max_batch_size: 64
input [
  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "schema" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "valid" data_type: TYPE_BOOL dims: [ 1 ] },
  { name: "errors" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""


def write_repository(engine_dir: str | Path, out: str | Path, device: str | None = None,
                     max_queue_size: int | None = None, ensemble: bool = True,
                     params: dict[str, str] | None = None) -> Path:
    """Write (or overwrite) the model repository for an engine; returns its path. `params`: more `qwen3`
    model parameters (QWEN3_PARAMETERS), e.g. {"num_kv_blocks": "64"}."""
    unknown = sorted(set(params or {}) - set(QWEN3_PARAMETERS))
    if unknown:
        raise QwentrtError(f"unknown qwen3 model parameter(s) {', '.join(unknown)} (known: {', '.join(QWEN3_PARAMETERS)})")
    engine_dir = Path(engine_dir)
    engine = EngineConfig.load(engine_dir)
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    env = json.dumps({"sys_path": python_paths(), "python": sys.version.split()[0], "executable": sys.executable},
                     indent=2)
    models = {"qwen3": ("qwen3.py", qwen3_config(engine, engine_dir, device,
                                                 max_queue_size or 4 * engine.limits.max_batch_size, params)),
              "json_validator": ("json_validator.py", VALIDATOR_CONFIG)}
    for name, (source, config) in models.items():
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(config, encoding="utf-8")
        src = resources.files("qwentrt.serving.models").joinpath(source)
        (version / "model.py").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        (version / "qwentrt_env.json").write_text(env, encoding="utf-8")
    if ensemble:
        (out / "ensemble" / "1").mkdir(parents=True, exist_ok=True)
        (out / "ensemble" / "config.pbtxt").write_text(ensemble_config(engine), encoding="utf-8")
    elif (out / "ensemble").exists():
        shutil.rmtree(out / "ensemble")
    return out
