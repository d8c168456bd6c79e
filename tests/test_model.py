"""The paged-KV model against HF transformers' Qwen3ForCausalLM on the same weights (tiny, CPU, float32):
teacher-forced logits, prefill chunked and unchunked, prompts longer than a KV page."""

import pytest
import torch
from safetensors.torch import load_file

from qwentrt.config import EngineConfig
from qwentrt.engine.engine import LLMEngine
from qwentrt.engine.scheduler import ScheduledSeq
from qwentrt.engine.sequence import Sequence
from qwentrt.config import SamplingParams
from qwentrt.quant.pack import dequantize_awq

from .conftest import DEVICE


def teacher_forced_logits(engine_dir, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits at every position, the prompt fed in chunks of `chunk` tokens through the paged cache."""
    eng = LLMEngine(engine_dir, device=DEVICE, dtype=torch.float32, num_blocks=32, allow_gpu_mismatch=True)
    seq = Sequence(0, "r", ids, SamplingParams())
    eng.block_manager.allocate(seq.seq_id, ids)
    out = []
    while seq.num_computed_tokens < len(ids):
        n = min(chunk, len(ids) - seq.num_computed_tokens)
        input_ids, meta = eng.runner.prepare([ScheduledSeq(seq, n)], eng.block_manager)
        meta.logits_indices = torch.arange(n, device=input_ids.device)
        out.append(eng.runner.model.compute_logits(eng.runner.model(input_ids, meta, eng.runner.kv_caches)))
        seq.num_computed_tokens += n
    return torch.cat(out).cpu()


def hf_logits(state_dict_or_path, ids: list[int], config_dir) -> torch.Tensor:
    from transformers import AutoConfig, Qwen3ForCausalLM
    if isinstance(state_dict_or_path, dict):
        model = Qwen3ForCausalLM(AutoConfig.from_pretrained(config_dir)).float()
        missing, unexpected = model.load_state_dict(state_dict_or_path, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
    else:
        model = Qwen3ForCausalLM.from_pretrained(state_dict_or_path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunk", [1000, 29, 1])
def test_bf16_engine_matches_hf(bf16_engine, tiny_ckpt, chunk):
    ids = torch.randint(0, 151000, (75,)).tolist()  # > 2 KV pages of 32
    ours = teacher_forced_logits(bf16_engine, ids, chunk)
    ref = hf_logits(tiny_ckpt, ids, tiny_ckpt)
    assert rel(ours, ref) < 1e-5, rel(ours, ref)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_int4_engine_matches_its_dequantized_reference(tiny_engine, tiny_ckpt):
    engine = EngineConfig.load(tiny_engine)
    tensors = load_file(str(tiny_engine / "model.safetensors"))
    sd = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            sd[base + ".weight"] = dequantize_awq(t, tensors[base + ".qzeros"], tensors[base + ".scales"],
                                                  engine.weights.group_size)
        elif not name.endswith((".qzeros", ".scales")):
            sd[name] = t.float()
    ids = torch.randint(0, 151000, (70,)).tolist()
    # The engine's KV cache is FP8: compare against a bf16-KV copy of the same int4 engine.
    import json, shutil
    plain = tiny_engine.parent / "tiny-awq-bf16kv"
    if not plain.exists():
        shutil.copytree(tiny_engine, plain)
        data = json.loads((plain / "engine.json").read_text())
        data["kv_cache"].update(dtype="bf16", k_scales=[], v_scales=[])
        (plain / "engine.json").write_text(json.dumps(data))
    ours = teacher_forced_logits(plain, ids, 31)
    ref = hf_logits(sd, ids, tiny_ckpt)
    assert rel(ours, ref) < 1e-5, rel(ours, ref)


def test_fp8_kv_stays_within_bound_of_bf16_kv(bf16_engine, bf16_fp8kv_engine):
    ids = torch.randint(0, 151000, (90,)).tolist()
    exact = teacher_forced_logits(bf16_engine, ids, 40)
    fp8 = teacher_forced_logits(bf16_fp8kv_engine, ids, 40)
    # E4M3 keeps 3 mantissa bits (~3% per element); through 2 layers the logits move by a few percent.
    assert rel(fp8, exact) < 0.05, rel(fp8, exact)


def test_tile_major_int4_weights_are_the_only_copy_and_change_no_logits(tiny_engine, monkeypatch):
    """`w4a16_gemv_tile_major`: each INT4 linear keeps its weight tile-major as its only buffer (no AWQ copy beside
    it) and every path reads it: the same logits. The engine does so on CUDA only (ops.TILE_MAJOR_DEVICES); here the
    CPU is let in, where the reference untiles the weight. BLOCK_N 512 leaves the 768- and 256-column linears' last
    tile padded."""
    import json
    import shutil
    from qwentrt.engine.kernels import ops
    d = tiny_engine.parent / "tiny-awq-tile-major"
    if not d.exists():
        shutil.copytree(tiny_engine, d)
        data = json.loads((d / "engine.json").read_text())
        data["kernels"]["w4a16_gemv"] = {"default": {"BLOCK_N": 512, "BLOCK_K": 16, "SPLIT_K": 4, "LAYOUT": "words"}}
        (d / "engine.json").write_text(json.dumps(data))
    monkeypatch.setattr(ops, "TILE_MAJOR_DEVICES", ("cuda", "cpu"))
    ids = torch.randint(0, 151000, (40,)).tolist()
    logits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("QWENTRT_GEMV_TILE_MAJOR", flag)
        eng = LLMEngine(d, device=DEVICE, dtype=torch.float32, num_blocks=32, allow_gpu_mismatch=True)
        for layer in eng.runner.model.layers:
            for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                assert [name for name, _ in lin.named_buffers()] == ["qweight", "qzeros", "scales"]
                assert lin.qweight.dim() == (3 if flag == "1" else 2)
                n, k = lin.out_features, lin.qzeros.shape[0] * lin.group_size
                assert lin.qweight.shape == ((-(-n // 512), k, 64) if flag == "1" else (k, n // 8))
        del eng
        logits[flag] = teacher_forced_logits(d, ids, 13)
    assert torch.equal(logits["1"], logits["0"])
