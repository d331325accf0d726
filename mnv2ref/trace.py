"""A per-layer trace of the forward pass: what each layer made and what it cost.

    rows = mnv2ref.trace(model, x, backend="numba")
    print(format_trace(rows))
    rows.layers_ms, rows.end_to_end_ms        # the per-layer times add up to the whole

For every layer (`layer_1` ... `layer_19`, `global_pool`, `Logits`,
`Predictions`): output shape, min/mean/max/std of the activation, the
fraction of the layer's last ReLU6 outputs clipped at 0 and at 6, wall time,
FLOPs (from `cost()`, the same architecture table) and their running total.

Two passes, because statistics and timing want different runs:

* statistics: one `model.endpoints(x)`, which writes out every
  intermediate tensor (the fused blocks of the fast path too);
* timing: the layers as the production path runs them (for numba the fused
  blocks of `fast.run`, nothing written out), each on its real input, the
  previous layer's output; for numba inside one real pass
  (`FastMobileNetV2.layer_seconds`: each layer's kernel calls timed as the
  replay of `run` makes them, so no per-layer Python work is counted that
  `run` does not do — calling the layers one by one added ~1 ms an image
  at 2 threads, and put the sum 26-45 % over the whole pass). After `warmup` untimed passes (the first one loads
  or compiles the kernels), `repeat` timed passes alternate a whole
  forward pass (`model.predict` / `model.embed`, i.e. `fast.run` for numba)
  with a pass of the layers one at a time, so that drift on a busy machine
  hits both alike. A layer's time `ms` is its mean over the `repeat`
  passes (`median_ms` and `best_ms`, the run least disturbed by other
  processes, are kept too); the end-to-end latency `end_to_end_ms` is the
  median of the whole passes (their mean and minimum are kept too).
  `layers_ms / end_to_end_ms` says whether the profile adds up: the layers
  are the whole network, so it is near 1 (`mnv2ref bench --layers` reports
  it). Why means per layer: means add up, medians do not. On a busy machine
  a 0.5 ms layer mostly runs within one scheduler time slice, so its median
  misses the preemptions that hit nearly every 10 ms pass; measured here
  under load, the sum of the per-layer medians was 0.5-0.6 of the end-to-end
  median, the sum of the means 1.0-1.2 (both ~1 on an idle machine).

Threads: as configured (`mnv2ref.fast.set_num_threads`, `model.fast.num_threads`
or NUMBA_NUM_THREADS for numba; the BLAS library's setting for numpy).
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import numpy as np

from .errors import InputError
from .interfaces import check_input

REPEAT = {"numba": 20, "numpy": 3}  # timed passes by default: numpy takes ~30 ms per 224x224 image
WARMUP = {"numba": 2, "numpy": 1}


@dataclass
class TraceRow:
    name: str
    shape: tuple
    min: float
    mean: float
    max: float
    std: float
    clipped_at_0: Optional[float]  # fraction of the last ReLU6's outputs that are 0
    clipped_at_6: Optional[float]  # ... and that are 6
    ms: float                      # mean of `repeat` timed runs of the layer on its input
    median_ms: float               # their median
    best_ms: float                 # the fastest of them
    flops: int
    cumulative_flops: int

    def to_dict(self) -> dict:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


class Trace(list):
    """The TraceRows of one trace (a list), with the end-to-end latency they
    are checked against: `end_to_end_ms` (median of `repeat` whole forward
    passes), `end_to_end_mean_ms`, `end_to_end_min_ms`, `backend`, `threads`
    (numba's thread count, None for numpy) and `repeat`."""

    def __init__(self, rows, passes_ms: list, backend: str, threads: Optional[int]):
        super().__init__(rows)
        self.end_to_end_ms = float(np.median(passes_ms))
        self.end_to_end_mean_ms, self.end_to_end_min_ms = float(np.mean(passes_ms)), float(np.min(passes_ms))
        self.backend, self.threads, self.repeat = backend, threads, len(passes_ms)

    @property
    def layers_ms(self) -> float:
        """The sum of the layers' times."""
        return sum(row.ms for row in self)

    @property
    def ratio(self) -> float:
        """layers_ms / end_to_end_ms: 1 when the profile accounts for the whole pass."""
        return self.layers_ms / self.end_to_end_ms

    def to_dict(self) -> dict:
        return {"backend": self.backend, "threads": self.threads, "repeat": self.repeat,
                "layers_ms": self.layers_ms, "end_to_end_ms": self.end_to_end_ms,
                "end_to_end_mean_ms": self.end_to_end_mean_ms, "end_to_end_min_ms": self.end_to_end_min_ms,
                "ratio": self.ratio,
                "layers": [row.to_dict() for row in self]}


def _last_relu6_output(name: str, outputs: dict) -> Optional[np.ndarray]:
    """The output of the last ReLU6 inside a layer: the layer itself for a
    plain conv layer, the depthwise output for a block (its projection is
    linear), none for the head."""
    if f"{name}/depthwise_output" in outputs:
        return outputs[f"{name}/depthwise_output"]
    if name.startswith("layer_"):
        return outputs[name]
    return None


def layer_steps(model, backend: str) -> list:
    """[(name, step)]: the layers as `backend` runs them in production,
    `step(x)` mapping a layer's input to its output (numba: the fast path's
    `layer`, fused blocks included; numpy: the layer objects)."""
    from .model import check_backend

    check_backend(backend)
    if backend == "numba":
        return [(name, partial(model.fast.layer, name)) for name in model.layer_names]
    return [(layer.name, layer) for layer in model.layers]


def time_layers(model, x: np.ndarray, backend: str, repeat: int, warmup: int) -> tuple:
    """The timing pass: ({layer: [ms of each run]}, [ms of each whole forward pass])."""
    steps = layer_steps(model, backend)
    whole = model.predict if model.num_classes else model.embed

    def stepwise(times=None):
        if backend == "numba":  # each layer's kernels timed inside the production pass
            seconds = model.fast.layer_seconds(x)
        else:
            seconds, h = {}, x
            for name, step in steps:
                start = time.perf_counter()
                h = step(h)
                seconds[name] = time.perf_counter() - start
        if times is not None:
            for name, value in seconds.items():
                times[name].append(value * 1e3)

    for _ in range(warmup):
        whole(x, backend=backend)
        stepwise()
    per_layer, passes = {name: [] for name, _ in steps}, []
    for _ in range(repeat):
        start = time.perf_counter()
        whole(x, backend=backend)
        passes.append((time.perf_counter() - start) * 1e3)
        stepwise(per_layer)
    return per_layer, passes


def trace(model, x: np.ndarray, backend: str = "numpy", repeat: Optional[int] = None,
          warmup: Optional[int] = None) -> Trace:
    """Profile `model` on the batch `x`: one TraceRow per layer, as a `Trace`.

    repeat / warmup: timed and untimed passes (default REPEAT / WARMUP per
    backend). See the module docstring for how the times are taken."""
    from .accounting import cost

    x = check_input(x)
    repeat = REPEAT.get(backend, 1) if repeat is None else repeat
    warmup = WARMUP.get(backend, 1) if warmup is None else warmup
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InputError(f"repeat must be an integer >= 1, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    per_layer, passes = time_layers(model, x, backend, repeat, warmup)
    outputs = model.endpoints(x, backend=backend)
    flops = cost(model.depth_multiplier, x.shape[1:3], model.num_classes).flops_by_layer()
    rows, total = [], 0
    for name in model.layer_names:
        value = outputs[name]
        relu6_output = _last_relu6_output(name, outputs)
        layer_flops = flops.get(name, 0) * x.shape[0]
        total += layer_flops
        rows.append(TraceRow(
            name=name, shape=tuple(value.shape),
            min=float(value.min()), mean=float(value.mean()), max=float(value.max()),
            std=float(value.std()),
            clipped_at_0=None if relu6_output is None else float(np.mean(relu6_output == 0)),
            clipped_at_6=None if relu6_output is None else float(np.mean(relu6_output == 6)),
            ms=float(np.mean(per_layer[name])), median_ms=float(np.median(per_layer[name])),
            best_ms=float(np.min(per_layer[name])), flops=layer_flops, cumulative_flops=total))
    threads = None
    if backend == "numba":
        from .fast import get_num_threads

        threads = model.fast.num_threads or get_num_threads()
    return Trace(rows, passes, backend, threads)


def format_trace(rows: list) -> str:
    """The trace as an aligned text table (with, for a `Trace`, the sum of
    the layers' times against the end-to-end latency)."""
    def pct(value):
        return "" if value is None else f"{100 * value:.1f}"

    header = (f"{'layer':<13}{'output shape':<20}{'min':>9}{'mean':>9}{'max':>9}{'std':>9}"
              f"{'=0 %':>7}{'=6 %':>7}{'ms':>9}{'MFLOPs':>9}{'total':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<13}{str(r.shape):<20}{r.min:>9.3f}{r.mean:>9.3f}{r.max:>9.3f}"
                     f"{r.std:>9.3f}{pct(r.clipped_at_0):>7}{pct(r.clipped_at_6):>7}{r.ms:>9.2f}"
                     f"{r.flops / 1e6:>9.1f}{r.cumulative_flops / 1e6:>9.1f}")
    if isinstance(rows, Trace):
        threads = "" if rows.threads is None else f", {rows.threads} thread" + "s" * (rows.threads > 1)
        lines += ["", f"sum of the layers {rows.layers_ms:.2f} ms (each the mean of {rows.repeat} runs); "
                      f"end to end {rows.end_to_end_ms:.2f} ms (median of {rows.repeat}; mean "
                      f"{rows.end_to_end_mean_ms:.2f}, min {rows.end_to_end_min_ms:.2f}); "
                      f"sum / end to end = {rows.ratio:.2f} ({rows.layers_ms / rows.end_to_end_mean_ms:.2f} "
                      f"of the mean; {rows.backend}{threads})"]
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """`mnv2ref.trace` is both this module and its function `trace`: importing
    the module rebinds the package's attribute to the module, so the module,
    called, is the function."""

    def __call__(self, *args, **kwargs):
        return trace(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
