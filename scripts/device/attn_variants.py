"""Paged-attention decode variants at the throughput case (H100 lab, not a test): 512 sequences of 1,000-2,000
tokens, FP8 KV, Qwen3-4B heads (32 q / 8 KV, head_dim 128), block size 32, the engine's full table width; one
partition per (sequence, KV head), as the production kernel runs there. Each variant is checked against the
production kernel's output, then timed under a CUDA graph (tuning.time_in_graph) over tiles / warps / stages.

Variants (what each tests):
- grid "seq":  programs ordered (sequence, KV head), sequence fastest, as production: the programs in flight
  at once read 128-byte slices (one KV head) of ~400 different sequences' pages;
- grid "head": KV head fastest: the 8 programs of a sequence run side by side and read its pages' 1 KiB token
  rows together (DRAM and L2 locality);
- dot "qk":   production's scores = q [16 (4 heads padded), D] @ K^T: M = 16 (mma.sync, K through smem);
- dot "kq":   scores^T = K [TILE, D] @ q^T [D, 16]: M = TILE (wgmma-sized), out^T = V^T @ P^T (M = D);
- dot "fma":  no tensor cores: 4 heads unpadded, products and sums on the FP32 units;
- dot "qk16": as "qk" with q, K, V and p in fp16 (e4m3 -> fp16 is one cvt per pair; -> bf16 is several).
The production kernel is timed with its dots in bf16 and in fp16 (compute_f16).
Usage: [QUICK=1] attn_variants.py [BATCH]"""

import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from qwentrt.engine.kernels import paged_attention as pa  # noqa: E402
from qwentrt.engine.tuning import time_in_graph  # noqa: E402
from tests.test_paged_attention_kernel import make_batch  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _lab_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, qk_scale, v_scale,
                stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
                GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                TILE_N: tl.constexpr, HEAD_FAST: tl.constexpr, DOT: tl.constexpr):
    if HEAD_FAST:
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    table = bt_ptr + seq * stride_bt
    if DOT == 2:
        G: tl.constexpr = GROUPS
    else:
        G: tl.constexpr = GROUPS_PAD
    offs_g = tl.arange(0, G)
    head_ok = offs_g < GROUPS
    heads = kv_head * GROUPS + offs_g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None],
                other=0.0)  # [G, D]
    m_i = tl.full([G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G], dtype=tl.float32)
    if DOT == 0:
        acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
    elif DOT == 1:
        acc = tl.zeros([HEAD_DIM, G], dtype=tl.float32)
        qt = tl.trans(q)
    else:
        acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
        qf = q.to(tl.float32)
    for tile_start in range(0, ctx, TILE_N):
        tok = tile_start + offs_n
        tok_ok = tok < ctx
        page = tl.load(table + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        offs = (page * stride_kb + (tok % BLOCK_SIZE) * stride_kt)[:, None] + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + offs, mask=tok_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        v = tl.load(v_ptr + offs, mask=tok_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
        if DOT == 0 or DOT == 3:  # 3: the dots in fp16
            if DOT == 3:
                qd = q.to(tl.float16)
            else:
                qd = q
            k = k.to(qd.dtype)
            v = v.to(qd.dtype)
            s = tl.dot(qd, tl.trans(k)) * qk_scale  # [G, TILE]
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        elif DOT == 1:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            st = tl.dot(k, qt) * qk_scale  # [TILE, G]
            st = tl.where(tok_ok[:, None], st, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(st, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(st - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype))  # [D, G]
            m_i = m_new
        else:
            kf = k.to(tl.float32)
            vf = v.to(tl.float32)
            s = tl.sum(kf[:, None, :] * qf[None, :, :], axis=2) * qk_scale  # [TILE, G]
            s = tl.where(tok_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vf[:, None, :], axis=0)  # [G, D]
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if DOT == 1:
        out = tl.trans(acc * (v_scale / l_safe)[None, :])
    else:
        out = acc * (v_scale / l_safe)[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def lab(inp, out, head_fast, dot, tile, warps, stages):
    q, kc, vc = inp["q"], inp["k_cache"].view(torch.uint8), inp["v_cache"].view(torch.uint8)
    b, h, d = q.shape
    _, bs, hk, _ = kc.shape
    grid = (hk, b) if head_fast else (b, hk)
    _lab_kernel[grid](q, kc, vc, inp["block_tables"], inp["context_lens"], out,
                      inp["scale"] * inp["k_scale"] * LOG2E, inp["v_scale"], q.stride(0), q.stride(1), kc.stride(0),
                      kc.stride(1), kc.stride(2), inp["block_tables"].stride(0), out.stride(0), out.stride(1),
                      GROUPS=h // hk, GROUPS_PAD=16, HEAD_DIM=d, BLOCK_SIZE=bs, TILE_N=tile, HEAD_FAST=head_fast,
                      DOT=dot, num_warps=warps, num_stages=stages)
    return out


def main(batch: int) -> None:
    torch.manual_seed(0)
    lens = torch.randint(1000, 2001, (batch,)).tolist()
    inp = make_batch(lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, q_dtype=torch.bfloat16,
                     kv_dtype=torch.float8_e4m3fn, device="cuda", extra_cols=1024 - -(-max(lens) // 32))
    kv_bytes = sum(lens) * 8 * 128 * 2
    ref = pa.paged_attention_decode(**inp, partition_size=None, compute_f16=False)  # the validated bf16 path
    out = torch.empty_like(inp["q"])
    results = []
    for f16 in (False, True):
        got = pa.paged_attention_decode(**inp, partition_size=None, compute_f16=f16)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        ms0 = time_in_graph(lambda: pa.paged_attention_decode(**inp, partition_size=None, out=out, compute_f16=f16),
                            replays=30)
        name = f"production, dots in {'fp16' if f16 else 'bf16'}"
        results.append((ms0, name))
        print(f"batch {batch}: {name} {ms0 * 1e3:.1f} us/layer ({kv_bytes / ms0 / 1e9:.2f} TB/s) err {err:.1e}",
              flush=True)
    for tile, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3)):  # production's own knobs, fp16
        try:
            ms = time_in_graph(lambda: pa.paged_attention_decode(**inp, partition_size=None, out=out, compute_f16=True,
                                                                 tile_tokens=tile, num_warps=warps, num_stages=stages),
                               replays=30)
            results.append((ms, f"production fp16 tile {tile} w{warps} s{stages}"))
        except Exception as e:  # noqa: BLE001
            print(f"  production fp16 tile {tile} w{warps} s{stages}: failed {type(e).__name__}", flush=True)
    quick = os.environ.get("QUICK") == "1"  # only the fp16 lab variant, 4 warps
    for head_fast, dot in itertools.product((False, True), (3,) if quick else (0, 1, 3)):
        for tile, warps, stages in itertools.product((64, 128), (4,) if quick else (4, 8), (2, 3)):
            name = f"grid {'head' if head_fast else 'seq '} dot {('qk', 'kq', 'fma', 'qk16')[dot]} tile {tile:3d} w{warps} s{stages}"
            try:
                got = lab(inp, torch.full_like(out, float("nan")), head_fast, dot, tile, warps, stages)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if not err < 2e-2:
                    print(f"  {name}: WRONG (max rel err {err:.3g})", flush=True)
                    continue
                ms = time_in_graph(lambda: lab(inp, out, head_fast, dot, tile, warps, stages), replays=30)
                results.append((ms, name))
                print(f"  {name}: {ms * 1e3:7.1f} us ({kv_bytes / ms / 1e9:.2f} TB/s) err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 (a config that does not compile / fit)
                print(f"  {name}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
    print("best:")
    for ms, name in sorted(results)[:10]:
        print(f"  {name}: {ms * 1e3:7.1f} us ({kv_bytes / ms / 1e9:.2f} TB/s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
