import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwentrt.config import BuildConfig
from qwentrt.engine.build import build
from qwentrt.synth import synth

# Where the runtime tests run: cpu here and in CI; `QWENTRT_TEST_DEVICE=cuda pytest` reruns them on a GPU.
DEVICE = os.environ.get("QWENTRT_TEST_DEVICE", "cpu")

# Small calibration for CI: the AWQ code path is the same as the default's.
FAST = BuildConfig(calib_samples=4, calib_seqlen=128, awq_grid=10, device="cpu", max_seq_len=4096,
                   target="sm_89", tune="off")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny-awq"
    build(tiny_ckpt, out, FAST, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def bf16_engine(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-bf16"
    build(tiny_ckpt, out, replace(FAST, weights="bf16", kv_cache="bf16"), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def bf16_fp8kv_engine(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-bf16-fp8kv"
    build(tiny_ckpt, out, replace(FAST, weights="bf16"), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def triton_server(tiny_engine, tmp_path_factory):
    """One real tritonserver for the session: the tiny engine on free 127.0.0.1 ports, the restricted
    protocol groups behind tests.serving_util.TEST_KEY (started once; skips without tritonserver)."""
    from tests.serving_util import TEST_KEY, start_server

    with start_server(tiny_engine, tmp_path_factory.mktemp("triton"), key=TEST_KEY,
                      models=("qwen3", "json_validator", "ensemble")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _seed_and_offline(monkeypatch):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh random inputs every run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
