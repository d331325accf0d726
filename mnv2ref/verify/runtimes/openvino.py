"""OpenVINO IR (.xml + .bin), every op output added as a model output
(`model.add_outputs`), compiled for the CPU in float32."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..foreign import ForeignModel, TensorInfo
from . import missing

CONV_OPS = {"Convolution", "GroupConvolution", "MatMul", "BinaryConvolution"}
SKIP_OPS = {"Constant", "Parameter", "Result", "ShapeOf", "Convert"}


class OpenVinoModel(ForeignModel):
    def __init__(self, path, threads: Optional[int] = None):
        try:
            import openvino as ov
        except ImportError as error:
            raise missing("OpenVINO", "openvino", error) from None
        from ...errors import InputError

        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as error:  # noqa: BLE001 - openvino raises RuntimeError for any bad file
            raise InputError(f"{path} is not a readable OpenVINO IR: {error}") from None
        self.source = str(path)
        if len(model.inputs) != 1:
            raise InputError(f"{path}: expected one input, found {len(model.inputs)}")
        shape = model.inputs[0].get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in shape)
        self.batch = self.input_shape[0] if self.input_shape else None
        ops = model.get_ordered_ops()
        types = {op.get_type_name() for op in ops}
        constant_types = {str(op.get_element_type()) for op in ops if op.get_type_name() == "Constant"}
        self.precision = ("int8" if "FakeQuantize" in types or "<Type: 'int8_t'>" in constant_types
                          else "float16" if "<Type: 'float16'>" in constant_types else "float32")

        ports, self.tensors = [], []
        for op in ops:
            kind_name = op.get_type_name()
            if kind_name in SKIP_OPS or op.get_output_size() != 1:
                continue
            if not op.get_output_element_type(0).is_real():
                continue
            computed = [i for i in op.inputs() if i.get_source_output().get_node().get_type_name() != "Constant"]
            kind = ("conv" if kind_name in CONV_OPS else "softmax" if kind_name == "Softmax" else
                    "add" if kind_name == "Add" and len(computed) == 2 else "other")
            names = op.output(0).get_names()
            name = sorted(names)[0] if names else op.get_friendly_name()
            self.tensors.append(TensorInfo(name, kind))
            ports.append(op.output(0))
        result_names = [sorted(o.get_names())[0] if o.get_names() else o.get_node().get_friendly_name()
                        for o in model.outputs]
        self.output_name = result_names[0]
        model.add_outputs(ports)
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        # Our ports come after the model's own results, in the order added.
        self._names = result_names + [t.name for t in self.tensors]

    def _run(self, native_x):
        results = self.compiled(native_x)
        values = [np.asarray(results[out], np.float32) for out in self.compiled.outputs]
        by_name = dict(zip(self._names, values))
        return {t.name: by_name[t.name] for t in self.tensors} | {
            n: by_name[n] for n in self._names[:len(self._names) - len(self.tensors)]}


def load(path, threads: Optional[int] = None) -> OpenVinoModel:
    return OpenVinoModel(path, threads)
