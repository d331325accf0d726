"""What a MobileNetV2 costs: MACs, FLOPs, parameters and activations per layer.

    c = mnv2ref.cost(depth_multiplier=1.0, resolution=224)
    c.macs, c.flops, c.params                 # 300_775_552, 614_620_118, 3_472_041
    print(c.format_table())                   # a Keras-style summary
    c.to_dict()                               # JSON-serialisable

Everything is computed from the architecture table (`architecture.V2_DEF`,
expanded by `layer_specs`) and the input size alone: no weights are needed,
and no other list of layers exists. `cost()` has one row per conv op (each with
its BatchNorm and ReLU6), one per residual add, and one each for the global
pool, the logits and the softmax (the last two only with `num_classes > 0`).
Shapes are NHWC with N = 1; spatial sizes follow TF `SAME` padding,
ceil(size / stride), so odd resolutions are handled as TensorFlow does.

Conventions
-----------
MACs
    Multiply-accumulates of the convolutions and of the logits (1x1 conv):
    H_out * W_out * C_out * k * k * C_in for a full conv, H_out * W_out * C *
    k * k for a depthwise one, C * num_classes for the logits. Nothing else
    (bias, BatchNorm, ReLU6, adds, pool, softmax) is a MAC. This is the
    TF-slim model zoo's "MACs (M)" (tensorflow/models,
    research/slim/nets/mobilenet/README.md), which *truncates* to whole
    millions: 300,775,552 for 1.0/224 is printed 300, and all 22 published
    (depth multiplier, resolution) pairs match the table that way (rounding
    to nearest would give 301, and leaving the logits out 299).

FLOPs
    2 per MAC (a multiply and an add), plus
      * 1 per output element of every conv, for the bias add -- BatchNorm
        folded into the conv at inference, i.e. the BN shift; the BN scale is
        folded into the kernel and costs nothing;
      * 1 per output element of every ReLU6 (a clip counts as one op);
      * 1 per output element of every residual add;
      * the global average pool: H * W per channel (H*W - 1 adds and one
        divide);
      * the logits: 2 per MAC plus 1 per class for the bias;
      * the softmax: 5 per class (max, subtract, exp, sum, divide -- what
        `layers.softmax` does).
    For 1.0/224 this is 614,620,118 = 0.61462 G, the "GFlops 0.615" of the
    OpenVINO Open Model Zoo card for mobilenet-v2-1.0-224 (and, for 1.4/224,
    1,183,120,022 = the card's "1.183"). The pieces for 1.0/224:
    2 x 299,494,272 conv MACs = 598,988,544; logits 2 x 1,281,280 MACs +
    1,001 bias = 2,563,561; conv bias adds 6,678,112; ReLU6 6,105,792;
    residual adds 216,384; pool 62,720; softmax 5,005.
    Only counting all the main terms (2 per MAC including the logits, bias,
    ReLU6 *and* residual adds) reaches 0.615 -- by a margin of 0.12 M. The
    variants tried (GFLOPs; 1.0/224, then 1.4/224, whose card says 1.183):
      2 x conv MACs only                          0.598989   1.160808
      2 x all MACs (conv + logits)                0.601551   1.164395
      + bias adds                                 0.608229   1.173969
      + bias adds + ReLU6                         0.614335   1.182724
      + bias adds + ReLU6 + residual adds         0.614551   1.183026
      + pool + logits bias + softmax (counted)    0.614620   1.183120
      the above without the logits/softmax        0.612052   1.179526
      the above without the residual adds         0.614404   1.182817
      BN unfolded (scale + shift, 2 / element)    0.621298   1.192693
      ReLU6 as 2 ops (max and min)                0.620726   1.191875
    The pool, the logits bias and the softmax together are 0.07 M and do not
    change the rounding; they are counted because they are work.

Parameters (M = 10**6 elements)
    params            conv kernels + logits weights and biases: the zoo's
                      "Parameters (M)" (3,472,041 for 1.0/224, printed 3.47)
    params_folded     conv kernels + one bias per conv output channel (BN
                      folded) + logits: 3,489,097 for 1.0/224, the OpenVINO
                      card's "MParams 3.489" (6,086,601 for 1.4/224: "6.087")
    params_trainable  conv kernels + BN gamma and beta + logits (3,506,153)
    The checkpoint additionally holds BN moving_mean and moving_variance:
    `params + 4 x (conv output channels)` is the number of elements of
    `architecture.variable_shapes`, i.e. of the model variables in a
    checkpoint.

Activations
    `activation_bytes` is the float32 size of each row's output; the total is
    the sum over rows (not a peak-memory figure).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Union

from .architecture import LOGITS_SCOPE, SCOPE, layer_specs, same_padding
from .errors import InputError

__all__ = ["cost", "Cost", "LayerCost", "CostTotals", "format_cost_table",
           "KINDS", "FLOAT32_BYTES"]

KINDS = ("stem", "expand", "depthwise", "project", "head", "residual")
FLOAT32_BYTES = 4
POOL_SCOPE = f"{SCOPE}/Logits/AvgPool"
SOFTMAX_SCOPE = f"{SCOPE}/Predictions/Softmax"
SOFTMAX_FLOPS_PER_CLASS = 5  # max, subtract, exp, sum, divide


@dataclass(frozen=True)
class LayerCost:
    """One row: a conv op (with its BatchNorm and ReLU6), a residual add, the
    pool, the logits or the softmax. `layer` is the TF-slim endpoint the row
    belongs to (`layer_1` ... `layer_19`, `global_pool`, `Logits`,
    `Predictions`); `scope` is the TF op/variable scope."""

    name: str
    layer: str
    scope: str
    kind: str
    input_shape: tuple
    output_shape: tuple
    macs: int
    flops: int
    params: int
    params_folded: int
    params_trainable: int
    activation_bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["output_shape"] = list(self.output_shape)
        return d


@dataclass(frozen=True)
class CostTotals:
    macs: int
    flops: int
    params: int
    params_folded: int
    params_trainable: int
    activation_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


TOTAL_FIELDS = tuple(CostTotals.__dataclass_fields__)


class Cost:
    """The per-layer cost table of one configuration, with its totals."""

    def __init__(self, depth_multiplier: float, resolution: tuple, num_classes: int,
                 layers: Iterable[LayerCost]):
        self.depth_multiplier = float(depth_multiplier)
        self.resolution = tuple(int(v) for v in resolution)
        self.num_classes = int(num_classes)
        self.layers = list(layers)
        self.totals = CostTotals(**{f: int(sum(getattr(row, f) for row in self.layers))
                                    for f in TOTAL_FIELDS})

    # Totals as attributes too: c.macs == c.totals.macs.
    macs = property(lambda self: self.totals.macs)
    flops = property(lambda self: self.totals.flops)
    params = property(lambda self: self.totals.params)
    params_folded = property(lambda self: self.totals.params_folded)
    params_trainable = property(lambda self: self.totals.params_trainable)
    activation_bytes = property(lambda self: self.totals.activation_bytes)

    @property
    def input_shape(self) -> tuple:
        return (1, *self.resolution, 3)

    def layer(self, name: str) -> LayerCost:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def by_layer(self, field: str = "flops") -> dict:
        """{endpoint: total of `field`} in network order, keyed like the
        model's endpoints: layer_1 ... layer_19, global_pool, Logits,
        Predictions (a block's convs and residual add sum into its layer)."""
        if field not in TOTAL_FIELDS:
            raise InputError(f"field must be one of {', '.join(TOTAL_FIELDS)}, got {field!r}")
        totals = {}
        for row in self.layers:
            totals[row.layer] = totals.get(row.layer, 0) + getattr(row, field)
        return totals

    def flops_by_layer(self) -> dict:
        return self.by_layer("flops")

    def macs_by_layer(self) -> dict:
        return self.by_layer("macs")

    def by_kind(self) -> dict:
        """Totals per kind: {kind: CostTotals}, for every kind in KINDS."""
        return {kind: CostTotals(**{f: sum(getattr(r, f) for r in self.layers if r.kind == kind)
                                    for f in TOTAL_FIELDS}) for kind in KINDS}

    def to_dict(self) -> dict:
        return {
            "model": "MobileNetV2",
            "depth_multiplier": self.depth_multiplier,
            "resolution": list(self.resolution),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "layers": [row.to_dict() for row in self.layers],
            "totals": self.totals.to_dict(),
        }

    def format_table(self) -> str:
        return format_cost_table(self)

    def __repr__(self):
        h, w = self.resolution
        return (f"Cost(MobileNetV2 {self.depth_multiplier}/{h}x{w}, {self.num_classes} classes: "
                f"{self.macs / 1e6:.1f} M MACs, {self.flops / 1e9:.3f} GFLOPs, "
                f"{self.params / 1e6:.3f} M params)")


def _resolution(resolution) -> tuple:
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise InputError(f"resolution must be an int or an (H, W) pair, got {resolution!r}")
        values = tuple(resolution)
    else:
        values = (resolution, resolution)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"resolution must be positive integers, got {resolution!r}")
    return values


def cost(depth_multiplier: float = 1.0, resolution: Union[int, tuple] = 224,
         num_classes: int = 1001) -> Cost:
    """The cost of MobileNetV2 at `depth_multiplier` on a `resolution` image
    (an int, or an (H, W) pair); `num_classes=0` for the backbone alone. See
    the module docstring for what is counted."""
    h, w = _resolution(resolution)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise InputError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    specs = layer_specs(depth_multiplier)
    rows = []
    shape = (1, h, w, 3)
    for index, layer in enumerate(specs):
        block_input = shape
        for conv in layer.convs:
            out_h = same_padding(shape[1], conv.kernel, conv.stride)[2]
            out_w = same_padding(shape[2], conv.kernel, conv.stride)[2]
            out_shape = (1, out_h, out_w, conv.out_channels)
            out_elems = math.prod(out_shape)
            kernel = math.prod(conv.weights_shape)
            per_output = conv.kernel * conv.kernel * (
                1 if conv.kind == "depthwise" else conv.in_channels)
            macs = out_elems * per_output
            flops = 2 * macs + out_elems + (out_elems if conv.relu6 else 0)
            if conv.kind == "conv":
                kind = "stem" if index == 0 else "head"
                name = layer.endpoint
            else:
                kind = conv.kind
                name = f"{layer.endpoint}/{conv.kind}"
            rows.append(LayerCost(
                name=name, layer=layer.endpoint, scope=conv.scope, kind=kind,
                input_shape=shape, output_shape=out_shape, macs=macs, flops=flops,
                params=kernel, params_folded=kernel + conv.out_channels,
                params_trainable=kernel + 2 * conv.out_channels,
                activation_bytes=FLOAT32_BYTES * out_elems))
            shape = out_shape
        if layer.residual:
            if block_input != shape:  # pragma: no cover - guaranteed by layer_specs
                raise InputError(f"{layer.endpoint}: residual add of {block_input} and {shape}")
            elems = math.prod(shape)
            rows.append(LayerCost(
                name=f"{layer.endpoint}/add", layer=layer.endpoint, scope=f"{layer.scope}/add",
                kind="residual", input_shape=shape, output_shape=shape, macs=0, flops=elems,
                params=0, params_folded=0, params_trainable=0,
                activation_bytes=FLOAT32_BYTES * elems))

    channels = shape[3]
    pooled = (1, 1, 1, channels)
    rows.append(LayerCost(
        name="global_pool", layer="global_pool", scope=POOL_SCOPE, kind="head",
        input_shape=shape, output_shape=pooled, macs=0, flops=math.prod(shape),
        params=0, params_folded=0, params_trainable=0,
        activation_bytes=FLOAT32_BYTES * channels))

    if num_classes:
        macs = channels * num_classes
        logits_params = macs + num_classes
        out = (1, num_classes)
        rows.append(LayerCost(
            name="Logits", layer="Logits", scope=LOGITS_SCOPE, kind="head",
            input_shape=pooled, output_shape=out, macs=macs, flops=2 * macs + num_classes,
            params=logits_params, params_folded=logits_params, params_trainable=logits_params,
            activation_bytes=FLOAT32_BYTES * num_classes))
        rows.append(LayerCost(
            name="Predictions", layer="Predictions", scope=SOFTMAX_SCOPE, kind="head",
            input_shape=out, output_shape=out, macs=0,
            flops=SOFTMAX_FLOPS_PER_CLASS * num_classes,
            params=0, params_folded=0, params_trainable=0,
            activation_bytes=FLOAT32_BYTES * num_classes))
    return Cost(depth_multiplier, (h, w), num_classes, rows)


# ---------------------------------------------------------------------------
# Text table


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {prefix}{unit}"
    return f"{value:g} {unit}"


def format_cost_table(c: Cost, width: Optional[int] = None) -> str:
    """A Keras-style summary of `c`: one line per row, then the totals."""
    header = ("Layer (kind)", "Output shape", "MACs", "FLOPs", "Params", "Params (folded)")
    lines = [(f"{r.name} ({r.kind})", str(r.output_shape), f"{r.macs:,}", f"{r.flops:,}",
              f"{r.params:,}", f"{r.params_folded:,}") for r in c.layers]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

    def fmt(cells):
        return "  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                         for i, cell in enumerate(cells))

    total_width = width or len(fmt(header))
    h, w = c.resolution
    t = c.totals
    out = [f'Model: "MobileNetV2" (depth multiplier {c.depth_multiplier}, input {h}x{w}, '
           + (f"{c.num_classes} classes)" if c.num_classes else "backbone only)"),
           "_" * total_width, fmt(header), "=" * total_width]
    for i, line in enumerate(lines):
        out.append(fmt(line))
        out.append("_" * total_width if i < len(lines) - 1 else "=" * total_width)
    totals = [
        ("Total MACs", f"{t.macs:,} ({_si(t.macs, 'MACs')})"),
        ("Total FLOPs", f"{t.flops:,} ({_si(t.flops, 'FLOPs')})"),
        ("Params (kernels + logits)", f"{t.params:,} ({_si(t.params, 'params')})"),
        ("Params (BN folded)", f"{t.params_folded:,} ({_si(t.params_folded, 'params')})"),
        ("Params (trainable)", f"{t.params_trainable:,} ({_si(t.params_trainable, 'params')})"),
        ("Activations (float32)", f"{t.activation_bytes:,} bytes "
                                  f"({t.activation_bytes / 2**20:.2f} MiB, sum of row outputs)"),
    ]
    label_width = max(len(label) for label, _ in totals) + 2
    out += [f"{label + ':':<{label_width}}{value}" for label, value in totals]
    out.append("_" * total_width)
    return "\n".join(out)
