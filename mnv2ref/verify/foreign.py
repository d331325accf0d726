"""A foreign MobileNetV2 as verify sees it, whatever ran it.

Every runtime module (`runtimes/*.py`) returns a `ForeignModel`: it runs the
model on a batch in the model's own input interface and returns every
intermediate tensor it exposes, by the model's own names, in execution
order. `predict` takes our interface instead and converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from ..interfaces import COLORS, LAYOUTS
from ..layers import softmax
from .interface import TRIED_SCALES, detect, expected, from_network_input, layout_of


@dataclass(frozen=True)
class TensorInfo:
    """One exposed tensor: its name and, when the graph says, what made it:
    "conv" (a convolution or matrix product), "add" (a sum of two computed
    tensors: a residual add), "softmax" or "other"; None for dumps and callables."""

    name: str
    kind: Optional[str] = None


class ForeignModel:
    """Base class; a runtime sets the attributes and implements `_run`.

    source:       what was loaded (a path, or the callable's name)
    input_shape:  the model's input shape, None for unknown sizes
    tensors:      [TensorInfo] in execution order (known after the first run
                  for callables)
    precision:    "float32", "float16" or "int8" (from tensor types and
                  quantization parameters)
    declared:     the interface the model declares for itself, or None
    batch:        a fixed batch size the model accepts (e.g. 1), or None
    """

    source: str = "model"
    input_shape: Optional[tuple] = None
    tensors: list = ()
    precision: str = "float32"
    declared: Optional[dict] = None
    batch: Optional[int] = None
    output_name: Optional[str] = None
    _interface: Optional[dict] = None

    @property
    def layout(self) -> Optional[str]:
        return (self.declared or {}).get("layout") or layout_of(self.input_shape)

    @property
    def interface(self) -> dict:
        """The interface `predict` converts to: the detected one once
        `verify` (or `detect_interface`) has run or the one set, else the
        declared one, else the model card's for the input layout (NHWC: RGB
        [-1, 1]; NCHW: BGR 0-255, as the card's converted model)."""
        if self._interface is None:
            self._interface = expected(self.declared, self.layout or "NHWC")[0]
        return self._interface

    @interface.setter
    def interface(self, value: dict) -> None:
        for key, choices in (("layout", LAYOUTS), ("color", COLORS), ("scale", TRIED_SCALES)):
            if value.get(key) not in choices:
                raise InputError(f"interface {key} must be one of {', '.join(choices)}, got {value.get(key)!r}")
        self._interface = dict(value)

    def detect_interface(self, reference=None, x: Optional[np.ndarray] = None) -> dict:
        """Find the interface by running the candidates on `x` (our input,
        default the bundled photo) against `reference` (a MobileNetV2,
        default the weights `resources.find_weights` finds)."""
        found, _ = detect(self, reference, x)
        self._interface = found
        return found

    def run(self, native_x: np.ndarray) -> dict:
        """{tensor name: array} for a batch in the model's own interface,
        every exposed tensor, in execution order; float arrays (quantized
        tensors are dequantized)."""
        if self.batch is None or native_x.shape[0] == self.batch:
            return self._run(native_x)
        if self.batch != 1:
            raise InputError(f"{self.source} takes batches of exactly {self.batch}, got {native_x.shape[0]}")
        parts = [self._run(native_x[i:i + 1]) for i in range(native_x.shape[0])]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _run(self, native_x: np.ndarray) -> dict:  # pragma: no cover - every runtime overrides it
        raise NotImplementedError

    def native_input(self, x: np.ndarray) -> np.ndarray:
        """Our (N, H, W, 3) RGB [-1, 1] batch in this model's interface."""
        return from_network_input(np.asarray(x, np.float32), **self.interface)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for our (N, H, W, 3) RGB [-1, 1]
        batch: converted to the model's interface, run, and the output
        softmaxed unless it already is a probability distribution."""
        outputs = self.run(self.native_input(x))
        name = self.output_name if self.output_name in outputs else list(outputs)[-1]
        out = np.asarray(outputs[name], np.float64).reshape(len(x), -1)
        if out.min() < 0 or not np.allclose(out.sum(axis=1), 1, atol=1e-3):
            out = softmax(out)
        return out.astype(np.float32)

    def __repr__(self):
        return f"{type(self).__name__}({self.source!r}, input {self.input_shape}, {self.precision})"
