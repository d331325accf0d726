"""The two input interfaces of the MobileNetV2 model card.

The network itself takes NHWC, RGB, scaled to [-1, 1]. Users arrive with
one of the two interfaces the model card describes:

  original (TF-slim)   input   [N, 224, 224, 3] NHWC, RGB, (x - 127.5) / 127.5
                       output  MobilenetV2/Predictions/Reshape_1, 1001 classes
  converted (OpenVINO) input   [N, 3, 224, 224] NCHW, BGR, 0-255
                       output  MobilenetV2/Predictions/Softmax, 1001 classes

`to_network_input` turns either into what the network takes; both outputs are
the same softmax over 1001 classes (class 0 = background).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

LAYOUTS = ("NHWC", "NCHW")
COLORS = ("RGB", "BGR")
SCALES = ("[-1,1]", "0-255")
INTERFACES = {
    "original": {"layout": "NHWC", "color": "RGB", "scale": "[-1,1]"},
    "converted": {"layout": "NCHW", "color": "BGR", "scale": "0-255"},
}


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def to_network_input(x: np.ndarray, layout: str = "NHWC", color: str = "RGB",
                     scale: str = "[-1,1]") -> np.ndarray:
    """(N, H, W, 3) or (N, 3, H, W) in the given colour order and scale ->
    (N, H, W, 3) RGB in [-1, 1], in x's float dtype.

    0-255 input is mapped with (x - 127.5) / 127.5, the model card's mean and
    scale; it equals TF-slim's (x / 255 - 0.5) * 2 up to float rounding."""
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("color", color, COLORS)
    _check_choice("scale", scale, SCALES)
    if (layout, color, scale) == ("NHWC", "RGB", "[-1,1]"):
        return x
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        shape = getattr(x, "shape", type(x).__name__)
        raise InputError(f"input must be a 4-d {layout} array, got {shape}")
    if layout == "NCHW":
        if x.shape[1] != 3:
            raise InputError(f"NCHW input must have shape (N, 3, H, W), got {x.shape}")
        x = x.transpose(0, 2, 3, 1)
    if color == "BGR":
        x = x[..., ::-1]
    if scale == "0-255":
        if x.dtype not in (np.float32, np.float64):
            raise InputError(f"input dtype must be float32 or float64, got {x.dtype}")
        half = x.dtype.type(127.5)
        x = (x - half) / half
    return np.ascontiguousarray(x)


def check_input(x) -> np.ndarray:
    """Refuse anything but a finite (N, H, W, 3) float32/float64 NHWC batch."""
    if not isinstance(x, np.ndarray):
        raise InputError(f"input must be a NumPy array of shape (N, H, W, 3), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[3] != 3:
        hint = " (add a batch axis: x[None])" if x.ndim == 3 and x.shape[-1] == 3 else ""
        raise InputError(f"input must have shape (N, H, W, 3) NHWC, got {x.shape}{hint}")
    if x.dtype not in (np.float32, np.float64):
        raise InputError(f"input dtype must be float32 or float64, got {x.dtype} "
                         "(preprocess uint8 images with mnv2ref.preprocess)")
    if min(x.shape[:3]) < 1:
        raise InputError(f"input has an empty axis: shape {x.shape}")
    # min and max carry any NaN or Inf: two reductions, no boolean copy of x
    if not (np.isfinite(x.min()) and np.isfinite(x.max())):
        raise InputError(f"input contains {np.count_nonzero(~np.isfinite(x))} NaN or Inf values")
    return x
