"""Keras models (.keras, or an .h5 holding a whole model), when Keras is
installed: a sub-model returning every layer's output."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import InputError, MissingDependencyError
from ..foreign import ForeignModel, TensorInfo
from . import INSTALL_HINT


class KerasModel(ForeignModel):
    def __init__(self, path):
        try:
            import keras
        except ImportError as error:
            raise MissingDependencyError(
                f"verifying a Keras model needs keras and one of its backends, which are not installed "
                f"({error}): {INSTALL_HINT} keras jax") from None
        try:
            model = keras.models.load_model(str(path), compile=False)
        except (ValueError, OSError) as error:
            raise InputError(f"{path}: Keras cannot load a model from it ({error}); a weights-only file "
                             "(Keras Applications' .h5) loads with MobileNetV2.from_keras_h5") from None
        self.source = str(path)
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        self.input_shape = tuple(model.inputs[0].shape)
        self.tensors = [TensorInfo(layer.name) for layer in layers]
        self.output_name = layers[-1].name
        self.model = keras.Model(model.inputs, [layer.output for layer in layers])

    def _run(self, native_x):
        values = self.model.predict(native_x, verbose=0)
        return {t.name: np.asarray(v, np.float32) for t, v in zip(self.tensors, values)}


def load(path, threads: Optional[int] = None) -> KerasModel:
    return KerasModel(path)
