"""`mnv2ref verify`: faithful conversions pass, each classic porting bug is
found at the right endpoint with the right hint, interfaces are detected.

The buggy models are made here: ONNX graphs from `export_onnx` edited with
the `onnx` package, activation dumps, callables; all on the synthetic 0.35
model at 96x96 (the peers are fixed at 224)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnv2ref.errors import InputError, MissingDependencyError
from mnv2ref.interfaces import INTERFACES
from mnv2ref.verify import load_foreign, verify
from mnv2ref.verify.hints import recompute, resize_variants
from mnv2ref.verify.interface import reference_input

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
SIZE = 96  # the bug models' resolution


# --- fixtures: the reference, buggy models -------------------------------------------------

@pytest.fixture(scope="session")
def peers(shared_dir):
    return shared_dir / "peers"


@pytest.fixture(scope="session")
def peer_report(peers, synthetic):
    """peer_report(file name) -> the VerifyReport of a peer against the synthetic model, made once."""
    reports = {}

    def report(name):
        if name not in reports:
            reports[name] = verify(peers / name, weights=synthetic)
        return reports[name]

    return report


@pytest.fixture(scope="session")
def x96():
    return reference_input(size=(SIZE, SIZE))


@pytest.fixture(scope="session")
def ours96(synthetic, x96):
    return synthetic.endpoints(x96)


@pytest.fixture(scope="session")
def bug_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("verify_bugs")


def _export(model, path):
    from mnv2ref.onnx_export import export_onnx

    export_onnx(model, path, resolution=SIZE)
    return path


def _edited(synthetic, bug_dir, name, edit):
    """export_onnx's graph of the synthetic model with `edit(graph)` applied."""
    path = _export(synthetic, bug_dir / f"{name}.onnx")
    proto = onnx.load(str(path))
    edit(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _with_variables(synthetic, bug_dir, name, change):
    """The synthetic model with changed variables, exported."""
    from mnv2ref.model import MobileNetV2

    variables = {k: v.copy() for k, v in synthetic.variables.items()}
    change(variables)
    return _export(MobileNetV2(variables, source=name), bug_dir / f"{name}.onnx")


def _node(graph, name):
    return next(n for n in graph.node if n.name == name)


def symmetric_padding(graph):
    """layer_3's stride-2 depthwise conv padded (1, 1) like PyTorch's padding=1."""
    for attribute in _node(graph, "MobilenetV2/expanded_conv_1/depthwise/Conv2D").attribute:
        if attribute.name == "pads":
            attribute.ints[:] = [1, 1, 1, 1]


def symmetric_padding_everywhere(graph):
    """Every stride-2 conv, the stem included, padded (1, 1): every input interface candidate
    is then far off at layer_1 (BGR nearly as close as RGB), and the expected one must be kept."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "pads" and list(attribute.ints) == [0, 0, 1, 1]:
                attribute.ints[:] = [1, 1, 1, 1]


def relu_not_relu6(graph):
    node = _node(graph, "MobilenetV2/expanded_conv_4/expand/Relu6")  # layer_6's expansion
    node.op_type = "Relu"
    del node.input[1:]


def no_residual(graph):
    add = _node(graph, "MobilenetV2/expanded_conv_2/add")  # layer_4
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == add.output[0]:
                node.input[i] = add.input[0]
    graph.node.remove(add)


def epsilon_1e5(variables):
    """BatchNorm folded with epsilon 1e-5: variance + 1e-3 becomes variance + 1e-5."""
    for name in variables:
        if name.endswith("moving_variance"):
            variables[name] = variables[name] - np.float32(1e-3 - 1e-5)


def bgr_weights(variables):
    """The stem's input channels reversed: the graph then wants BGR."""
    variables["MobilenetV2/Conv/weights"] = variables["MobilenetV2/Conv/weights"][:, :, ::-1].copy()


def torch_names(model) -> dict:
    """Our endpoint -> torchvision's module name (`features.N`, `features.N.conv.I`)."""
    last = len(model.specs)
    names = {"layer_1": "features.0", f"layer_{last}": f"features.{last - 1}", "Logits": "classifier.1"}
    for spec in model.specs[1:-1]:
        k = int(spec.endpoint.split("_")[1]) - 1
        modules = (["expansion_output"] if spec.conv("expand") else []) + ["depthwise_output"]
        for i, module in enumerate(modules):
            names[f"{spec.endpoint}/{module}"] = f"features.{k}.conv.{i}"
        if spec.residual:
            names[f"{spec.endpoint}/projection_output"] = f"features.{k}.conv.{len(modules) + 1}"
        names[spec.endpoint] = f"features.{k}"
    return names


def write_dump(path, x, endpoints, names, nchw=True):
    """An .npz as a PyTorch port would dump it: `input`, then tensors by their names."""
    to_layout = (lambda a: a.transpose(0, 3, 1, 2) if a.ndim == 4 else a) if nchw else (lambda a: a)
    arrays = {"input": to_layout(x)}
    arrays.update({names[k]: to_layout(v) for k, v in endpoints.items() if k in names})
    np.savez(path, **arrays)
    return path


# --- faithful conversions pass ---------------------------------------------------------------

@pytest.mark.parametrize("name, interface", [
    ("tf2onnx_mobilenet_v2_0.35_224.onnx", "original"),
    ("tflite_mobilenet_v2_0.35_224.tflite", "original"),
    ("openvino_converted_0.35_224.xml", "converted"),
])
def test_faithful_peers_pass(peer_report, name, interface):
    report = peer_report(name)
    assert report.passed and report.exit_code == 0, report.format()
    assert report.first_divergence is None and not report.hints
    assert all(m.foreign is not None for m in report.endpoints), "every endpoint is matched"
    assert report.interface == INTERFACES[interface]  # the OpenVINO IR: NCHW, BGR, 0-255 inside the graph
    assert report.precision == "float32" and report.tolerance == 5e-5
    assert report.format().splitlines()[-1].startswith("PASS")


def test_keras_names_map_blocks(peer_report):
    report = peer_report("tflite_mobilenet_v2_0.35_224.tflite")
    theirs = {m.name: m.foreign for m in report.endpoints}
    assert "block_3_expand_relu" in theirs["layer_5/expansion_output"]
    assert "block_2_add" in theirs["layer_4"] and "block_2_project_BN" in theirs["layer_4/projection_output"]
    assert "Conv1_relu" in theirs["layer_1"] and "out_relu" in theirs["layer_19"]


def test_bench_tflite_passes_at_full_size(peers, shared_dir):
    report = verify(peers / "tflite_bench_mobilenet_v2_1.0_224.tflite",
                    weights=shared_dir / "checkpoints/bench_mobilenet_v2_1.0_224/model.ckpt")
    assert report.passed, report.format()


def test_exported_graph_passes_with_ambiguous_shapes(synthetic, bug_dir):
    # At 96x96 layer_3/expansion_output is (1, 48, 48, 48): NCHW and NHWC have the same shape,
    # and the graph's inner layout (NCHW) must decide, not its NHWC input.
    report = verify(_export(synthetic, bug_dir / "faithful.onnx"), weights=synthetic)
    assert report.passed, report.format()


def test_graph_ending_at_logits_has_no_predictions(synthetic, bug_dir):
    def drop_softmax(graph):
        for node in [n for n in graph.node if n.op_type == "Softmax" or n.output[0] == "Predictions"]:
            graph.node.remove(node)
        graph.output.remove(next(o for o in graph.output if o.name == "Predictions"))
        for node in graph.node:  # and no name tells what the last tensors are
            node.output[:] = [{"Logits": "out", "global_pool": "pooled"}.get(n, n) for n in node.output]
        for output in graph.output:
            output.name = {"Logits": "out", "global_pool": "pooled"}.get(output.name, output.name)

    report = verify(_edited(synthetic, bug_dir, "logits", drop_softmax), weights=synthetic)
    assert report.passed, report.format()
    theirs = {m.name: m.foreign for m in report.endpoints}
    assert theirs["Predictions"] is None and theirs["Logits"] == "Logits/flatten"


def test_unnamed_graph_with_an_extra_conv_aligns_by_order(synthetic, bug_dir):
    # One conv more than ours (so no structural match) and no names: the order pass must take
    # each chain's end (the Clip), not the conv output before it.
    from onnx import helper, numpy_helper

    def extra_conv_no_names(graph):
        graph.initializer.append(numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye"))
        for node in graph.node:
            node.input[:] = ["input/eye" if i == "input/to_nchw" else i for i in node.input]
        at = next(i for i, n in enumerate(graph.node) if n.output[0] == "input/to_nchw")
        graph.node.insert(at + 1, helper.make_node("Conv", ["input/to_nchw", "eye"], ["input/eye"],
                                                   kernel_shape=[1, 1]))
        outputs, renamed = {o.name for o in graph.output}, {}
        for i, node in enumerate(graph.node):
            node.input[:] = [renamed.get(n, n) for n in node.input]
            for j, name in enumerate(node.output):
                if name not in outputs:
                    renamed[name] = node.output[j] = f"t{i}_{j}"

    report = verify(_edited(synthetic, bug_dir, "extra_conv", extra_conv_no_names), weights=synthetic)
    assert report.passed and len(report.matched) == 65, report.format()


# --- each classic bug: the right first divergence and the right hint -------------------------

ONNX_EDITS = {"symmetric_padding": symmetric_padding, "symmetric_padding_everywhere": symmetric_padding_everywhere,
              "relu": relu_not_relu6, "no_residual": no_residual}
VARIABLE_CHANGES = {"epsilon": epsilon_1e5, "bgr": bgr_weights}


@pytest.mark.parametrize("bug, first, hint", [
    ("symmetric_padding", "layer_3/depthwise_output", "symmetric (PyTorch-style) padding"),
    ("symmetric_padding_everywhere", "layer_1", "symmetric (PyTorch-style) padding"),
    ("relu", "layer_6/expansion_output", "ReLU instead of ReLU6"),
    ("no_residual", "layer_4", "missing residual add in layer_4"),
    ("epsilon", "layer_1", "BatchNorm epsilon 1e-5"),
    ("bgr", "input", "RGB/BGR swap"),
    ("raw", "layer_1", "raw weights instead of their moving averages"),
])
def test_bug_found_and_explained(synthetic, synthetic_prefix, bug_dir, bug, first, hint):
    from mnv2ref.model import MobileNetV2

    if bug in ONNX_EDITS:
        path = _edited(synthetic, bug_dir, bug, ONNX_EDITS[bug])
    elif bug in VARIABLE_CHANGES:
        path = _with_variables(synthetic, bug_dir, bug, VARIABLE_CHANGES[bug])
    else:  # the raw training variables instead of the EMA shadows TF-slim evaluates with
        path = _export(MobileNetV2.from_checkpoint(synthetic_prefix, use_ema=False), bug_dir / "raw.onnx")
    report = verify(path, weights=synthetic)
    assert report.exit_code == 1
    assert report.first_divergence == first, report.format()
    if bug != "bgr":
        assert report.interface == INTERFACES["original"]
    assert len(report.hints) == 1 and hint in report.hints[0], report.hints
    assert report.format().splitlines()[-1].startswith(f"DIVERGES: first at {first}")


def test_bgr_graph_is_detected_as_bgr(synthetic, bug_dir):
    report = verify(_with_variables(synthetic, bug_dir, "bgr", bgr_weights), weights=synthetic)
    assert report.interface == {"layout": "NHWC", "color": "BGR", "scale": "[-1,1]"}
    # With the detected interface the rest of the network is right.
    assert all(m.max_rel_err < 5e-5 for m in report.matched)


def test_undeclared_bgr_graph_fails_unless_declared(synthetic, bug_dir):
    # No metadata: an NHWC model is expected to take the card's original interface (RGB).
    path = _with_variables(synthetic, bug_dir, "bgr", bgr_weights)
    proto = onnx.load(str(path))
    proto.producer_name = "someone"
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    report = verify(path, weights=synthetic)
    assert report.first_divergence == "input" and "RGB/BGR swap" in report.hints[0]
    declared = verify(path, weights=synthetic, interface={"layout": "NHWC", "color": "BGR", "scale": "[-1,1]"})
    assert declared.passed, declared.format()


def test_callable_with_scale_mixup(synthetic):
    def port(x):  # expects 0-255 although it declares nothing else than our interface
        return synthetic.endpoints((x - np.float32(127.5)) / np.float32(127.5), until="layer_4")

    report = verify(port, weights=synthetic)
    assert report.first_divergence == "input"
    assert report.interface["scale"] == "0-255"
    assert "[-1,1]/0-255 scale mix-up" in report.hints[0]


def test_onnx_port_with_imagenet_normalization(synthetic, bug_dir):
    # A PyTorch-style port: NCHW, fed ImageNet mean/std normalized RGB, no metadata.
    from onnx import helper, numpy_helper

    from mnv2ref.verify.interface import IMAGENET_MEAN, IMAGENET_STD

    path = _export(synthetic, bug_dir / "meanstd.onnx")
    proto = onnx.load(str(path))
    graph = proto.graph
    proto.producer_name = "pytorch-port"
    del proto.metadata_props[:]
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3  # (N, 3, 96, 96)
    graph.input[0].type.tensor_type.shape.dim[3].dim_value = SIZE
    transpose = _node(graph, "input/to_nchw")  # the graph is NCHW inside: drop the transpose ...
    std = numpy_helper.from_array((IMAGENET_STD * 2).reshape(1, 3, 1, 1), "std2")
    shift = numpy_helper.from_array(((IMAGENET_MEAN * 2) - 1).reshape(1, 3, 1, 1), "mean2")
    graph.initializer.extend([std, shift])
    # ... and undo the normalization: x_ours = (y * std + mean) * 2 - 1
    graph.node.remove(transpose)
    graph.node.insert(0, helper.make_node("Mul", ["input", "std2"], ["scaled"]))
    graph.node.insert(1, helper.make_node("Add", ["scaled", "mean2"], [transpose.output[0]]))
    onnx.save(proto, str(path))
    report = verify(path, weights=synthetic)
    assert report.interface == {"layout": "NCHW", "color": "RGB", "scale": "mean-std"}
    assert report.first_divergence == "input"
    assert "[-1,1]/mean-std scale mix-up" in report.hints[0], report.hints


def test_nchw_callable_passes(synthetic, x96):
    def port(x):
        if x.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W), got {x.shape}")
        out = synthetic.endpoints(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), until="layer_4")
        return {f"t{i}": v.transpose(0, 3, 1, 2) for i, v in enumerate(out.values())}

    report = verify(port, weights=synthetic)
    assert report.passed, report.format()
    assert report.interface["layout"] == "NCHW"
    assert [m.foreign for m in report.matched] == [f"t{i}" for i in range(10)]


def test_pytorch_dump_in_nchw_passes(synthetic, x96, ours96, bug_dir):
    path = write_dump(bug_dir / "torch.npz", x96, ours96, torch_names(synthetic))
    report = verify(path, weights=synthetic)
    assert report.passed, report.format()
    theirs = {m.name: m.foreign for m in report.endpoints}
    assert theirs["layer_4"] == "features.3" and theirs["layer_4/expansion_output"] == "features.3.conv.0"
    assert theirs["layer_2/depthwise_output"] == "features.1.conv.0"
    assert report.interface["layout"] == "NCHW"


def test_tensorflow_golden_file_passes(shared_dir, synthetic):
    # TensorFlow's own values, as a dump: `input` and 7 endpoints under our names.
    report = verify(shared_dir / "golden/synthetic_0.35_224_chelsea_ema.npz", weights=synthetic,
                    images=[shared_dir / "images/chelsea.png"])
    assert report.passed, report.format()
    assert [m.name for m in report.matched] == ["input", "layer_1", "layer_2", "layer_18", "layer_19",
                                                 "global_pool", "Logits", "Predictions"]


def test_h5_dump_named_by_endpoint_attributes(synthetic, x96, ours96, bug_dir):
    import h5py

    path = bug_dir / "golden.h5"  # as `mnv2ref golden -o FILE.h5 --layout NCHW` writes it
    with h5py.File(path, "w") as f:
        f["input"] = x96.transpose(0, 3, 1, 2)
        for name, value in ours96.items():
            dataset = f.create_dataset(name.replace("/", "."), data=value.transpose(0, 3, 1, 2)
                                       if value.ndim == 4 else value)
            dataset.attrs["endpoint"] = name
        f.attrs["endpoints"] = json.dumps(list(ours96))
    report = verify(path, weights=synthetic)
    assert report.passed and len(report.matched) == len(ours96) + 1, report.format()
    assert report.interface["layout"] == "NCHW"


def test_dump_with_pillow_resize(synthetic, bug_dir):
    from mnv2ref.resources import EXAMPLE_IMAGE

    pillow = next(v for k, v in resize_variants([EXAMPLE_IMAGE], (SIZE, SIZE)).items() if "Pillow" in k)
    path = write_dump(bug_dir / "resize.npz", pillow, synthetic.endpoints(pillow), torch_names(synthetic))
    report = verify(path, weights=synthetic)
    assert report.first_divergence == "input"
    assert len(report.hints) == 1 and "Pillow's bilinear" in report.hints[0]
    # Everything after the input is compared on their input, so it matches.
    assert all(m.max_rel_err < 5e-5 for m in report.matched if m.name != "input")


@pytest.mark.parametrize("kind", ["half-pixel", "torchvision"])
def test_dump_with_other_resizes(synthetic, bug_dir, kind):
    from mnv2ref.resources import EXAMPLE_IMAGE

    description, theirs = next((k, v) for k, v in resize_variants([EXAMPLE_IMAGE], (SIZE, SIZE)).items()
                               if kind in k)
    if kind == "half-pixel":  # as OpenCV would give it, rounded to 8 bits
        theirs = (np.round((theirs + 1) * 127.5) / np.float32(127.5) - 1).astype(np.float32)
    names = {k: f"t{i}" for i, k in enumerate(["layer_1", "layer_2"])}
    path = write_dump(bug_dir / f"{kind}.npz", theirs, synthetic.endpoints(theirs, until="layer_2"), names)
    report = verify(path, weights=synthetic)
    assert report.first_divergence == "input" and report.hints == [
        f"wrong preprocessing: their input is made with {description}"]


def test_dump_whose_first_conv_sees_bgr(synthetic, x96, ours96, bug_dir):
    theirs = {"layer_1": recompute(synthetic, "layer_1", x96, {}, "input_bgr")}
    for name in list(ours96)[1:]:
        theirs[name] = recompute(synthetic, name, x96, theirs)
    report = verify(write_dump(bug_dir / "bgr.npz", x96, theirs, torch_names(synthetic)), weights=synthetic)
    assert report.first_divergence == "layer_1"
    assert report.hints and "their first conv sees the colour channels in the other order" in report.hints[0]


def test_order_alignment_never_skips_to_a_better_tensor(synthetic, x96, ours96, bug_dir):
    # Unnamed tensors: layer_5/expansion_output is wrong, and a correct copy of it follows
    # later with the same shape. The alignment must take the tensor in its place.
    endpoints = dict(ours96)
    right = endpoints["layer_5/expansion_output"]
    endpoints["layer_5/expansion_output"] = right * np.float32(1.1)
    names = {k: f"t{i}" for i, k in enumerate(endpoints)}
    path = write_dump(bug_dir / "anon.npz", x96, endpoints, names, nchw=False)
    arrays = dict(np.load(path))
    arrays["zz_copy"] = right
    np.savez(path, **arrays)
    report = verify(path, weights=synthetic)
    assert report.first_divergence == "layer_5/expansion_output"
    assert {m.name: m.foreign for m in report.endpoints}["layer_5/expansion_output"] == names[
        "layer_5/expansion_output"]


# --- precision, JSON, errors -------------------------------------------------------------------

def test_float16_model_is_recognised(synthetic, bug_dir):
    from onnx import TensorProto, helper, numpy_helper

    path = _export(synthetic, bug_dir / "fp16.onnx")
    proto = onnx.load(str(path))
    graph = proto.graph
    for i, init in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                              init.name))
    for node in graph.node:
        node.input[:] = [f"{n}/fp16" if n == "input" else n for n in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["input"], ["input/fp16"], to=TensorProto.FLOAT16))
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.output[:] = [f"{n}/fp16" if n in outputs else n for n in node.output]
        node.input[:] = [f"{n}/fp16" if n in outputs else n for n in node.input]
    for name in outputs:
        graph.node.append(helper.make_node("Cast", [f"{name}/fp16"], [name], to=TensorProto.FLOAT))
    onnx.save(proto, str(path))
    report = verify(path, weights=synthetic)
    assert report.precision == "float16" and report.tolerance == 0.1
    assert report.passed, report.format()
    assert 1e-4 < report.matched[0].max_rel_err < 5e-3  # float16 rounding, not float32's
    assert any("error by layer" in note for note in report.notes)
    assert "float16 error grows from" in report.format().splitlines()[-1]


def test_int8_model_is_recognised(synthetic, bug_dir, x96):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from mnv2ref.onnx_export import export_onnx

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = [{"input": x96}, {"input": np.ascontiguousarray(x96[:, ::-1])}]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    float_model = export_onnx(synthetic, bug_dir / "float.onnx", resolution=SIZE, batch=1)
    quantize_static(str(float_model), str(bug_dir / "int8.onnx"), Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    report = verify(bug_dir / "int8.onnx", weights=synthetic)
    assert report.precision == "int8" and report.tolerance == 0.25
    assert report.passed, report.format()
    # The quantized tensors (what the next layer reads), not the conv outputs the quantizer
    # left with the fused ReLU6's name.
    theirs = {m.name: m.foreign for m in report.endpoints}
    assert theirs["layer_1"].endswith("DequantizeLinear_Output")
    assert all(m.cosine > 0.95 for m in report.matched)
    assert "int8 error grows from" in report.format().splitlines()[-1]


def test_keras_classes_without_background(synthetic):
    from mnv2ref.layers import softmax

    def keras_like(x):
        out = synthetic.endpoints(x)
        logits = out["Logits"][:, 1:]  # Keras dropped class 0
        return {"layer_19": out["layer_19"], "Logits": logits, "predictions": softmax(logits)}

    report = verify(keras_like, weights=synthetic)
    assert report.passed, report.format()
    assert {m.name: m.foreign for m in report.matched} == {
        "layer_19": "layer_19", "Logits": "Logits", "Predictions": "predictions"}
    assert any("1000 classes" in note for note in report.notes)


def test_json_schema(synthetic, x96, ours96, bug_dir):
    path = write_dump(bug_dir / "torch.npz", x96, ours96, torch_names(synthetic))
    data = json.loads(verify(path, weights=synthetic).to_json())
    assert set(data) >= {"model", "interface", "endpoints", "first_divergence", "hints", "tolerance"}
    assert set(data["interface"]) == {"layout", "color", "scale"}
    assert all(set(e) == {"name", "foreign", "max_rel_err", "cosine"} for e in data["endpoints"])
    assert data["first_divergence"] is None and data["tolerance"] == 5e-5
    unmatched = [e for e in data["endpoints"] if e["foreign"] is None]
    assert [e["name"] for e in unmatched] == ["global_pool", "Predictions"]  # torchvision has no names for them
    assert all(e["max_rel_err"] is None for e in unmatched)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mnv2ref", "verify", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_exit_codes(synthetic, synthetic_prefix, x96, ours96, bug_dir):
    good = write_dump(bug_dir / "torch.npz", x96, ours96, torch_names(synthetic))
    result = _cli(good, "--weights", synthetic_prefix, "--json", "-")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["first_divergence"] is None  # stdout is the JSON alone
    assert result.stderr.rstrip().splitlines()[-1].startswith("PASS")

    bad_endpoints = {**ours96, "layer_9": ours96["layer_9"] + np.float32(0.5)}
    bad = write_dump(bug_dir / "bad.npz", x96, bad_endpoints, torch_names(synthetic))
    out = bug_dir / "report.json"
    result = _cli(bad, "--weights", synthetic_prefix, "--json", out)
    assert result.returncode == 1, result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith("DIVERGES: first at layer_9")
    assert json.loads(out.read_text())["first_divergence"] == "layer_9"

    result = _cli(bug_dir / "missing.onnx", "--weights", synthetic_prefix)
    assert result.returncode == 2 and "mnv2ref: error:" in result.stderr and "missing.onnx" in result.stderr


def test_onnx_session_threads_and_no_spinning(peers):
    options = load_foreign(peers / "tf2onnx_mobilenet_v2_0.35_224.onnx", threads=1).session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


@pytest.mark.parametrize("name, modules", [
    ("tf2onnx_mobilenet_v2_0.35_224.onnx", ["onnxruntime"]),
    ("openvino_converted_0.35_224.xml", ["openvino"]),
    ("tflite_mobilenet_v2_0.35_224.tflite", ["ai_edge_litert", "tflite_runtime"]),
])
def test_missing_runtime_names_the_extra(peers, monkeypatch, name, modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r'pip install "mnv2ref\[verify\]"'):
        load_foreign(peers / name)


def test_keras_file_without_keras(peers):
    try:
        import keras  # noqa: F401
        pytest.skip("keras is installed")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match=r"keras.*mnv2ref\[verify\]"):
        load_foreign(peers / "keras_mobilenet_v2_0.35_224.h5")


def test_verify_is_callable_and_a_package(synthetic):
    import mnv2ref
    import mnv2ref.verify as package

    assert mnv2ref.verify is package and mnv2ref.verify.load_foreign is load_foreign
    report = mnv2ref.verify(lambda x: synthetic.endpoints(x, until="layer_1"), weights=synthetic)
    assert report.passed and [m.name for m in report.matched] == ["layer_1"]


def test_interface_argument_parsing():
    from mnv2ref.verify.interface import parse

    assert parse("converted") == INTERFACES["converted"]
    assert parse("NCHW,RGB,[-1,1]") == {"layout": "NCHW", "color": "RGB", "scale": "[-1,1]"}
    assert parse("NHWC,BGR,mean-std")["scale"] == "mean-std"
    with pytest.raises(InputError, match="LAYOUT,COLOR,SCALE"):
        parse("NCHW,RGB")


def test_nothing_matched_is_an_error(synthetic, x96, bug_dir):
    path = bug_dir / "unrelated.npz"
    np.savez(path, input=x96, features=np.zeros((1, 7, 7, 5), np.float32))
    with pytest.raises(InputError, match="none of its tensors"):
        verify(path, weights=synthetic)


def test_unknown_file_type(tmp_path):
    with pytest.raises(InputError, match="expected an .onnx"):
        load_foreign(tmp_path / "model.pt")


def test_load_foreign_predict_in_our_interface(peers, synthetic):
    foreign = load_foreign(peers / "openvino_converted_0.35_224.xml")
    assert foreign.interface == INTERFACES["converted"]  # the card's, for an NCHW model
    x = reference_input()
    foreign.interface = INTERFACES["original"] | {"layout": "NCHW"}
    assert foreign.detect_interface(synthetic, x) == INTERFACES["converted"] == foreign.interface
    probs = foreign.predict(x)
    assert probs.shape == (1, 1001)
    np.testing.assert_allclose(probs, synthetic.predict(x, backend="numpy"), atol=2e-6)
