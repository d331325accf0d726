"""Golden files (`mnv2ref golden`, `mnv2ref.golden`) and `mnv2ref.testing.assert_endpoints_close`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import mnv2ref
from mnv2ref.compare import relative_error
from mnv2ref.golden import METADATA_FIELDS, METADATA_KEY, endpoint_order, read_golden, transpose_layout, write_golden
from mnv2ref.testing import assert_endpoints_close
from mnv2ref.weights import sha256_of

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 5e-5


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mnv2ref", *map(str, args)], capture_output=True, env=env)


@pytest.fixture(scope="session")
def chelsea(shared_dir):
    return shared_dir / "images" / "chelsea.png"


@pytest.fixture(scope="session")
def small_golden(synthetic, chelsea, shared_dir, tmp_path_factory):
    """The synthetic 0.35 model on two photos at 96x96, NHWC float32 .npz."""
    path = tmp_path_factory.mktemp("golden") / "synthetic_96.npz"
    write_golden(synthetic, [chelsea, shared_dir / "images" / "coffee.png"], path, size=96)
    return path


def test_nchw_golden_of_the_real_backbone_matches_tensorflow(backbone, chelsea, golden, tmp_path):
    path = write_golden(backbone, [chelsea], tmp_path / "backbone.npz", layout="NCHW")
    arrays, metadata = read_golden(path)
    tf = golden("backbone_1.0_224_chelsea")
    assert metadata["layout"] == "NCHW" and arrays["input"].shape == (1, 3, 224, 224)
    assert arrays["layer_3/expansion_output"].shape == (1, 96, 112, 112)
    assert arrays["global_pool"].shape == (1, 1280, 1, 1)
    assert set(tf) <= set(arrays)
    for name, expected in tf.items():
        ours = transpose_layout(arrays[name], "NCHW", "NHWC")
        assert ours.dtype == np.float32
        assert relative_error(ours, expected) <= TOLERANCE, name
    assert np.array_equal(transpose_layout(arrays["input"], "NCHW", "NHWC"), tf["input"])
    # TensorFlow's NHWC endpoints pass against our NCHW file: the layout is told by the shapes
    errors = assert_endpoints_close(tf, path)
    assert set(errors) == set(tf)


def test_every_endpoint_is_stored_in_network_order(synthetic, small_golden):
    arrays, metadata = read_golden(small_golden)
    x = arrays["input"]
    assert x.shape == (2, 96, 96, 3) and x.dtype == np.float32
    expected = ["input", *synthetic.endpoints(x[:1], backend="numpy")]
    assert list(arrays) == expected == metadata["endpoints"]
    assert expected == sorted(expected, key=endpoint_order)
    for name in ("layer_2/depthwise_output", "layer_3/expansion_output", "layer_4/projection_output",
                 "layer_19", "global_pool", "Logits", "Predictions"):
        assert name in arrays and arrays[name].shape[0] == 2, name
    # the two images are stacked: each row is that image's own run
    alone = synthetic.endpoints(x[1:], backend="numpy")
    assert relative_error(arrays["layer_19"][1:], alone["layer_19"]) <= 1e-6


def test_metadata(synthetic, synthetic_prefix, small_golden):
    _, metadata = read_golden(small_golden)
    assert list(metadata) == list(METADATA_FIELDS)  # every field documented
    assert metadata["format"] == "mnv2ref-golden" and metadata["format_version"] == 1
    assert metadata["mnv2ref_version"] == mnv2ref.__version__
    assert metadata["dtype"] == "float32" and metadata["layout"] == "NHWC" and metadata["size"] == [96, 96]
    assert [Path(p).name for p in metadata["images"]] == ["chelsea.png", "coffee.png"]
    assert metadata["weights"] == synthetic.source
    index = Path(str(synthetic_prefix) + ".index")
    assert metadata["weights_sha256"][index.name] == sha256_of(index)
    assert len(metadata["weights_sha256"]) == 2  # the .index and its one data shard
    assert metadata["weights_values"] == "ema"
    assert metadata["num_classes"] == 1001 and "background" in metadata["classes"]
    assert metadata["preprocessing"]["central_crop"] == 0.875
    assert "legacy" in metadata["preprocessing"]["resize"]
    assert metadata["tolerance"] == 5e-5 and metadata["tolerances"]["float64"] == 1e-12


def test_npz_reads_with_numpy_alone(small_golden):
    with np.load(small_golden, allow_pickle=False) as data:  # the README's example
        metadata = json.loads(str(data[METADATA_KEY]))
        assert data[METADATA_KEY].shape == ()
        assert data["layer_3/expansion_output"].shape == (2, 48, 48, 48)
        assert metadata["endpoints"] == [name for name in data.files if name != METADATA_KEY]


def test_float64_h5_nchw(synthetic, chelsea, golden, tmp_path):
    path = write_golden(synthetic, [chelsea], tmp_path / "g.h5", layout="NCHW", dtype="float64")
    with h5py.File(path, "r") as f:  # the README's example: h5py alone
        assert f.attrs["dtype"] == "float64" and f.attrs["tolerance"] == 1e-12
        assert f["layer_3.expansion_output"].attrs["endpoint"] == "layer_3/expansion_output"
        assert f["layer_1"].shape == (1, 16, 112, 112) and f["layer_1"].dtype == np.float64
        assert json.loads(f.attrs["endpoints"])[:3] == ["input", "layer_1", "layer_2/depthwise_output"]
    arrays, metadata = read_golden(path)
    assert metadata["tolerance"] == 1e-12 and metadata["images"] == [str(chelsea)]
    assert list(arrays) == metadata["endpoints"]
    # float64 against TensorFlow's float32 goldens: within the float32 tolerance
    assert_endpoints_close(golden("synthetic_0.35_224_chelsea_ema"), path, tolerance=TOLERANCE)
    # the other backend in float64 meets the file's own float64 tolerance, in NHWC
    x = transpose_layout(arrays["input"], "NCHW", "NHWC")
    numba = synthetic.endpoints(x, backend="numba")
    errors = assert_endpoints_close(numba, path)
    assert max(errors.values()) <= 1e-12 and len(errors) == len(arrays) - 1
    # a float32 run is not float64-exact, but within the float32 tolerance
    float32 = synthetic.endpoints(x.astype(np.float32), backend="numpy")
    with pytest.raises(AssertionError, match="tolerance 1e-12"):
        assert_endpoints_close(float32, path)
    assert_endpoints_close(float32, path, tolerance=metadata["tolerances"]["float32"])


def test_bad_arguments_write_nothing(synthetic, chelsea, tmp_path):
    for kwargs in ({"layout": "CHWN"}, {"dtype": "float16"}):
        with pytest.raises(mnv2ref.InputError):
            write_golden(synthetic, [chelsea], tmp_path / "g.npz", size=64, **kwargs)
    with pytest.raises(mnv2ref.InputError, match=r"\.npz, \.h5"):
        write_golden(synthetic, [chelsea], tmp_path / "g.npy", size=64)
    with pytest.raises(mnv2ref.InputError, match="no images"):
        write_golden(synthetic, [], tmp_path / "g.npz", size=64)
    assert list(tmp_path.iterdir()) == []


def test_cli_golden(synthetic_prefix, chelsea, tmp_path):
    out = tmp_path / "g.h5"
    result = run_cli("golden", chelsea, "-o", out, "--layout", "NCHW", "--size", "64",
                     "--weights", synthetic_prefix, "--raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == str(out)
    arrays, metadata = read_golden(out)
    assert arrays["input"].shape == (1, 3, 64, 64) and metadata["weights_values"] == "raw"

    result = run_cli("golden", chelsea, "-o", "-", "--size", "64", "--weights", synthetic_prefix,
                     "--dtype", "float64")
    assert result.returncode == 0, result.stderr
    (tmp_path / "stdout.npz").write_bytes(result.stdout)
    arrays, metadata = read_golden(tmp_path / "stdout.npz")
    assert metadata["dtype"] == "float64" and arrays["layer_19"].dtype == np.float64

    result = run_cli("golden", chelsea, "-o", tmp_path / "g.txt", "--weights", synthetic_prefix)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("mnv2ref: error: golden file") and not (tmp_path / "g.txt").exists()


# --- assert_endpoints_close -------------------------------------------------------------


def test_passes_on_our_own_endpoints(small_golden):
    arrays, _ = read_golden(small_golden)
    errors = assert_endpoints_close(arrays, small_golden)
    assert len(errors) == len(arrays) and max(errors.values()) == 0
    assert assert_endpoints_close({"layer_5": arrays["layer_5"]}, arrays) == {"layer_5": 0.0}


def test_names_the_first_failing_endpoint_and_where(small_golden):
    arrays, _ = read_golden(small_golden)
    theirs = {name: value.copy() for name, value in reversed(arrays.items())}
    theirs["layer_9"][1, 2, 3, 4] += 10.0
    theirs["layer_7"][0, 1, 2, 3] += 1.0  # earlier in the network: reported first
    expected = arrays["layer_7"][0, 1, 2, 3]
    with pytest.raises(AssertionError) as failure:
        assert_endpoints_close(theirs, small_golden)
    message = str(failure.value)
    assert message.startswith("layer_7 differs from the golden")
    assert "golden[0, 1, 2, 3]" in message and f"vs golden {expected:.8g}" in message
    assert f"theirs {expected + np.float32(1):.8g}" in message
    assert "tolerance 5e-05" in message and "also failing:" in message and "layer_9" in message


def test_their_layout_may_differ(small_golden):
    arrays, _ = read_golden(small_golden)
    nchw = {name: transpose_layout(value, "NHWC", "NCHW") for name, value in arrays.items()}
    assert_endpoints_close(nchw, small_golden)
    assert_endpoints_close({**nchw, "input": arrays["input"]}, small_golden)  # mixed layouts
    # (2, 48, 48, 48) fits both ways: read in the layout of the others
    square = nchw["layer_3/expansion_output"] = nchw["layer_3/expansion_output"].copy()
    assert square.shape == (2, 48, 48, 48)
    square[1, 40, 2, 3] += 100.0
    with pytest.raises(AssertionError, match=r"golden\[1, 2, 3, 40\] \(NHWC\) = theirs\[1, 40, 2, 3\] \(NCHW\)"):
        assert_endpoints_close(nchw, small_golden)
    nchw["layer_3/expansion_output"] = transpose_layout(arrays["layer_3/expansion_output"], "NHWC", "NCHW")
    nchw["layer_4"] = nchw["layer_4"].copy()
    nchw["layer_4"][0, 5, 1, 2] -= 3.0
    with pytest.raises(AssertionError, match=r"layer_4 .* golden\[0, 1, 2, 5\] \(NHWC\) = "
                                             r"theirs\[0, 5, 1, 2\] \(NCHW\)"):
        assert_endpoints_close(nchw, small_golden)


def test_fails_without_common_endpoints_wrong_shapes_or_nan(small_golden):
    arrays, _ = read_golden(small_golden)
    with pytest.raises(AssertionError, match="no endpoint in common"):
        assert_endpoints_close({"features.0": arrays["layer_1"]}, small_golden)
    with pytest.raises(AssertionError, match=r"layer_19 has the wrong shape: theirs shape \(1, 3, 3, 1280\)"):
        assert_endpoints_close({"layer_19": arrays["layer_19"][:1]}, small_golden)
    poisoned = arrays["Logits"].copy()
    poisoned[1, 7] = np.nan
    with pytest.raises(AssertionError, match=r"Logits differs .* golden\[1, 7\]: theirs nan"):
        assert_endpoints_close({"Logits": poisoned}, arrays)


def test_tensorflow_goldens_work_as_golden_files(synthetic, shared_dir):
    path = shared_dir / "golden" / "synthetic_0.35_224_chelsea_ema.npz"
    arrays, metadata = read_golden(path)
    assert metadata == {} and list(arrays)[0] == "input"
    errors = assert_endpoints_close(synthetic.endpoints(arrays["input"]), path)  # default 5e-5
    assert set(errors) == set(arrays) - {"input"}
