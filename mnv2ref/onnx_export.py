"""Export the network to ONNX, with standard operators only.

    from mnv2ref.onnx_export import export_onnx
    export_onnx(model, "mobilenet_v2.onnx")                  # 224x224, batch "N"
    export_onnx(model, "odd.onnx", resolution=(225, 193), batch=3, endpoints=True)

The graph takes the same input as `MobileNetV2.predict`: a float32 NHWC batch
named `input`, (N, H, W, 3), preprocessed to [-1, 1]. A `Transpose` turns it
into NCHW, ONNX's layout, and every layer is then one or two standard ops:

    conv + BatchNorm        Conv with the BatchNorm folded into weights + bias (folded
                            in float64, stored as float32)
    depthwise conv + BN     Conv with group = channels
    ReLU6                   Clip(0, 6)
    residual                Add
    global pool             GlobalAveragePool, then Flatten -> `global_pool` (N, C)
    logits                  Conv 1x1 with bias on the pooled (N, C, 1, 1), Flatten -> `Logits`
    softmax                 Softmax(axis=1) -> `Predictions`

`Logits` and `Predictions` exist only when the model has a classifier. With
`endpoints=True` every `layer_N` (and the inner `layer_N/expansion_output`
and `layer_N/depthwise_output`) is also an output, transposed back to NHWC
so it compares directly with `model.endpoints(x)`.

Why the export is for one spatial size: TF "SAME" padding as explicit pads
--------------------------------------------------------------------------
TensorFlow's `padding="SAME"` means "pad with zeros so that the output has
ceil(size / stride) positions". A k-wide window moved by `stride` needs

    out   = ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)      zeros to add in all
    before = total // 2,  after = total - before        the odd zero goes AFTER

(`architecture.same_padding` computes exactly this). Examples for a 3x3 kernel:

    size 224, stride 1: out 224, total 2 -> pads (1, 1)    symmetric
    size 224, stride 2: out 112, total 1 -> pads (0, 1)    asymmetric!
    size 225, stride 2: out 113, total 2 -> pads (1, 1)    symmetric again

So the padding depends on the input size, not only on the kernel and stride.
ONNX's `Conv` has two ways to express this: `auto_pad="SAME_UPPER"` (which
most runtimes implement like TF, but which is loosely specified and refused
by some converters and accelerators), or explicit `pads = [top, left,
bottom, right]` ([x1_begin, x2_begin, x1_end, x2_end]). We write explicit
pads, which every runtime implements identically; the price is that they are
computed for one input size, so the export is for a fixed H x W
(`resolution`, default 224) and only the batch axis stays free ("N").
PyTorch's `padding=1` would instead pad (1, 1) on every layer, shifting every
stride-2 layer by one pixel against TensorFlow: the difference is silent and
large, which is why the tests compare the ONNX graph with TensorFlow's
goldens layer by layer.

Clip's bounds: before opset 11 `Clip` takes `min`/`max` attributes; from 11
on they are (optional) inputs, given here as two scalar initializers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .architecture import same_padding
from .errors import InputError, MissingDependencyError

__all__ = ["export_onnx", "onnx_session", "MIN_OPSET", "INPUT_NAME"]

MIN_OPSET = 7
INPUT_NAME = "input"
INSTALL_HINT = "pip install onnx onnxruntime (or: pip install 'mnv2ref[onnx]')"


def _import_onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as error:
        raise MissingDependencyError(f"ONNX export needs the onnx package ({error}): {INSTALL_HINT}") from None
    return onnx, TensorProto, helper, numpy_helper


def _resolution(resolution) -> tuple:
    values = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                               for v in values):
        raise InputError(f"resolution must be a positive int or an (H, W) pair, got {resolution!r}")
    return int(values[0]), int(values[1])


class _GraphBuilder:
    """Collects nodes and initializers; every value name is unique."""

    def __init__(self, helper, numpy_helper, opset: int):
        self.helper, self.numpy_helper, self.opset = helper, numpy_helper, opset
        self.nodes, self.initializers = [], []
        self._clip_bounds = None

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list, output: str, name: Optional[str] = None, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def conv(self, x: str, scope: str, weights_hwio: np.ndarray, bias: np.ndarray, stride: int,
             size: tuple, depthwise: bool) -> tuple:
        """TF-layout folded weights -> Conv (OIHW) with explicit TF SAME pads.
        Returns (output name, output spatial size)."""
        kernel = weights_hwio.shape[0]
        top, bottom, out_h = same_padding(size[0], kernel, stride)
        left, right, out_w = same_padding(size[1], kernel, stride)
        if depthwise:  # (k, k, C, 1) -> (C, 1, k, k): C groups of one channel each
            w = weights_hwio.transpose(2, 3, 0, 1)
        else:  # (k, k, Cin, Cout) -> (Cout, Cin, k, k)
            w = weights_hwio.transpose(3, 2, 0, 1)
        w = self.constant(f"{scope}/weights", w.astype(np.float32))
        b = self.constant(f"{scope}/biases", np.asarray(bias, dtype=np.float32))
        attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride],
                     pads=[top, left, bottom, right], dilations=[1, 1],
                     group=int(weights_hwio.shape[2]) if depthwise else 1)
        return self.node("Conv", [x, w, b], f"{scope}/Conv2D", **attrs), (out_h, out_w)

    def relu6(self, x: str, scope: str) -> str:
        if self.opset >= 11:
            if self._clip_bounds is None:
                self._clip_bounds = (self.constant("relu6/min", np.array(0.0, np.float32)),
                                     self.constant("relu6/max", np.array(6.0, np.float32)))
            return self.node("Clip", [x, *self._clip_bounds], f"{scope}/Relu6")
        return self.node("Clip", [x], f"{scope}/Relu6", min=0.0, max=6.0)

    def conv_bn(self, x: str, conv_bn, size: tuple) -> tuple:
        """A `model.ConvBN`: folded conv (+ Clip unless it is a linear projection)."""
        spec = conv_bn.spec
        weights, bias = conv_bn.folded(np.float64)  # one rounding to float32, at the end
        y, size = self.conv(x, spec.scope, weights, bias, spec.stride, size, spec.kind == "depthwise")
        return (self.relu6(y, spec.scope) if spec.relu6 else y), size


def export_onnx(model, path: Union[str, os.PathLike], opset: int = 13, batch: Optional[int] = None,
                resolution: Union[int, tuple] = 224, endpoints: bool = False) -> Path:
    """Write `model` (a `MobileNetV2`) as an ONNX graph to `path` and return the path.

    opset: ONNX opset (>= 7; `Clip` takes its bounds as inputs from 11 on).
    batch: a fixed batch size, or None for a symbolic batch axis "N".
    resolution: the input's spatial size, an int or (H, W): the TF SAME pads
        are computed for it (see the module docstring), so the graph accepts
        only this size.
    endpoints: also output every `layer_N` and the blocks' inner
        `layer_N/expansion_output` / `layer_N/depthwise_output`, in NHWC.

    Outputs: `global_pool` (N, C) -- the embedding, as `model.embed` -- and,
    with a classifier, `Logits` (N, classes) and `Predictions` (softmax).
    The file is checked with `onnx.checker.check_model` and written
    atomically (temp file + rename)."""
    onnx, TensorProto, helper, numpy_helper = _import_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if opset > max_opset:
        raise InputError(f"opset {opset} is newer than the installed onnx {onnx.__version__} "
                         f"supports (<= {max_opset})")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch must be a positive integer or None (symbolic), got {batch!r}")
    height, width = _resolution(resolution)
    n = "N" if batch is None else batch

    g = _GraphBuilder(helper, numpy_helper, opset)
    outputs = []  # (name, shape)

    def output(name: str, value: str, shape: list, nhwc: bool = False) -> None:
        if nhwc:  # NCHW -> NHWC, as model.endpoints returns them
            value = g.node("Transpose", [value], f"{name}/to_nhwc", perm=[0, 2, 3, 1])
        g.node("Identity", [value], name, name=f"{name}/output")
        outputs.append((name, shape))

    x = g.node("Transpose", [INPUT_NAME], "input/to_nchw", perm=[0, 3, 1, 2])
    size = (height, width)
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "ConvLayer":
            x, size = g.conv_bn(x, layer.conv, size)
        elif kind == "InvertedResidual":
            block_input, h = x, x
            if layer.expand is not None:
                h, size = g.conv_bn(h, layer.expand, size)
                if endpoints:
                    output(f"{layer.name}/expansion_output", h,
                           [n, *size, layer.expand.spec.out_channels], nhwc=True)
            h, size = g.conv_bn(h, layer.depthwise, size)
            if endpoints:
                output(f"{layer.name}/depthwise_output", h,
                       [n, *size, layer.depthwise.spec.out_channels], nhwc=True)
            h, size = g.conv_bn(h, layer.project, size)
            if layer.spec.residual:
                h = g.node("Add", [h, block_input], f"{layer.spec.scope}/add")
            x = h
        elif kind == "GlobalPool":
            pooled = g.node("GlobalAveragePool", [x], "MobilenetV2/Logits/AvgPool")
            output("global_pool", g.node("Flatten", [pooled], "global_pool/flatten", axis=1),
                   [n, model.embedding_size])
            continue
        elif kind == "Logits":
            weights = layer.weights.reshape(1, 1, *layer.weights.shape[-2:])
            logits, _ = g.conv(pooled, "MobilenetV2/Logits/Conv2d_1c_1x1", weights, layer.biases,
                               1, (1, 1), depthwise=False)
            x = g.node("Flatten", [logits], "Logits/flatten", axis=1)
            output("Logits", x, [n, model.num_classes])
            continue
        elif kind == "Predictions":
            x = g.node("Softmax", [x], "MobilenetV2/Predictions/Softmax", axis=1)
            output("Predictions", x, [n, model.num_classes])
            continue
        else:  # pragma: no cover - model.layers holds only the kinds above
            raise InputError(f"cannot export layer {layer!r}")
        if endpoints:
            output(layer.name, x, [n, *size, layer.spec.out_channels], nhwc=True)

    # The main outputs first, in the order global_pool, Logits, Predictions.
    main = [o for o in outputs if o[0] in ("global_pool", "Logits", "Predictions")]
    ordered = main + [o for o in outputs if o not in main]
    graph = helper.make_graph(
        g.nodes, "mobilenet_v2",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [n, height, width, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in ordered],
        initializer=g.initializers)
    graph.doc_string = (f"MobileNetV2 depth multiplier {model.depth_multiplier:g}, "
                        f"{model.num_classes or 'no'} classes, input NHWC float32 "
                        f"[{n}, {height}, {width}, 3] in [-1, 1]; BatchNorm folded; "
                        f"TF SAME padding as explicit pads for {height}x{width}")
    proto = helper.make_model(graph, producer_name="mnv2ref",
                              opset_imports=[helper.make_opsetid("", opset)])
    # IR 3 (opsets 7-8) would also require every initializer as a graph input.
    proto.ir_version = min(proto.ir_version, max(_max_ir_version(onnx, opset), 4))
    from . import __version__

    proto.producer_version = __version__
    proto.doc_string = graph.doc_string
    helper.set_model_props(proto, {
        "depth_multiplier": f"{model.depth_multiplier:g}",
        "num_classes": str(model.num_classes),
        "resolution": f"{height}x{width}",
        "layout": "NHWC",
        "source": str(getattr(model, "source", "")),
    })
    onnx.checker.check_model(proto, full_check=True)

    from .files import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=".onnx") as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def _max_ir_version(onnx, opset: int) -> int:
    """The oldest IR version that knows `opset`, so older runtimes load the file."""
    table = getattr(onnx.helper, "VERSION_TABLE", ())
    for _release, ir, op, *_ in table:
        if op >= opset:
            return ir
    return onnx.IR_VERSION


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None, spinning: bool = True):
    """An onnxruntime CPU `InferenceSession` for an exported file, with
    `intra_op_num_threads = threads` (None: onnxruntime's default).
    `spinning=False`: idle pool threads sleep at once instead of spinning for
    a while after each run (on a shared machine, spinning steals cores)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise MissingDependencyError(f"running ONNX needs onnxruntime ({error}): {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
