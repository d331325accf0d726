"""Hints for the classic porting bugs.

The technique: at the first endpoint beyond tolerance, re-run OUR layer with
each candidate bug applied, on their previous endpoint as input (ours where
theirs is missing), and see which candidate explains their tensor, i.e. brings
the error below tolerance. A bug spread thinly over every layer (a BatchNorm
epsilon, say) may only cross the tolerance after several layers: then the
candidate is applied to the whole network instead. The error pattern that
goes with each bug is quoted as evidence.

Preprocessing bugs show in a dump's `input`: a different resize kernel that
reproduces their input is named.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import layers as L
from ..architecture import BATCH_NORM_EPSILON
from ..compare import relative_error

PYTORCH_EPSILON = 1e-5

# Bugs applied to a layer's computation, and how they are described.
LAYER_BUGS = {
    "symmetric_padding": "symmetric (PyTorch-style) padding instead of TF SAME at {layer}: TensorFlow pads a "
                         "stride-2 conv on an even size 0 before and 1 after, yours pads 1 on both sides, "
                         "shifting the output by a pixel{evidence}",
    "epsilon": "BatchNorm epsilon 1e-5 (PyTorch's default) instead of TF-slim's 1e-3 at {layer}{evidence}",
    "relu": "ReLU instead of ReLU6 at {layer}: the error sits only where we clip at 6{evidence}",
    "no_residual": "missing residual add in {layer}: their block output equals our projection_output "
                   "(the input of the block is not added back)",
    "input_bgr": "RGB/BGR swap: their first conv sees the colour channels in the other order "
                 "(their weights or their input are BGR)",
    "input_0-255": "input scale mix-up: their first conv sees 0-255 pixels where the network expects "
                   "[-1, 1] ((x - 127.5) / 127.5 is missing)",
    "input_0-1": "input scale mix-up: their first conv sees [0, 1] pixels where the network expects "
                 "[-1, 1] ((x - 0.5) * 2 is missing)",
}
SPREAD_BUGS = ("epsilon", "relu", "symmetric_padding")
INPUT_BUGS = {"input_bgr": lambda x: x[..., ::-1], "input_0-255": lambda x: x * np.float32(127.5) + np.float32(127.5),
              "input_0-1": lambda x: (x + np.float32(1)) * np.float32(0.5)}


def conv_bn(conv, x: np.ndarray, bug: Optional[str] = None) -> np.ndarray:
    """`model.ConvBN.__call__` with one bug applied: (N, H, W, Cin) -> (N, H', W', Cout)."""
    spec, padding = conv.spec, "SAME"
    if bug == "symmetric_padding" and spec.stride == 2:
        p = spec.kernel // 2  # PyTorch's padding=1 for a 3x3 kernel
        x, padding = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), "VALID"
    if spec.kind == "depthwise":
        y = L.depthwise_conv2d(x, conv.weights, spec.stride, padding)
    elif spec.kernel == 1 and spec.stride == 1:
        y = L.pointwise_conv2d(x, conv.weights)
    else:
        y = L.conv2d(x, conv.weights, spec.stride, padding)
    epsilon = PYTORCH_EPSILON if bug == "epsilon" else BATCH_NORM_EPSILON
    y = L.batch_norm(y, conv.gamma, conv.beta, conv.moving_mean, conv.moving_variance, epsilon)
    if not spec.relu6:
        return y
    return np.maximum(y, y.dtype.type(0)) if bug == "relu" else L.relu6(y)


def layer_endpoints(layer, x: np.ndarray, bug: Optional[str] = None) -> dict:
    """The endpoints of one of `model.layers` on input x, with `bug` applied."""
    kind = type(layer).__name__
    if bug in INPUT_BUGS:
        x = INPUT_BUGS[bug](x)
    if kind == "ConvLayer":
        return {layer.name: conv_bn(layer.conv, x, bug)}
    if kind != "InvertedResidual":
        return {layer.name: layer(x)}
    out, h = {}, x
    if layer.expand is not None:
        h = out[f"{layer.name}/expansion_output"] = conv_bn(layer.expand, h, bug)
    h = out[f"{layer.name}/depthwise_output"] = conv_bn(layer.depthwise, h, bug)
    h = conv_bn(layer.project, h, bug)
    if layer.spec.residual:
        out[f"{layer.name}/projection_output"] = h
        if bug != "no_residual":
            h = h + x
    out[layer.name] = h
    return out


def network_endpoints(model, x: np.ndarray, bug: str, until: str) -> dict:
    """Every endpoint up to layer `until` with `bug` applied in every layer."""
    out = {}
    for layer in model.layers:
        found = layer_endpoints(layer, x, bug)
        out.update(found)
        x = found[layer.name]
        if layer.name == until:
            break
    return out


def layer_of(endpoint: str) -> str:
    return endpoint.split("/")[0]


def applicable(model, layer_name: str) -> list:
    """The bugs that can change this layer's output."""
    layer = model.layers[model.layer_names.index(layer_name)]
    kind = type(layer).__name__
    if kind not in ("ConvLayer", "InvertedResidual"):
        return []
    convs = [layer.conv] if kind == "ConvLayer" else [c for c in (layer.expand, layer.depthwise, layer.project) if c]
    bugs = ["epsilon"]
    if any(c.spec.stride == 2 for c in convs):
        bugs.append("symmetric_padding")
    if any(c.spec.relu6 for c in convs):
        bugs.append("relu")
    if kind == "InvertedResidual" and layer.spec.residual:
        bugs.append("no_residual")
    if model.layer_names.index(layer_name) == 0:
        bugs += list(INPUT_BUGS)
    return bugs


def evidence(bug: str, endpoint: str, ours: np.ndarray, theirs: np.ndarray, model=None) -> str:
    """The error pattern that goes with `bug`, in words."""
    error = np.abs(np.asarray(theirs, np.float64) - ours)
    total = error.sum() or 1.0
    if bug == "symmetric_padding":
        edge = error[:, 0, :, :].sum() + error[:, 1:, 0, :].sum()
        return f" ({edge / total:.0%} of the error of {endpoint} is on its first row and column)"
    if bug == "relu":
        at_six = error[ours >= 6].sum()
        return f" ({at_six / total:.0%} of the error of {endpoint} is where ours is clipped at 6)"
    if bug == "epsilon" and model is not None:
        conv = _last_conv(model, endpoint)
        if conv is not None and error.shape[-1] == conv.moving_variance.shape[0]:
            per_channel = error.reshape(-1, error.shape[-1]).max(axis=0)
            worst = int(per_channel.argmax())
            variance = conv.moving_variance
            rank = int((variance < variance[worst]).sum())
            return (f" (the largest error is on channel {worst}, whose moving variance {variance[worst]:.2g} "
                    f"is the {_ordinal(rank + 1)} smallest of {variance.size})")
    return ""


def _ordinal(n: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(n, f"{n}th ") if n > 1 else ""


def _last_conv(model, endpoint: str):
    layer = model.layers[model.layer_names.index(layer_of(endpoint))]
    if type(layer).__name__ == "ConvLayer":
        return layer.conv
    if type(layer).__name__ != "InvertedResidual":
        return None
    if endpoint.endswith("expansion_output"):
        return layer.expand
    return layer.depthwise if endpoint.endswith("depthwise_output") else layer.project


def explain(model, first: str, x: np.ndarray, ours: dict, theirs: dict, tolerance: float,
            raw_model=None) -> list:
    """Hints for the first divergent endpoint `first`.

    x: our network input; ours: our endpoints on it; theirs: {endpoint:
    array} their mapped tensors, in our layout; raw_model: the same
    checkpoint's raw variables, when it also has EMA shadows."""
    layer_name = layer_of(first)
    if layer_name not in model.layer_names:
        return []
    index = model.layer_names.index(layer_name)
    layer = model.layers[index]
    previous = model.layer_names[index - 1] if index else None
    layer_input = x if previous is None else theirs.get(previous, ours[previous])
    target = theirs[first]
    baseline = relative_error(target, ours[first])

    def fits(candidate: np.ndarray) -> bool:
        error = relative_error(target, candidate)
        return error <= tolerance and error < baseline

    hints = []
    for bug in applicable(model, layer_name):
        if fits(layer_endpoints(layer, layer_input, bug)[first]):
            hints.append(_describe(bug, layer_name, first, ours[first], target, model))
    if raw_model is not None and index < len(raw_model.layers):
        if fits(layer_endpoints(raw_model.layers[index], layer_input)[first]):
            hints.append(f"raw weights instead of their moving averages at {layer_name}: TF-slim evaluates "
                         "with the ExponentialMovingAverage shadows (the `/ExponentialMovingAverage` "
                         "variables of the checkpoint), your weights are the raw training variables")
    if hints:
        return hints
    # A bug in every layer may cross the tolerance only after several layers.
    for bug in SPREAD_BUGS:
        if bug in applicable(model, layer_name) and fits(network_endpoints(model, x, bug, layer_name)[first]):
            hints.append(_describe(bug, "every layer", first, ours[first], target, model))
    if raw_model is not None and not hints:
        if fits(raw_model.endpoints(x, until=layer_name)[first]):
            hints.append("raw weights instead of their moving averages (in every layer): TF-slim evaluates "
                         "with the ExponentialMovingAverage shadows of the checkpoint")
    return hints


def _describe(bug: str, where: str, endpoint: str, ours: np.ndarray, theirs: np.ndarray, model) -> str:
    return LAYER_BUGS[bug].format(layer=where, evidence=evidence(bug, endpoint, ours, theirs, model))


def raw_twin(model):
    """The same checkpoint with its raw variables, when `model` was loaded
    with the EMA shadows of a checkpoint that has both; else None."""
    source = str(model.metadata.get("source", ""))
    if not (model.metadata.get("use_ema") and source.endswith(".index")):
        return None
    from ..model import MobileNetV2

    raw = MobileNetV2.from_checkpoint(source[:-len(".index")], use_ema=False)
    differs = any(not np.array_equal(raw.variables[k], model.variables[k]) for k in model.variables)
    return raw if differs else None


# Preprocessing ---------------------------------------------------------------

def resize_variants(images, size: tuple) -> dict:
    """{description: (N, H, W, 3) input} made with the usual wrong resizes."""
    from PIL import Image

    from ..preprocessing import central_crop, load_image, preprocess, to_unit_float

    variants = {"Pillow's bilinear resize (antialiased), not TF1's legacy bilinear": [],
                "half-pixel-centre bilinear (TF2 tf.image.resize, OpenCV), not TF1's legacy bilinear": [],
                "no central crop (TF-slim keeps the central 87.5%)": []}
    keys = list(variants)
    for path in images:
        rgb = load_image(path)
        crop = central_crop(rgb)
        pil = np.asarray(Image.fromarray(crop).resize((size[1], size[0]), Image.BILINEAR))
        variants[keys[0]].append((to_unit_float(pil) - np.float32(0.5)) * np.float32(2))
        variants[keys[1]].append((_half_pixel_bilinear(to_unit_float(crop), size) - np.float32(0.5)) * np.float32(2))
        variants[keys[2]].append(preprocess(rgb, size=size, central_fraction=None))
    return {k: np.stack(v) for k, v in variants.items()}


def _half_pixel_bilinear(image: np.ndarray, size: tuple) -> np.ndarray:
    """(H, W, C) -> (h, w, C) bilinear with half-pixel centres, no antialiasing."""
    def axis(in_size, out_size):
        source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, in_size - 1), (source - low).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(image.shape[0], size[0]), axis(image.shape[1], size[1])
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def explain_input(theirs_as_ours: np.ndarray, images, tolerance: float) -> list:
    """Hints for a dump whose `input` is not our preprocessing of the images."""

    hints = []
    for description, candidate in resize_variants(images, theirs_as_ours.shape[1:3]).items():
        if relative_error(theirs_as_ours, candidate) <= max(tolerance, 1e-3):
            hints.append(f"wrong preprocessing: their input is made with {description}")
    if not hints:
        hints.append("their `input` is not TF-slim's eval preprocessing of the image(s) given "
                     "(pass the same images with --image; check the central crop, the resize kernel "
                     "and the scaling to [-1, 1])")
    return hints
