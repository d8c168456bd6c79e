"""AutoAWQ GEMM int4 layout: pack/unpack round-trips, and the nibble order matches AutoAWQ's own loop."""

import torch

from qwentrt.quant.awq import pseudo_quantize
from qwentrt.quant.pack import dequantize_awq, pack_awq, pack_int4, unpack_int4

from .autoawq_ref import pack_loop as autoawq_pack_loop


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (64, 96), dtype=torch.int32)
    packed = pack_int4(q)
    assert packed.shape == (64, 12) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)


def test_pack_matches_autoawq_nibble_order():
    q = torch.randint(0, 16, (16, 64), dtype=torch.int32)
    assert torch.equal(pack_int4(q), autoawq_pack_loop(q))
    # Column 1 sits in nibble 4 (bits 16..19): the interleaved order AWQ's kernels expect.
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 1] = 0xF
    assert int(pack_int4(one)[0, 0]) == 0xF << 16


def test_pack_awq_dequantizes_to_pseudo_quantized_weights():
    for group in (32, 128):
        w = torch.randn(48, 256) * 0.05
        deq, scales, zeros = pseudo_quantize(w, group)
        t = pack_awq(w, scales, zeros, group)
        assert t["qweight"].shape == (256, 6) and t["qzeros"].shape == (256 // group, 6)
        assert t["scales"].shape == (256 // group, 48) and t["scales"].dtype == torch.float16
        back = dequantize_awq(t["qweight"], t["qzeros"], t["scales"], group)
        # Equal up to storing the scales in fp16.
        rel = (back - deq).norm() / deq.norm()
        assert rel < 2e-3, rel


def test_pack_rejects_bad_input():
    import pytest
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 8), 16))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 7, dtype=torch.int32))
