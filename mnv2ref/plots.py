"""Figures for people: the cost of each layer, and feature maps.

matplotlib is optional (`pip install 'mnv2ref[plot]'`); it is imported when a
plot is asked for, and no global pyplot state is touched, so these work in
scripts, servers and notebooks alike.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from .errors import InputError, MissingDependencyError
from .files import atomic_write
from .text import printable


PLOT_KINDS = ("stem", "expand", "depthwise", "project", "residual", "head")
KIND_COLORS = {"stem": "#4c72b0", "expand": "#55a868", "depthwise": "#c44e52",
               "project": "#8172b2", "residual": "#ccb974", "head": "#64b5cd"}


def _import_matplotlib():
    try:
        importlib.import_module("matplotlib")
        figure = importlib.import_module("matplotlib.figure")
        backend = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError as exc:
        raise MissingDependencyError(
            "plotting needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'mnv2ref[plot]')") from exc
    return figure.Figure, backend.FigureCanvasAgg


def figure_format(path) -> str:
    """The format `path`'s extension asks for (no extension: png); InputError,
    before anything is drawn, when matplotlib cannot write it."""
    _, FigureCanvas = _import_matplotlib()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = FigureCanvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(f"cannot write a figure as .{printable(fmt)} ({printable(path)}); "
                         f"matplotlib writes {', '.join('.' + f for f in sorted(supported))}")
    return fmt


def save_figure(fig, path) -> Path:
    """Save atomically; the format follows the extension (.png, .svg, .pdf)."""
    path = Path(path)
    fmt = figure_format(path)
    with atomic_write(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=fmt)
    return path


def plot_cost(c, path) -> Path:
    """Save a bar chart of FLOPs and parameters per layer (layer_1 ...
    layer_19, pool, logits, softmax), stacked by kind, to `path` (the format
    follows the extension: .png, .svg, .pdf ...). Needs matplotlib; no global
    pyplot state is touched."""
    figure_format(path)
    Figure, FigureCanvas = _import_matplotlib()
    groups = list(dict.fromkeys(row.layer for row in c.layers))
    labels = [g.replace("layer_", "") if g.startswith("layer_") else
              {"global_pool": "pool", "Logits": "logits", "Predictions": "softmax"}.get(g, g)
              for g in groups]
    fig = Figure(figsize=(12, 7), layout="constrained")
    FigureCanvas(fig)
    axes = fig.subplots(2, 1, sharex=True)
    h, w = c.resolution
    for ax, field, scale, unit in ((axes[0], "flops", 1e6, "MFLOPs"),
                                   (axes[1], "params", 1e3, "k parameters")):
        bottom = [0.0] * len(groups)
        for kind in PLOT_KINDS:
            values = [sum(getattr(r, field) for r in c.layers if r.layer == g and r.kind == kind)
                      / scale for g in groups]
            if any(values):
                ax.bar(range(len(groups)), values, bottom=bottom, label=kind,
                       color=KIND_COLORS[kind])
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"MobileNetV2 {c.depth_multiplier} at {h}x{w}: "
                      f"{c.flops / 1e9:.3f} GFLOPs, {c.macs / 1e6:.1f} M MACs")
    axes[1].set_title(f"parameters (conv kernels + logits): {c.params / 1e6:.3f} M; "
                      f"BN folded {c.params_folded / 1e6:.3f} M")
    axes[0].legend(title="kind", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].set_xticks(range(len(groups)), labels, rotation=45, ha="right",
                       rotation_mode="anchor")
    axes[1].set_xlabel("layer")
    return save_figure(fig, path)


def plot_feature_maps(activation: np.ndarray, path, title: str = "", max_maps: int = 64) -> Path:
    """Save a grid of the first `max_maps` channels of one activation,
    (1, H, W, C) or (H, W, C), each on its own colour scale."""
    maps = activation[0] if activation.ndim == 4 else activation
    if maps.ndim != 3:
        raise InputError(f"feature maps must be (1, H, W, C) or (H, W, C), got shape {activation.shape}")
    figure_format(path)
    Figure, FigureCanvas = _import_matplotlib()
    count = min(maps.shape[-1], max_maps)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows + 0.6), layout="constrained")
    FigureCanvas(fig)
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        ax.set_axis_off()
        if k < count:
            ax.imshow(maps[..., k], cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {k}", fontsize=7)
    fig.suptitle(title or f"{count} of {maps.shape[-1]} feature maps, {maps.shape[0]}x{maps.shape[1]}")
    return save_figure(fig, path)
