"""The ONNX export, run by onnxruntime, against TensorFlow's goldens and our NumPy model."""

import os

import numpy as np
import pytest

import mnv2ref
from mnv2ref.errors import MissingDependencyError
from mnv2ref.compare import relative_error
from mnv2ref.onnx_export import export_onnx, onnx_session

if os.environ.get("CI") != "true":  # on CI the ONNX packages are required: fail, never skip
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

import onnx

TOLERANCE = 5e-5  # max|ours - golden| / max|golden|, float32, as in test_golden.py


def run(path, x):
    session = onnx_session(path, threads=2)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x})))


@pytest.fixture(scope="module")
def backbone_onnx(backbone, tmp_path_factory):
    return export_onnx(backbone, tmp_path_factory.mktemp("onnx") / "backbone.onnx", endpoints=True)


@pytest.mark.parametrize("image", ["chelsea", "coffee"])
def test_backbone_onnx_matches_tensorflow(golden, backbone_onnx, image):
    expected = golden(f"backbone_1.0_224_{image}")
    out = run(backbone_onnx, expected["input"])
    names = [name for name in expected if name != "input"]
    assert {f"layer_{i}" for i in range(1, 20)} | {"global_pool"} <= set(names)
    errors = {}
    for name in names:
        ours = out[name]
        if name == "global_pool":  # ONNX gives the embedding (N, C); the golden is (N, 1, 1, C)
            assert ours.shape == (1, 1280)
            ours = ours.reshape(expected[name].shape)
        assert ours.shape == expected[name].shape, name
        assert ours.dtype == np.float32, name
        errors[name] = relative_error(ours, expected[name])
    bad = {name: e for name, e in errors.items() if not e <= TOLERANCE}
    assert not bad, f"ONNX endpoints off the golden: {bad}"


def test_synthetic_onnx_logits_and_predictions(golden, synthetic, tmp_path):
    expected = golden("synthetic_0.35_224_chelsea_ema")
    path = export_onnx(synthetic, tmp_path / "synthetic.onnx", endpoints=True)
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()][:3] == ["global_pool", "Logits", "Predictions"]
    out = run(path, expected["input"])
    assert out["Logits"].shape == out["Predictions"].shape == (1, 1001)
    for name in ("layer_1", "layer_2", "layer_18", "layer_19", "Logits", "Predictions"):
        assert relative_error(out[name], expected[name]) <= TOLERANCE, name
    assert relative_error(out["global_pool"].reshape(1, 1, 1, -1), expected["global_pool"]) <= TOLERANCE
    assert out["Predictions"].argmax() == expected["Predictions"].argmax()
    np.testing.assert_allclose(out["Predictions"].sum(), 1.0, rtol=1e-5)


def test_graph_uses_explicit_asymmetric_tf_pads(backbone, tmp_path):
    proto = onnx.load(str(export_onnx(backbone, tmp_path / "m.onnx")))
    onnx.checker.check_model(proto)
    graph = proto.graph
    assert [i.name for i in graph.input] == ["input"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 224, 224, 3]
    assert [o.name for o in graph.output] == ["global_pool"]
    ops = {node.op_type for node in graph.node}
    assert ops <= {"Transpose", "Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Identity"}
    assert graph.node[0].op_type == "Transpose"
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 52
    attrs = {node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
             for node in convs}
    stem = attrs["MobilenetV2/Conv/Conv2D"]
    assert stem["strides"] == [2, 2] and stem["pads"] == [0, 0, 1, 1]  # 224 -> 112: pad after only
    first_dw = attrs["MobilenetV2/expanded_conv/depthwise/Conv2D"]
    assert first_dw["group"] == 32 and first_dw["pads"] == [1, 1, 1, 1]
    assert sum(a["group"] > 1 for a in attrs.values()) == 17
    assert sum(node.op_type == "Add" for node in graph.node) == 10


def test_odd_resolution_and_batch_match_numpy_backend(backbone, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 225, 193, 3)).astype(np.float32)
    path = export_onnx(backbone, tmp_path / "odd.onnx", resolution=(225, 193), endpoints=True)
    out = run(path, x)
    assert out["layer_1"].shape == (3, 113, 97, 32)
    assert out["layer_19"].shape == (3, 8, 7, 1280)
    # Reference: our NumPy backend in float64. Against the float32 NumPy run the
    # deepest layers differ by ~1.5e-5, but that run is itself ~1e-5 off the
    # float64 result at layer_19: float32 rounding of two different summation
    # orders, not an export error.
    truth = backbone.endpoints(x.astype(np.float64), backend="numpy")
    for name in [f"layer_{i}" for i in range(1, 20)]:
        assert relative_error(out[name], truth[name]) <= 1e-5, name
    assert relative_error(out["global_pool"], truth["global_pool"].reshape(3, -1)) <= 1e-5
    ours32 = backbone.embed(x, backend="numpy")
    assert relative_error(out["global_pool"], ours32) <= 1e-5
    # each image of the batch is computed independently: batch of 1 == slice of batch of 3
    single = run(path, x[1:2])["global_pool"]
    np.testing.assert_allclose(out["global_pool"][1:2], single, rtol=1e-5, atol=1e-6)


def test_fixed_batch_and_old_opset(synthetic, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (3, 96, 96, 3)).astype(np.float32)
    expected = synthetic.predict(x, backend="numpy")
    for opset in (13, 10):  # opset 10: Clip bounds as attributes
        path = export_onnx(synthetic, tmp_path / f"b3_{opset}.onnx", opset=opset, batch=3, resolution=96)
        proto = onnx.load(str(path))
        assert proto.opset_import[0].version == opset
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [3, 96, 96, 3]
        out = run(path, x)
        assert relative_error(out["Predictions"], expected) <= 1e-5
    with pytest.raises(Exception, match="invalid dimensions"):  # a fixed batch of 3 refuses 2
        run(path, x[:2])


def test_write_is_atomic_and_arguments_checked(backbone, tmp_path):
    path = tmp_path / "out" / "m.onnx"
    assert export_onnx(backbone, path, resolution=64) == path
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    for bad in (dict(opset=5), dict(opset=10_000), dict(batch=0), dict(resolution=0),
                dict(resolution=(224,))):
        with pytest.raises(mnv2ref.InputError):
            export_onnx(backbone, tmp_path / "bad.onnx", **bad)
    assert not (tmp_path / "bad.onnx").exists()


def test_missing_onnx_is_a_clear_error(backbone, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(MissingDependencyError, match="pip install onnx onnxruntime"):
        export_onnx(backbone, tmp_path / "m.onnx")
    assert issubclass(MissingDependencyError, mnv2ref.Mnv2refError)
