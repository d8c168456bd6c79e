"""`qwentrt build` end to end on the CPU: the engine folder, engine.json, AWQ checkpoints taken as
they are, FP8 KV scales, bf16 variants, the memory plan."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qwentrt.checkpoint import load
from qwentrt.config import EngineConfig, KVCacheSpec
from qwentrt.engine import memory_plan
from qwentrt.engine.build import LayerSource, build, load_tokenizer
from qwentrt.errors import ConfigError
from qwentrt.quant.calib_data import calibration_blocks
from qwentrt.quant.dense_qwen3 import DecoderLayer, rope_cos_sin
from qwentrt.quant.kv import FP8_E4M3_MAX, KVRangeObserver, dequantize_fp8, quantize_fp8
from qwentrt.quant.pack import dequantize_awq
from qwentrt.synth import preset

from .autoawq_ref import write_awq_checkpoint
from .conftest import FAST

QUIET = dict(progress=False, log=lambda *_: None)


def test_engine_folder(tiny_engine):
    names = {f.name for f in tiny_engine.iterdir()}
    assert {"engine.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in tiny_engine.parent.iterdir() if ".partial-" in n.name]
    engine = EngineConfig.load(tiny_engine)
    assert engine.weights.format == "int4-awq" and engine.weights.source == "awq-search"
    assert engine.kv_cache.dtype == "fp8-e4m3" and engine.kv_cache.capacity_tokens >= engine.limits.max_seq_len
    assert engine.target.compute_capability == "8.9" and engine.memory.budget == 24 << 30
    assert engine.kernels["compute_capability"] == "8.9"
    tensors = load_file(str(tiny_engine / "model.safetensors"))
    cfg = engine.model
    for name, (n, k) in cfg.linear_shapes().items():
        p = f"model.layers.1.{name}"
        assert tensors[p + ".qweight"].shape == (k, n // 8) and tensors[p + ".qweight"].dtype == torch.int32
        assert tensors[p + ".qzeros"].shape == (k // 128, n // 8)
        assert tensors[p + ".scales"].shape == (k // 128, n)
    assert engine.weights.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    for group, s in engine.build.awq.items():
        assert s["mean_loss_vs_rtn"] <= 1.0, group


def test_engine_json_round_trips(tiny_engine):
    engine = EngineConfig.load(tiny_engine)
    again = EngineConfig.from_json(engine.to_json())
    assert again == engine
    assert json.loads(again.to_json()) == json.loads((tiny_engine / "engine.json").read_text())


def test_engine_json_errors_name_the_problem(tiny_engine):
    data = json.loads((tiny_engine / "engine.json").read_text())
    with pytest.raises(ConfigError, match="format version 99"):
        EngineConfig.from_json(json.dumps(data | {"format_version": 99}))
    broken = json.loads(json.dumps(data))
    broken["kv_cache"]["dtype"] = "int8"
    with pytest.raises(ConfigError, match=r"kv_cache\.dtype: 'int8' is not one of"):
        EngineConfig.from_json(json.dumps(broken))
    broken["kv_cache"]["dtype"] = "bf16"
    del broken["limits"]
    with pytest.raises(ConfigError, match="missing key 'limits'"):
        EngineConfig.from_json(json.dumps(broken))
    with pytest.raises(ConfigError, match="not valid JSON"):
        EngineConfig.from_json("{")


def test_fp8_kv_scales_cover_the_observed_range(tiny_engine, tiny_ckpt):
    engine = EngineConfig.load(tiny_engine)
    k_scales, v_scales = engine.kv_cache.k_scales, engine.kv_cache.v_scales
    n = engine.model.num_hidden_layers
    assert len(k_scales) == len(v_scales) == n
    assert all(torch.isfinite(torch.tensor(s)).all() and min(s) > 0 for s in (k_scales, v_scales))
    # Observe K/V again on the calibration data with the original weights: the scales cover it.
    ckpt = load(tiny_ckpt)
    blocks = calibration_blocks(load_tokenizer(tiny_ckpt), None, FAST.calib_samples, FAST.calib_seqlen)
    x = ckpt.get("model.embed_tokens.weight").float()[blocks]
    cos, sin = rope_cos_sin(torch.arange(blocks.shape[1]), engine.model.head_dim, engine.model.rope_theta,
                            torch.float32)
    obs = KVRangeObserver(n)
    src = LayerSource(ckpt)
    with torch.no_grad():
        for i in range(n):
            layer = DecoderLayer(ckpt.config).load({k: v.float() for k, v in src.dense(i).items()})
            layer.self_attn.kv_observer = obs.observer(i)
            x = layer(x, cos, sin)
    for i in range(n):
        assert k_scales[i] * FP8_E4M3_MAX >= obs.k_amax[i] * (1 - 1e-6) > 0
        assert v_scales[i] * FP8_E4M3_MAX >= obs.v_amax[i] * (1 - 1e-6) > 0
        # ...and tightly: not wasting E4M3's range (within 1% of the observed max).
        assert k_scales[i] * FP8_E4M3_MAX <= obs.k_amax[i] * 1.01


def test_fp8_reference_quantization_error():
    x = torch.randn(4096) * 3
    scale = float(x.abs().max()) / FP8_E4M3_MAX
    back = dequantize_fp8(quantize_fp8(x, scale), scale)
    assert ((back - x).norm() / x.norm()) < 0.04  # E4M3 keeps 3 mantissa bits: ~2-3% RMS error


def test_third_party_awq_checkpoint_loads_and_dequantizes(tiny_ckpt, tmp_path):
    expected = write_awq_checkpoint(tiny_ckpt, tmp_path / "awq")
    ckpt = load(tmp_path / "awq")
    assert ckpt.awq is not None and ckpt.awq.group_size == 128
    src = LayerSource(ckpt)
    for i in range(ckpt.config.num_hidden_layers):
        dense = src.dense(i)
        for lin in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            torch.testing.assert_close(dense[lin + ".weight"], expected[f"model.layers.{i}.{lin}"], rtol=0, atol=0)
    engine = build(tmp_path / "awq", tmp_path / "engine", FAST, **QUIET)
    assert engine.weights.source == "checkpoint-awq"
    ours, theirs = load_file(str(tmp_path / "engine" / "model.safetensors")), load_file(str(tmp_path / "awq" / "model.safetensors"))
    for name in theirs:
        if name.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(ours[name], theirs[name]), name
    w = dequantize_awq(ours["model.layers.0.mlp.up_proj.qweight"], ours["model.layers.0.mlp.up_proj.qzeros"],
                       ours["model.layers.0.mlp.up_proj.scales"], 128)
    torch.testing.assert_close(w, expected["model.layers.0.mlp.up_proj"], rtol=0, atol=0)


def test_unsupported_awq_version_is_refused(tiny_ckpt, tmp_path):
    from qwentrt.errors import CheckpointError
    write_awq_checkpoint(tiny_ckpt, tmp_path / "awq")
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="AWQ version 'gemv' is not supported"):
        load(tmp_path / "awq")


def test_bf16_variants(tiny_ckpt, tmp_path):
    engine = build(tiny_ckpt, tmp_path / "bf16", replace(FAST, weights="bf16", kv_cache="bf16"), **QUIET)
    assert engine.weights.format == "bf16" and engine.kv_cache.dtype == "bf16" and engine.kv_cache.k_scales == []
    assert engine.build.calibration == {}  # nothing to calibrate
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    ref = load(tiny_ckpt).get("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], ref.to(torch.bfloat16))
    e2 = build(tiny_ckpt, tmp_path / "bf16-fp8", replace(FAST, weights="bf16"), **QUIET)
    assert e2.kv_cache.dtype == "fp8-e4m3" and len(e2.kv_cache.k_scales) == e2.model.num_hidden_layers
    assert e2.kv_cache.bytes_per_token * 2 == engine.kv_cache.bytes_per_token


def test_memory_plan_of_the_4b_model_on_a_24_gib_card():
    cfg = preset("4b")
    weights = int(2.67e9)  # int4 linears with scales + the bf16 tied embedding
    plan, blocks = memory_plan.plan(cfg, 24 << 30, weights, "fp8-e4m3", 32, 8192, 256)
    assert cfg.kv_bytes_per_token("fp8-e4m3") == 72 * 1024
    assert blocks * 32 >= 200_000
    assert plan.weights + plan.activations + plan.cuda_context + plan.cuda_graphs_and_workspace + plan.headroom + plan.kv_cache <= plan.budget


def test_a_budget_too_small_is_refused_with_the_numbers(tiny_ckpt, tmp_path):
    from qwentrt.errors import BuildError
    with pytest.raises(BuildError, match="leaves KV room for 0 tokens"):
        build(tiny_ckpt, tmp_path / "e", replace(FAST, weights="bf16", kv_cache="bf16", gpu_memory_gib=0.5), **QUIET)
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


def test_kv_spec_capacity():
    assert KVCacheSpec("fp8-e4m3", 32, 10, 1).capacity_tokens == 320


def test_default_max_batch_size_follows_the_gpu_budget():
    from qwentrt.config import BuildConfig, default_max_batch_size

    assert default_max_batch_size(24) == 256 and default_max_batch_size(80) == 512
    BuildConfig().validate()  # None: decided by the build from the budget
    BuildConfig(max_batch_size=384).validate()
