"""Which input a foreign model wants: layout, colour order and scale.

The layout comes from the input shape (a 3 on axis 1 and not on axis 3 is
NCHW). Colour order and scale cannot be read off a graph (the card's
converted OpenVINO model does its BGR swap, mean and scale inside the
graph), so they are found by running the candidates and keeping the one
whose output agrees best with ours.
"""

from __future__ import annotations

from itertools import product
from typing import Optional, Sequence

import numpy as np

from ..interfaces import COLORS, LAYOUTS, SCALES, to_network_input

ORIGINAL = {"layout": "NHWC", "color": "RGB", "scale": "[-1,1]"}


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


def candidates(layout: Optional[str]) -> list:
    """Every interface worth trying: the known layout (or both), each colour
    order and scale; the original interface first."""
    layouts = [layout] if layout else list(LAYOUTS)
    found = [{"layout": lay, "color": c, "scale": s} for lay, c, s in product(layouts, COLORS, SCALES)]
    return sorted(found, key=lambda i: [i[k] != ORIGINAL[k] for k in ("layout", "color", "scale")])


def from_network_input(x: np.ndarray, layout: str = "NHWC", color: str = "RGB",
                       scale: str = "[-1,1]") -> np.ndarray:
    """The inverse of `interfaces.to_network_input`: our (N, H, W, 3) RGB
    [-1, 1] batch -> the given interface."""
    if scale == "0-255":
        half = x.dtype.type(127.5)
        x = x * half + half
    if color == "BGR":
        x = x[..., ::-1]
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def identify(theirs: np.ndarray, ours: np.ndarray) -> tuple:
    """(interface, relative error): how a foreign input array `theirs`
    relates to our network input `ours` (N, H, W, 3), the best candidate."""
    from ..compare import relative_error

    best = None
    for candidate in candidates(layout_of(theirs.shape)):
        try:
            converted = to_network_input(theirs.astype(np.float32), **candidate)
        except Exception:  # noqa: BLE001 - a candidate that does not even fit the shape
            continue
        if converted.shape != ours.shape:
            continue
        error = relative_error(converted, ours)
        if best is None or error < best[1]:
            best = (candidate, error)
    return best if best else (None, float("inf"))


def describe(interface: dict) -> str:
    return f"{interface['layout']}, {interface['color']}, {interface['scale']}"


def reference_input(images=None, size=(224, 224)) -> np.ndarray:
    """Our network input (N, H, W, 3) for image paths (default the bundled photo)."""
    from ..preprocessing import load_image, preprocess
    from ..resources import EXAMPLE_IMAGE

    return np.stack([preprocess(load_image(p), size=size) for p in (images or [EXAMPLE_IMAGE])])


def spatial_size(input_shape) -> tuple:
    """(H, W) a model's input shape fixes, (224, 224) where it does not."""
    layout = layout_of(input_shape)
    if layout is None:
        return (224, 224)
    h, w = (input_shape[1:3] if layout == "NHWC" else input_shape[2:4])
    return (h or 224, w or 224)


def detect(foreign, reference=None, x: Optional[np.ndarray] = None, ours: Optional[dict] = None) -> tuple:
    """(interface, {description: error}): run `foreign` on `x` (our input)
    in every candidate interface and keep the one whose earliest endpoint
    (as `mapping.align` matches it) is closest to ours. `ours` are the
    reference's endpoints on `x`, computed when not given."""
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
        try:
            outputs = foreign.run(from_network_input(x, **candidate))
        except Exception:  # noqa: BLE001 - a wrong layout makes the runtime refuse the shape
            continue
        candidate = {**candidate, "layout": foreign.layout or candidate["layout"]}  # a callable may switch
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
    best = min(errors.values(), key=lambda pair: pair[1])[0]
    return best, {k: v[1] for k, v in errors.items()}
