"""A per-layer trace of one forward pass: what each layer made and what it cost.

For every layer (`layer_1` ... `layer_19`, `global_pool`, `Logits`,
`Predictions`): output shape, min/mean/max/std of the activation, the
fraction of the layer's last ReLU6 outputs clipped at 0 and at 6, wall time,
FLOPs (from `cost()`, the same architecture table) and their running total.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np


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
    ms: float
    flops: int
    cumulative_flops: int

    def to_dict(self) -> dict:
        row = asdict(self)
        row["shape"] = list(self.shape)
        return row


def _last_relu6_output(name: str, outputs: dict) -> Optional[np.ndarray]:
    """The output of the last ReLU6 inside a layer: the layer itself for a
    plain conv layer, the depthwise output for a block (its projection is
    linear), none for the head."""
    if f"{name}/depthwise_output" in outputs:
        return outputs[f"{name}/depthwise_output"]
    if name.startswith("layer_"):
        return outputs[name]
    return None


def trace(model, x: np.ndarray, backend: str = "numpy") -> list:
    """Run `model` on the batch `x` and return one TraceRow per layer."""
    from .accounting import cost

    layer_names = set(model.layer_names)
    stamps = {}

    def stamp(name, value):
        if name in layer_names:
            stamps[name] = time.perf_counter()

    start = time.perf_counter()
    outputs = model.endpoints(x, backend=backend, capture=stamp)
    flops = cost(model.depth_multiplier, x.shape[1:3], model.num_classes).flops_by_layer()
    rows, previous, total = [], start, 0
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
            ms=(stamps[name] - previous) * 1e3, flops=layer_flops,
            cumulative_flops=total))
        previous = stamps[name]
    return rows


def format_trace(rows: list) -> str:
    """The trace as an aligned text table."""
    def pct(value):
        return "" if value is None else f"{100 * value:.1f}"

    header = (f"{'layer':<13}{'output shape':<20}{'min':>9}{'mean':>9}{'max':>9}{'std':>9}"
              f"{'=0 %':>7}{'=6 %':>7}{'ms':>9}{'MFLOPs':>9}{'total':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.name:<13}{str(r.shape):<20}{r.min:>9.3f}{r.mean:>9.3f}{r.max:>9.3f}"
                     f"{r.std:>9.3f}{pct(r.clipped_at_0):>7}{pct(r.clipped_at_6):>7}{r.ms:>9.2f}"
                     f"{r.flops / 1e6:>9.1f}{r.cumulative_flops / 1e6:>9.1f}")
    return "\n".join(lines)
