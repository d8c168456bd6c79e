"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that the kernels launched with it wait before
reading what other kernels write. Compiled for sm_90 on the CPU (Triton's bundled ptxas), read in the PTX; whether
it pays is measured on the GPU (docs/KERNEL_NOTES.md)."""

import pytest
import torch

from qwentrt.engine.kernels import pdl

pytestmark = pytest.mark.skipif(not pdl.TRITON_HAS_PDL, reason="this Triton has no programmatic dependent launch")


def test_pdl_is_off_unless_the_engine_or_the_environment_asks(monkeypatch):
    monkeypatch.delenv("QWENTRT_PDL", raising=False)
    pdl.configure({})
    assert not pdl._wanted["on"]
    pdl.configure({"pdl": True})
    assert pdl._wanted["on"]
    assert not pdl.enabled(torch.device("cpu")) and pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("QWENTRT_PDL", "0")
    pdl.configure({"pdl": True})
    assert not pdl._wanted["on"]
    monkeypatch.setenv("QWENTRT_PDL", "1")
    pdl.configure({})
    assert pdl._wanted["on"]
    monkeypatch.setenv("QWENTRT_PDL", "late")
    pdl.configure({})
    assert pdl._wanted["on"] and pdl.late_trigger()
    monkeypatch.delenv("QWENTRT_PDL")
    pdl.configure({"pdl": "late"})
    assert pdl._wanted["on"] and pdl.late_trigger()
    with pytest.raises(ValueError, match='"pdl" must be true, false or "late"'):
        pdl.configure({"pdl": "early"})
    pdl.configure({})
    assert not pdl._wanted["on"] and not pdl.late_trigger()


def test_the_engine_configuration_reaches_pdl(monkeypatch):
    """ops.configure (what the model calls with the engine's kernel configs) configures PDL too."""
    from qwentrt.engine.kernels import ops
    monkeypatch.delenv("QWENTRT_PDL", raising=False)
    ops.configure({"pdl": "late"})
    assert pdl._wanted == {"on": True, "late": True}
    monkeypatch.setenv("QWENTRT_PDL", "1")
    ops.configure({"pdl": False})
    assert pdl._wanted == {"on": True, "late": False}
    monkeypatch.delenv("QWENTRT_PDL")
    ops.configure({})
    assert pdl._wanted == {"on": False, "late": False}


def _ptx(fn, signature: dict, constexprs: dict, launch_pdl: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 1, **({"launch_pdl": True} if launch_pdl else {})})
    return kernel.asm["ptx"]


GEMV_ARGS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": "*bf16",
             "ws_ptr": "*fp32", "count_ptr": "*i32", "N": "i32", "K": "i32", "SPLIT_K": "i32", "stride_xm": "i32",
             "stride_qw": "i32", "stride_qz": "i32", "stride_s": "i32", "stride_ym": "i32", "stride_qt": "i32"}


def _gemv_ptx(layout: str, deferred: bool, pdl_on: bool, late: bool = False) -> str:
    """PTX of the GEMV kernel of this layout ("lanes" or "window") for sm_90."""
    from qwentrt.engine.kernels import w4a16_gemv as g
    if layout == "lanes":
        fn, sig = g._w4a16_gemv_kernel, GEMV_ARGS
        const = {"GROUP": 128, "BLOCK_N": 128, "BLOCK_K": 16, "SILU_MUL": False}
    else:
        fn, sig = g._w4a16_gemv_words_kernel, dict(GEMV_ARGS, magic="i32")
        const = {"GROUP": 128, "PN": 32, "BLOCK_K": 8, "EVEN_N": True, "ASM": True, "WINDOW": True, "KSTAGES": 0}
    const.update(COUNTER_SEM="acq_rel", DEFERRED=deferred, PDL=pdl_on, PDL_LATE=late)
    return _ptx(fn, sig, const, pdl_on)


@pytest.mark.parametrize("layout", ["lanes", "window"])
def test_the_gemv_prefetches_its_weights_then_waits_before_reading_x(layout):
    on = _gemv_ptx(layout, deferred=False, pdl_on=True)
    off = _gemv_ptx(layout, deferred=False, pdl_on=False)
    assert "griddepcontrol" not in off and "prefetch.global.L2" not in off
    wait = on.index("griddepcontrol.wait")
    assert on.index("prefetch.global.L2") < on.index("griddepcontrol.launch_dependents") < wait
    # every global load but the L2 prefetches comes after the wait
    assert "ld.global" not in on[:wait]


@pytest.mark.parametrize("layout", ["lanes", "window"])
def test_the_gemv_late_trigger_comes_after_its_main_loop(layout):
    """"pdl": "late": the prefetch and the wait as before, the trigger after every weight load (only the split-K
    epilogue's atomics after it)."""
    late = _gemv_ptx(layout, deferred=True, pdl_on=True, late=True)
    wait = late.index("griddepcontrol.wait")
    trigger = late.index("griddepcontrol.launch_dependents")
    assert late.index("prefetch.global.L2") < wait < trigger and "ld.global" not in late[:wait]
    assert "ld.global" not in late[trigger:]
    assert "red.global" in late[trigger:] or "atom.global" in late[trigger:]


def test_small_kernels_wait_first_under_pdl():
    from qwentrt.engine.kernels import norm
    sig = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
           "residual_out_ptr": "*bf16", "n_cols": "i32", "eps": "fp32", "stride_x": "i32", "stride_r": "i32",
           "stride_o": "i32", "stride_ro": "i32"}
    const = {"HAS_RESIDUAL": True, "BLOCK": 4096, "X_SUMS": False}
    on = _ptx(norm._rms_norm_kernel, sig, dict(const, PDL=True), True)
    assert "griddepcontrol" not in _ptx(norm._rms_norm_kernel, sig, dict(const, PDL=False), False)
    wait = on.index("griddepcontrol.wait")
    assert on.index("griddepcontrol.launch_dependents") < wait and "ld.global" not in on[:wait]
