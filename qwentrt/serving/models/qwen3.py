"""Triton Python-backend model `qwen3` (decoupled), copied into the repository by `qwentrt repo`.
A thin shim: the logic is qwentrt.serving.qwen3_backend, importable because qwentrt_env.json (written
beside this file) lists the Python paths of the environment qwentrt was installed in: the backend's
stub embeds the system Python, which knows nothing of virtual environments or PYTHONPATH."""

import json
import os
import site
import sys


def _use_qwentrt_environment():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "qwentrt_env.json"), encoding="utf-8") as f:
        env = json.load(f)
    before = list(sys.path)
    for path in env["sys_path"]:
        site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # the environment's packages (numpy<2 among them) win
    return env


_ENV = _use_qwentrt_environment()

import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        from qwentrt.serving.qwen3_backend import Qwen3Backend

        # python: the interpreter of qwentrt's environment, for the engine process (engine_process option)
        self.backend = Qwen3Backend(params, pb_utils, args["model_name"], python=_ENV.get("executable"))

    def execute(self, requests):
        return self.backend.execute(requests)

    def finalize(self):
        self.backend.shutdown()
