"""Triton Python-backend model `json_validator`, copied into the repository by `qwentrt repo`:
inputs `text` and `schema` (BYTES, [batch, 1]), outputs `valid` (BOOL) and `errors` (BYTES, one per line)
per row. Bad input (not UTF-8, a schema that is not JSON or not a schema) is INVALID_ARG."""

import json
import os
import site
import sys


def _use_qwentrt_environment():
    # The same bootstrap as qwen3.py, repeated on purpose: it must run before qwentrt is importable.
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "qwentrt_env.json"), encoding="utf-8") as f:
        paths = json.load(f)["sys_path"]
    before = list(sys.path)
    for path in paths:
        site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before


_use_qwentrt_environment()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from qwentrt.serving.json_validator import InvalidSchema, validate
        from qwentrt.serving.lifecycle import exit_with_parent

        exit_with_parent()  # no orphan if tritonserver dies
        self.validate, self.InvalidSchema = validate, InvalidSchema

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts, schemas = self._texts(request, "text"), self._texts(request, "schema")
                if len(texts) != len(schemas):
                    raise ValueError(f"text and schema: {len(texts)} texts but {len(schemas)} schemas")
                rows = [self.validate(t, s) for t, s in zip(texts, schemas)]
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("valid", np.array([[v] for v, _ in rows], dtype=np.bool_)),
                    pb_utils.Tensor("errors", np.array([["\n".join(e).encode("utf-8")] for _, e in rows],
                                                       dtype=np.object_))]))
            except (self.InvalidSchema, ValueError) as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
        return responses

    @staticmethod
    def _texts(request, name):
        """One string per batch row ([batch, 1])."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise ValueError(f"{name}: required")
        out = []
        for i, value in enumerate(tensor.as_numpy().reshape(-1)):
            try:
                out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: not valid UTF-8 (row {i}, byte {e.start})") from None
        return out
