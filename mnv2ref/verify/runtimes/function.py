"""A Python callable f(x) -> {name: array} (or one array) as a foreign model.

x is a float32 batch, by default in our interface (N, H, W, 3) RGB [-1, 1];
a callable that refuses NHWC is tried with NCHW."""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from ..foreign import ForeignModel, TensorInfo


class CallableModel(ForeignModel):
    def __init__(self, function):
        self.function = function
        self.source = getattr(function, "__qualname__", None) or type(function).__name__
        self.input_shape = (None, None, None, 3)
        self.declared = {"layout": "NHWC", "color": "RGB", "scale": "[-1,1]"}
        self.tensors = []

    def _run(self, native_x):
        try:
            out = self.function(native_x)
        except Exception as error:  # noqa: BLE001 - the user's code may raise anything
            if self.input_shape[1] is None and native_x.ndim == 4:
                return self._retry_nchw(native_x, error)
            raise InputError(f"{self.source}({native_x.shape}) raised {type(error).__name__}: {error}") from None
        return self._record(out)

    def _retry_nchw(self, native_x, error):
        nchw = np.ascontiguousarray(native_x.transpose(0, 3, 1, 2))
        try:
            out = self.function(nchw)
        except Exception:  # noqa: BLE001
            raise InputError(f"{self.source}({native_x.shape}) raised {type(error).__name__}: {error} "
                             "(and refuses NCHW too)") from None
        # It takes NCHW: from now on `interface` converts to it.
        self.input_shape = (None, 3, None, None)
        self.declared = {"layout": "NCHW", "color": "RGB", "scale": "[-1,1]"}
        if self._interface is not None:
            self._interface = {**self._interface, "layout": "NCHW"}
        return self._record(out)

    def _record(self, out) -> dict:
        if isinstance(out, np.ndarray) or not hasattr(out, "items"):
            out = {"output": out}
        tensors = {str(name): np.asarray(value, np.float32) for name, value in out.items()}
        if not tensors:
            raise InputError(f"{self.source} returned no tensors")
        self.tensors = [TensorInfo(name) for name in tensors]
        self.output_name = self.tensors[-1].name
        return tensors


def load(function, threads=None) -> CallableModel:
    return CallableModel(function)
