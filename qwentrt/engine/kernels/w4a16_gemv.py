"""W4A16 GEMV for the decode range (a few tokens): y[M, N] = x[M, K] @ dequant(qweight)[K, N], AutoAWQ
GEMM layout (see w4a16.py), without tensor cores.

One program per (row m, tile of BLOCK_N columns, run of quantization groups). At one token the GEMV is
bound by the instructions that turn nibbles into floats, not by memory (H100: loads alone 11 us of the
gate_up projection's 27 us; docs/KERNEL_NOTES.md), so the inner loop is cut to three per nibble:

- no shifts: a packed int32 is split into two 16-bit halves; nibble p of a half, masked and OR-ed into the
  float 2^23 (0x4B000000), reads as 2^23 + q * 16^p, and subtracting 2^23 leaves q * 16^p exactly (one
  LOP3, one FADD); the 16^p is taken out once per group (a power of two: exact);
- no zero point in the loop: sum_k x (q - z) s = s * (sum_k x q - z * sum_k x), per group and column;
- products accumulate elementwise over a group's rows; one reduction over rows per group.
Half h, nibble p of packed column c is AWQ position 4h + p, which is logical column 8c + 2p + h (AWQ's
(0, 2, 4, 6, 1, 3, 5, 7) order), so results are kept as [BLOCK_N / 8, 2, 4] and stored by that index.

SILU_MUL: x is the gate|up projection's output [M, 2K] and the kernel takes silu(gate) * up as its input,
rounded as `activation.silu_and_mul` rounds it (so the result is the unfused pair's, bit for bit): the MLP's down
projection at a few tokens then needs no SiLU-mul launch (one kernel less per layer in the decode graph). Every
column tile recomputes its K range of the product, a few exps per thousand nibbles.

LAYOUT (a config key): "lanes" (the kernel first below, the default) spreads a word's 8 nibbles over 8 threads;
"words" (the second) has each thread own whole words, ~4.1 against ~5.7 SASS instructions per nibble on sm_90
(scripts/sass_lab.py reads them on the CPU). Build-time tuning times both. "stream" is the persistent GEMV of
w4a16_gemv_stream.py (one wave of programs streaming tile-major weights; its own config keys).

Split-K partial sums go to a float32 workspace with atomic adds; the last split of each tile to finish
(an atomic counter per tile) writes the output in x's dtype and puts the workspace and its counter back
to zero, so a call is one launch: no memset, no cast kernel. The workspace and counters persist per
device (zero between calls), which also makes the kernel CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwentrt.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _nibbles_scaled(words, masks):
        """[..., PN] int32 -> [..., PN, 2, 4] float32: nibble p of half h as q * 16^p, exactly."""
        halves = tl.join(words, words >> 16)
        bits = (tl.expand_dims(halves, len(halves.shape)) & masks) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _pdl_prologue(qw_ptr, stride_qw, row0, word0, N, GROUP: tl.constexpr, PN: tl.constexpr, PDL: tl.constexpr,
                      PDL_LATE: tl.constexpr):
        """Under PDL (pdl.py), before the kernel before this one has finished: ask L2 for this program's first group
        of weight rows (one prefetch per 128-byte line; weights are never written by a step), let the next kernel
        launch (unless PDL_LATE: then after the main loop, _pdl_late_trigger), then wait for the one before.
        Everything after reads what earlier kernels wrote."""
        if PDL:
            LINES: tl.constexpr = PN // 32 if PN >= 32 else 1
            cols = tl.minimum(word0 + tl.arange(0, LINES) * 32, N // 8 - 1) - word0  # (qw_ptr: the tile's)
            rows = row0 + tl.arange(0, GROUP)
            pdl.prefetch_l2(qw_ptr + rows[:, None] * stride_qw + cols[None, :], PDL)
            if not PDL_LATE:
                pdl.launch_dependents(PDL)
            pdl.wait(PDL)

    @triton.jit
    def _pdl_late_trigger(PDL: tl.constexpr, PDL_LATE: tl.constexpr):
        """PDL "late": the main loop is done; the next kernel may launch while the split-K epilogue drains."""
        if PDL and PDL_LATE:
            pdl.launch_dependents(PDL)

    @triton.jit
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K, SPLIT_K,
                           stride_xm, stride_qw, stride_qz, stride_s, stride_ym, stride_qt,
                           GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SILU_MUL: tl.constexpr = False, PDL: tl.constexpr = False,
                           COUNTER_SEM: tl.constexpr = "acq_rel", DEFERRED: tl.constexpr = False,
                           PDL_LATE: tl.constexpr = False):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PN: tl.constexpr = BLOCK_N // 8
        offs_pn = pid_n * PN + tl.arange(0, PN)
        mask = offs_pn < N // 8
        rk = tl.arange(0, BLOCK_K)
        h = tl.arange(0, 2)
        p = tl.arange(0, 4)
        masks = 15 << (4 * p)  # nibble p of a 16-bit half
        unscale = tl.exp2(-4.0 * p.to(tl.float32))  # 16^-p, exact
        cols = offs_pn[:, None, None] * 8 + 2 * p[None, None, :] + h[None, :, None]  # [PN, 2, 4]
        cmask = mask[:, None, None]
        n_groups = K // GROUP
        g0 = pid_k * n_groups // SPLIT_K  # this split's run of whole groups
        g1 = (pid_k + 1) * n_groups // SPLIT_K
        qw_ptr += pid_n * stride_qt  # this tile's words (AWQ layout: stride_qt = PN; tile-major: K * PN)
        _pdl_prologue(qw_ptr, stride_qw, g0 * GROUP, pid_n * PN, N, GROUP, PN, PDL, PDL_LATE)
        tile_words = tl.arange(0, PN)
        out = tl.zeros([PN, 2, 4], tl.float32)
        for g in range(g0, g1):
            acc = tl.zeros([BLOCK_K, PN, 2, 4], tl.float32)
            xs = tl.zeros([BLOCK_K], tl.float32)
            for kk in tl.static_range(0, GROUP, BLOCK_K):
                offs_k = g * GROUP + kk + rk
                x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)
                if SILU_MUL:  # x is the gate; the up half starts K further on (activation.py's rounding)
                    up = tl.load(x_ptr + m * stride_xm + K + offs_k).to(tl.float32)
                    silu = (x / (1.0 + tl.exp(-x))).to(x_ptr.dtype.element_ty).to(tl.float32)
                    x = (silu * up).to(x_ptr.dtype.element_ty).to(tl.float32)
                qw = tl.load(qw_ptr + offs_k[:, None] * stride_qw + tile_words[None, :], mask=mask[None, :], other=0)
                acc += x[:, None, None, None] * _nibbles_scaled(qw, masks)
                xs += x
            xq = tl.sum(acc, axis=0) * unscale  # sum_k x q, [PN, 2, 4]
            qz = tl.load(qz_ptr + g * stride_qz + offs_pn, mask=mask, other=0)
            z = _nibbles_scaled(qz, masks) * unscale
            s = tl.load(s_ptr + g * stride_s + cols, mask=cmask, other=0.0).to(tl.float32)
            out += s * (xq - z * tl.sum(xs, axis=0))
        _pdl_late_trigger(PDL, PDL_LATE)
        y_ptrs = y_ptr + m * stride_ym + cols
        if SPLIT_K == 1:
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=cmask)
        else:
            ws_ptrs = ws_ptr + m * N + cols
            tl.atomic_add(ws_ptrs, out, mask=cmask, sem="relaxed")
            if not DEFERRED:  # (DEFERRED: the next kernel reads the sums and clears them; no counter, no fence)
                tile = m * tl.num_programs(1) + pid_n
                tl.debug_barrier()  # every thread's adds are issued before the count goes up
                # acq_rel: this program's partial sums are visible before the count, and the last one sees all
                done = tl.atomic_add(count_ptr + tile, 1, sem=COUNTER_SEM)
                if done == SPLIT_K - 1:
                    # read through the atomic unit (L2): the sum of every split; then leave zeros for the next call
                    total = tl.atomic_add(ws_ptrs, tl.zeros([PN, 2, 4], dtype=tl.float32), mask=cmask, sem="relaxed")
                    tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=cmask)
                    tl.store(ws_ptrs, tl.zeros([PN, 2, 4], dtype=tl.float32), mask=cmask)
                    tl.store(count_ptr + tile, 0)


if triton is not None:

    # ---- the "words" layout: each thread owns whole packed words (LAYOUT "words")
    # The kernel above spreads a word's 8 nibbles over 8 threads ([BLOCK_K, PN, 2, 4], threadsPerWarp [1, 4, 2, 4]):
    # every word goes through shared memory and every thread loads each x, ~5.7 SASS instructions per nibble on
    # sm_90 (scripts/sass_lab.py). Here the 8 columns of a word are 8 [BLOCK_K, PN] accumulators in the loaded
    # words' own layout (128-bit word loads where the tiles divide N), one FFMA per nibble, reduced over rows once
    # per group; ~4.0 instructions per nibble. Same math, same split-K protocol, same results up to summation order.

    @triton.jit
    def _nibble(w, SHIFT: tl.constexpr, magic, ASM: tl.constexpr):
        """Bits SHIFT..SHIFT+3 of w as q * 16^(SHIFT / 4) in float32, exactly: (w & mask) | 2^23's bits, minus
        2^23. One LOP3 needs the mask as its immediate and the magic in a register; left to the compiler, sm_89's
        ptxas reads the magic from the constant bank and splits the AND-OR in two (scripts/sass_lab.py), so on the
        GPU the AND-OR is one PTX lop3 (ASM); the interpreter runs no PTX."""
        if ASM:
            m = magic + tl.zeros_like(w)
            if SHIFT == 0:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF, $2, 0xEA;", "=r,r,r", [w, m],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            elif SHIFT == 4:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF0, $2, 0xEA;", "=r,r,r", [w, m],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            elif SHIFT == 8:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF00, $2, 0xEA;", "=r,r,r", [w, m],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF000, $2, 0xEA;", "=r,r,r", [w, m],
                                                 dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = (w & (15 << SHIFT)) | magic
        return bits.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _high_half(w, ASM: tl.constexpr):
        """w >> 16, as inline PTX on the GPU: opaque to LLVM, which otherwise re-extracts each high nibble from
        the word (a shift and a bitfield extract per nibble). The interpreter runs no PTX: a plain shift."""
        if ASM:
            return tl.inline_asm_elementwise("shr.u32 $0, $1, 16;", "=r,r", [w], dtype=tl.int32, is_pure=True,
                                             pack=1)
        else:
            return w >> 16

    @triton.jit
    def _column(acc, xsum, qz, s_ptr, cols, mask, SHIFT: tl.constexpr, magic, ASM: tl.constexpr):
        """One column of each word over one group: s * (sum x q - z sum x), the 16^p taken out."""
        unscale: tl.constexpr = 1.0 / (1 << SHIFT)
        z = _nibble(qz, SHIFT, magic, ASM) * unscale
        s = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        return s * (tl.sum(acc, axis=0) * unscale - z * xsum)

    @triton.jit
    def _shifted(w, SHIFT: tl.constexpr, ASM: tl.constexpr):
        """w << SHIFT (SHIFT > 0) or w >> -SHIFT, as inline PTX on the GPU (one SHF each; LLVM would otherwise
        fold the shift into every nibble's mask as separate extracts)."""
        if ASM:
            if SHIFT == 8:
                return tl.inline_asm_elementwise("shl.b32 $0, $1, 8;", "=r,r", [w], dtype=tl.int32, is_pure=True,
                                                 pack=1)
            elif SHIFT == 16:
                return tl.inline_asm_elementwise("shl.b32 $0, $1, 16;", "=r,r", [w], dtype=tl.int32, is_pure=True,
                                                 pack=1)
            elif SHIFT == -8:
                return tl.inline_asm_elementwise("shr.u32 $0, $1, 8;", "=r,r", [w], dtype=tl.int32, is_pure=True,
                                                 pack=1)
            else:
                return tl.inline_asm_elementwise("shr.u32 $0, $1, 16;", "=r,r", [w], dtype=tl.int32, is_pure=True,
                                                 pack=1)
        else:
            if SHIFT > 0:
                return w << SHIFT
            else:
                return (w >> -SHIFT) & ((1 << (32 + SHIFT)) - 1)

    @triton.jit
    def _windowed(w, SHIFT: tl.constexpr, one, ASM: tl.constexpr):
        """The nibble at bits SHIFT..SHIFT+3 (12 or 16) of w as the float 1 + q 2^(SHIFT - 23), exactly: the
        AND-OR with 1.0's bits is the whole conversion (no subtraction; the 1s are taken out once per group)."""
        if ASM:
            if SHIFT == 12:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF000, $2, 0xEA;", "=r,r,r",
                                                 [w, one + tl.zeros_like(w)], dtype=tl.int32, is_pure=True, pack=1)
            else:
                bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF0000, $2, 0xEA;", "=r,r,r",
                                                 [w, one + tl.zeros_like(w)], dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = (w & (15 << SHIFT)) | one
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _column_windowed(acc, xsum, qz, s_ptr, cols, mask, SHIFT: tl.constexpr, BITS: tl.constexpr, magic,
                         ASM: tl.constexpr):
        """_column for an accumulator of x (1 + q 2^(BITS - 23)): sum x q = (sum - sum x) 2^(23 - BITS)."""
        unscale: tl.constexpr = 1.0 / (1 << SHIFT)
        z = _nibble(qz, SHIFT, magic, ASM) * unscale
        s = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        return s * ((tl.sum(acc, axis=0) - xsum) * (1 << (23 - BITS)) - z * xsum)

    @triton.jit
    def _words_step(x_row, qw_ptr, offs_k, words, mask, stride_qw, magic, a0, a1, a2, a3, a4, a5, a6, a7, xs,
                    EVEN_N: tl.constexpr, ASM: tl.constexpr, WINDOW: tl.constexpr):
        """BLOCK_K rows of the words kernel: each word's 8 nibbles times x, into the 8 accumulators (qw_ptr: the
        tile's first word; words: offsets in the tile)."""
        x = tl.load(x_row + offs_k).to(tl.float32)
        w_ptrs = qw_ptr + offs_k[:, None] * stride_qw + words[None, :]
        if EVEN_N:  # unmasked: the loads vectorize
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask[None, :], other=0)
        xb = x[:, None]
        if WINDOW:  # nibbles shifted into mantissa bits 12..19: one LOP3 and one FFMA each
            one = 0x3F800000  # 1.0's bits
            l8 = _shifted(w, 8, ASM)
            r8 = _shifted(w, -8, ASM)
            a0 += xb * _windowed(_shifted(w, 16, ASM), 16, one, ASM)  # AWQ position 0 (bits 0-3)
            a1 += xb * _windowed(l8, 12, one, ASM)  # 1
            a2 += xb * _windowed(l8, 16, one, ASM)  # 2
            a3 += xb * _windowed(w, 12, one, ASM)  # 3
            a4 += xb * _windowed(w, 16, one, ASM)  # 4
            a5 += xb * _windowed(r8, 12, one, ASM)  # 5
            a6 += xb * _windowed(r8, 16, one, ASM)  # 6
            a7 += xb * _windowed(_shifted(w, -16, ASM), 12, one, ASM)  # 7
        else:
            hi = _high_half(w, ASM)
            a0 += xb * _nibble(w, 0, magic, ASM)
            a1 += xb * _nibble(w, 4, magic, ASM)
            a2 += xb * _nibble(w, 8, magic, ASM)
            a3 += xb * _nibble(w, 12, magic, ASM)
            a4 += xb * _nibble(hi, 0, magic, ASM)
            a5 += xb * _nibble(hi, 4, magic, ASM)
            a6 += xb * _nibble(hi, 8, magic, ASM)
            a7 += xb * _nibble(hi, 12, magic, ASM)
        return a0, a1, a2, a3, a4, a5, a6, a7, xs + x

    @triton.jit
    def _finish_group(o0, o1, o2, o3, o4, o5, o6, o7, a0, a1, a2, a3, a4, a5, a6, a7, xs, qz_row, s_row, words, mask,
                      magic, ASM: tl.constexpr, WINDOW: tl.constexpr):
        """One group's 8 accumulators (a_j: x times nibble j of each word, [BLOCK_K, PN]) added to the 8 columns of
        each word (o_j, [PN]): s (sum x q - z sum x), qz_row / s_row the group's zeros and scales (words and window
        arithmetic; shared by the words kernel and the persistent one, w4a16_gemv_stream.py)."""
        xsum = tl.sum(xs, axis=0)
        qz = tl.load(qz_row + words, mask=mask, other=0)
        qzh = _high_half(qz, ASM)
        sg = s_row
        c0 = words * 8  # column of half h, nibble p of a word: 8c + 2p + h (AWQ's order)
        if WINDOW:
            o0 += _column_windowed(a0, xsum, qz, sg, c0 + 0, mask, 0, 16, magic, ASM)
            o1 += _column_windowed(a1, xsum, qz, sg, c0 + 2, mask, 4, 12, magic, ASM)
            o2 += _column_windowed(a2, xsum, qz, sg, c0 + 4, mask, 8, 16, magic, ASM)
            o3 += _column_windowed(a3, xsum, qz, sg, c0 + 6, mask, 12, 12, magic, ASM)
            o4 += _column_windowed(a4, xsum, qzh, sg, c0 + 1, mask, 0, 16, magic, ASM)
            o5 += _column_windowed(a5, xsum, qzh, sg, c0 + 3, mask, 4, 12, magic, ASM)
            o6 += _column_windowed(a6, xsum, qzh, sg, c0 + 5, mask, 8, 16, magic, ASM)
            o7 += _column_windowed(a7, xsum, qzh, sg, c0 + 7, mask, 12, 12, magic, ASM)
        else:
            o0 += _column(a0, xsum, qz, sg, c0 + 0, mask, 0, magic, ASM)  # low half: p = 0..3 -> columns 0, 2, 4, 6
            o1 += _column(a1, xsum, qz, sg, c0 + 2, mask, 4, magic, ASM)
            o2 += _column(a2, xsum, qz, sg, c0 + 4, mask, 8, magic, ASM)
            o3 += _column(a3, xsum, qz, sg, c0 + 6, mask, 12, magic, ASM)
            o4 += _column(a4, xsum, qzh, sg, c0 + 1, mask, 0, magic, ASM)  # high half -> columns 1, 3, 5, 7
            o5 += _column(a5, xsum, qzh, sg, c0 + 3, mask, 4, magic, ASM)
            o6 += _column(a6, xsum, qzh, sg, c0 + 5, mask, 8, magic, ASM)
            o7 += _column(a7, xsum, qzh, sg, c0 + 7, mask, 12, magic, ASM)
        return o0, o1, o2, o3, o4, o5, o6, o7

    @triton.jit
    def _w4a16_gemv_words_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, y_ptr, ws_ptr, count_ptr, N, K, SPLIT_K,
                                 stride_xm, stride_qw, stride_qz, stride_s, stride_ym, stride_qt, magic,
                                 GROUP: tl.constexpr, PN: tl.constexpr, BLOCK_K: tl.constexpr,
                                 EVEN_N: tl.constexpr, ASM: tl.constexpr, WINDOW: tl.constexpr = False,
                                 KSTAGES: tl.constexpr = 0, PDL: tl.constexpr = False,
                                 COUNTER_SEM: tl.constexpr = "acq_rel", DEFERRED: tl.constexpr = False,
                                 PDL_LATE: tl.constexpr = False):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        words = pid_n * PN + tl.arange(0, PN)
        mask = words < N // 8
        rk = tl.arange(0, BLOCK_K)
        c0 = words * 8  # column of half h, nibble p of a word: 8c + 2p + h (AWQ's order)
        n_groups = K // GROUP
        g0 = pid_k * n_groups // SPLIT_K
        g1 = (pid_k + 1) * n_groups // SPLIT_K
        qw_ptr += pid_n * stride_qt  # this tile's words (AWQ layout: stride_qt = PN; tile-major: K * PN)
        _pdl_prologue(qw_ptr, stride_qw, g0 * GROUP, pid_n * PN, N, GROUP, PN, PDL, PDL_LATE)
        tile_words = tl.arange(0, PN)
        o0 = tl.zeros([PN], tl.float32)
        o1 = tl.zeros([PN], tl.float32)
        o2 = tl.zeros([PN], tl.float32)
        o3 = tl.zeros([PN], tl.float32)
        o4 = tl.zeros([PN], tl.float32)
        o5 = tl.zeros([PN], tl.float32)
        o6 = tl.zeros([PN], tl.float32)
        o7 = tl.zeros([PN], tl.float32)
        for g in range(g0, g1):
            a0 = tl.zeros([BLOCK_K, PN], tl.float32)
            a1 = tl.zeros([BLOCK_K, PN], tl.float32)
            a2 = tl.zeros([BLOCK_K, PN], tl.float32)
            a3 = tl.zeros([BLOCK_K, PN], tl.float32)
            a4 = tl.zeros([BLOCK_K, PN], tl.float32)
            a5 = tl.zeros([BLOCK_K, PN], tl.float32)
            a6 = tl.zeros([BLOCK_K, PN], tl.float32)
            a7 = tl.zeros([BLOCK_K, PN], tl.float32)
            xs = tl.zeros([BLOCK_K], tl.float32)
            if KSTAGES == 0:  # the group's BLOCK_K-row steps unrolled; loads issued as registers allow
                for kk in tl.static_range(0, GROUP, BLOCK_K):
                    a0, a1, a2, a3, a4, a5, a6, a7, xs = _words_step(
                        x_ptr + m * stride_xm, qw_ptr, g * GROUP + kk + rk, tile_words, mask, stride_qw, magic,
                        a0, a1, a2, a3, a4, a5, a6, a7, xs, EVEN_N, ASM, WINDOW)
            else:  # a loop whose weight loads go through shared memory, KSTAGES steps in flight (cp.async)
                for kk in tl.range(0, GROUP, BLOCK_K, num_stages=KSTAGES):
                    a0, a1, a2, a3, a4, a5, a6, a7, xs = _words_step(
                        x_ptr + m * stride_xm, qw_ptr, g * GROUP + kk + rk, tile_words, mask, stride_qw, magic,
                        a0, a1, a2, a3, a4, a5, a6, a7, xs, EVEN_N, ASM, WINDOW)
            o0, o1, o2, o3, o4, o5, o6, o7 = _finish_group(
                o0, o1, o2, o3, o4, o5, o6, o7, a0, a1, a2, a3, a4, a5, a6, a7, xs, qz_ptr + g * stride_qz,
                s_ptr + g * stride_s, words, mask, magic, ASM, WINDOW)
        _pdl_late_trigger(PDL, PDL_LATE)
        # each word's 8 columns side by side, [PN, 8] in column order (8c + 2p + h: p1, p0, h from the outer axis
        # in), so a thread writes 8 consecutive floats: 8 strided [PN] stores or atomics touch 8x the sectors
        out = tl.reshape(tl.join(tl.join(tl.join(o0, o2), tl.join(o1, o3)), tl.join(tl.join(o4, o6), tl.join(o5, o7))),
                         [PN, 8])
        cols = c0[:, None] + tl.arange(0, 8)[None, :]
        cmask = mask[:, None]
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + cols, out.to(y_ptr.dtype.element_ty), mask=cmask)
        else:  # the split-K protocol of the kernel above: atomics, a counter per tile, the last split writes y
            tl.atomic_add(ws_ptr + m * N + cols, out, mask=cmask, sem="relaxed")
            if not DEFERRED:
                tile = m * tl.num_programs(1) + pid_n
                tl.debug_barrier()
                done = tl.atomic_add(count_ptr + tile, 1, sem=COUNTER_SEM)
                if done == SPLIT_K - 1:
                    zero = tl.zeros([PN, 8], tl.float32)
                    total = tl.atomic_add(ws_ptr + m * N + cols, zero, mask=cmask, sem="relaxed")
                    tl.store(y_ptr + m * stride_ym + cols, total.to(y_ptr.dtype.element_ty), mask=cmask)
                    tl.store(ws_ptr + m * N + cols, zero, mask=cmask)
                    tl.store(count_ptr + tile, 0)


# H100 winners per shape are in scripts/device/h100_kernels.json; this is a safe middle for any shape
DEFAULT_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 16, "SPLIT_K": 8, "num_warps": 1, "num_stages": 2}
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
WORKSPACE_FLOATS = 1 << 22  # 16 MiB: M * N of the largest call (e.g. 16 tokens x 262,144 columns)
MAX_TILES = 1 << 16
MAGIC_2_23 = 0x4B000000  # the float 2^23's bits (the words kernel's magic, passed as a value)


@dataclass
class SplitKSums:
    """A GEMV's output left in the split-K workspace as float32 sums ("deferred", `w4a16_gemv_deferred`): the GEMV's
    programs only add their parts (no tile counter, so no acq_rel fence at the end of every program), and the kernel
    that consumes the output (the residual-add + RMSNorm, the SiLU-mul) reads the sums, rounds them to `dtype` as
    the GEMV would have stored them (the results do not change) and stores zeros back, which the workspace must hold
    when the next GEMV starts. Anything else that gets one calls `materialize()`."""
    sums: torch.Tensor  # [M, N] float32, a view of the workspace
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.sums.shape

    @property
    def device(self) -> torch.device:
        return self.sums.device

    @property
    def is_cuda(self) -> bool:
        return self.sums.is_cuda

    def materialize(self) -> torch.Tensor:
        """The output as a tensor in `dtype`; the workspace cleared."""
        out = self.sums.to(self.dtype, copy=True)  # (a copy even in float32: the sums are zeroed next)
        self.sums.zero_()
        return out


def reset_split_k_workspaces() -> None:
    """Zero every device's workspace and counters: after a step that failed part-way (a consumer that never ran
    leaves its sums behind)."""
    for ws, counts in _workspaces.values():
        ws.zero_()
        counts.zero_()


def split_k_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Persistent zeroed float32 workspace and tile counters, shared by the GEMV and the GEMM (w4a16.py):
    each kernel leaves them zero, and both run on the engine's one stream."""
    if device not in _workspaces:
        _workspaces[device] = (torch.zeros(WORKSPACE_FLOATS, dtype=torch.float32, device=device),
                               torch.zeros(MAX_TILES, dtype=torch.int32, device=device))
    return _workspaces[device]


def tile_major(qweight: torch.Tensor, block_n: int) -> torch.Tensor:
    """AutoAWQ's qweight [K, N/8] as [tiles, K, BLOCK_N/8]: the words of each BLOCK_N-column tile, row after row,
    contiguous (the last tile zero-padded), so that a GEMV program's group of rows is one contiguous run of memory
    (in the AWQ layout it is K rows of BLOCK_N/2 bytes, N/2 bytes apart). `w4a16_gemv` takes either layout."""
    k, words = qweight.shape
    pn = block_n // 8
    tiles = -(-words // pn)
    padded = torch.zeros((k, tiles * pn), dtype=qweight.dtype, device=qweight.device)
    padded[:, :words] = qweight
    return padded.view(k, tiles, pn).permute(1, 0, 2).contiguous()


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: dict | None = None, silu_mul: bool = False,
               _lab_relaxed_counter: bool = False, deferred: bool = False) -> torch.Tensor | SplitKSums:
    """x [M, K] -> [M, N] in x's dtype. Meant for M of 1 to a few: each row is its own program.
    qweight: AutoAWQ's [K, N/8], or tile-major [tiles, K, BLOCK_N/8] (`tile_major`, of this config's BLOCK_N).
    silu_mul: x is [M, 2K] (gate | up) and the product is silu(gate) * up (activation.silu_and_mul) times W.
    _lab_relaxed_counter: labs only, never the engine: the split-K tile counter without its acq_rel fence
    (MEMBAR.ALL.GPU), which may return a sum before every split's part arrived: it times what the fence costs.
    deferred: with a split K, return the workspace's float32 sums as a SplitKSums for the next kernel to finish."""
    if triton is None:
        raise RuntimeError("the W4A16 GEMV kernel needs the triton package")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if cfg.get("LAYOUT") == "stream" and not silu_mul:  # the persistent GEMV over tile-major weights
        from qwentrt.engine.kernels.w4a16_gemv_stream import w4a16_gemv_stream
        sums = w4a16_gemv_stream(x, qweight, qzeros, scales, group_size, config)
        return sums if deferred else sums.materialize()
    m, k = x.shape
    if silu_mul:
        if k % 2:
            raise ValueError(f"W4A16 GEMV: silu_mul needs x as gate | up, [M, 2K]; got {k} columns")
        k //= 2
    if k != qweight.shape[-2 if qweight.dim() == 3 else 0]:
        raise ValueError(f"W4A16 GEMV: x has K = {k}, the weight {tuple(qweight.shape)}")
    n = scales.shape[1]
    block_k = min(cfg["BLOCK_K"], group_size)
    if group_size % block_k or k % group_size:
        raise ValueError(f"W4A16 GEMV: BLOCK_K ({block_k}) must divide the group size ({group_size}), and the "
                         f"group size must divide K ({k})")
    if n % 8:
        raise ValueError(f"W4A16 GEMV: N ({n}) must be a multiple of 8")
    pn = cfg["BLOCK_N"] // 8
    if cfg["BLOCK_N"] % 8 or pn < 1 or pn & (pn - 1):
        raise ValueError(f"W4A16 GEMV: BLOCK_N ({cfg['BLOCK_N']}) must be 8 times a power of two (8, 16, ..., 1024)")
    if qweight.dim() == 3:  # tile-major (`tile_major`): [tiles, K, PN], each program's rows contiguous
        if qweight.shape[2] != pn or qweight.shape[0] != triton.cdiv(n // 8, pn) or qweight.stride(2) != 1:
            raise ValueError(f"W4A16 GEMV: a tile-major weight {tuple(qweight.shape)} is not of BLOCK_N "
                             f"{cfg['BLOCK_N']} for N = {n}: repack it with tile_major(qweight, {cfg['BLOCK_N']})")
        stride_qt, stride_qw, even_n = qweight.stride(0), qweight.stride(1), True  # (padded: every load in bounds)
    else:
        stride_qt, stride_qw, even_n = pn, qweight.stride(0), (n // 8) % pn == 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    split = max(1, min(cfg["SPLIT_K"], k // group_size))  # a split owns whole groups
    grid = (m, triton.cdiv(n, cfg["BLOCK_N"]), split)
    ws, counts = split_k_workspace(x.device)
    if split > 1 and (m * n > ws.numel() or grid[0] * grid[1] > counts.numel()):
        raise ValueError(f"W4A16 GEMV: {m} x {n} outputs exceed the split-K workspace; use SPLIT_K 1")
    deferred = deferred and split > 1
    out = torch.empty((0 if deferred else m, n), dtype=x.dtype, device=x.device)  # (deferred: not written)
    launch = pdl.launch_kwargs(x.device)
    if launch["PDL"]:
        launch["PDL_LATE"] = pdl.late_trigger()
    layout = cfg.get("LAYOUT", "lanes")
    if layout not in ("lanes", "words", "window", "stream"):
        raise ValueError(f"W4A16 GEMV: LAYOUT must be 'lanes', 'words', 'window' or 'stream', got {layout!r}")
    if layout in ("words", "window") and not silu_mul:  # (the fused SiLU-mul exists in the lanes kernel only)
        _w4a16_gemv_words_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, split, x.stride(0),
                                       stride_qw, qzeros.stride(0), scales.stride(0), out.stride(0), stride_qt,
                                       MAGIC_2_23, GROUP=group_size, PN=pn, BLOCK_K=block_k,
                                       EVEN_N=even_n, ASM=x.is_cuda, WINDOW=layout == "window",
                                       KSTAGES=cfg.get("KSTAGES", 0), DEFERRED=deferred,
                                       COUNTER_SEM="relaxed" if _lab_relaxed_counter else "acq_rel",
                                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)
        return SplitKSums(ws[:m * n].view(m, n), x.dtype) if deferred else out
    _w4a16_gemv_kernel[grid](x, qweight, qzeros, scales, out, ws, counts, n, k, split, x.stride(0), stride_qw,
                             qzeros.stride(0), scales.stride(0), out.stride(0), stride_qt, GROUP=group_size,
                             BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SILU_MUL=silu_mul, DEFERRED=deferred,
                             COUNTER_SEM="relaxed" if _lab_relaxed_counter else "acq_rel",
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)
    return SplitKSums(ws[:m * n].view(m, n), x.dtype) if deferred else out
