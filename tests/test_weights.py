"""Checkpoint -> HDF5 -> model, variable selection, and refusals of bad weights."""

import json

import h5py
import numpy as np
import pytest

import mnv2ref
from mnv2ref.architecture import variable_shapes
from mnv2ref.errors import WeightsError
from mnv2ref.weights import EMA_SUFFIX, read_h5, select_variables, write_h5



@pytest.fixture(scope="module")
def converted(synthetic_prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("h5") / "synthetic.h5"
    assert mnv2ref.convert(synthetic_prefix, out) == out
    return out


def test_convert_writes_ema_values_and_metadata(converted, synthetic_prefix):
    checkpoint = mnv2ref.read_checkpoint(synthetic_prefix)
    variables, attributes = read_h5(converted)
    assert set(variables) == set(variable_shapes(0.35, 1001))
    for name, value in variables.items():
        np.testing.assert_array_equal(value, checkpoint[name + EMA_SUFFIX])
    assert attributes["depth_multiplier"] == 0.35
    assert attributes["num_classes"] == 1001
    assert attributes["use_ema"] is True or attributes["use_ema"] == 1
    assert attributes["format_version"] == 1
    assert set(attributes["source_files"]) == {"model.ckpt.index", "model.ckpt.data-00000-of-00001"}
    assert all(len(digest) == 64 for digest in attributes["source_sha256"].values())
    assert not list(converted.parent.glob(".*.tmp")), "temporary file left behind"


def test_convert_raw(tmp_path, synthetic_prefix):
    out = mnv2ref.convert(synthetic_prefix, tmp_path / "raw.h5", use_ema=False)
    checkpoint = mnv2ref.read_checkpoint(synthetic_prefix)
    variables, attributes = read_h5(out)
    assert not attributes["use_ema"]
    name = "MobilenetV2/Conv/weights"
    np.testing.assert_array_equal(variables[name], checkpoint[name])


def test_round_trip_gives_bit_identical_endpoints(converted, tmp_path, backbone_prefix, synthetic_prefix):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 96, 80, 3)).astype(np.float32)
    from_checkpoint = mnv2ref.MobileNetV2.from_checkpoint(synthetic_prefix).endpoints(x)
    from_h5 = mnv2ref.MobileNetV2.from_h5(converted).endpoints(x)
    assert from_checkpoint.keys() == from_h5.keys()
    for name in from_h5:
        np.testing.assert_array_equal(from_h5[name], from_checkpoint[name], err_msg=name)

    backbone_h5 = mnv2ref.convert(backbone_prefix, tmp_path / "backbone.h5")
    a = mnv2ref.MobileNetV2.from_checkpoint(backbone_prefix).endpoints(x)["global_pool"]
    b = mnv2ref.MobileNetV2.from_h5(backbone_h5).endpoints(x)["global_pool"]
    np.testing.assert_array_equal(a, b)
    assert mnv2ref.MobileNetV2.from_h5(backbone_h5).num_classes == 0


def test_ema_selection_rules():
    raw = {"MobilenetV2/a": np.zeros(1), "MobilenetV2/b": np.ones(1), "global_step": np.int64(3),
           "MobilenetV2/a/RMSProp": np.zeros(1)}
    variables, used_ema = select_variables(raw)
    assert set(variables) == {"MobilenetV2/a", "MobilenetV2/b"} and not used_ema
    partial = dict(raw, **{"MobilenetV2/a" + EMA_SUFFIX: np.full(1, 7.0)})
    with pytest.raises(WeightsError, match="MobilenetV2/b"):
        select_variables(partial)
    variables, used_ema = select_variables(partial, use_ema=False)
    assert variables["MobilenetV2/a"][0] == 0 and not used_ema


def test_bad_h5_files_are_refused_with_the_tensor_named(converted, tmp_path):
    variables, attributes = read_h5(converted)
    attributes = {k: v for k, v in attributes.items() if k not in ("format", "format_version")}
    name = "MobilenetV2/expanded_conv_3/expand/weights"
    missing = write_h5(tmp_path / "missing.h5", {k: v for k, v in variables.items() if k != name},
                       attributes)
    with pytest.raises(WeightsError, match=name):
        mnv2ref.MobileNetV2.from_h5(missing)

    wrong = write_h5(tmp_path / "wrong.h5", dict(variables, **{name: np.zeros((1, 1, 8, 9))}),
                     attributes)
    with pytest.raises(WeightsError, match=r"expanded_conv_3/expand/weights has shape \(1, 1, 8, 9\)"):
        mnv2ref.MobileNetV2.from_h5(wrong)

    not_ours = tmp_path / "other.h5"
    with h5py.File(not_ours, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(WeightsError, match="not a MobileNetV2.*MobilenetV2/Conv/weights is missing"):
        mnv2ref.MobileNetV2.from_h5(not_ours)

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "keras"
    with pytest.raises(WeightsError, match="not an mnv2ref weights file"):
        mnv2ref.MobileNetV2.from_h5(foreign)


def test_h5_edited_after_writing_warns_and_names_what_is_wrong(converted, tmp_path):
    edited = tmp_path / "edited.h5"
    edited.write_bytes(converted.read_bytes())
    name = "MobilenetV2/expanded_conv_3/expand/weights"
    with h5py.File(edited, "r+") as f:
        del f[name]
    with pytest.warns(mnv2ref.Mnv2refWarning, match="changed since mnv2ref wrote it"):
        with pytest.raises(WeightsError, match=f"tensor {name} is missing"):
            mnv2ref.MobileNetV2.from_h5(edited)

    relabelled = tmp_path / "relabelled.h5"
    raw = bytearray(converted.read_bytes())
    raw[40] = ord("0") if raw[40] != ord("0") else ord("1")  # a digit of the recorded digest
    relabelled.write_bytes(bytes(raw))
    with pytest.warns(mnv2ref.Mnv2refWarning):
        model = mnv2ref.MobileNetV2.from_h5(relabelled)  # the data itself is intact
    assert model.depth_multiplier == 0.35


def test_missing_and_garbage_h5(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(WeightsError, match="garbage.h5"):
        mnv2ref.MobileNetV2.from_h5(garbage)
    with pytest.raises(WeightsError, match="no such"):
        mnv2ref.MobileNetV2.from_h5(tmp_path / "absent.h5")


def test_failed_convert_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    with pytest.raises(mnv2ref.Mnv2refError):
        mnv2ref.convert(tmp_path / "no_such.ckpt", out)
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.h5"]


def test_non_mobilenet_weights_are_refused():
    with pytest.raises(WeightsError, match="not a MobileNetV2"):
        mnv2ref.MobileNetV2({"some/other/net": np.zeros((3, 3))})


def test_source_sha256_is_json(converted):
    with h5py.File(converted, "r") as f:
        assert isinstance(json.loads(f.attrs["source_sha256"]), dict)
