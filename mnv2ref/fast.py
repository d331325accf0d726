"""The Numba fast path: MobileNetV2 with BatchNorm folded into JIT-compiled kernels.

    fast = FastMobileNetV2(model)            # or model.fast
    probs = fast.run(x, "Predictions")       # (N, 1001)
    embedding = fast.run(x, "global_pool")   # (N, 1, 1, 1280)
    outputs = fast.endpoints(x)              # same keys and capture order as model.endpoints(x)
    y = fast.layer("layer_5", x4)            # one layer on its input

BatchNorm is folded into each conv's weights and bias once (in float64),
and the weights are packed into the layouts of `kernels.py` per dtype: the
float32 pack is made at construction (which also compiles, or loads from
Numba's cache, the float32 kernels), the float64 pack on the first float64
input. Inverted-residual blocks on rows of 20 pixels or more are streamed
through one fused kernel (the 6x expanded tensor is never written out);
smaller ones run as three kernels, which is faster there (`fuse_block`).
`endpoints` uses the same kernels and also writes the intermediate tensors,
so its values are bit-identical to `run`'s, whatever the thread count.
`run` on small inputs (up to two 224x224 images) replays the kernel calls
recorded on the first input of that shape (`_Replay`), so Python's
per-layer work is done once per shape.

Threads: the kernels run on Numba's thread pool, sized by NUMBA_NUM_THREADS
(default: all cores). `set_num_threads(n)` changes it for the calling
thread; `FastMobileNetV2(model, num_threads=n)` or `fast.num_threads = n`
for one model's calls. While other processes keep CPUs busy, fewer
threads are used (`threads_free`; `adaptive_threads=False` turns that
off). Nothing here calls BLAS, so OpenBLAS's thread pool
never competes with Numba's. `kernels.py` also caps GNU OpenMP's spin-wait
(GOMP_SPINCOUNT) unless the environment sets it: see there.
"""

from __future__ import annotations

import contextlib
import time
import threading
from typing import Callable, Optional

import numba
import numpy as np

from . import kernels as K
from . import layers as L
from .contention import threads_free
from .errors import InputError
from .interfaces import check_input

Capture = Optional[Callable[[str, np.ndarray], None]]


def set_num_threads(n: int) -> None:
    """Use `n` threads (1 .. NUMBA_NUM_THREADS) for the fast path, from now
    on in the calling thread (Numba's setting is per calling thread)."""
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the fast path uses in the calling thread."""
    return numba.get_num_threads()


@contextlib.contextmanager
def _threads(n: Optional[int], adaptive: bool = False):
    """Run the body on `n` threads (None: the calling thread's setting),
    fewer if `adaptive` and other processes are busy (`threads_free`)."""
    saved = numba.get_num_threads()
    wanted = saved if n is None else int(n)
    if adaptive:
        wanted = threads_free(wanted)
    if wanted == saved:
        yield
        return
    numba.set_num_threads(wanted)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


class _Pack:
    """The folded, packed weights of one model in one dtype. BatchNorm is
    folded in float64 and the result rounded once to `dtype`."""

    def __init__(self, model, dtype):
        self.dtype = np.dtype(dtype)
        self.layers = []
        for layer in model.layers[:len(model.specs)]:
            if layer.spec.is_block:
                expand = layer.expand and K.pack_gemm(*layer.expand.folded(np.float64), dtype)
                self.layers.append((expand, K.pack_depthwise(*layer.depthwise.folded(np.float64), dtype),
                                    K.pack_gemm(*layer.project.folded(np.float64), dtype)))
            else:
                self.layers.append(K.pack_gemm(*layer.conv.folded(np.float64), dtype))
        logits = next((layer for layer in model.layers if layer.name == "Logits"), None)
        self.logits = logits and K.pack_gemm(logits.weights, logits.biases, dtype)

    def arrays(self):
        """(weights, bias) of every packed conv."""
        for layer in [*self.layers, self.logits]:
            for packed in layer if isinstance(layer, tuple) else (layer,):
                if packed is not None:
                    yield packed.w, packed.b


class FastMobileNetV2:
    """A `MobileNetV2` compiled for speed: same layers, same endpoints, same
    results to float rounding (~1e-6 relative in float32, ~1e-15 in float64).

    `num_threads`: threads for this model's calls (None, the default: the
    calling thread's Numba setting, i.e. NUMBA_NUM_THREADS or the last
    `set_num_threads`). `adaptive_threads` (default True): use fewer while
    other processes keep CPUs busy (`threads_free`), so that a busy machine
    makes two threads no slower than one. Both may be changed at any time."""

    def __init__(self, model, num_threads: Optional[int] = None, adaptive_threads: bool = True):
        self.model = model
        self.num_threads = num_threads
        self.adaptive_threads = adaptive_threads
        self.specs = model.specs
        self.layer_names = model.layer_names
        self.num_classes = model.num_classes
        self._packs = {}
        self._replays = threading.local()  # per calling thread: their buffers are reused
        self._pack(np.float32)

    def _pack(self, dtype) -> _Pack:
        dtype = np.dtype(dtype)
        pack = self._packs.get(dtype)
        if pack is None:
            K.compile_kernels(dtype)
            pack = self._packs[dtype] = _Pack(self.model, dtype)
        return pack

    # -- the forward pass ---------------------------------------------------

    def run(self, x: np.ndarray, until: Optional[str] = None) -> np.ndarray:
        """The output of layer `until` (any name in `layer_names`; default the
        last: "Predictions", or "global_pool" for a backbone)."""
        return self._forward(x, until, None)

    def endpoints(self, x: np.ndarray, until: Optional[str] = None, capture: Capture = None) -> dict:
        """Every endpoint by name, as `MobileNetV2.endpoints`, with
        `capture(name, array)` called in the same order."""
        outputs = {}

        def record(name, value):
            outputs[name] = value
            if capture is not None:
                capture(name, value)

        self._forward(x, until, record)
        return outputs

    def layer(self, name: str, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        """Run the one layer `name` on its input `x` (the previous layer's
        output; the image for layer_1), calling `capture` for the layer's
        intermediate endpoints: a step of the network in isolation."""
        if name not in self.layer_names:
            raise InputError(f"no layer named {name!r}; layers are {', '.join(self.layer_names)}")
        x = _kernel_input(x)
        if x.dtype not in (np.float32, np.float64):
            raise InputError(f"input dtype must be float32 or float64, got {x.dtype}")
        with _threads(self.num_threads, self.adaptive_threads):
            return self._layer(self.layer_names.index(name), x, self._pack(x.dtype), capture)

    def _forward(self, x, until, record):
        x = check_input(x)
        until = until or self.layer_names[-1]
        if until not in self.layer_names:
            raise InputError(f"no layer named {until!r}; layers are {', '.join(self.layer_names)}")
        with _threads(self.num_threads, self.adaptive_threads):
            pack = self._pack(x.dtype)
            x = _kernel_input(x)
            if record is None and x.shape[0] * x.shape[1] * x.shape[2] <= _REPLAY_MAX_PIXELS:
                return self._replay(x, until, pack)
            return self._layers(x, until, pack, record)

    def _layers(self, x, until, pack, record):
        for index, name in enumerate(self.layer_names):
            x = self._layer(index, x, pack, record)
            if record is not None:
                record(name, x)
            if name == until:
                return x
        raise AssertionError(until)

    def layer_seconds(self, x: np.ndarray) -> dict:
        """{layer: seconds} of one whole forward pass on x, each layer timed
        as `run` runs it (through the replay, for inputs it replays), so the
        times add up to the pass: the profile of `mnv2ref.trace`."""
        x = check_input(x)
        until = self.layer_names[-1]
        with _threads(self.num_threads, self.adaptive_threads):
            pack = self._pack(x.dtype)
            x = _kernel_input(x)
            if x.shape[0] * x.shape[1] * x.shape[2] <= _REPLAY_MAX_PIXELS:
                return self._replay_for(x, until, pack).timed(x)
            seconds = {}
            for index, name in enumerate(self.layer_names):
                start = time.perf_counter()
                x = self._layer(index, x, pack, None)
                seconds[name] = time.perf_counter() - start
            return seconds

    def _replay(self, x, until, pack):
        """run(x, until) through the `_Replay` of x's shape (recorded now if new)."""
        return self._replay_for(x, until, pack)(x)

    def _replay_for(self, x, until, pack) -> "_Replay":
        replays = self._replays.__dict__
        key = (x.shape, x.dtype, until, numba.get_num_threads())
        replay = replays.get(key)
        if replay is None:
            if len(replays) >= 4:  # each holds a forward pass's worth of buffers
                replays.clear()
            replay = replays[key] = _Replay(self, x, until, pack)
        return replay

    def _layer(self, index: int, x: np.ndarray, pack: _Pack, record) -> np.ndarray:
        if index < len(self.specs):
            spec, packed = self.specs[index], pack.layers[index]
            if not spec.is_block:
                if spec.convs[0].kernel == 1:
                    return _pointwise(x, packed, relu6=True)
                return K.stem_conv(x, packed, spec.convs[0].stride)
            if fuse_block(x.shape, spec.stride):
                return self._fused_block(x, spec, packed, record)
            return self._unfused_block(x, spec, packed, record)
        name = self.layer_names[index]
        if name == "global_pool":
            return K.global_avg_pool(x)
        if name == "Logits":
            return _pointwise(x.reshape(x.shape[0], -1), pack.logits, relu6=False)
        return L.softmax(x)  # Predictions: NumPy, no BLAS

    @staticmethod
    def _fused_block(x, spec, packed, record):
        expand, depthwise, project = packed
        if record is None:
            return K.inverted_residual(x, expand, depthwise, project, spec.stride, spec.residual)
        out, expanded, filtered, projected = K.inverted_residual(
            x, expand, depthwise, project, spec.stride, spec.residual, capture=True)
        _record_block(record, spec.endpoint, expanded, filtered, projected)
        return out

    @staticmethod
    def _unfused_block(x, spec, packed, record):
        """The block as three kernels with the tensors in between written
        out: faster than streaming for small images, where the rows are
        too short to fill the register tiles. Same arithmetic, same bits."""
        expand, depthwise, project = packed
        expanded = _pointwise(x, expand, relu6=True) if expand is not None else None
        filtered = K.depthwise_conv(x if expanded is None else expanded, depthwise, spec.stride)
        if record is None or not spec.residual:
            out = _pointwise(filtered, project, relu6=False, residual=x if spec.residual else None)
            projected = None
        else:
            projected = _pointwise(filtered, project, relu6=False)
            out = projected + x  # the same single rounding as the kernel's epilogue
        if record is not None:
            _record_block(record, spec.endpoint, expanded, filtered, projected)
        return out


# Inputs up to this many pixels (batch x height x width) are run by replay.
_REPLAY_MAX_PIXELS = 2 * 224 * 224


class _Replay:
    """A forward pass's kernel calls, recorded on a first input and replayed
    on later inputs of the same shape, dtype, last layer and thread count.

    Per layer, Python checks shapes, allocates the output and builds the
    kernel's argument list, ~8 us a call and ~40 calls an image: 0.35 ms,
    10% of a 224x224 image on 2 threads. A replay does that once and then
    only calls the kernels, with the new input in the recorded input's
    place: the same arithmetic, so the same bits. As XNNPACK's memory
    planner does, tensors whose uses do not overlap share memory
    (`_share_memory`): one buffer per tensor instead made the replay ~8%
    slower on 1 thread, each layer writing to memory out of the cache. The
    result is copied out (and the softmax, NumPy, computed afresh)."""

    def __init__(self, fast, x, until, pack):
        self.softmax = until == "Predictions"
        last, out, self.bounds = ("Logits" if self.softmax else until), x, []
        with K.recording() as steps:
            for index, name in enumerate(fast.layer_names):
                out = fast._layer(index, out, pack, None)
                self.bounds.append((name, len(steps)))  # the layer's steps end here
                if name == last:
                    break
        fixed = {id(_owner(a)) for packed in pack.arrays() for a in packed}
        fixed |= {id(_owner(x))} | {id(a) for a in K.kernel_arrays(x.dtype)}
        steps, self.out = _share_memory(steps, out, fixed)
        self.steps = [(kernel, args, tuple(j for j, arg in enumerate(args) if arg is x))
                      for kernel, args in steps]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._run(x, self.steps)
        return L.softmax(self.out) if self.softmax else self.out.copy()

    def timed(self, x: np.ndarray) -> dict:
        """Replay on x, timing each layer's kernel calls: {layer: seconds}."""
        seconds, begin = {}, 0
        for name, end in self.bounds:
            start = time.perf_counter()
            self._run(x, self.steps[begin:end])
            seconds[name], begin = time.perf_counter() - start, end
        if self.softmax:
            start = time.perf_counter()
            L.softmax(self.out)
            seconds["Predictions"] = time.perf_counter() - start
        return seconds

    @staticmethod
    def _run(x: np.ndarray, steps: list) -> None:
        for kernel, args, input_at in steps:
            if input_at:
                args = tuple(x if j in input_at else arg for j, arg in enumerate(args))
            kernel(*args)


def _owner(a: np.ndarray) -> np.ndarray:
    """The array that owns a's memory (a itself if it is not a view)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _share_memory(steps: list, out: np.ndarray, fixed: set) -> tuple:
    """(steps, out) with the tensors made during the steps (all but the
    arrays whose owners' ids are in `fixed`) moved into shared buffers: a
    tensor takes the first buffer, big enough, whose last tensor was last
    used by an earlier step. Tensors a step reads or writes are never in
    the same buffer. The tensors only ever appear whole (reshaped), which
    is checked; if not, nothing is moved."""
    first, last, owners = {}, {}, {}
    for index, (_, args) in enumerate(steps):
        for arg in args:
            if isinstance(arg, np.ndarray) and id(_owner(arg)) not in fixed:
                owner = _owner(arg)
                if arg.ctypes.data != owner.ctypes.data or arg.nbytes != owner.nbytes:
                    return steps, out
                owners[id(owner)] = owner
                first.setdefault(id(owner), index)
                last[id(owner)] = index
    last[id(_owner(out))] = len(steps)  # the result outlives the steps
    buffers, home = [], {}  # buffers: [memory, index of the last step using it]
    for key in sorted(owners, key=first.get):
        free = (b for b in buffers if b[1] < first[key] and b[0].nbytes >= owners[key].nbytes)
        buffer = next(free, None)
        if buffer is None:
            buffer = [K.empty_aligned(owners[key].nbytes, np.uint8), -1]
            buffers.append(buffer)
        buffer[1] = last[key]
        home[key] = buffer[0]

    def moved(a):
        if not isinstance(a, np.ndarray) or id(_owner(a)) not in home:
            return a
        return home[id(_owner(a))][:a.nbytes].view(a.dtype).reshape(a.shape)

    return [(kernel, tuple(moved(arg) for arg in args)) for kernel, args in steps], moved(out)


def fuse_block(shape: tuple, stride: int) -> bool:
    """Stream a block with input `shape` (N, H, W, C) through the fused
    kernel (True) or run it as three kernels (False)?

    Measured on 224x224 float32 inputs, 1 thread: fusing wins 15-30% on
    112x112 and 56x56 inputs, where the expanded tensor (up to 4.8 MB)
    would go through memory, and ~5-10% on 28x28; it loses 5-10% on 14x14
    and 7x7, where a 14- or 7-pixel row leaves the 4-pixel register tiles
    partly empty and two threads' row bands recompute a large share of the
    expanded rows. Whole network, 2 threads: 5.7 ms with this rule, 6.0 ms
    all fused, 6.2 ms all unfused. Re-measured per block with the 512-bit
    GEMM tile (4 x 32): the same split, at 1 and 2 threads (fusing 14x14
    costs 0-15% at 1 thread, is within 3% either way at 2)."""
    return shape[2] >= 20


def _pointwise(x, packed, relu6, residual=None):
    """A 1x1 conv over a whole tensor, its work split between the threads
    by pixels when there are many and by output channels when there are few."""
    threads = get_num_threads()
    pixels = x.size // x.shape[-1]
    if pixels >= 64 * threads:
        return K.pointwise_conv(x, packed, relu6, residual, pixel_chunks=threads)
    return K.pointwise_conv(x, packed, relu6, residual, pixel_chunks=1, panel_chunks=threads)


def _record_block(record, name, expanded, filtered, projected):
    if expanded is not None:
        record(f"{name}/expansion_output", expanded)
    record(f"{name}/depthwise_output", filtered)
    if projected is not None:
        record(f"{name}/projection_output", projected)


def _kernel_input(x: np.ndarray) -> np.ndarray:
    """x as the kernels take it: C-contiguous and writeable. Read-only inputs
    (memory-mapped files, np.frombuffer, writeable=False) are copied, since
    the kernels are compiled for writeable arrays only."""
    return np.require(x, requirements=("C", "W"))
