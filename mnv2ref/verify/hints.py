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
# A resize done on 8-bit pixels rounds each to 1/255: 2/255 of the [-1, 1] range at most.
UINT8_ROUNDING = 1e-2

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
    "input_mean-std": "input scale mix-up: their first conv sees ImageNet mean/std normalized pixels "
                      "(PyTorch's convention) where the network expects (x - 0.5) * 2 of [0, 1] pixels",
}
SPREAD_BUGS = ("epsilon", "relu", "symmetric_padding")
# What their first conv may see instead of our input: the interfaces of `interface.py`.
INPUT_BUGS = {"input_bgr": {"color": "BGR"}, "input_0-255": {"scale": "0-255"}, "input_0-1": {"scale": "[0,1]"},
              "input_mean-std": {"scale": "mean-std"}}


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


def producers(model) -> dict:
    """{endpoint: (operation, [input endpoints])} for every endpoint: an
    operation is a `ConvBN`, "add" (the residual), or a layer object
    (global pool, logits, softmax); None as an input is the network input."""
    found, previous = {}, None
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "ConvLayer":
            found[layer.name] = (layer.conv, [previous])
        elif kind == "InvertedResidual":
            h = previous
            if layer.expand is not None:
                h = f"{layer.name}/expansion_output"
                found[h] = (layer.expand, [previous])
            found[f"{layer.name}/depthwise_output"] = (layer.depthwise, [h])
            if layer.spec.residual:
                found[f"{layer.name}/projection_output"] = (layer.project, [f"{layer.name}/depthwise_output"])
                found[layer.name] = ("add", [f"{layer.name}/projection_output", previous])
            else:
                found[layer.name] = (layer.project, [f"{layer.name}/depthwise_output"])
        else:
            found[layer.name] = (layer, [previous])
        previous = layer.name
    return found


def recompute(model, endpoint: str, x: np.ndarray, given: dict, bug: Optional[str] = None,
              _producers: Optional[dict] = None, _memo: Optional[dict] = None) -> np.ndarray:
    """Our `endpoint` with `bug` applied, computed from the nearest inputs in
    `given` ({endpoint: array}, e.g. their tensors), or further back from
    the network input x where they are missing. With `given` empty the bug
    is in every layer. Each endpoint is computed once per call (`_memo`):
    a residual add reads its block's input twice, which unmemoised made the
    early layers run up to 2**10 times."""
    table = _producers or producers(model)
    memo = {} if _memo is None else _memo
    operation, inputs = table[endpoint]

    def value(name):
        if name is None:
            return x
        if name in given:
            return given[name]
        if name not in memo:
            memo[name] = recompute(model, name, x, given, bug, table, memo)
        return memo[name]

    values = [value(name) for name in inputs]
    if operation == "add":
        return values[0] if bug == "no_residual" else values[0] + values[1]
    if not hasattr(operation, "spec"):
        return operation(values[0])
    if inputs == [None] and bug in INPUT_BUGS:
        from .interface import from_network_input

        values[0] = from_network_input(values[0], **INPUT_BUGS[bug])
    return conv_bn(operation, values[0], bug)


def applicable(model, endpoint: str) -> list:
    """The bugs that can change this endpoint given correct inputs."""
    operation, inputs = producers(model)[endpoint]
    if operation == "add":
        return ["no_residual"]
    if not hasattr(operation, "spec"):
        return []
    bugs = ["epsilon"]
    if operation.spec.stride == 2:
        bugs.append("symmetric_padding")
    if operation.spec.relu6:
        bugs.append("relu")
    if inputs == [None]:
        bugs += list(INPUT_BUGS)
    return bugs


def evidence(bug: str, endpoint: str, ours: np.ndarray, theirs: np.ndarray, model=None) -> str:
    """The error pattern that goes with `bug`, in words."""
    error = np.abs(np.asarray(theirs, np.float64) - ours)
    total = error.sum() or 1.0
    if bug == "symmetric_padding":
        edge = error[:, 0, :, :].sum() + error[:, 1:, 0, :].sum()
        h, w = error.shape[1:3]
        return (f" ({edge / total:.0%} of the error of {endpoint} is on its first row and column, "
                f"which hold {(h + w - 1) / (h * w):.0%} of its pixels)")
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
                    f"is the {_ordinal(rank + 1)}smallest of {variance.size})")
    return ""


def _ordinal(n: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(n, f"{n}th ") if n > 1 else ""


def _last_conv(model, endpoint: str):
    operation = producers(model)[endpoint][0]
    return operation if hasattr(operation, "spec") else None


def explain(model, first: str, x: np.ndarray, ours: dict, theirs: dict, tolerance: float,
            raw_model=None) -> list:
    """Hints for the first divergent endpoint `first`.

    x: our network input; ours: our endpoints on it; theirs: {endpoint:
    array} their mapped tensors, in our layout; raw_model: the same
    checkpoint's raw variables, when it also has EMA shadows."""
    target = theirs[first]
    if target.shape != ours[first].shape:  # Keras's 1000 classes: none of our bugs is about them
        return []
    baseline = relative_error(target, ours[first])
    inputs = {k: v for k, v in theirs.items() if k != first}

    def fits(candidate: np.ndarray) -> bool:
        error = relative_error(target, candidate)
        return error <= tolerance and error < baseline

    hints = [_describe(bug, first, first, ours[first], target, model)
             for bug in applicable(model, first) if fits(recompute(model, first, x, inputs, bug))]
    if raw_model is not None and fits(recompute(raw_model, first, x, inputs)):
        hints.append(f"raw weights instead of their moving averages at {first}: TF-slim evaluates "
                     "with the ExponentialMovingAverage shadows (the `/ExponentialMovingAverage` "
                     "variables of the checkpoint), your weights are the raw training variables")
    if hints:
        return hints
    # A bug in every layer may cross the tolerance only after several layers.
    for bug in SPREAD_BUGS:
        if fits(recompute(model, first, x, {}, bug)):
            hints.append(_describe(bug, "every layer", first, ours[first], target, model))
    if raw_model is not None and not hints and fits(recompute(raw_model, first, x, {})):
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
    """{description: (N, H, W, 3) input in [-1, 1]} made with the usual wrong
    resizes, from the images."""
    from PIL import Image

    from ..preprocessing import central_crop, load_image, preprocess, to_unit_float

    def scaled(unit):
        return (unit - np.float32(0.5)) * np.float32(2)

    def pillow(rgb, height, width):
        return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))

    def torchvision(rgb):
        """Resize(256) + CenterCrop(224), scaled to the size: PyTorch's ImageNet evaluation."""
        short = round(min(size) * 256 / 224)
        h, w = rgb.shape[:2]
        resized = pillow(rgb, *((short, round(w * short / h)) if h <= w else (round(h * short / w), short)))
        top, left = (resized.shape[0] - size[0]) // 2, (resized.shape[1] - size[1]) // 2
        return resized[top:top + size[0], left:left + size[1]]

    makers = {
        "Pillow's bilinear resize (antialiased), not TF1's legacy bilinear":
            lambda rgb: scaled(to_unit_float(pillow(central_crop(rgb), *size))),
        "half-pixel-centre bilinear (TF2 tf.image.resize, OpenCV), not TF1's legacy bilinear":
            lambda rgb: scaled(_half_pixel_bilinear(to_unit_float(central_crop(rgb)), size)),
        "no central crop (TF-slim keeps the central 87.5% before resizing)":
            lambda rgb: preprocess(rgb, size=size, central_fraction=None),
        "torchvision's Resize(256) + CenterCrop(224), not TF-slim's central crop 87.5% + legacy bilinear":
            lambda rgb: scaled(to_unit_float(torchvision(rgb))),
    }
    rgbs = [load_image(path) for path in images]
    return {description: np.stack([make(rgb) for rgb in rgbs]) for description, make in makers.items()}


def _half_pixel_bilinear(image: np.ndarray, size: tuple) -> np.ndarray:
    """(H, W, C) -> (h, w, C) bilinear with half-pixel centres, no antialiasing."""
    def axis(in_size, out_size):
        source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, in_size - 1), (source - low).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(image.shape[0], size[0]), axis(image.shape[1], size[1])
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def explain_input(theirs_as_ours: np.ndarray, ours: np.ndarray, images, tolerance: float) -> list:
    """Hints for a dump whose `input` is not our preprocessing `ours` of the
    images: the preprocessing variant that reproduces it, if one does (up to
    the rounding of an 8-bit resize) clearly better than ours."""
    variants = resize_variants(images, theirs_as_ours.shape[1:3])
    errors = {description: relative_error(theirs_as_ours, candidate) for description, candidate in variants.items()}
    description = min(errors, key=errors.get)
    if errors[description] <= max(tolerance, UINT8_ROUNDING) and \
            errors[description] < 0.5 * relative_error(theirs_as_ours, ours):
        return [f"wrong preprocessing: their input is made with {description}"]
    return ["their `input` is not TF-slim's eval preprocessing of the image(s) given (pass the same "
            "images with --image; check the central crop, the resize kernel and the scaling to [-1, 1])"]
