"""TF Lite flatbuffers, run with LiteRT (`ai_edge_litert`, or `tflite_runtime`)
keeping every intermediate tensor (`experimental_preserve_all_tensors`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..foreign import ForeignModel, TensorInfo
from . import missing

CONV_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"}


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter
    except ImportError as error:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            raise missing("TF Lite", "ai-edge-litert (or tflite-runtime)", error) from None
    return interpreter


class TfliteModel(ForeignModel):
    def __init__(self, path, threads: Optional[int] = None):
        import warnings

        from ...errors import InputError

        module = _interpreter_module()
        # Without the default XNNPACK delegate every op runs (and keeps its
        # output) on its own; a delegated subgraph would hide its intermediates.
        resolvers = getattr(module, "OpResolverType", None)  # absent from old tflite_runtime releases
        options = {"experimental_op_resolver_type": resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if resolvers else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging"
                self.interpreter = module.Interpreter(
                    model_path=str(path), num_threads=threads, experimental_preserve_all_tensors=True,
                    **options)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise InputError(f"{path} is not a readable TF Lite model: {error}") from None
        self.source = str(path)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1:
            raise InputError(f"{path}: expected one input, found {len(inputs)}")
        self._input = inputs[0]
        signature = self._input.get("shape_signature", self._input["shape"])
        self.input_shape = tuple(int(d) if d > 0 else None for d in signature)
        self.batch = int(self._input["shape"][0])
        self.output_name = _short(outputs[0]["name"])
        details = {t["index"]: t for t in self.interpreter.get_tensor_details()}
        ops = _ops(self.interpreter, details, self._input["index"])
        produced = {int(i) for op in ops for i in op["outputs"]}
        computed = produced | {self._input["index"]}
        self._tensors, self.tensors, seen = [], [], set()
        for op in ops:
            n_computed = sum(int(i) in computed for i in op["inputs"])
            kind = (None if op["op_name"] is None else "conv" if op["op_name"] in CONV_OPS else
                    "softmax" if op["op_name"] == "SOFTMAX" else
                    "add" if op["op_name"] == "ADD" and n_computed == 2 else "other")
            for index in map(int, op["outputs"]):
                name = _short(details[index]["name"])
                name = name if name not in seen else f"{name}#{index}"
                seen.add(name)
                self._tensors.append((name, details[index]))
                self.tensors.append(TensorInfo(name, kind))
        dtypes = {np.dtype(d["dtype"]) for d in details.values()}
        quantized = any(d["quantization"][0] for d in details.values())
        self.precision = ("int8" if quantized and dtypes & {np.dtype(np.int8), np.dtype(np.uint8)}
                          else "float16" if np.dtype(np.float16) in dtypes else "float32")

    def _run(self, native_x):
        scale, zero = self._input["quantization"]
        if scale and np.dtype(self._input["dtype"]).kind in "iu":  # a quantized input: x / scale + zero point
            info = np.iinfo(self._input["dtype"])
            native_x = np.clip(np.round(native_x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(self._input["index"], native_x.astype(self._input["dtype"]))
        self.interpreter.invoke()
        return {name: _dequantize(self.interpreter.get_tensor(d["index"]), d) for name, d in self._tensors}


def _ops(interpreter, details: dict, input_index: int) -> list:
    """The ops in execution order, {"op_name", "inputs", "outputs"}. The op
    graph is only available through `_get_ops_details` (private, but stable
    for years); without it every tensor counts, in index order, op unknown."""
    if hasattr(interpreter, "_get_ops_details"):
        return interpreter._get_ops_details()
    return [{"op_name": None, "inputs": [], "outputs": [index]} for index in sorted(details)
            if index != input_index and details[index]["name"]]


def _short(name: str) -> str:
    """A fused op's tensor is named by every op fused into it, joined by ';':
    the first is the op whose output it is."""
    return name.split(";")[0]


def _dequantize(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if scale and value.dtype.kind in "iu":
        return (value.astype(np.float32) - zero) * np.float32(scale)
    return value.astype(np.float32)


def load(path, threads: Optional[int] = None) -> TfliteModel:
    return TfliteModel(path, threads)
