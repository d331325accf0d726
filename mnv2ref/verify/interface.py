"""Which input a foreign model wants: layout, colour order and scale.

The layout comes from the input shape (a 3 on axis 1 and not on axis 3 is
NCHW). Colour order and scale cannot be read off a graph (the card's
converted OpenVINO model does its BGR swap, mean and scale inside the
graph), so they are found by running the candidates and keeping the one
whose output agrees best with ours.
"""

from __future__ import annotations

import os
from itertools import product
from typing import Optional, Sequence

import numpy as np

from ..interfaces import COLORS, LAYOUTS, SCALES, to_network_input

ORIGINAL = {"layout": "NHWC", "color": "RGB", "scale": "[-1,1]"}

# Another interface than the expected one is "detected" only if it fits
# clearly better: a bug in their first layer leaves every candidate far off,
# and the expected one need not be the least far.
CLEARLY_BETTER = 0.5


def layout_of(input_shape: Optional[Sequence]) -> Optional[str]:
    """NHWC or NCHW from a 4-d input shape (None entries are unknown sizes);
    None when the shape does not say."""
    if input_shape is None or len(input_shape) != 4:
        return None
    if input_shape[3] == 3 and input_shape[1] != 3:
        return "NHWC"
    if input_shape[1] == 3 and input_shape[3] != 3:
        return "NCHW"
    return None


# Beyond the card's two scales, the usual mistakes: [0, 1] pixels, and
# PyTorch's ImageNet mean/std normalization of [0, 1] RGB pixels.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TRIED_SCALES = (*SCALES, "[0,1]", "mean-std")


def candidates(layout: Optional[str]) -> list:
    """Every interface worth trying: the known layout (or both), each colour
    order and scale; the original interface first."""
    layouts = [layout] if layout else list(LAYOUTS)
    found = [{"layout": lay, "color": c, "scale": s} for lay, c, s in product(layouts, COLORS, TRIED_SCALES)]
    return sorted(found, key=lambda i: [i[k] != ORIGINAL[k] for k in ("layout", "color", "scale")])


def from_network_input(x: np.ndarray, layout: str = "NHWC", color: str = "RGB",
                       scale: str = "[-1,1]") -> np.ndarray:
    """The inverse of `interfaces.to_network_input` (with the scales of
    `TRIED_SCALES`): our (N, H, W, 3) RGB [-1, 1] batch -> the given interface."""
    half, one = x.dtype.type(127.5), x.dtype.type(1)
    if scale == "0-255":
        x = x * half + half
    elif scale == "[0,1]":
        x = (x + one) * x.dtype.type(0.5)
    elif scale == "mean-std":
        x = ((x + one) * x.dtype.type(0.5) - IMAGENET_MEAN.astype(x.dtype)) / IMAGENET_STD.astype(x.dtype)
    if color == "BGR":
        x = x[..., ::-1]
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def to_network(x: np.ndarray, layout: str = "NHWC", color: str = "RGB", scale: str = "[-1,1]") -> np.ndarray:
    """`interfaces.to_network_input`, also for the scales of `TRIED_SCALES`."""
    if scale in SCALES:
        return to_network_input(x, layout, color, scale)
    x = to_network_input(x, layout, color, "[-1,1]")
    rgb_mean, rgb_std = IMAGENET_MEAN.astype(x.dtype), IMAGENET_STD.astype(x.dtype)
    unit = x * rgb_std + rgb_mean if scale == "mean-std" else x
    return np.ascontiguousarray(unit * x.dtype.type(2) - x.dtype.type(1))


def identify(theirs: np.ndarray, ours: np.ndarray) -> tuple:
    """(interface, relative error): how a foreign input array `theirs`
    relates to our network input `ours` (N, H, W, 3). Candidates are ranked
    by their relative L2 distance, which a few differing pixels (another
    resize) do not dominate; an expected interface is kept unless another
    is clearly closer."""
    from ..compare import relative_error

    distances = {}
    for candidate in candidates(layout_of(theirs.shape)):
        try:
            converted = to_network(theirs.astype(np.float32), **candidate)
        except Exception:  # noqa: BLE001 - a candidate that does not even fit the shape
            continue
        if converted.shape == ours.shape:
            distances[describe(candidate)] = (candidate, np.linalg.norm(converted - ours) / np.linalg.norm(ours))
    if not distances:
        return None, float("inf")
    chosen = _prefer_expected(list(distances.values()), None)
    return chosen, relative_error(to_network(theirs.astype(np.float32), **chosen), ours)


def _prefer_expected(scored: list, declared: Optional[dict]) -> dict:
    """The interface of the best (interface, error) pair, or the best
    expected one when the best is not clearly better."""
    best, best_error = min(scored, key=lambda pair: pair[1])
    accepted = [pair for pair in scored if pair[0] in expected(declared, best["layout"])]
    if accepted:
        nearest, nearest_error = min(accepted, key=lambda pair: pair[1])
        if best_error > CLEARLY_BETTER * nearest_error:
            return nearest
    return best


def describe(interface: dict) -> str:
    return f"{interface['layout']}, {interface['color']}, {interface['scale']}"


def reference_input(images=None, size=(224, 224)) -> np.ndarray:
    """Our network input (N, H, W, 3) for image paths (default the bundled photo)."""
    from ..preprocessing import load_image, preprocess
    from ..resources import EXAMPLE_IMAGE

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    return np.stack([preprocess(load_image(p), size=size) for p in (images or [EXAMPLE_IMAGE])])


def spatial_size(input_shape) -> tuple:
    """(H, W) a model's input shape fixes, (224, 224) where it does not."""
    layout = layout_of(input_shape)
    if layout is None:
        return (224, 224)
    h, w = (input_shape[1:3] if layout == "NHWC" else input_shape[2:4])
    return (h or 224, w or 224)


def detect(foreign, reference=None, x: Optional[np.ndarray] = None, ours: Optional[dict] = None,
           declared: Optional[dict] = None) -> tuple:
    """(interface, {description: error}): run `foreign` on `x` (our input)
    in every candidate interface and keep the one whose earliest endpoint
    (as `mapping.align` matches it) is closest to ours, unless an expected
    one (`expected(declared or foreign.declared, ...)`) is nearly as close.
    `ours` are the reference's endpoints on `x`, computed when not given."""
    from ..compare import relative_error
    from .mapping import align, to_ours

    if reference is None:
        from ..model import MobileNetV2
        from ..resources import find_weights

        reference = MobileNetV2.load(find_weights())
    if x is None:
        x = reference_input(size=spatial_size(foreign.input_shape))
    if ours is None:
        ours = reference.endpoints(x)
    errors, mapping = {}, None
    for candidate in candidates(foreign.layout):
        candidate = {**candidate, "layout": foreign.layout or candidate["layout"]}
        try:
            outputs = foreign.run(from_network_input(x, **candidate))
        except Exception:  # noqa: BLE001 - a wrong layout makes the runtime refuse the shape
            continue
        candidate["layout"] = foreign.layout or candidate["layout"]  # a callable may have switched to NCHW
        if mapping is None:
            mapping = align(reference, {k: v.shape for k, v in ours.items()}, foreign.tensors,
                            {k: v.shape for k, v in outputs.items()}, candidate["layout"])
            if not mapping:
                from ..errors import InputError

                raise InputError(f"{foreign.source}: none of its tensors has the shape of one of our "
                                 f"endpoints for input {x.shape} (is it a MobileNetV2 of this depth?)")
        first = next(iter(mapping))
        name, how = mapping[first]
        errors[describe(candidate)] = (candidate, relative_error(to_ours(outputs[name], how, ours[first].shape),
                                                                 ours[first]))
    if not errors:
        from ..errors import InputError

        raise InputError(f"{foreign.source} refuses input in any layout ({x.shape} as NHWC and NCHW)")
    return _prefer_expected(list(errors.values()), declared or foreign.declared), {k: v[1] for k, v in errors.items()}


def expected(declared: Optional[dict], layout: str) -> list:
    """The interfaces a model may take without that being a bug: the one it
    declares in full (metadata, `--interface`), else the model card's for
    its layout, NHWC: the original (RGB, [-1, 1]); NCHW: the converted (BGR,
    0-255) or the original transposed (what a PyTorch port takes)."""
    if declared and all(k in declared for k in ORIGINAL):
        return [dict(declared)]
    from ..interfaces import INTERFACES

    card = ([ORIGINAL] if layout == "NHWC" else
            [INTERFACES["converted"], {**ORIGINAL, "layout": "NCHW"}])
    found = []
    for interface in card:
        interface = {**interface, **(declared or {})}
        if interface not in found:
            found.append(interface)
    return found


def parse(text: str) -> dict:
    """`original`, `converted`, or `LAYOUT,COLOR,SCALE` (e.g. `NCHW,RGB,[-1,1]`) as an interface."""
    from ..errors import InputError
    from ..interfaces import INTERFACES

    if text in INTERFACES:
        return dict(INTERFACES[text])
    parts = [p.strip() for p in text.split(",", 2)]  # the scale "[-1,1]" has a comma itself
    interface = dict(zip(("layout", "color", "scale"), parts))
    if len(parts) != 3 or interface["layout"] not in LAYOUTS or interface["color"] not in COLORS \
            or interface["scale"] not in TRIED_SCALES:
        raise InputError(f"interface must be original, converted or LAYOUT,COLOR,SCALE with LAYOUT in "
                         f"{'/'.join(LAYOUTS)}, COLOR in {'/'.join(COLORS)}, SCALE in {'/'.join(TRIED_SCALES)}; "
                         f"got {text!r}")
    return interface


def mismatch_hint(detected: dict, accepted: list, source: str) -> str:
    """The RGB/BGR or scale mix-up between the detected interface and the
    nearest accepted one."""
    nearest = min(accepted, key=lambda a: sum(a[k] != detected[k] for k in a))
    differ = [k for k in ("color", "scale") if nearest[k] != detected[k]]
    kind = " and ".join({"color": "RGB/BGR swap", "scale": f"{nearest['scale']}/{detected['scale']} scale mix-up"}[k]
                        for k in differ)
    what = ", ".join(f"{'colour order' if k == 'color' else 'scale'} {detected[k]} where "
                     f"{nearest[k]} is expected" for k in differ)
    return (f"{kind or 'layout mix-up'}: {source} agrees with the reference only with input "
            f"{describe(detected)} ({what or 'another layout'}); expected "
            f"{' or '.join(describe(a) for a in accepted)} (declare the intended one with --interface)")
