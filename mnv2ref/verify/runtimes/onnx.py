"""ONNX models, run with ONNX Runtime; every node output becomes a graph output."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..foreign import ForeignModel, TensorInfo
from . import missing

CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}
ADD_OPS = {"Add", "Sum", "QLinearAdd"}


class OnnxModel(ForeignModel):
    def __init__(self, path, threads: Optional[int] = None):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as error:
            raise missing("ONNX", "onnx and onnxruntime", error) from None
        from ...errors import InputError

        try:
            proto = onnx.load(str(path))
        except Exception as error:  # noqa: BLE001 - onnx raises DecodeError, ValueError, ...
            raise InputError(f"{path} is not a readable ONNX model: {error}") from None
        self.source = str(path)
        graph = proto.graph
        constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                            for o in n.output}
        inputs = [i for i in graph.input if i.name not in constants]
        if len(inputs) != 1:
            raise InputError(f"{path}: expected one input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        self.batch = self.input_shape[0] if self.input_shape else None
        self.output_name = graph.output[0].name
        self.precision = _precision(graph, onnx)
        self.declared = _declared_interface(proto)

        try:
            inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
        except Exception:  # noqa: BLE001 - custom ops: expose what the graph itself types
            inferred = graph.value_info
        types = {v.name: v.type.tensor_type.elem_type for v in inferred}
        types.update({o.name: o.type.tensor_type.elem_type for o in graph.output})
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                  onnx.TensorProto.UINT8, onnx.TensorProto.INT8}
        self.tensors, outputs = [], {o.name for o in graph.output}
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            computed = [i for i in node.input if i and i not in constants]
            kind = ("conv" if node.op_type in CONV_OPS else "softmax" if node.op_type == "Softmax" else
                    "add" if node.op_type in ADD_OPS and len(computed) >= 2 else "other")
            for name in node.output:
                if name and types.get(name) in floats:
                    self.tensors.append(TensorInfo(name, kind))
                    if name not in outputs:
                        graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                        outputs.add(name)
        self._zero_points = _quantization(graph, onnx)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # Spinning worker threads would slow our own reference running in this process 2-3x.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(proto.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, native_x):
        values = dict(zip(self._outputs, self.session.run(self._outputs, {self.input_name: native_x})))
        order = [t.name for t in self.tensors] + [n for n in self._outputs if n not in
                                                  {t.name for t in self.tensors}]
        return {name: self._dequantize(name, values[name]) for name in order if name in values}

    def _dequantize(self, name, value):
        if name in self._zero_points:
            scale, zero = self._zero_points[name]
            return (value.astype(np.float32) - zero) * scale
        return value.astype(np.float32, copy=False)


def _precision(graph, onnx) -> str:
    ops = {n.op_type for n in graph.node}
    if ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}:
        return "int8"
    types = {i.data_type for i in graph.initializer if len(i.dims) > 1}
    return "float16" if onnx.TensorProto.FLOAT16 in types else "float32"


def _quantization(graph, onnx) -> dict:
    """{quantized tensor: (scale, zero point)} from the QuantizeLinear nodes
    whose scale and zero point are initializers (the usual static quantization)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            zero = inits.get(node.input[2], np.zeros(())) if len(node.input) > 2 else np.zeros(())
            found[node.output[0]] = (inits[node.input[1]].astype(np.float32), zero.astype(np.float32))
    return found


def _declared_interface(proto) -> Optional[dict]:
    """The interface in the model's metadata (`layout`, `color`, `scale`);
    mnv2ref's own export declares the original interface."""
    props = {p.key: p.value for p in proto.metadata_props}
    declared = {k: props[k] for k in ("layout", "color", "scale") if k in props}
    if proto.producer_name == "mnv2ref":
        declared = {"layout": "NHWC", "color": "RGB", "scale": "[-1,1]", **declared}
    return declared or None


def load(path, threads: Optional[int] = None) -> OnnxModel:
    return OnnxModel(path, threads)
