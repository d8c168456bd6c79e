"""AWQ against round-to-nearest on activations with outlier channels (the case AWQ exists for)."""

import torch
from torch import nn

from qwentrt.config import Qwen3Config
from qwentrt.quant.awq import apply_clip, apply_scales, awq_decoder_layer, pseudo_quantize, search_clip, search_scales
from qwentrt.quant.dense_qwen3 import DecoderLayer, RMSNorm, rope_cos_sin

GROUP = 128


def outlier_activations(tokens: int, channels: int, outliers: torch.Tensor) -> torch.Tensor:
    x = torch.randn(tokens, channels)
    x[:, outliers] *= 30.0
    return x


def test_awq_beats_rtn_on_a_linear_with_outlier_channels():
    k, n = 512, 256
    outliers = torch.randperm(k)[:8]
    calib = outlier_activations(2048, k, outliers)
    held_out = outlier_activations(1024, k, outliers)
    norm = RMSNorm(k, 1e-6)
    lin = nn.Linear(k, n, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    w0 = lin.weight.detach().clone()
    reference = held_out @ w0.t()

    rtn = pseudo_quantize(w0, GROUP)[0]
    err_rtn = (held_out @ rtn.t() - reference).norm() / reference.norm()

    res = search_scales([lin], calib, lin, GROUP, n_grid=20)
    assert res.loss < res.loss_rtn
    feats = calib.clone()
    apply_scales(norm, [lin], res.scales, [feats])
    apply_clip(lin, search_clip(lin.weight.detach(), feats, GROUP), GROUP)
    q = pseudo_quantize(lin.weight.detach(), GROUP)[0]
    # What the engine computes: norm weight (1/s) folded into the input, then the int4 weight.
    y = (held_out * norm.weight.detach()) @ q.t()
    err_awq = (y - reference).norm() / reference.norm()
    assert err_awq < 0.7 * err_rtn, (err_awq, err_rtn)


def tiny_cfg() -> Qwen3Config:
    return Qwen3Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True)


def test_awq_decoder_layer_lowers_block_error_vs_rtn():
    cfg = tiny_cfg()
    torch.manual_seed(torch.seed() % 2**31)
    layer = DecoderLayer(cfg)
    for name, p in layer.named_parameters():
        with torch.no_grad():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.05 * torch.randn_like(p))
    batch, seq = 4, 64
    outliers = torch.randperm(cfg.hidden_size)[:4]
    x = torch.randn(batch, seq, cfg.hidden_size)
    x[..., outliers] *= 20
    cos, sin = rope_cos_sin(torch.arange(seq), cfg.head_dim, cfg.rope_theta, torch.float32)
    with torch.no_grad():
        ref, feats = layer.forward_with_features(x, cos, sin)
        rtn = DecoderLayer(cfg)
        rtn.load_state_dict(layer.state_dict())
        for m in rtn.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(pseudo_quantize(m.weight, GROUP)[0])
        err_rtn = (rtn(x, cos, sin) - ref).norm() / (ref - x).norm()
        stats = awq_decoder_layer(layer, feats, cos, sin, batch=batch, group_size=GROUP, n_grid=10)
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(pseudo_quantize(m.weight, GROUP)[0])
        err_awq = (layer(x, cos, sin) - ref).norm() / (ref - x).norm()
    assert set(stats) == {"qkv", "gate_up", "down"}
    for group, (ratio, loss, loss_rtn) in stats.items():
        assert loss <= loss_rtn, group
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_scales_are_exact_in_full_precision():
    """Folding scales into the previous op changes nothing before rounding."""
    k, n = 256, 128
    norm = RMSNorm(k, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(k))
    lin = nn.Linear(k, n, bias=False)
    x = torch.randn(32, k)
    before = lin(norm(x))
    apply_scales(norm, [lin], torch.rand(k) + 0.5)
    torch.testing.assert_close(lin(norm(x)), before, rtol=1e-5, atol=1e-5)
