"""Keras Applications weights files: `MobileNetV2.from_keras_h5`, `mnv2ref convert`, 1000 classes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import mnv2ref
from mnv2ref.compare import relative_error
from mnv2ref.keras import KERAS_CLASSES, convert_keras, is_keras_h5, read_keras_h5
from mnv2ref.resources import label, labels

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 5e-5


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mnv2ref", *map(str, args)], capture_output=True,
                          text=True, env=env)


@pytest.fixture(scope="session")
def keras_035(shared_dir):
    return shared_dir / "peers" / "keras_mobilenet_v2_0.35_224.h5"


@pytest.fixture(scope="session")
def keras_model(keras_035):
    return mnv2ref.MobileNetV2.from_keras_h5(keras_035)


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_keras_035_is_the_tf_checkpoints_ema_network(keras_model, synthetic, golden):
    assert keras_model.depth_multiplier == 0.35 and keras_model.num_classes == 1000
    assert keras_model.metadata["classes"] == KERAS_CLASSES
    # the same tensors, bit for bit, except the background class Keras dropped
    assert set(keras_model.variables) == set(synthetic.variables)
    for name, value in keras_model.variables.items():
        expected = synthetic.variables[name][..., 1:] if "Logits" in name else synthetic.variables[name]
        assert np.array_equal(value, expected), name

    expected = golden("synthetic_0.35_224_chelsea_ema")
    ours = keras_model.endpoints(expected["input"])
    for name in ("layer_1", "layer_19", "global_pool"):
        assert relative_error(ours[name], expected[name]) <= TOLERANCE, name
    tf_logits = expected["Logits"].astype(np.float64)
    assert relative_error(ours["Logits"], tf_logits[:, 1:]) <= TOLERANCE
    assert relative_error(ours["Predictions"], softmax(tf_logits[:, 1:])) <= TOLERANCE
    assert ours["Predictions"].shape == (1, 1000)
    assert ours["Predictions"].argmax() + 1 == expected["Predictions"].argmax()
    probs = keras_model.predict(expected["input"], backend="numba")
    assert relative_error(probs, softmax(tf_logits[:, 1:])) <= TOLERANCE


def test_keras_no_top_is_the_real_backbone(shared_dir, golden):
    model = mnv2ref.MobileNetV2.load(shared_dir / "peers" / "keras_mobilenet_v2_1.0_224_no_top.h5")
    assert model.depth_multiplier == 1.0 and model.num_classes == 0
    assert model.metadata["source_format"] == "keras"
    expected = golden("backbone_1.0_224_chelsea")
    ours = model.endpoints(expected["input"])
    for name in ("layer_19", "global_pool", "layer_15/expansion_output"):
        assert relative_error(ours[name], expected[name]) <= TOLERANCE, name


def test_labels_of_1000_classes_are_tf_slims_shifted_by_one():
    assert label(0, 1001) == "background"
    assert label(281, 1000) == label(282, 1001) == labels()[282] == "tabby"
    assert [label(i, 1000) for i in range(1000)] == list(labels()[1:])
    assert label(3, 10) == "class 3"


def test_convert_round_trips(keras_035, keras_model, tmp_path):
    out = tmp_path / "keras.h5"
    result = run_cli("convert", keras_035, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    converted = mnv2ref.MobileNetV2.from_h5(out)
    assert converted.num_classes == 1000 and converted.depth_multiplier == 0.35
    assert converted.metadata["classes"] == KERAS_CLASSES
    assert converted.metadata["source_format"] == "keras"
    assert list(converted.metadata["source_sha256"]) == [keras_035.name]
    assert set(converted.variables) == set(keras_model.variables)
    for name, value in keras_model.variables.items():
        assert np.array_equal(converted.variables[name], value), name
    assert not is_keras_h5(out) and is_keras_h5(keras_035)

    result = run_cli("convert", keras_035, tmp_path / "raw.h5", "--raw")
    assert result.returncode == 1 and "TF checkpoints only" in result.stderr
    assert not (tmp_path / "raw.h5").exists()
    result = run_cli("convert", out, tmp_path / "again.h5")  # ours, not Keras's
    assert result.returncode == 1 and "not a Keras weights file" in result.stderr


def test_classify_and_demo_with_1000_classes(keras_035, shared_dir, golden):
    result = run_cli("classify", shared_dir / "images" / "chelsea.png", "--weights", keras_035,
                     "--backend", "numpy", "--top", "1")
    assert result.returncode == 0, result.stderr
    tf_top = int(golden("synthetic_0.35_224_chelsea_ema")["Predictions"].argmax())
    index, name, _ = result.stdout.split("\t")[1].split(":")
    assert int(index) == tf_top - 1 and name == labels()[tf_top]

    result = run_cli("demo", "--weights", keras_035, "--backend", "numpy", "--size", "96")
    assert result.returncode == 0, result.stderr
    assert "1000 classes" in result.stdout and "top-5:" in result.stdout


@pytest.fixture
def edited_copy(keras_035, tmp_path):
    """A writable copy of the Keras 0.35 file."""
    path = tmp_path / "edited.h5"
    shutil.copyfile(keras_035, path)
    return path


def test_missing_layer_is_named(edited_copy):
    with h5py.File(edited_copy, "r+") as f:
        del f["block_5_project"]
    with pytest.raises(mnv2ref.WeightsError, match="layer block_5_project is listed in layer_names but has no group"):
        read_keras_h5(edited_copy)
    with h5py.File(edited_copy, "r+") as f:
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != "block_5_project"]
    with pytest.raises(mnv2ref.WeightsError, match=r"Keras layer block_5_project is missing .*"
                                                   r"block_5_project/block_5_project/kernel:0 .*"
                                                   r"MobilenetV2/expanded_conv_5/project/weights"):
        mnv2ref.MobileNetV2.from_keras_h5(edited_copy)


def test_missing_dataset_is_named(edited_copy):
    with h5py.File(edited_copy, "r+") as f:
        del f["block_2_depthwise_BN/block_2_depthwise_BN/moving_variance:0"]
    with pytest.raises(mnv2ref.WeightsError, match="layer block_2_depthwise_BN lists weight "
                                                   "block_2_depthwise_BN/moving_variance:0 but has no dataset"):
        read_keras_h5(edited_copy)


def test_wrong_shape_is_named(edited_copy):
    with h5py.File(edited_copy, "r+") as f:
        group = f["block_7_expand"]
        del group["block_7_expand/kernel:0"]
        group.create_dataset("block_7_expand/kernel:0", data=np.zeros((1, 1, 24, 100), np.float32))
    with pytest.raises(mnv2ref.WeightsError, match=r"MobilenetV2/expanded_conv_7/expand/weights \(Keras "
                                                   r"dataset block_7_expand/block_7_expand/kernel:0\) has "
                                                   r"shape \(1, 1, 24, 100\), expected \(1, 1, 24, 144\)"):
        read_keras_h5(edited_copy)


def test_unknown_weighted_layer_and_non_keras_files_are_refused(edited_copy, tmp_path):
    with h5py.File(edited_copy, "r+") as f:
        f.attrs["layer_names"] = [*f.attrs["layer_names"], "dense_extra"]
        group = f.create_group("dense_extra")
        group.attrs["weight_names"] = ["dense_extra/kernel:0"]
        group.create_dataset("dense_extra/kernel:0", data=np.zeros((4, 4), np.float32))
    with pytest.raises(mnv2ref.WeightsError, match="Keras layer dense_extra has weights"):
        read_keras_h5(edited_copy)
    text = tmp_path / "not.h5"
    text.write_text("not HDF5")
    assert not is_keras_h5(text)
    with pytest.raises(mnv2ref.WeightsError, match="not.h5: cannot read"):
        read_keras_h5(text)


def test_keras_reader_does_not_import_the_model():
    code = "import sys, mnv2ref.keras; assert 'mnv2ref.model' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0
