"""Bad checkpoints get a one-line error naming the problem, and leave no engine folder behind."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qwentrt.cli import main


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def run_build(src, out):
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(out), "--quiet", "--device", "cpu",
                                       "--calib-samples", "2", "--calib-seqlen", "64"])
    return result


def assert_refused(ckpt, tmp_path, *needles):
    out = tmp_path / "build" / "engine"
    result = run_build(ckpt, out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not (tmp_path / "build").exists() or list((tmp_path / "build").iterdir()) == []
    return lines[0]


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    assert_refused(tmp_path / "nope", tmp_path, "nope", "no such folder")


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert_refused(ckpt, tmp_path, "no config.json")


def test_missing_weights(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    assert_refused(ckpt, tmp_path, "no *.safetensors weights")


def test_missing_tokenizer(ckpt, tmp_path):
    for f in ("tokenizer.json", "vocab.json"):
        (ckpt / f).unlink()
    assert_refused(ckpt, tmp_path, "no tokenizer")


@pytest.mark.parametrize("model_type,needle", [("llama", "'llama', qwentrt supports 'qwen3' only"),
                                               ("qwen3_moe", "Qwen3 MoE models are not supported")])
def test_wrong_model_type(ckpt, tmp_path, model_type, needle):
    edit_config(ckpt, model_type=model_type)
    assert_refused(ckpt, tmp_path, needle)


def test_unsupported_features(ckpt, tmp_path):
    edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert_refused(ckpt, tmp_path, "rope_scaling", "not supported")


def test_shape_mismatch(ckpt, tmp_path):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.randn(256, 640).to(torch.bfloat16)
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert_refused(ckpt, tmp_path, "model.layers.1.mlp.down_proj.weight", "[256, 640]", "[256, 768]")


def test_config_disagrees_with_weights(ckpt, tmp_path):
    edit_config(ckpt, num_hidden_layers=3)
    assert_refused(ckpt, tmp_path, "missing tensor(s) model.layers.2.", "3 layers")


def test_corrupt_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    assert_refused(ckpt, tmp_path, "model.safetensors", "corrupt")


def test_truncated_safetensors(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(ckpt, tmp_path, "model.safetensors", "corrupt")


def test_invalid_config_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    assert_refused(ckpt, tmp_path, "config.json", "not valid JSON")


def test_hub_id_offline(tmp_path):
    assert_refused("someone/not-a-cached-model", tmp_path, "someone/not-a-cached-model", "Hugging Face Hub")


def test_existing_output_needs_force(tiny_ckpt, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_build(tiny_ckpt, out)
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_options(tiny_ckpt, tmp_path):
    result = CliRunner().invoke(main, ["build", str(tiny_ckpt), "-o", str(tmp_path / "e"), "--max-batch-size",
                                       "0"])
    assert result.exit_code == 2 and "--max-batch-size must be positive" in result.output
    result = CliRunner().invoke(main, ["build", str(tiny_ckpt), "-o", str(tmp_path / "e"), "--target", "sm_75"])
    assert result.exit_code == 2 and "--target 'sm_75' is not known" in result.output
    assert not (tmp_path / "e").exists()
