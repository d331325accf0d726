"""Numba kernels for the fast path: BatchNorm-folded convolutions with fused
epilogues, and whole inverted-residual blocks streamed row by row.

Everything here works on NHWC float32 or float64 arrays and computes in the
dtype of its input, like `layers.py`, the definition of truth the tests hold
these kernels to. The only fast-math liberty they take (FASTMATH) is
contraction of a multiply and an add into one fused multiply-add, which
rounds once instead of twice and is 18% faster; no reassociation, no
flush-to-zero, no approximate functions. So every result is a fixed sequence
of IEEE operations and only the summation order and the FMA rounding differ
from NumPy's (float64 agrees to ~1e-15, float32 to ~1e-6 of the range).

Layout of the work
------------------
* A 1x1 convolution is a GEMM, out (P, Cout) = x (P, K) @ W (K, Cout) + b,
  over P pixels. `_gemm` computes it register tile by register tile:
  MR = 4 pixels times NR2 = 32 output channels, summing over K in order.
  The weights are packed once, at load, into panels (Cout / NR, K, NR) of
  NR = 16 columns, zero-padded to a multiple of NR, and a tile spans two
  neighbouring panels (a lone last panel is covered for 2*MR pixels
  instead). Each step of the K loop loads NR weights from each panel (one
  16-wide vector each in float32), broadcasts MR inputs and does 8 vector
  multiply-adds into 8 accumulators (16 in float64): weights are reused MR
  times and inputs 32 times from registers, and 8 independent chains hide
  the FMA latency, which makes the GEMM compute-bound.
* 512-bit vectors: LLVM's tuning for AVX-512 cores such as Rocket Lake
  prefers 256-bit vectors, which halves the peak of cores with two 512-bit
  FMA units. `_wide_vectors` lifts that preference for the functions that
  call it (the GEMM tile and the depthwise row), by function attribute:
  Numba's configuration and every other function in the process are left
  alone. Measured on the 2-core Rocket Lake, float32, 1 thread: the GEMM
  went from ~100 GFLOP/s (4x16 tile in ymm registers) to 130-180, the
  224x224 network from 9.2 to ~6.5 ms.
* The accumulator tile lives in a stack array (`_stack_array`, an LLVM
  alloca) indexed only by constants after unrolling, so LLVM promotes it to
  registers, and the superword-level-parallelism (SLP) vectorizer turns
  each tile row into vector instructions. Numba leaves the SLP vectorizer
  off by default, so `compile_kernels` compiles every kernel with it on,
  with explicit signatures (nothing is compiled later without it). Without
  it the tile runs as scalar code at 1/8 of the speed. The tile's rows are
  written out by hand in the K loop: left to LLVM's unroller, a loop over
  6 or 8 rows (or 4 rows of 32) stayed rolled, the tile was not promoted
  and ran ~20x slower.
* The 3x3 depthwise conv (`_dw_row`) makes one output row from three
  zero-bordered input rows, DW_CB = 16 channels (one 512-bit vector) at a
  time: those channels' 9 taps stay in registers while the row is swept,
  so each multiply-add costs one load.
* The stem (3x3, stride 2, 3 input channels) gathers each output row's
  patches (im2col, Wo x 27) and multiplies them with `_gemm`.
* `_inverted_residual_task` streams a whole block: for each output row it
  expands the one (stride 1) or two (stride 2) new input rows it needs into
  a ring of three zero-bordered rows, runs the depthwise conv on the ring
  and projects the result, adding the residual in the epilogue, so the
  6x-expanded tensor never leaves the cache. It can also write the
  intermediate tensors, for `endpoints`. Fused and unfused runs of a block
  do exactly the same arithmetic: same bits.

Every conv adds the bias after its sum, then applies ReLU6 (when asked),
then adds the residual, in that order, as the unfolded NumPy layers do.

Parallelism: each kind of work is split into independent tasks (bands of
output rows times the batch, or pixels times output channels for a GEMM),
run by one parallel kernel, `_launch`, on Numba's threads
(`numba.set_num_threads`). The split never changes the arithmetic, so any
thread count gives the same bits. Nothing here calls BLAS.

Compilation and launches
------------------------
A cold start compiles every kernel from an empty cache before the first
prediction. Most of it was LLVM optimising and emitting the same code
again: Numba links every jitted function a kernel calls into that kernel,
so the GEMM tile was optimised and turned into machine code once on its
own, again in each task function that called it, and twice more in the
parallel kernel (its gufunc and their wrapper). Now the kernels call each
other by address (`_call`, as XNNPACK's operators call their micro-kernels
through function pointers): each is compiled exactly once, on its own, with
an explicit signature, and in any order. One parallel kernel, `_launch`,
has one call in its loop, to `_run_task`, which calls the task function of
the kind of work; holding only calls, `_launch` is compiled at LLVM's -O1.
And because no kernel needs another one compiled first, a cold start hands
a share of them (`_HELPER_SHARE`) to a second process, which compiles them
into Numba's on-disk cache while this one compiles the rest, then loads
them from there. Measured on the 2-core AMD EPYC (Zen 4) on
2026-12-02, a day it ran 1.5-1.7x slower than the day before, new process
to first prediction with an empty cache: 26.6 s (everything linked; 15.0 s
the day before) -> 14-18 s (calls by address, one process; the machine
slowed down over the afternoon) -> 9.5-12 s (two processes, `mnv2ref bench`
9.9-11 s). A warm start takes 1.6-1.8 s on that day: loading the ten
kernels ~0.05 s of it, Numba's own lazy imports most of the rest. Per
layer the indirect calls cost nothing measurable (one call per row of
work; best-of-60 layer times, one thread, within 5% either way of the
linked kernels').
Tried and not kept: one call site for the depthwise channel block (the
last block overlapping by a computed start) halved `_dw_row`'s compile
time but made the 112x112 layers 1.3-1.8x slower.

From XNNPACK and OpenVINO: XNNPACK's runtime separates reshape/setup (work
out every operator's arguments and buffers once per input shape) from
invoke (call the micro-kernels); `fast.py` does the same for small inputs
(`_Replay`): the kernel calls of one forward pass are recorded and replayed,
which halved the Python time between kernels (0.7 -> 0.37 ms per 224x224
image, measured under load; ~10% of a 2-thread image). (XNNPACK also plans
one memory arena for all intermediate tensors; the replay keeps one buffer
per tensor.) OpenVINO (TBB) and XNNPACK (pthreadpool) fork and join per
operator as these kernels do; OpenVINO's 2-thread latency with one core
kept busy was 1.4x its 1-thread latency that day. Here the fast path uses
fewer threads while other processes keep CPUs busy
(`contention.threads_free`): 2 threads with a busy core then cost what 1
does (35 ms against 35 ms that day; before: 73 ms against 28).

Alignment (from XNNPACK, whose packed weights and arena start on
XNN_ALLOCATION_ALIGNMENT = 64 bytes): NumPy starts its arrays on 16 bytes,
so most 16-float weight rows of the packs straddled two cache lines and the
tile's vector loads were split. The packs and the replay's shared buffers
now start on 64 bytes (`empty_aligned`). Measured on the 2-core AMD EPYC
(Zen 4), 1 thread, one GEMM A/B in one process: K = 32 -> 192 channels
50 -> 52-57 GFLOP/s, 160 -> 960 (7x7) 70 -> 78, 320 -> 1280 76-78 -> 80.
The row buffers the block and depthwise tasks allocate (the ring of
expanded rows, the depthwise output row) start on 64 bytes too
(`_zeros_aligned`; Numba aligns to 32): each layer's kernel call timed
hot, best of 20, same machine, 1 thread, two alternating runs: the sum
9.37 -> 8.68 and 8.84 -> 7.97 ms; layer_3 (112x112, K = 16 expansion)
1.18 -> 0.92 ms, the 14x14 expansions 0.15 -> 0.13. Whole network, 2
threads, same machine (median ms per image; other agents' load made
separate-process runs vary by +-20%, so the packs' alignment was A/B'd in
one process, alternating, against packs and buffers placed 16 bytes off):
batch 1 8.04 -> 7.54 and 6.07 -> 5.83, batch 8 6.17 -> 5.81; the row
buffers, processes alternating, 6 rounds: batch 1 6.27 -> 6.29 (best
5.13 -> 4.96), batch 8 6.29 -> 5.89 (best 4.74 -> 4.37).
Tried and not kept (same machine): the layers' output tensors on 64 bytes
too, for inputs the replay does not cover (batch 8: 9.1 -> 10.7 ms best
of 8, 1 thread; likely 4K aliasing between input and output, both then
at the same page offset); half-vector epilogue steps for a last panel of
8 or more columns (the 24-wide projections, the logits): no difference
measured; the 14x14 1x1 convs split over output-channel panels instead of
pixels on 2 threads: no faster.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import types as pytypes
from dataclasses import dataclass

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .architecture import same_padding
from .contention import available_cpus


def _avx512_target() -> bool:
    """Does Numba compile for a CPU with AVX-512? (Its feature string, read
    as Numba's code generator reads it: NUMBA_CPU_FEATURES or the host's.)"""
    from numba.core.codegen import get_host_cpu_features

    features = numba.config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return "+avx512f" in features.split(",")


# With AVX-512 (32 vector registers of 16 floats) the GEMM tile spans two
# weight panels and the depthwise blocks are 16 channels wide; with AVX2
# (16 registers of 8) those sizes would need more registers than there are
# (measured, AVX2 target: the GEMM at 60 GFLOP/s instead of 100), so there
# a tile covers one panel and a depthwise block 8 channels.
WIDE = _avx512_target()
MR = 4        # pixels per GEMM register tile
NR = 16       # width of a packed weight panel (output channels)
NR2 = 2 * NR  # output channels per GEMM register tile with WIDE: two panels
DW_CB = 16 if WIDE else 8  # channels per depthwise register block
ALIGN = 64  # bytes: a cache line, and one 512-bit vector (see empty_aligned)
_U3, _U6, _U9, _UCB = np.uintp(3), np.uintp(6), np.uintp(9), np.uintp(DW_CB)  # unsigned loop bounds, see _dw_row
FASTMATH = {"contract"}  # fused multiply-add only: see the module docstring

DTYPES = (np.float32, np.float64)

# GNU OpenMP (Numba's default threading layer on Linux) makes a thread that
# reaches a barrier spin ~300000 times before it sleeps. On an idle machine
# that is what makes 40 short parallel regions per image cheap, but when
# another process keeps a core busy the spinning threads take the CPU from
# the ones with work left: measured on 2 cores with one busy process, a
# 224x224 image went from 11 ms (1 thread: 23 ms) to 400 ms. A 10000-spin
# limit keeps the idle-machine latency (5.7 ms) and caps the busy case at
# ~35 ms. libgomp reads this once, when Numba first starts its threads, and
# an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
# (`fast.py` goes further and runs on fewer threads while another process
# is busy: `contention.threads_free`.)
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# ---------------------------------------------------------------------------
# A small stack array: the register tile.
# ---------------------------------------------------------------------------

@intrinsic
def _stack_array(typingctx, rows, cols, dtype):
    """Pointer to `rows * cols` uninitialised elements of `dtype` on the stack.

    Both sizes must be compile-time constants (module-level ints). Unlike
    np.empty, an alloca provably aliases no argument array, so LLVM can keep
    it in registers when every index into it is a constant."""
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(cols, types.IntegerLiteral)):
        return None
    count = rows.literal_value * cols.literal_value

    def codegen(context, builder, signature, args):
        element = context.get_value_type(dtype.dtype)
        return cgutils.alloca_once(builder, element, size=count)

    return types.CPointer(dtype.dtype)(rows, cols, dtype), codegen


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM use 512-bit vectors in the calling function.

    LLVM's tuning for AVX-512 cores such as Rocket Lake prefers 256-bit
    vectors ("prefer-vector-width"=256), so the SLP vectorizer never forms
    zmm operations. These two function attributes lift that for the one
    function that calls this, leaving Numba's configuration and every other
    function alone; on a CPU without AVX-512 they change nothing (the
    legaliser splits the vectors again). Measured on the GEMM tile: 4x32
    float32 in zmm registers 170 GFLOP/s, against 102 for 4x16 in ymm."""
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        # llvmlite's attribute set knows no string attributes: add them raw.
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _call(typingctx, calls, callee, args):
    """Call the compiled kernel `_CALLEES[callee]`, whose machine address is
    `calls[callee]`, with the tuple `args`, in Numba's own calling convention.

    A call to a jitted function links that function's code into the caller,
    and LLVM optimises and emits it again there: a kernel called from three
    task functions and the parallel kernel was compiled four times on a cold
    start. A call through an address links nothing; each kernel is compiled
    once, on its own, and a cold start can compile them in any order. The
    arguments are converted to the kernel's declared signature
    (`_signatures`), and a call that does not fit it is a typing error, so
    the address is always called with the types it was compiled for."""
    if not (isinstance(calls, types.Array) and calls.dtype == types.int64
            and isinstance(callee, types.IntegerLiteral) and isinstance(args, types.BaseTuple)):
        return None
    tensors = [t for t in args.types if isinstance(t, types.Array) and isinstance(t.dtype, types.Float)]
    if not tensors:
        return None
    declared = _signatures(numba.np.numpy_support.as_dtype(tensors[0].dtype))[_CALLEES[callee.literal_value]]
    # A literal in the declared signature (`_gemm_relu6`'s flags) is passed
    # as its plain type: the two have the same machine representation.
    plain = [types.unliteral(t) for t in declared]
    if len(plain) != len(args.types) or any(
            (a != d) if isinstance(d, types.Array) else typingctx.can_convert(types.unliteral(a), d) is None
            for a, d in zip(args.types, plain)):
        return None

    def codegen(context, builder, signature, llargs):
        given = signature.args[2].types
        values = [context.cast(builder, builder.extract_value(llargs[2], i), types.unliteral(a), d)
                  for i, (a, d) in enumerate(zip(given, plain))]
        table = context.make_array(signature.args[0])(context, builder, llargs[0])
        address = builder.load(builder.gep(table.data, [context.get_constant(types.intp, callee.literal_value)]))
        function = context.call_conv.get_function_type(types.none, declared)
        pointer = builder.inttoptr(address, function.as_pointer())
        status, _ = context.call_conv.call_function(builder, pointer, types.none, declared, values)
        # A failure in the callee (an allocation that failed, say) fails the caller too.
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(calls, callee, args), codegen


# ---------------------------------------------------------------------------
# 1x1 convolution as a GEMM.
# ---------------------------------------------------------------------------

@njit(cache=True, fastmath=FASTMATH)
def _gemm(x, p0, count, wp, bp, nb0, nb1, out, q0, relu6, res, add_res, pre, store_pre):
    """out[q0 + p, c] = epilogue(sum_k x[p0 + p, k] * W[k, c] + b[c]) for
    p < count and the channels c of panels nb0 .. nb1-1.

    x: (P, K) input pixels; wp: (NB, K, NR) packed weights, panel `nb`
    holding output channels nb*NR .. nb*NR+NR-1; bp: (NB*NR,) packed bias;
    out, res, pre: (Q, N), with N the true (unpadded) channel count.

    Epilogue per element: v = sum + b; v = relu6(v) if relu6; pre = v if
    store_pre; v += res if add_res; out = v. The bias is added after the
    sum, as the unfolded layers add the BatchNorm shift after the conv:
    starting the sum from a large bias that the products then cancel would
    carry the bias's magnitude, and its rounding, through every partial sum
    (measured: 1.5-2x the error on the published weights).
    """
    _wide_vectors()
    acc = carray(_stack_array(MR, NR2, x.dtype), (MR, NR2))
    n = out.shape[1]
    depth = x.shape[1]
    zero = x.dtype.type(0)
    six = x.dtype.type(6)
    # Panel-pair-major: two K x NR weight panels stay in L1/L2 while every
    # pixel tile streams past them. (Blocking the pixels as well measured no
    # faster for the shapes where this kernel is used unfused.) The tile is
    # written out here rather than in a function of its own: LLVM did not
    # inline that call, which cost 30% on the short (K = 16..32) expansions.
    for nb in range(nb0, nb1, 2 if WIDE else 1):
        # With WIDE, a tile spans panels nb and nb + 1 for MR pixels; a lone
        # last panel (the 16- and 144-wide layers, the logits) is instead
        # covered for 2*MR pixels, the second MR in the tile's right half:
        # the same 8 accumulators, so the same latency hiding (computing the
        # lone panel twice measured 25% slower on those layers). Without
        # WIDE every tile is MR pixels x one panel: 8 ymm accumulators.
        pair = WIDE and nb + 1 < nb1
        step = 2 * MR if WIDE and not pair else MR
        for t in range(0, count, step):
            # Pixels p0+t .. of this tile. A partial tile re-reads its last
            # valid pixel instead of branching, and drops those rows at the end.
            last = p0 + min(t + step, count) - 1
            i0 = p0 + t
            i1 = min(i0 + 1, last)
            i2 = min(i0 + 2, last)
            i3 = min(i0 + 3, last)
            for r in range(MR):
                for j in range(NR2):
                    acc[r, j] = 0
            # One k step loads a row of NR weights from each panel (one
            # 16-wide vector each in float32) and 4 pixels' inputs, and does
            # 8 vector multiply-adds into 8 accumulators: enough independent
            # chains to hide the FMA latency. The rows are written out by
            # hand: LLVM's unroller left a 6- or 8-row loop rolled, and the
            # tile then lived in memory at 1/20 of the speed.
            if pair:
                for k in range(depth):
                    x0 = x[i0, k]
                    x1 = x[i1, k]
                    x2 = x[i2, k]
                    x3 = x[i3, k]
                    for j in range(NR):
                        wa = wp[nb, k, j]
                        wb = wp[nb + 1, k, j]
                        acc[0, j] += x0 * wa
                        acc[1, j] += x1 * wa
                        acc[2, j] += x2 * wa
                        acc[3, j] += x3 * wa
                        acc[0, NR + j] += x0 * wb
                        acc[1, NR + j] += x1 * wb
                        acc[2, NR + j] += x2 * wb
                        acc[3, NR + j] += x3 * wb
            elif not WIDE:
                for k in range(depth):
                    x0 = x[i0, k]
                    x1 = x[i1, k]
                    x2 = x[i2, k]
                    x3 = x[i3, k]
                    for j in range(NR):
                        wa = wp[nb, k, j]
                        acc[0, j] += x0 * wa
                        acc[1, j] += x1 * wa
                        acc[2, j] += x2 * wa
                        acc[3, j] += x3 * wa
            else:
                i4 = min(i0 + 4, last)
                i5 = min(i0 + 5, last)
                i6 = min(i0 + 6, last)
                i7 = min(i0 + 7, last)
                for k in range(depth):
                    x0 = x[i0, k]
                    x1 = x[i1, k]
                    x2 = x[i2, k]
                    x3 = x[i3, k]
                    x4 = x[i4, k]
                    x5 = x[i5, k]
                    x6 = x[i6, k]
                    x7 = x[i7, k]
                    for j in range(NR):
                        wa = wp[nb, k, j]
                        acc[0, j] += x0 * wa
                        acc[1, j] += x1 * wa
                        acc[2, j] += x2 * wa
                        acc[3, j] += x3 * wa
                        acc[0, NR + j] += x4 * wa
                        acc[1, NR + j] += x5 * wa
                        acc[2, NR + j] += x6 * wa
                        acc[3, NR + j] += x7 * wa
            for h in range(2):
                # Half h of the tile: panel nb + h for pixels t .. t+MR-1,
                # or (lone panel) panel nb for pixels t+MR*h .. t+MR*h+MR-1.
                if h == 1 and not WIDE:
                    break
                n0 = (nb + h) * NR if pair else nb * NR
                t0 = t if pair else t + h * MR
                rows = min(MR, count - t0)
                if rows <= 0:
                    break
                cols = min(NR, n - n0)
                for r in range(MR):
                    if r >= rows:
                        break
                    q = q0 + t0 + r
                    for j in range(NR):
                        acc[r, h * NR + j] += bp[n0 + j]
                    if cols == NR:
                        # Whole-row steps, each a handful of vector instructions.
                        if relu6:
                            for j in range(NR):
                                acc[r, h * NR + j] = min(max(acc[r, h * NR + j], zero), six)
                        if store_pre:
                            for j in range(NR):
                                pre[q, n0 + j] = acc[r, h * NR + j]
                        if add_res:
                            for j in range(NR):
                                acc[r, h * NR + j] += res[q, n0 + j]
                        for j in range(NR):
                            out[q, n0 + j] = acc[r, h * NR + j]
                    else:
                        # The last panel of a layer whose width is not a
                        # multiple of NR: element by element, so nothing past
                        # `cols` is read or written.
                        for j in range(NR):
                            if j < cols:
                                v = acc[r, h * NR + j]
                                if relu6:
                                    v = min(max(v, zero), six)
                                if store_pre:
                                    pre[q, n0 + j] = v
                                if add_res:
                                    v += res[q, n0 + j]
                                out[q, n0 + j] = v


def _renamed(function, name: str):
    """A copy of a Python function under another name: compiled by Numba,
    it has cache files of its own."""
    copy = pytypes.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                                function.__closure__)
    copy.__qualname__ = name
    return copy


# `_gemm` for the stem and the expansions, compiled with ReLU6 on and the
# rest of the epilogue off as constants (`_signatures`): their short sums
# (K = 16..32) make the epilogue a large share of the work, and with the
# flags constant LLVM drops its branches (measured: those layers 7-20%
# faster). A kernel of its own rather than a second signature of `_gemm`,
# so that a cold start can compile the two in different processes
# (`_HELPER_SHARE`) without both writing `_gemm`'s cache index.
_gemm_relu6 = njit(cache=True, fastmath=FASTMATH)(_renamed(_gemm.py_func, "_gemm_relu6"))


@njit(cache=True, fastmath=FASTMATH)
def _pointwise_task(calls, task, x, wp, bp, out, relu6, res, add_res, pixel_chunks, panel_chunks):
    """Task `task` of out = epilogue(x @ W + b) for a whole tensor,
    x: (P, K) -> out: (P, N), split into pixel_chunks x panel_chunks tasks:
    splitting the pixels suits large images, splitting the output channels
    (so each thread reads only part of W) suits the 7x7 and 14x14 layers
    and the logits."""
    tiles = (x.shape[0] + MR - 1) // MR
    panels = wp.shape[0]
    pc = task // panel_chunks
    nc = task % panel_chunks
    p0 = pc * tiles // pixel_chunks * MR
    p1 = min((pc + 1) * tiles // pixel_chunks * MR, x.shape[0])
    nb0 = nc * panels // panel_chunks
    nb1 = (nc + 1) * panels // panel_chunks
    if p1 > p0 and nb1 > nb0:
        _call(calls, GEMM, (x, p0, p1 - p0, wp, bp, nb0, nb1, out, p0, relu6, res, add_res, out, False))


# ---------------------------------------------------------------------------
# The stem: a full 3x3 stride-2 conv on the image, via im2col + the GEMM tile.
# ---------------------------------------------------------------------------

@njit(cache=True, fastmath=FASTMATH)
def _stem_task(calls, task, x, wp, bp, ksize, stride, out, chunks):
    """Task `task` of `chunks` of out = relu6(conv2d(x, W, stride, SAME) + b).

    x: (N, H, W, Cin); wp: (NB, ksize*ksize*Cin, NR) packed from the
    (k, k, Cin, Cout) kernel flattened in (i, j, c) order; out: (N, Ho, Wo, Cout).
    Each task owns a band of output rows of one image; for every row it
    gathers the Wo patches into `patches` (Wo, k*k*Cin), zero where the
    window hangs over the TF SAME padding, and multiplies them by W.
    """
    n_img, h, w, cin = x.shape
    ho, wo = out.shape[1], out.shape[2]
    top = max((ho - 1) * stride + ksize - h, 0) // 2
    left = max((wo - 1) * stride + ksize - w, 0) // 2
    zero = x.dtype.type(0)
    per_image = chunks // n_img
    img = task // per_image
    band = task % per_image
    oy0 = band * ho // per_image
    oy1 = (band + 1) * ho // per_image
    patches = np.empty((wo, ksize * ksize * cin), x.dtype)
    run = ksize * cin  # one kernel row of a patch: contiguous in x
    for oy in range(oy0, oy1):
        for i in range(ksize):
            iy = oy * stride + i - top
            row_inside = 0 <= iy < h
            src = x[img, min(max(iy, 0), h - 1)].reshape(w * cin)
            for ox in range(wo):
                ix0 = ox * stride - left
                dst = i * run
                if row_inside and ix0 >= 0 and ix0 + ksize <= w:
                    # Interior: copy ksize * cin contiguous values. The
                    # 3x3x3 stem's 9 as a constant-length copy, unrolled
                    # to two vector moves: the stem 0.36 -> 0.31 ms.
                    s0 = np.uintp(ix0 * cin)
                    d0 = np.uintp(dst)
                    if run == 9:
                        for e in range(_U9):
                            patches[ox, d0 + e] = src[s0 + e]
                    else:
                        for e in range(run):
                            patches[ox, dst + e] = src[ix0 * cin + e]
                else:
                    # Border: zero where the window leaves the image.
                    for j in range(ksize):
                        inside = row_inside and 0 <= ix0 + j < w
                        for c in range(cin):
                            patches[ox, dst + j * cin + c] = src[(ix0 + j) * cin + c] if inside else zero
        row = out[img, oy]
        _call(calls, GEMM_RELU6, (patches, 0, wo, wp, bp, 0, wp.shape[0], row, 0, True, row, False, row, False))


# ---------------------------------------------------------------------------
# 3x3 depthwise convolution, one output row at a time.
# ---------------------------------------------------------------------------

@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dw_block(r0, r1, r2, col0, stride, wd, bd, out, relu6, c0, w, acc):
    """Channels c0 .. c0+DW_CB-1 of `_dw_row`'s output row, w and acc its
    register blocks. The block's 9 x DW_CB taps are loaded into registers
    once and reused for the whole row, so each multiply-add costs one load.
    The tap loops use unsigned indices (_U3, _UCB, ...): Numba adds
    negative-index wraparound code to every signed index, which here cost a
    third of the time. (Computing 2 or 4 pixels per step to interleave their
    add chains, or 2 pixels to share 6 of their 12 loads with 16-channel
    blocks, measured no faster.) Inlined by Numba
    (inline="always"), so w and acc stay in registers."""
    wo = out.shape[0]
    zero = wd.dtype.type(0)
    six = wd.dtype.type(6)
    for t in range(9):
        for c in range(DW_CB):
            w[t, c] = wd[t, c0 + c]
    cu = np.uintp(c0)
    for ox in range(wo):
        col = np.uintp(ox * stride + col0)
        for c in range(DW_CB):
            acc[c] = 0
        for j in range(_U3):
            for c in range(_UCB):
                acc[c] += r0[col + j, cu + c] * w[j, c]
        for j in range(_U3):
            for c in range(_UCB):
                acc[c] += r1[col + j, cu + c] * w[_U3 + j, c]
        for j in range(_U3):
            for c in range(_UCB):
                acc[c] += r2[col + j, cu + c] * w[_U6 + j, c]
        # Epilogue as whole-block steps ending in one contiguous store,
        # the shape LLVM's SLP vectorizer recognises.
        for c in range(DW_CB):
            acc[c] += bd[c0 + c]
        if relu6:
            for c in range(DW_CB):
                acc[c] = min(max(acc[c], zero), six)
        for c in range(DW_CB):
            out[ox, c0 + c] = acc[c]


@njit(cache=True, fastmath=FASTMATH)
def _dw_row(r0, r1, r2, col0, stride, wd, bd, out, relu6):
    """One output row of a 3x3 depthwise conv + bias (+ ReLU6).

    r0, r1, r2: (Wb, C) the input rows under kernel rows 0, 1, 2, each with
    zero columns where the window leaves the image; output column ox reads
    buffer columns ox*stride + col0 + (0, 1, 2). wd: (9, C) taps in (i, j)
    order; bd: (C,); out: (Wo, C). The 9 products are summed in (i, j)
    order, like `layers.depthwise_conv2d`, and the bias added last.
    """
    _wide_vectors()
    wo, c_all = out.shape
    w = carray(_stack_array(9, DW_CB, wd.dtype), (9, DW_CB))
    acc = carray(_stack_array(1, DW_CB, wd.dtype), (DW_CB,))
    zero = wd.dtype.type(0)
    six = wd.dtype.type(6)
    # Channel blocks outermost (see _dw_block). When C is not a multiple of
    # DW_CB (the 8 mod 16 widths of the smaller depth multipliers) a last
    # block overlapping the one before it covers the rest: its channels are
    # computed twice, to the same bits, instead of one by one.
    blocked = c_all - c_all % DW_CB
    for c0 in range(0, blocked, DW_CB):
        _dw_block(r0, r1, r2, col0, stride, wd, bd, out, relu6, c0, w, acc)
    if blocked < c_all and blocked > 0:
        _dw_block(r0, r1, r2, col0, stride, wd, bd, out, relu6, c_all - DW_CB, w, acc)
    # Fewer than DW_CB channels: one by one.
    for c in range(c_all if blocked == 0 else 0):
        for ox in range(wo):
            col = ox * stride + col0
            v = zero
            for j in range(3):
                v += r0[col + j, c] * wd[j, c]
            for j in range(3):
                v += r1[col + j, c] * wd[3 + j, c]
            for j in range(3):
                v += r2[col + j, c] * wd[6 + j, c]
            v += bd[c]
            if relu6:
                v = min(max(v, zero), six)
            out[ox, c] = v


@njit(cache=True, inline="always")
def _zeros_aligned(shape, like):
    """np.zeros(shape, like.dtype) starting on an ALIGN-byte boundary (Numba
    aligns its arrays to 32 bytes): the row buffers the GEMM tile stores to
    and the depthwise row loads from, 16 floats per vector, then use whole
    cache lines. Inlined by Numba, so no compilation of its own."""
    count = 1
    for size in shape:
        count *= size
    flat = np.zeros(count + ALIGN // like.itemsize, like.dtype)
    start = (ALIGN - flat.ctypes.data % ALIGN) % ALIGN // like.itemsize
    return flat[start:start + count].reshape(shape)


@njit(cache=True, fastmath=FASTMATH)
def _copy_rows(src, src_row, dst, dst_row, rows):
    """dst[dst_row : dst_row + rows] = src[src_row : src_row + rows] for two
    (R, C) C-contiguous arrays with the same C, as one flat unsigned loop."""
    length = np.uintp(rows * src.shape[1])
    s = src.reshape(src.size)
    d = dst.reshape(dst.size)
    s0 = np.uintp(src_row * src.shape[1])
    d0 = np.uintp(dst_row * dst.shape[1])
    for e in range(length):
        d[d0 + e] = s[s0 + e]


@njit(cache=True, fastmath=FASTMATH)
def _depthwise_task(calls, task, x, wd, bd, stride, relu6, out, chunks):
    """Task `task` of `chunks` of out = relu6(depthwise_conv2d(x, W, stride, SAME) + b), 3x3.

    x: (N, H, W, C); wd: (9, C); bd: (C,); out: (N, Ho, Wo, C).
    Input rows are copied into a 3-row ring of zero-bordered buffers
    (W + 2, C), each row once per task, so `_dw_row` needs no bounds checks.
    """
    n_img, h, w, c_all = x.shape
    ho = out.shape[1]
    wo = out.shape[2]
    top = max((ho - 1) * stride + 3 - h, 0) // 2
    left = max((wo - 1) * stride + 3 - w, 0) // 2
    per_image = chunks // n_img
    img = task // per_image
    band = task % per_image
    oy0 = band * ho // per_image
    oy1 = (band + 1) * ho // per_image
    ring = _zeros_aligned((3, w + 2, c_all), x)
    zrow = _zeros_aligned((w + 2, c_all), x)
    held = np.full(3, -1, np.int64)  # input row held by each ring slot
    for oy in range(oy0, oy1):
        for i in range(3):
            iy = oy * stride + i - top
            if 0 <= iy < h and held[iy % 3] != iy:
                _call(calls, COPY_ROWS, (x[img, iy], 0, ring[iy % 3], 1, w))
                held[iy % 3] = iy
        iy = oy * stride - top
        r0 = ring[iy % 3] if 0 <= iy < h else zrow
        r1 = ring[(iy + 1) % 3] if 0 <= iy + 1 < h else zrow
        r2 = ring[(iy + 2) % 3] if 0 <= iy + 2 < h else zrow
        _call(calls, DW_ROW, (r0, r1, r2, 1 - left, stride, wd, bd, out[img, oy], relu6))


# ---------------------------------------------------------------------------
# A whole inverted-residual block, streamed by output rows.
# ---------------------------------------------------------------------------

@njit(cache=True, fastmath=FASTMATH)
def _inverted_residual_task(calls, task, x, we, be, has_expand, wd, bd, wp, bp, stride, residual, out,
                            exp_out, dw_out, proj_out, capture, chunks):
    """out = project(depthwise(expand(x))) (+ x), never materialising the
    expanded tensor unless asked to.

    x: (N, H, W, Cin); we: (NBe, Cin, NR), be: packed expand weights/bias
    (ignored unless has_expand); wd: (9, Cexp), bd: (Cexp,); wp: (NBp, Cexp, NR),
    bp: packed projection; out: (N, Ho, Wo, Cout).
    With `capture` the intermediate endpoints are written too:
    exp_out (N, H, W, Cexp) if has_expand, dw_out (N, Ho, Wo, Cexp), and
    proj_out (N, Ho, Wo, Cout), the projection before the residual add, if
    residual. (Pass any 4-D array of the right dtype when not capturing.)

    Each task owns a band of output rows of one image. Per output row it
    expands the input rows it has not yet computed (1 for stride 1, 2 for
    stride 2) into a ring of three zero-bordered rows (W + 2, Cexp), runs the
    depthwise conv into `dw` (Wo, Cexp) and projects that row into `out`.
    Neighbouring bands recompute the 1-2 expanded rows they share.
    """
    n_img, h, w = x.shape[:3]
    ho, wo = out.shape[1], out.shape[2]
    c_exp = wd.shape[1]
    top = max((ho - 1) * stride + 3 - h, 0) // 2
    left = max((wo - 1) * stride + 3 - w, 0) // 2
    per_image = chunks // n_img
    img = task // per_image
    band = task % per_image
    oy0 = band * ho // per_image
    oy1 = (band + 1) * ho // per_image
    # Expanded input rows this band writes to exp_out: each row is
    # written by exactly one band.
    own0 = oy0 * stride
    own1 = h if oy1 == ho else oy1 * stride
    ring = _zeros_aligned((3, w + 2, c_exp), x)
    zrow = _zeros_aligned((w + 2, c_exp), x)
    dw = _zeros_aligned((wo, c_exp), x)
    held = np.full(3, -1, np.int64)
    for oy in range(oy0, oy1):
        for i in range(3):
            iy = oy * stride + i - top
            if 0 <= iy < h and held[iy % 3] != iy:
                slot = ring[iy % 3]
                src = x[img, iy]
                if has_expand:
                    # Expanded pixel ix lands in buffer column ix + 1.
                    _call(calls, GEMM_RELU6, (src, 0, w, we, be, 0, we.shape[0], slot, 1, True, slot, False, slot,
                                              False))
                    if capture and own0 <= iy < own1:
                        _call(calls, COPY_ROWS, (slot, 1, exp_out[img, iy], 0, w))
                else:
                    _call(calls, COPY_ROWS, (src, 0, slot, 1, w))
                held[iy % 3] = iy
        iy = oy * stride - top
        r0 = ring[iy % 3] if 0 <= iy < h else zrow
        r1 = ring[(iy + 1) % 3] if 0 <= iy + 1 < h else zrow
        r2 = ring[(iy + 2) % 3] if 0 <= iy + 2 < h else zrow
        _call(calls, DW_ROW, (r0, r1, r2, 1 - left, stride, wd, bd, dw, True))
        if capture:
            _call(calls, COPY_ROWS, (dw, 0, dw_out[img, oy], 0, wo))
        row = out[img, oy]
        # The residual is read from the block input, same row and columns.
        shortcut = x[img, oy] if residual else row
        pre = proj_out[img, oy] if capture and residual else row
        _call(calls, GEMM, (dw, 0, wo, wp, bp, 0, wp.shape[0], row, 0, False, shortcut, residual,
                            pre, capture and residual))


# ---------------------------------------------------------------------------
# One parallel kernel for all of the above.
# ---------------------------------------------------------------------------

POINTWISE, STEM, DEPTHWISE, BLOCK = 0, 1, 2, 3  # kinds of work for _launch

# The kernels `_call` calls by address, indexed by these names; `calls`
# arrays hold their addresses.
GEMM, GEMM_RELU6, DW_ROW, COPY_ROWS, POINTWISE_TASK, STEM_TASK, DEPTHWISE_TASK, BLOCK_TASK, RUN_TASK = range(9)


@njit(cache=True, fastmath=FASTMATH)
def _run_task(calls, kind, task, tasks, x, gemm_w, gemm_b, dw_w, dw_b, proj_w, proj_b, out, aux1, aux2, aux3,
              stride, n1, n2, flag1, flag2, flag3):
    """Run task `task` of `tasks` of one kind of work (see `_launch`)."""
    if kind == POINTWISE:
        p, k, n = x.shape[2], x.shape[3], out.shape[3]
        _call(calls, POINTWISE_TASK, (calls, task, x.reshape((p, k)), gemm_w, gemm_b, out.reshape((p, n)), flag1,
                                      aux1.reshape((p, n)), flag2, n1, n2))
    elif kind == STEM:
        _call(calls, STEM_TASK, (calls, task, x, gemm_w, gemm_b, n1, stride, out, tasks))
    elif kind == DEPTHWISE:
        _call(calls, DEPTHWISE_TASK, (calls, task, x, dw_w, dw_b, stride, flag1, out, tasks))
    else:
        _call(calls, BLOCK_TASK, (calls, task, x, gemm_w, gemm_b, flag1, dw_w, dw_b, proj_w, proj_b, stride,
                                  flag2, out, aux1, aux2, aux3, flag3, tasks))


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _launch(calls, kind, tasks, x, gemm_w, gemm_b, dw_w, dw_b, proj_w, proj_b, out, aux1, aux2, aux3,
            stride, n1, n2, flag1, flag2, flag3):
    """Run `tasks` tasks of one kind of work on Numba's threads.

    One parallel kernel rather than one per kind, and one call in its loop
    (`_run_task` picks the task function): a parallel kernel costs a second
    or more to compile however little it does, more with every call in its
    body. `calls` holds the kernels' addresses (`_call`). All tensors are
    4-D (a pointwise layer's (P, K) pixels as (1, 1, P, K)); arguments a
    kind does not use may be any array of the right type.

    kind       x, out          weights               aux1, aux2, aux3        n1, n2 / flag1, flag2, flag3
    POINTWISE  pixels          gemm (the 1x1 conv)   residual, -, -          pixel, panel chunks / relu6, add residual, -
    STEM       image, output   gemm (k*k*Cin rows)   -                       kernel size, - / -
    DEPTHWISE  input, output   dw                    -                       - / relu6
    BLOCK      input, output   gemm (expand), dw,    expansion, depthwise,   - / has expand, residual, capture
                               proj                  projection outputs
    """
    for task in prange(tasks):
        _call(calls, RUN_TASK, (calls, kind, np.int64(task), tasks, x, gemm_w, gemm_b, dw_w, dw_b, proj_w, proj_b,
                                out, aux1, aux2, aux3, stride, n1, n2, flag1, flag2, flag3))


_CALLEES = (_gemm, _gemm_relu6, _dw_row, _copy_rows, _pointwise_task, _stem_task, _depthwise_task,
            _inverted_residual_task, _run_task)


# ---------------------------------------------------------------------------
# Compilation: explicit signatures, with the SLP vectorizer on.
# ---------------------------------------------------------------------------

def _signatures(dtype) -> dict:
    f = numba.from_dtype(np.dtype(dtype))
    a1, a2, a3, a4 = (types.Array(f, nd, "C") for nd in (1, 2, 3, 4))
    i, b = types.int64, types.boolean
    calls = types.Array(i, 1, "C")
    relu6, off = types.literal(True), types.literal(False)
    return {
        _gemm: (a2, i, i, a3, a1, i, i, a2, i, b, a2, b, a2, b),
        _gemm_relu6: (a2, i, i, a3, a1, i, i, a2, i, relu6, a2, off, a2, off),
        _dw_row: (a2, a2, a2, i, i, a2, a1, a2, b),
        _copy_rows: (a2, i, a2, i, i),
        _pointwise_task: (calls, i, a2, a3, a1, a2, b, a2, b, i, i),
        _stem_task: (calls, i, a4, a3, a1, i, i, a4, i),
        _depthwise_task: (calls, i, a4, a2, a1, i, b, a4, i),
        _inverted_residual_task: (calls, i, a4, a3, a1, b, a2, a1, a3, a1, i, b, a4, a4, a4, a4, b, i),
        _run_task: (calls, i, i, i, a4, a3, a1, a2, a1, a3, a1, a4, a4, a4, a4, i, i, i, b, b, b),
        _launch: (calls, i, i, a4, a3, a1, a2, a1, a3, a1, a4, a4, a4, a4, i, i, i, b, b, b),
    }


# The parallel kernel only calls compiled code by address: LLVM's cheapest
# optimisation level suffices for its few lines.
_CALLS_ONLY = {_launch}


_calls = {}  # dtype -> the int64 addresses of _CALLEES, once compiled
_compile_lock = threading.Lock()

# Seconds to compile every kernel for one dtype from an empty cache, on the
# 2-core AMD EPYC (Zen 4) this project is measured on, for the notice.
COLD_COMPILE_S = 10


def _in_cache(kernel, signature) -> bool:
    """Is `kernel` compiled for `signature` in Numba's on-disk cache? (Asked
    the way Dispatcher.compile asks it; True if Numba's internals differ.)"""
    try:
        cache = kernel._cache
        key = cache._index_key(signature, kernel.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # an internal API: never let it stop a prediction
        return True


def _compile_notice() -> None:
    """One line on stderr before a cold compile, saying how long it takes."""
    print(f"mnv2ref: compiling the Numba kernels once (about {COLD_COMPILE_S} s); "
          "later runs load them from the cache", file=sys.stderr, flush=True)


def _address(kernel, signature) -> int:
    """Machine address of `kernel` compiled for `signature`, in Numba's
    calling convention (what `_call` calls)."""
    compiled = kernel.overloads[tuple(signature)]
    return compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)


def _compile(signatures: dict) -> None:
    """Compile (or load from Numba's on-disk cache) each kernel for its
    signature, with Numba's SLP vectorizer switched on for the duration
    (it is off by default, and the register tiles rely on it). The switch is
    made under Numba's global compiler lock, so no other compilation in the
    process sees it. Afterwards the kernels' compilation is disabled: a
    lazily compiled specialisation would lack the SLP vectorizer (and be
    saved to the on-disk cache for later processes), so a call with
    unexpected argument types raises a TypeError instead."""
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        saved = numba.config.SLP_VECTORIZE, numba.config.OPT
        numba.config.SLP_VECTORIZE = 1
        try:
            for kernel, signature in signatures.items():
                numba.config.OPT = 1 if kernel in _CALLS_ONLY else saved[1]
                kernel.disable_compile(False)
                try:
                    kernel.compile(signature)
                finally:
                    if kernel.signatures:
                        kernel.disable_compile()
        finally:
            numba.config.SLP_VECTORIZE, numba.config.OPT = saved


# On a cold start a second process compiles these kernels into the on-disk
# cache while this one compiles the others; this one then loads them from
# there. Kernels call each other by address (`_call`), so each compiles on
# its own, in any order; Numba keeps one cache index file per kernel, so the
# two processes never write the same file. (Measured: the module
# docstring, "Compilation and launches".)
_HELPER_SHARE = (_gemm_relu6, _dw_row, _depthwise_task, _run_task)
_HELPER_TIMEOUT_S = 300


# The helper imports this very file (Numba's cache is keyed by its path),
# whatever its working directory or PYTHONPATH would pick, and does nothing
# if that failed.
_HELPER_CODE = """import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(sys.argv[1])))
from mnv2ref import kernels
if os.path.realpath(kernels.__file__) == sys.argv[1]:
    kernels.compile_for_cache(sys.argv[2], sys.argv[3:])
"""


def _start_helper(dtype, kernels: list):
    """The process compiling `kernels` for `dtype` into the cache, or None
    (one CPU only, nothing to share, or no process could be started)."""
    if not kernels or available_cpus() < 2:
        return None
    try:
        return subprocess.Popen([sys.executable, "-c", _HELPER_CODE, os.path.realpath(__file__),
                                 np.dtype(dtype).name, *(kernel.py_func.__name__ for kernel in kernels)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def compile_for_cache(dtype_name: str, names: list) -> None:
    """The helper process of a cold start: compile the kernels named for
    the dtype named into Numba's on-disk cache."""
    signatures = _signatures(np.dtype(dtype_name).type)
    _compile({kernel: signature for kernel, signature in signatures.items()
              if kernel.py_func.__name__ in names})


def compile_kernels(dtype=np.float32) -> np.ndarray:
    """Compile (or load from Numba's on-disk cache) every kernel for `dtype`;
    returns the addresses of the kernels `_call` calls (a `calls` array).

    Done once per dtype per process (`_compile`). When kernels are missing
    from the cache, one line on stderr says so before compiling
    (`_compile_notice`), and a second process compiles some of them
    meanwhile (`_HELPER_SHARE`)."""
    dtype = np.dtype(dtype).type
    if dtype in _calls:
        return _calls[dtype]
    with _compile_lock:
        if dtype in _calls:
            return _calls[dtype]
        signatures = _signatures(dtype)
        missing = [kernel for kernel, signature in signatures.items() if not _in_cache(kernel, signature)]
        helper = None
        if missing:
            _compile_notice()
            helper = _start_helper(dtype, [kernel for kernel in missing if kernel in _HELPER_SHARE])
        shared = _HELPER_SHARE if helper is not None else ()
        try:
            _compile({kernel: signature for kernel, signature in signatures.items() if kernel not in shared})
            if helper is not None:
                helper.wait(timeout=_HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass  # compiled here below, then
        finally:
            if helper is not None and helper.poll() is None:
                helper.kill()
                helper.wait()
        # From the cache the helper filled; compiled here if it failed.
        _compile({kernel: signatures[kernel] for kernel in shared})
        _calls[dtype] = np.array([_address(kernel, signatures[kernel]) for kernel in _CALLEES], np.int64)
        return _calls[dtype]


# ---------------------------------------------------------------------------
# Packed weights and the Python-level kernels.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Packed:
    """Folded weights and bias in the layout a kernel wants.

    kind "gemm": w (ceil(N/NR), K, NR), b (ceil(N/NR)*NR,), zero-padded; used for
    1x1 convs (K = Cin), the stem (K = k*k*Cin, (i, j, c) order) and the logits.
    kind "depthwise": w (k*k, C), b (C,).
    """

    kind: str
    w: np.ndarray
    b: np.ndarray
    cout: int
    ksize: int = 1

    @property
    def dtype(self):
        return self.w.dtype


def empty_aligned(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting on an ALIGN-byte boundary (NumPy's own
    arrays start on 16): then every 16-float weight row the GEMM tile loads
    as one vector lies in one cache line instead of straddling two. The
    array is a view of a uint8 buffer a little larger."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGN, np.uint8)
    start = -buffer.ctypes.data % ALIGN
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` on an ALIGN-byte boundary (`empty_aligned`)."""
    out = empty_aligned(a.shape, a.dtype)
    out[...] = a
    return out


def pack_gemm(weights: np.ndarray, bias: np.ndarray, dtype=np.float32) -> Packed:
    """Pack (k, k, Cin, Cout) or (Cin, Cout) weights and a (Cout,) bias into
    NR-wide panels: w[nb, kk, j] = W[kk, nb*NR + j] with kk over (i, j, c)."""
    ksize = weights.shape[0] if weights.ndim == 4 else 1
    cout = weights.shape[-1]
    flat = np.asarray(weights, dtype).reshape(-1, cout)
    panels = -(-cout // NR)
    padded = np.zeros((flat.shape[0], panels * NR), dtype)
    padded[:, :cout] = flat
    w = _aligned_copy(padded.reshape(flat.shape[0], panels, NR).transpose(1, 0, 2))
    b = np.zeros(panels * NR, dtype)
    b[:cout] = np.asarray(bias, dtype)
    return Packed("gemm", w, _aligned_copy(b), cout, ksize)


def pack_depthwise(weights: np.ndarray, bias: np.ndarray, dtype=np.float32) -> Packed:
    """(3, 3, C, 1) depthwise weights -> (9, C) taps in (i, j) order."""
    k, _, c, _ = weights.shape
    if k != 3:
        raise ValueError(f"depthwise kernels are 3x3, got {k}x{k}")
    w = _aligned_copy(np.asarray(weights, dtype).reshape(k * k, c))
    return Packed("depthwise", w, _aligned_copy(np.asarray(bias, dtype)), c, k)


_recorder = threading.local()


def _run(kernel, *args) -> None:
    """Call a compiled kernel, and note the call if `recording`."""
    kernel(*args)
    steps = getattr(_recorder, "steps", None)
    if steps is not None:
        steps.append((kernel, args))


@contextlib.contextmanager
def recording():
    """Note the kernel calls made in the body by this thread, as a list of
    (kernel, arguments) that replays the same computation on the same
    arrays: `for kernel, args in steps: kernel(*args)`."""
    saved = getattr(_recorder, "steps", None)
    _recorder.steps = steps = []
    try:
        yield steps
    finally:
        _recorder.steps = saved


_UNUSED = {}


def _unused(dtype) -> tuple:
    """Tiny (depthwise, gemm) weights and biases of `dtype` for the arguments
    of _launch that a kind of work does not use: ((1, 1), (1,)), ((1, 1, NR), (NR,))."""
    dtype = np.dtype(dtype)
    if dtype not in _UNUSED:
        _UNUSED[dtype] = ((np.zeros((1, 1), dtype), np.zeros(1, dtype)),
                          (np.zeros((1, 1, NR), dtype), np.zeros(NR, dtype)))
    return _UNUSED[dtype]


def kernel_arrays(dtype) -> list:
    """The arrays the kernels themselves pass to every call for `dtype` (the
    `calls` addresses, the unused arguments): a replay must leave them
    where they are."""
    return [compile_kernels(dtype), *(a for pair in _unused(dtype) for a in pair)]


def _threads() -> int:
    return numba.get_num_threads()


def bands_per_image(batch: int, rows: int, threads: int = 0) -> int:
    """How many row bands to cut each image into so that batch * bands tasks
    divide evenly over the threads (1 when the batch alone does)."""
    threads = threads or _threads()
    return max(1, min(rows, threads // math.gcd(batch, threads)))


def _contiguous(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=dtype)


def _require(condition: bool, message: str) -> None:
    """The kernels run without bounds checks: refuse mismatched shapes here."""
    if not condition:
        raise ValueError(message)


def pointwise_conv(x: np.ndarray, packed: Packed, relu6: bool = True, residual=None,
                   pixel_chunks: int = 0, panel_chunks: int = 1) -> np.ndarray:
    """1x1 conv + bias (+ ReLU6) (+ residual): (..., Cin) -> (..., Cout)."""
    calls = compile_kernels(packed.dtype)
    x = _contiguous(x, packed.dtype)
    _require(packed.kind == "gemm" and x.shape[-1] == packed.w.shape[1],
             f"input has {x.shape[-1]} channels, weights expect {packed.w.shape[1]}")
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty((flat.shape[0], packed.cout), packed.dtype)
    if residual is None:
        res, add_res = out, False
    else:
        _require(residual.shape == (*x.shape[:-1], packed.cout),
                 f"residual shape {residual.shape} is not the output's")
        res, add_res = _contiguous(residual, packed.dtype).reshape(out.shape), True
    pixel_chunks = pixel_chunks or max(1, min(_threads(), -(-flat.shape[0] // MR)))
    as4d = lambda a: a.reshape(1, 1, *a.shape)  # noqa: E731 - the (P, C) pixels as _launch takes them
    dw, proj = _unused(packed.dtype)
    _run(_launch, calls, POINTWISE, pixel_chunks * panel_chunks, as4d(flat), packed.w, packed.b, *dw, *proj,
            as4d(out), as4d(res), as4d(out), as4d(out), 1, pixel_chunks, panel_chunks, relu6, add_res, False)
    return out.reshape(*x.shape[:-1], packed.cout)


def stem_conv(x: np.ndarray, packed: Packed, stride: int = 2) -> np.ndarray:
    """Full k x k conv, TF SAME padding, + bias + ReLU6: (N, H, W, Cin) -> (N, Ho, Wo, Cout)."""
    calls = compile_kernels(packed.dtype)
    x = _contiguous(x, packed.dtype)
    n, h, w, cin = x.shape
    _require(packed.kind == "gemm" and packed.ksize ** 2 * cin == packed.w.shape[1] and stride >= 1,
             f"a {packed.ksize}x{packed.ksize} conv with {packed.w.shape[1]} inputs per window "
             f"cannot take {cin} channels")
    ho, wo = same_padding(h, packed.ksize, stride)[2], same_padding(w, packed.ksize, stride)[2]
    out = np.empty((n, ho, wo, packed.cout), packed.dtype)
    dw, proj = _unused(packed.dtype)
    _run(_launch, calls, STEM, n * bands_per_image(n, ho), x, packed.w, packed.b, *dw, *proj, out, out, out, out,
            stride, packed.ksize, 1, False, False, False)
    return out


def depthwise_conv(x: np.ndarray, packed: Packed, stride: int = 1, relu6: bool = True) -> np.ndarray:
    """3x3 depthwise conv, TF SAME padding, + bias (+ ReLU6): (N, H, W, C) -> (N, Ho, Wo, C)."""
    calls = compile_kernels(packed.dtype)
    x = _contiguous(x, packed.dtype)
    n, h, w, c = x.shape
    _require(packed.kind == "depthwise" and c == packed.cout and stride >= 1,
             f"input has {c} channels, depthwise weights {packed.cout}")
    ho, wo = same_padding(h, 3, stride)[2], same_padding(w, 3, stride)[2]
    out = np.empty((n, ho, wo, c), packed.dtype)
    _, gemm = _unused(packed.dtype)
    _run(_launch, calls, DEPTHWISE, n * bands_per_image(n, ho), x, *gemm, packed.w, packed.b, *gemm, out, out, out,
            out, stride, 1, 1, relu6, False, False)
    return out


def inverted_residual(x: np.ndarray, expand, depthwise: Packed, project: Packed, stride: int,
                      residual: bool, capture: bool = False, bands: int = 0):
    """A fused inverted-residual block: (N, H, W, Cin) -> (N, Ho, Wo, Cout).

    expand: Packed or None (t = 1 blocks). With `capture`, returns
    (out, expansion or None, depthwise, projection or None), the projection
    being the block output before the residual add."""
    dtype = depthwise.dtype
    calls = compile_kernels(dtype)
    x = _contiguous(x, dtype)
    n, h, w, cin = x.shape
    ho, wo = same_padding(h, 3, stride)[2], same_padding(w, 3, stride)[2]
    c_exp, c_out = depthwise.cout, project.cout
    _require((expand.w.shape[1] == cin and expand.cout == c_exp) if expand is not None else cin == c_exp,
             f"block input has {cin} channels; expand/depthwise weights do not match")
    _require(project.w.shape[1] == c_exp and stride >= 1, "projection weights do not match the block")
    _require(not residual or (stride == 1 and cin == c_out), "a residual block keeps its shape")
    out = np.empty((n, ho, wo, c_out), dtype)
    has_expand = expand is not None
    if not has_expand:
        expand = project  # any array of the right type; unused
    if capture:
        exp_out = np.empty((n, h, w, c_exp), dtype) if has_expand else out
        dw_out = np.empty((n, ho, wo, c_exp), dtype)
        proj_out = np.empty((n, ho, wo, c_out), dtype) if residual else out
    else:
        exp_out = dw_out = proj_out = out
    bands = bands or bands_per_image(n, ho)
    _run(_launch, calls, BLOCK, n * bands, x, expand.w, expand.b, depthwise.w, depthwise.b, project.w, project.b,
            out, exp_out, dw_out, proj_out, stride, 1, 1, has_expand, residual, capture)
    if not capture:
        return out
    return (out, exp_out if has_expand else None, dw_out, proj_out if residual else None)


def _mean_pool(x: np.ndarray, out: np.ndarray) -> None:
    """out = the mean of x over its spatial axes, as `layers.global_avg_pool`."""
    np.mean(x, axis=(1, 2), dtype=x.dtype, out=out, keepdims=True)


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, 1, 1, C), summed in x's dtype. NumPy's mean, the
    reference layer's very arithmetic: for 7x7 pixels a kernel of its own
    gained ~10 us per image and cost half a second of every cold start."""
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], 1, 1, x.shape[3]), x.dtype)
    _run(_mean_pool, x, out)
    return out
