"""Synthetic checkpoints are real HF Qwen3 checkpoints: transformers loads them, and our dense
calibration layer computes what HF's Qwen3 layer computes."""

import json
from importlib import resources

import torch

from qwentrt.checkpoint import load
from qwentrt.quant.dense_qwen3 import DecoderLayer, rope_cos_sin
from qwentrt.synth import preset


def test_4b_preset_is_the_reference_shape():
    ref = json.loads(resources.files("qwentrt.data").joinpath("qwen3-4b-instruct-2507.config.json").read_text())
    hf = preset("4b").to_hf()
    for key, value in ref.items():
        assert hf[key] == value, key
    assert abs(preset("4b").num_parameters() - 4.022e9) < 0.001e9


def test_tiny_checkpoint_loads_in_transformers_and_matches_our_layer(tiny_ckpt):
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ckpt = load(tiny_ckpt)
    assert model.config.num_hidden_layers == ckpt.config.num_hidden_layers
    assert AutoConfig.from_pretrained(tiny_ckpt).model_type == "qwen3"

    seq = 40
    ids = torch.randint(0, ckpt.config.vocab_size, (2, seq))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        layer = DecoderLayer(ckpt.config)
        p = "model.layers.0."
        layer.load({k[len(p):]: ckpt.get(k).float() for k in ckpt.expected_shapes() if k.startswith(p)})
        cos, sin = rope_cos_sin(torch.arange(seq), ckpt.config.head_dim, ckpt.config.rope_theta, torch.float32)
        ours = layer(hidden[0], cos, sin)
    rel = (ours - hidden[1]).norm() / hidden[1].norm()
    assert rel < 1e-5, rel

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": "你好, world 👋"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\n你好, world 👋<|im_end|>\n<|im_start|>assistant\n"
    assert "<think>" not in text


def test_synth_is_seeded(tmp_path):
    from qwentrt.synth import synth
    a = load(synth(tmp_path / "a", "tiny", seed=3, progress=False)).get("model.layers.1.mlp.up_proj.weight")
    b = load(synth(tmp_path / "b", "tiny", seed=3, progress=False)).get("model.layers.1.mlp.up_proj.weight")
    c = load(synth(tmp_path / "c", "tiny", seed=4, progress=False)).get("model.layers.1.mlp.up_proj.weight")
    assert torch.equal(a, b) and not torch.equal(a, c)
