"""The whole MobileNetV2 architecture as one declarative table.

`V2_DEF` below plays the role of TF-slim's `V2_DEF` in `mobilenet_v2.py`: it is
the only place that says what the network is. Everything else — the NumPy
model, the Numba fast path, the ONNX export and the cost accounting — expands
it with `layer_specs` and walks the result.

The table rows are

    Conv(channels, kernel, stride)          a full conv + BatchNorm + ReLU6
    Bottleneck(t, c, n, s)                  n inverted residual blocks: expand the
                                            input t times with a 1x1 conv, filter
                                            it with a 3x3 depthwise conv (stride s
                                            for the first of the n), project it
                                            back to c channels with a linear 1x1 conv

For a depth multiplier `d` every channel count `c` becomes
`make_divisible(c * d)`, except the last conv, which keeps its 1280 channels
for `d <= 1` (TF-slim's "finegrain classification mode", used by every
published checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import InputError

SCOPE = "MobilenetV2"
BATCH_NORM_EPSILON = 1e-3
PUBLISHED_DEPTH_MULTIPLIERS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
PUBLISHED_RESOLUTIONS = (96, 128, 160, 192, 224)
# The largest network mnv2ref loads: twice the widest published one (1.4 with
# 1001 classes, 6,158,505 values). Weights declaring more (a 200,000-class
# classifier, say) are refused from their shapes, before anything is read.
MAX_MODEL_VALUES = 2 * 6_158_505
# Channel counts grow linearly with the depth multiplier; far beyond the
# published 1.4 they stop meaning anything and overflow float arithmetic.
MAX_DEPTH_MULTIPLIER = 10.0


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class Bottleneck:
    t: int  # expansion factor
    c: int  # output channels
    n: int  # repeats
    s: int  # stride of the first repeat


V2_DEF = (
    Conv(channels=32, kernel=3, stride=2),
    Bottleneck(t=1, c=16, n=1, s=1),
    Bottleneck(t=6, c=24, n=2, s=2),
    Bottleneck(t=6, c=32, n=3, s=2),
    Bottleneck(t=6, c=64, n=4, s=2),
    Bottleneck(t=6, c=96, n=3, s=1),
    Bottleneck(t=6, c=160, n=3, s=2),
    Bottleneck(t=6, c=320, n=1, s=1),
    Conv(channels=1280, kernel=1, stride=1),
)


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """TF-slim's channel rounding: the nearest multiple of `divisor`, at least
    `min_value`, and never more than 10% below `value` (hardware likes
    multiples of 8; the 10% rule keeps small layers from being starved)."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class ConvSpec:
    """One conv + BatchNorm (+ ReLU6) as TF-slim names and shapes it.

    `kind` is "conv" (full kxk), "expand" (1x1), "depthwise" (kxk, one filter
    per channel) or "project" (1x1, linear: no ReLU6)."""

    scope: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int

    @property
    def relu6(self) -> bool:
        return self.kind != "project"

    @property
    def weights_name(self) -> str:
        leaf = "depthwise_weights" if self.kind == "depthwise" else "weights"
        return f"{self.scope}/{leaf}"

    @property
    def weights_shape(self) -> tuple:
        if self.kind == "depthwise":
            return (self.kernel, self.kernel, self.in_channels, 1)
        return (self.kernel, self.kernel, self.in_channels, self.out_channels)

    def batch_norm_name(self, leaf: str) -> str:
        return f"{self.scope}/BatchNorm/{leaf}"


BATCH_NORM_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclass(frozen=True)
class LayerSpec:
    """One numbered layer of the network: `layer_1` ... `layer_19`.

    A plain conv layer has a single ConvSpec in `convs`; an inverted residual
    block has (expand,) depthwise, project. `residual` says whether the block
    adds its input to its output (stride 1 and unchanged channel count)."""

    endpoint: str
    scope: str
    convs: tuple
    residual: bool = False

    @property
    def in_channels(self) -> int:
        return self.convs[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.convs[-1].out_channels

    @property
    def stride(self) -> int:
        return max(conv.stride for conv in self.convs)

    @property
    def is_block(self) -> bool:
        return len(self.convs) > 1

    def conv(self, kind: str) -> Optional[ConvSpec]:
        return next((c for c in self.convs if c.kind == kind), None)


@dataclass(frozen=True)
class LogitsSpec:
    scope: str
    in_channels: int
    num_classes: int

    @property
    def weights_name(self) -> str:
        return f"{self.scope}/weights"

    @property
    def biases_name(self) -> str:
        return f"{self.scope}/biases"


LOGITS_SCOPE = f"{SCOPE}/Logits/Conv2d_1c_1x1"


def check_depth_multiplier(depth_multiplier: float) -> float:
    """A depth multiplier as a float in (0, MAX_DEPTH_MULTIPLIER]; InputError otherwise."""
    if not (isinstance(depth_multiplier, (int, float)) and not isinstance(depth_multiplier, bool)
            and 0 < depth_multiplier <= MAX_DEPTH_MULTIPLIER):
        raise InputError(f"depth_multiplier must be a number in (0, {MAX_DEPTH_MULTIPLIER:g}], "
                         f"got {depth_multiplier!r}")
    return float(depth_multiplier)


def layer_specs(depth_multiplier: float = 1.0) -> list:
    """Expand `V2_DEF` into the 19 concrete layers for one depth multiplier."""
    d = check_depth_multiplier(depth_multiplier)
    stem, *bottlenecks, last = V2_DEF
    specs = []
    channels = make_divisible(stem.channels * d)
    specs.append(LayerSpec("layer_1", f"{SCOPE}/Conv", (
        ConvSpec(f"{SCOPE}/Conv", "conv", 3, channels, stem.kernel, stem.stride),)))

    block_index = 0
    for row in bottlenecks:
        out_channels = make_divisible(row.c * d)
        for repeat in range(row.n):
            stride = row.s if repeat == 0 else 1
            scope = f"{SCOPE}/expanded_conv" + (f"_{block_index}" if block_index else "")
            expanded = make_divisible(channels * row.t)
            convs = []
            # TF-slim skips the expand conv when it would not widen the input (t = 1).
            if expanded > channels:
                convs.append(ConvSpec(f"{scope}/expand", "expand", channels, expanded, 1, 1))
            convs.append(ConvSpec(f"{scope}/depthwise", "depthwise", expanded, expanded, 3, stride))
            convs.append(ConvSpec(f"{scope}/project", "project", expanded, out_channels, 1, 1))
            residual = stride == 1 and channels == out_channels
            specs.append(LayerSpec(f"layer_{len(specs) + 1}", scope, tuple(convs), residual))
            channels = out_channels
            block_index += 1

    last_channels = make_divisible(last.channels * max(d, 1.0))
    specs.append(LayerSpec(f"layer_{len(specs) + 1}", f"{SCOPE}/Conv_1", (
        ConvSpec(f"{SCOPE}/Conv_1", "conv", channels, last_channels, last.kernel, last.stride),)))
    return specs


def logits_spec(depth_multiplier: float = 1.0, num_classes: int = 1001) -> LogitsSpec:
    return LogitsSpec(LOGITS_SCOPE, layer_specs(depth_multiplier)[-1].out_channels, num_classes)


def variable_shapes(depth_multiplier: float = 1.0, num_classes: int = 1001) -> dict:
    """Every model variable's TF-slim name and shape (no EMA shadows, no
    optimizer slots); `num_classes=0` for the backbone alone."""
    shapes = {}
    for layer in layer_specs(depth_multiplier):
        for conv in layer.convs:
            shapes[conv.weights_name] = conv.weights_shape
            for leaf in BATCH_NORM_LEAVES:
                shapes[conv.batch_norm_name(leaf)] = (conv.out_channels,)
    if num_classes:
        logits = logits_spec(depth_multiplier, num_classes)
        shapes[logits.weights_name] = (1, 1, logits.in_channels, num_classes)
        shapes[logits.biases_name] = (num_classes,)
    return shapes


def same_padding(size: int, kernel: int, stride: int) -> tuple:
    """TF `SAME` padding along one axis: (before, after, output size).

    The output has ceil(size / stride) positions; the padding needed to get
    there is split with the odd pixel *after*, so stride 2 on an even size
    pads 0 before and 1 after — unlike PyTorch's symmetric padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out
