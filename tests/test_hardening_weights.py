"""Weights that are not what they claim, refused at load (issue 14, parts 2-4).

Every bad input is built here: a small 0.35 backbone of random weights,
written as a TF checkpoint (with the writer of test_checkpoint.py) or as an
HDF5 file (with `write_h5`), then damaged: non-float dtypes, NaN/Inf,
negative variances, HDF5 features that read other files, sizes declared far
beyond what a MobileNetV2 needs.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mnv2ref
from mnv2ref.architecture import MAX_MODEL_VALUES, variable_shapes
from mnv2ref.checkpoint import MAX_CHECKPOINT_BYTES, read_checkpoint
from mnv2ref.errors import CheckpointError, FileError, Mnv2refError, WeightsError
from mnv2ref.weights import USER_BLOCK_SIZE, _user_block, check_variables, read_h5, sha256_of, write_h5
from test_checkpoint import DATA_SUFFIX, encode_entry, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONV = "MobilenetV2/Conv/weights"
VARIANCE = "MobilenetV2/Conv/BatchNorm/moving_variance"
LOGITS = "MobilenetV2/Logits/Conv2d_1c_1x1"


def random_variables(depth_multiplier=0.35, num_classes=0, seed=0):
    """{name: float32 array} of a whole network; variances positive."""
    rng = np.random.default_rng(seed)
    variables = {}
    for name, shape in variable_shapes(depth_multiplier, num_classes).items():
        value = rng.standard_normal(shape).astype(np.float32) * 0.1
        variables[name] = np.abs(value) + 0.5 if name.endswith("moving_variance") else value
    return variables


VARIABLES = random_variables()


@pytest.fixture(scope="module")
def variables():
    return VARIABLES


def seal(path):
    """Rewrite the digest header so that the file counts as intact (no probe)."""
    with open(path, "r+b") as f:
        f.write(_user_block(sha256_of(path, USER_BLOCK_SIZE)))


@pytest.fixture(scope="module")
def good_h5(variables, tmp_path_factory):
    return write_h5(tmp_path_factory.mktemp("h5") / "good.h5", variables, {"num_classes": 0})


def edited_h5(good_h5, tmp_path, edit, name="edited.h5", **options):
    """A copy of the good file changed by `edit(h5py.File)`, digest resealed."""
    path = tmp_path / name
    path.write_bytes(good_h5.read_bytes())
    with h5py.File(path, "r+", **options) as f:
        edit(f)
    seal(path)
    return path


# ---------------------------------------------------------------------------
# Not numbers: dtypes, NaN / Inf, negative variances
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_enum,stored,found", [
    (3, np.int32, "int32"), (10, np.bool_, "bool"), (8, np.float64, "complex64")])
def test_checkpoint_tensor_of_another_dtype_is_refused(variables, tmp_path, dtype_enum, stored, found):
    tensors = dict(variables, **{CONV: np.zeros(variables[CONV].shape, dtype=stored)})
    # complex64 has 8-byte elements: float64 zeros have the size its entry needs.
    prefix, _ = write_checkpoint(tmp_path, tensors, fields={CONV: {"dtype_enum": dtype_enum}})
    with pytest.raises(WeightsError, match=f"tensor {CONV} has dtype {found}, expected a floating-point"):
        mnv2ref.MobileNetV2.from_checkpoint(prefix)
    with pytest.raises(WeightsError, match=f"tensor {CONV} has dtype {found}"):
        mnv2ref.convert(prefix, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_checkpoint_string_tensor_is_refused(variables, tmp_path):
    prefix, _ = write_checkpoint(tmp_path, variables, fields={CONV: {"dtype_enum": 7}})
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        mnv2ref.MobileNetV2.from_checkpoint(prefix)


@pytest.mark.parametrize("stored,found", [
    (np.int32, "int32"), (np.bool_, "bool"), (np.complex64, "complex64"), ("S3", "|S3")])
def test_h5_dataset_of_another_dtype_is_refused_before_reading(good_h5, tmp_path, stored, found):
    def edit(f):
        shape = f[CONV].shape
        del f[CONV]
        f.create_dataset(CONV, data=np.zeros(shape, dtype=stored))

    path = edited_h5(good_h5, tmp_path, edit)
    with pytest.raises(WeightsError, match=f"tensor {CONV} has dtype {found.replace('|', '.')}"):
        read_h5(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_weights_are_refused_at_load(variables, tmp_path, bad):
    damaged = dict(variables)
    damaged[CONV] = variables[CONV].copy()
    damaged[CONV][1, 2, 0, 5] = bad
    damaged[CONV][2, 2, 2, 7] = bad
    message = rf"tensor {CONV} has 2 NaN or infinite values \(first at index \(1, 2, 0, 5\)"
    with pytest.raises(WeightsError, match=message):
        mnv2ref.MobileNetV2(damaged)
    prefix, _ = write_checkpoint(tmp_path / "ckpt", damaged)
    with pytest.raises(WeightsError, match=message):
        mnv2ref.MobileNetV2.from_checkpoint(prefix)
    with pytest.raises(WeightsError, match=message):
        mnv2ref.convert(prefix, tmp_path / "out.h5")
    h5 = write_h5(tmp_path / "nan.h5", damaged, {})
    with pytest.raises(WeightsError, match=message):
        mnv2ref.MobileNetV2.from_h5(h5)


def test_negative_moving_variance_is_refused_zero_is_not(variables, tmp_path):
    damaged = dict(variables)
    damaged[VARIANCE] = variables[VARIANCE].copy()
    damaged[VARIANCE][3] = 0.0                # harmless: epsilon keeps sqrt positive
    assert mnv2ref.MobileNetV2(damaged).num_classes == 0
    damaged[VARIANCE][[4, 9]] = -1e-3
    with pytest.raises(WeightsError, match=rf"tensor {VARIANCE} has 2 negative moving variances "
                                           r"\(first at index \(4,\)"):
        mnv2ref.MobileNetV2(damaged)
    prefix, _ = write_checkpoint(tmp_path, damaged)
    with pytest.raises(WeightsError, match="negative moving variances"):
        mnv2ref.MobileNetV2.from_checkpoint(prefix)


def test_check_variables_looks_only_at_the_networks_tensors(variables):
    extra = dict(variables, **{"MobilenetV2/unused": np.array([np.nan]), "step": np.array([3])})
    assert check_variables(extra) == (0.35, 0)


# ---------------------------------------------------------------------------
# Sizes declared beyond what a MobileNetV2 needs, refused before reading
# ---------------------------------------------------------------------------

def test_h5_declaring_200000_classes_is_refused_before_reading(good_h5, tmp_path):
    def edit(f):  # declared only: no data is ever written, the file stays small
        f.create_dataset(f"{LOGITS}/weights", shape=(1, 1, 1280, 200_000), dtype="f4")
        f.create_dataset(f"{LOGITS}/biases", shape=(200_000,), dtype="f4")

    path = edited_h5(good_h5, tmp_path, edit)
    assert path.stat().st_size < 2 * good_h5.stat().st_size
    with pytest.raises(WeightsError, match=f"200,000 classes has .* more than the {MAX_MODEL_VALUES:,}"):
        read_h5(path)


def test_model_values_limit_is_twice_the_largest_published_model():
    largest = sum(math.prod(s) for s in variable_shapes(1.4, 1001).values())
    assert MAX_MODEL_VALUES == 2 * largest
    check_variables(random_variables(1.4, 1001))            # the largest published model loads


def test_index_whose_entries_share_one_block_is_refused(variables, tmp_path):
    block = variables[CONV]
    fields = {}
    tensors = {CONV: block}
    for i in range(300):  # 300 variables, all pointing at the bytes of the first one
        name = f"MobilenetV2/copy_{i:03d}/weights"
        tensors[name] = block
        fields[name] = {"offset": 0}
    prefix, _ = write_checkpoint(tmp_path, tensors, fields=fields)
    assert (tmp_path / f"model.ckpt{DATA_SUFFIX}").stat().st_size == 301 * block.nbytes
    (tmp_path / f"model.ckpt{DATA_SUFFIX}").write_bytes(block.tobytes())   # one block only
    with pytest.raises(CheckpointError, match="share bytes 0-"):
        read_checkpoint(prefix)


def test_checkpoint_declaring_more_than_a_mobilenet_needs_is_refused(tmp_path):
    values = MAX_CHECKPOINT_BYTES // 4 // 2 + 1        # two float32 tensors, just over the limit
    shard = tmp_path / f"model.ckpt{DATA_SUFFIX}"
    prefix, _ = write_checkpoint(tmp_path, {}, extra_pairs=[
        (b"a", encode_entry(1, (values,), 0, 4 * values, 0)),
        (b"b", encode_entry(1, (values,), 4 * values, 4 * values, 0))])
    with open(shard, "wb") as f:                      # sparse: no disk space used
        f.truncate(8 * values)
    with pytest.raises(CheckpointError, match=f"declare {8 * values:,} bytes, more than the"):
        read_checkpoint(prefix)


# ---------------------------------------------------------------------------
# HDF5 files that read other files
# ---------------------------------------------------------------------------

def test_external_raw_storage_is_refused(good_h5, tmp_path, variables):
    source = tmp_path / "pixels.png"
    source.write_bytes(variables[CONV].tobytes())     # the weights, hidden in another file

    def edit(f):
        del f[CONV]
        f.create_dataset(CONV, shape=variables[CONV].shape, dtype="<f4",
                         external=[(str(source), 0, variables[CONV].nbytes)])

    path = edited_h5(good_h5, tmp_path, edit)
    with h5py.File(path, "r") as f:                   # h5py itself would read it from there
        np.testing.assert_array_equal(f[CONV][()], variables[CONV])
    with pytest.raises(WeightsError, match=f"dataset /{CONV} stores its data in an external file "
                                           f".*pixels.png.*self-contained"):
        read_h5(path)


def test_virtual_dataset_is_refused(good_h5, tmp_path, variables):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = variables[CONV]

    def edit(f):
        layout = h5py.VirtualLayout(shape=variables[CONV].shape, dtype="f4")
        layout[...] = h5py.VirtualSource(str(other), "data", shape=variables[CONV].shape)
        del f[CONV]
        f.create_virtual_dataset(CONV, layout)

    with pytest.raises(WeightsError, match="is a virtual dataset"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_external_link_is_refused(good_h5, tmp_path):
    def edit(f):
        f["MobilenetV2/elsewhere"] = h5py.ExternalLink("/etc/other.h5", "/data")

    with pytest.raises(WeightsError, match="MobilenetV2/elsewhere is an ExternalLink to /etc/other.h5"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_dataset_declared_but_never_written_is_refused(good_h5, tmp_path, variables):
    def edit(f):
        del f[CONV]
        f.create_dataset(CONV, shape=variables[CONV].shape, dtype="<f4")   # only fill values

    with pytest.raises(WeightsError, match=f"dataset /{CONV} has no data stored"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_dataset_of_tiny_chunks_is_refused(good_h5, tmp_path, variables):
    name = "MobilenetV2/Conv_1/weights"             # (1, 1, 112, 1280)

    def edit(f):
        del f[name]
        f.create_dataset(name, data=variables[name], chunks=(1, 1, 1, 8))

    with pytest.raises(WeightsError, match=f"dataset /{name} is stored in 17,920 chunks, more than the 16,384"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_file_of_too_many_objects_is_refused(good_h5, tmp_path):
    def edit(f):
        for i in range(10_001):
            f.create_group(f"g{i}")

    with pytest.raises(WeightsError, match="more than 10,000 groups and datasets"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_filter_that_is_not_compression_is_refused(good_h5, tmp_path, variables):
    def edit(f):
        del f[CONV]
        f.create_dataset(CONV, data=variables[CONV], scaleoffset=4)

    with pytest.raises(WeightsError, match=r"uses HDF5 filter 6 \(scaleoffset\); only gzip, shuffle"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_unknown_filter_plugin_is_refused(good_h5, tmp_path, variables):
    from h5py import h5d, h5p, h5s, h5t, h5z

    def edit(f):
        del f[CONV]
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_chunk(variables[CONV].shape)
        dcpl.set_filter(32123, h5z.FLAG_OPTIONAL, (1, 2))
        dataset = h5d.create(f.id, CONV.encode(), h5t.IEEE_F32LE, h5s.create_simple(variables[CONV].shape),
                             dcpl=dcpl)
        h5py.Dataset(dataset)[...] = variables[CONV]   # stored unfiltered: the filter is optional

    with pytest.raises(WeightsError, match="uses HDF5 filter 32123"):
        read_h5(edited_h5(good_h5, tmp_path, edit))


def test_external_storage_on_a_fifo_does_not_block_even_with_an_intact_digest(good_h5, tmp_path, variables):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def edit(f):
        del f[CONV]
        f.create_dataset(CONV, shape=variables[CONV].shape, dtype="<f4",
                         external=[(str(fifo), 0, variables[CONV].nbytes)])

    path = edited_h5(good_h5, tmp_path, edit)
    code = ("import sys\nfrom mnv2ref.weights import has_intact_digest, read_h5\n"
            "assert has_intact_digest(__import__('pathlib').Path(sys.argv[1]))\n"
            "try:\n    read_h5(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.stdout.startswith("WeightsError") and "external file" in result.stdout, result.stderr


def test_oversized_attribute_is_refused(tmp_path):
    path = tmp_path / "big_attribute.h5"
    with h5py.File(path, "w", userblock_size=USER_BLOCK_SIZE, libver="latest") as f:  # dense attributes
        for name, value in VARIABLES.items():
            f[name] = value
        f.attrs.create("notes", np.zeros(2_000_000, dtype="u1"))
    seal(path)
    with pytest.raises(WeightsError, match="attribute notes holds 2,000,000 bytes"):
        read_h5(path)


def test_weights_file_that_is_a_fifo_is_refused_without_opening(tmp_path):
    os.mkfifo(tmp_path / "w.h5")
    with pytest.raises(FileError, match="w.h5: it is a FIFO"):
        read_h5(tmp_path / "w.h5")


# Each layout feature, and whether a weights file using it must load.
LAYOUTS = {
    "gzip": (dict(compression="gzip", compression_opts=1), True),
    "shuffle+gzip": (dict(shuffle=True, compression="gzip"), True),
    "fletcher32": (dict(fletcher32=True), True),
    "lzf": (dict(compression="lzf"), True),
    "chunked": (dict(chunks=True), True),
    "float64": (dict(dtype="<f8"), True),
    "big-endian": (dict(dtype=">f4"), True),
    "scaleoffset": (dict(scaleoffset=3), False),
    "external": (dict(extra="external"), False),
    "virtual": (dict(extra="virtual"), False),
    "external link": (dict(extra="external link"), False),
    "soft link": (dict(extra="soft link"), None),     # either loads or is a clean error
}


def apply_layout(f, name, value, options, tmp_path):
    options = dict(options)
    extra = options.pop("extra", None)
    del f[name]
    if extra == "external":
        source = tmp_path / f"ext{len(os.listdir(tmp_path))}"
        source.write_bytes(value.astype("<f4").tobytes())
        f.create_dataset(name, shape=value.shape, dtype="<f4", external=[(str(source), 0, value.nbytes)])
    elif extra == "virtual":
        other = tmp_path / f"vds{len(os.listdir(tmp_path))}.h5"
        with h5py.File(other, "w") as g:
            g["data"] = value
        layout = h5py.VirtualLayout(shape=value.shape, dtype="f4")
        layout[...] = h5py.VirtualSource(str(other), "data", shape=value.shape)
        f.create_virtual_dataset(name, layout)
    elif extra in ("external link", "soft link"):
        f[f"hidden/{name}"] = value
        f[name] = (h5py.ExternalLink(str(tmp_path / "nowhere.h5"), "/x") if extra == "external link"
                   else h5py.SoftLink(f"/hidden/{name}"))
    else:
        f.create_dataset(name, data=value.astype(options.pop("dtype", "<f4")), **options)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.tuples(st.sampled_from(sorted(LAYOUTS)), st.integers(0, 10**6)),
                        min_size=1, max_size=3))
def test_fuzzed_layout_features_load_correctly_or_are_refused(good_h5, tmp_path_factory, choices):
    tmp_path, variables = tmp_path_factory.mktemp("layout"), VARIABLES
    names = sorted(variables)
    picked = {names[index % len(names)]: feature for feature, index in choices}

    def edit(f):
        for name, feature in picked.items():
            apply_layout(f, name, variables[name], LAYOUTS[feature][0], tmp_path)

    path = edited_h5(good_h5, tmp_path, edit)
    outcomes = [LAYOUTS[feature][1] for feature in picked.values()]
    try:
        loaded, _ = read_h5(path)
    except WeightsError:
        assert not all(outcomes), picked
        return
    assert all(o is not False for o in outcomes), picked
    for name, value in variables.items():
        np.testing.assert_array_equal(loaded[name], value)


@settings(max_examples=40, deadline=None)
@given(num_shards=st.integers(-3, 2**40), endianness=st.integers(0, 3), min_consumer=st.integers(0, 3),
       footer=st.binary(min_size=0, max_size=48), cut=st.integers(0, 64))
def test_fuzzed_checkpoint_headers_only_raise_clean_errors(tmp_path_factory, num_shards, endianness,
                                                           min_consumer, footer, cut):
    from test_checkpoint import encode_header

    directory = tmp_path_factory.mktemp("header")
    prefix, _ = write_checkpoint(directory, {"a": np.arange(4, dtype=np.float32)},
                                 header=encode_header(num_shards, endianness, min_consumer))
    index = directory / "model.ckpt.index"
    data = index.read_bytes()
    if footer:  # overwrite the start of the footer: its two block handles
        data = data[:-48] + footer[:40].ljust(40, b"\0")[:40] + data[-8:]
    index.write_bytes(data[:len(data) - cut] if cut < 48 else data)
    try:
        checkpoint = read_checkpoint(prefix)
        np.testing.assert_array_equal(checkpoint["a"], np.arange(4, dtype=np.float32))
    except Mnv2refError:
        pass


# ---------------------------------------------------------------------------
# Keras Applications files go through the same checks
# ---------------------------------------------------------------------------

KERAS_VARIANCE = "block_2_depthwise_BN/block_2_depthwise_BN/moving_variance:0"


@pytest.fixture
def keras_copy(shared_dir, tmp_path):
    path = tmp_path / "keras.h5"
    path.write_bytes((shared_dir / "peers" / "keras_mobilenet_v2_0.35_224.h5").read_bytes())
    return path


def test_keras_file_with_negative_variance_or_nan_is_refused(keras_copy, tmp_path):
    from mnv2ref.keras import convert_keras

    with h5py.File(keras_copy, "r+") as f:
        f[KERAS_VARIANCE][5] = -1.0
    message = r"tensor MobilenetV2/expanded_conv_2/depthwise/BatchNorm/moving_variance has 1 negative"
    with pytest.raises(WeightsError, match=message):
        mnv2ref.MobileNetV2.from_keras_h5(keras_copy)
    with pytest.raises(WeightsError, match=message):
        convert_keras(keras_copy, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    with pytest.raises(FileError, match="it is the input"):
        convert_keras(keras_copy, keras_copy)


def test_keras_file_reading_other_files_is_refused(keras_copy, tmp_path):
    from mnv2ref.keras import read_keras_h5

    with h5py.File(keras_copy, "r+") as f:
        value = f[KERAS_VARIANCE][()]
        (tmp_path / "elsewhere.bin").write_bytes(value.astype("<f4").tobytes())
        del f[KERAS_VARIANCE]
        f.create_dataset(KERAS_VARIANCE, shape=value.shape, dtype="<f4",
                         external=[(str(tmp_path / "elsewhere.bin"), 0, value.nbytes)])
    with pytest.raises(WeightsError, match="external file .*elsewhere.bin"):
        read_keras_h5(keras_copy)
    with h5py.File(keras_copy, "r+") as f:
        f["extra"] = h5py.ExternalLink("/etc/passwd.h5", "/x")
    with pytest.raises(WeightsError, match="extra is an ExternalLink"):
        read_keras_h5(keras_copy)


def test_keras_fifo_does_not_block(tmp_path, capsys):
    from test_cli import run

    os.mkfifo(tmp_path / "k.h5")
    code, out, err = run(capsys, "convert", tmp_path / "k.h5", tmp_path / "out.h5")
    assert code == 1 and "FIFO" in err and err.count("\n") == 1


def test_golden_files_that_block_or_read_other_files_are_refused(tmp_path):
    from mnv2ref.golden import read_golden

    os.mkfifo(tmp_path / "g.npz")
    with pytest.raises(FileError, match="golden file .*g.npz: it is a FIFO"):
        read_golden(tmp_path / "g.npz")
    (tmp_path / "secret").write_bytes(np.arange(4, dtype="<f4").tobytes())
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("layer_1", shape=(4,), dtype="<f4", external=[(str(tmp_path / "secret"), 0, 16)])
    with pytest.raises(WeightsError, match="external file .*secret"):
        read_golden(tmp_path / "g.h5")
