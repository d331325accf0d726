"""mnv2ref.checkpoint against the real checkpoints, hand-made tables and corrupted copies.

The expected variable names and shapes are derived here from the MobileNetV2
definition itself, independently of the package, and then cross-checked with
`mnv2ref.architecture.variable_shapes`.  Small checkpoints are built with a
minimal SSTable/protobuf *writer* that exists only in this file.
"""

import re
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnv2ref.architecture import variable_shapes
from mnv2ref.checkpoint import (
    Checkpoint,
    TensorEntry,
    crc32c,
    mask_crc,
    parse_bundle_entry,
    read_checkpoint,
    read_table,
    snappy_decompress,
    unmask_crc,
)
from mnv2ref.errors import CheckpointError, ChecksumError

BACKBONE = "checkpoints/mobilenet_v2_1.0_224_backbone"
SYNTHETIC = "checkpoints/synthetic_mobilenet_v2_0.35_224"
DATA_SUFFIX = ".data-00000-of-00001"
MAGIC = 0xDB4775248B80FB57


# ---------------------------------------------------------------------------
# Expected variables, derived from the MobileNetV2 paper / TF-slim V2_DEF
# ---------------------------------------------------------------------------

BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]
BN_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")
TRAINABLE_LEAVES = ("weights", "depthwise_weights", "biases", "gamma", "beta")


def make_divisible(v, divisor=8):
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def expected_shapes(d, num_classes):
    shapes = {}

    def conv(scope, kernel_name, kernel_shape, channels):
        shapes[f"{scope}/{kernel_name}"] = kernel_shape
        for leaf in BN_LEAVES:
            shapes[f"{scope}/BatchNorm/{leaf}"] = (channels,)

    c = make_divisible(32 * d)
    conv("MobilenetV2/Conv", "weights", (3, 3, 3, c), c)
    i = 0
    for t, c_out, n, _s in BLOCKS:
        c_out = make_divisible(c_out * d)
        for _ in range(n):
            scope = "MobilenetV2/expanded_conv" + (f"_{i}" if i else "")
            expanded = c
            if t != 1:
                expanded = make_divisible(t * c)
                conv(f"{scope}/expand", "weights", (1, 1, c, expanded), expanded)
            conv(f"{scope}/depthwise", "depthwise_weights", (3, 3, expanded, 1), expanded)
            conv(f"{scope}/project", "weights", (1, 1, expanded, c_out), c_out)
            c = c_out
            i += 1
    last = 1280 if d <= 1 else make_divisible(1280 * d)
    conv("MobilenetV2/Conv_1", "weights", (1, 1, c, last), last)
    if num_classes:
        shapes["MobilenetV2/Logits/Conv2d_1c_1x1/weights"] = (1, 1, last, num_classes)
        shapes["MobilenetV2/Logits/Conv2d_1c_1x1/biases"] = (num_classes,)
    return shapes


def is_trainable(name):
    return name.rsplit("/", 1)[1] in TRAINABLE_LEAVES


def test_expected_shapes_agree_with_architecture():
    for d, classes in [(1.0, 0), (0.35, 1001), (1.4, 1001), (0.5, 10)]:
        assert expected_shapes(d, classes) == variable_shapes(d, classes)
    assert len(expected_shapes(1.0, 0)) == 260
    assert len(expected_shapes(0.35, 1001)) == 262


# ---------------------------------------------------------------------------
# A minimal checkpoint writer: protobuf, SSTable blocks, footer
# ---------------------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1  # negative int64 values are 10-byte varints
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def pb_varint(field, value):
    return varint(field << 3) + varint(value)


def pb_bytes(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_fixed32(field, value):
    return varint(field << 3 | 5) + struct.pack("<I", value)


def encode_header(num_shards=1, endianness=0, min_consumer=0):
    version = pb_varint(1, 1) + (pb_varint(2, min_consumer) if min_consumer else b"")
    return (pb_varint(1, num_shards) + (pb_varint(2, endianness) if endianness else b"")
            + pb_bytes(3, version))


def encode_entry(dtype_enum, shape, offset, size, crc, shard_id=0, extra=b""):
    shape_bytes = b"".join(pb_bytes(2, pb_varint(1, dim)) for dim in shape)
    return (pb_varint(1, dtype_enum) + pb_bytes(2, shape_bytes) + pb_varint(3, shard_id)
            + pb_varint(4, offset) + pb_varint(5, size) + pb_fixed32(6, crc) + extra)


def build_block(pairs, restart_interval=16):
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(pairs):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def snappy_literals(data):
    """A valid (if useless) Snappy encoding: literals of at most 60 bytes."""
    out = bytearray(varint(len(data)))
    for i in range(0, len(data), 60):
        chunk = data[i:i + 60]
        out += bytes([(len(chunk) - 1) << 2]) + chunk
    return bytes(out)


def write_table(path, pairs, per_block=4, restart_interval=16, compression=0):
    """Write a LevelDB table; return the (offset, size) of every block."""
    out, handles = bytearray(), []

    def emit(contents, ctype):
        stored = snappy_literals(contents) if ctype == 1 else contents
        handles.append((len(out), len(stored)))
        out.extend(stored + bytes([ctype]) + struct.pack("<I", mask_crc(crc32c(stored + bytes([ctype])))))
        return handles[-1]

    index_pairs = []
    for i in range(0, len(pairs), per_block):
        chunk = pairs[i:i + per_block]
        offset, size = emit(build_block(chunk, restart_interval), compression)
        index_pairs.append((chunk[-1][0], varint(offset) + varint(size)))
    meta = emit(build_block([]), 0)
    index = emit(build_block(index_pairs, 1), 0)
    footer = varint(meta[0]) + varint(meta[1]) + varint(index[0]) + varint(index[1])
    out += footer + bytes(40 - len(footer)) + struct.pack("<Q", MAGIC)
    path.write_bytes(bytes(out))
    return handles


DTYPE_ENUMS = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int16": 5, "int8": 6,
               "int64": 9, "bool": 10, "float16": 19}


def write_checkpoint(directory, tensors, *, fields=None, header=None, extra_pairs=(), **table):
    """Write `tensors` ({name: array}) as a one-shard checkpoint in `directory`.

    `fields` = {name: {encode_entry keyword: value}} alters entries (e.g. a
    wrong dtype); `extra_pairs` adds raw (key, value) pairs to the index.
    Returns (prefix, block handles of the index)."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "model.ckpt"
    data = bytearray()
    pairs = [(b"", encode_header() if header is None else header), *extra_pairs]
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        kwargs = dict(dtype_enum=DTYPE_ENUMS[array.dtype.name], shape=array.shape, offset=len(data),
                      size=len(raw), crc=mask_crc(crc32c(raw)))
        kwargs.update((fields or {}).get(name, {}))
        pairs.append((name.encode(), encode_entry(**kwargs)))
        data += raw
    (directory / f"model.ckpt{DATA_SUFFIX}").write_bytes(bytes(data))
    handles = write_table(directory / "model.ckpt.index", sorted(pairs), **table)
    return prefix, handles


SMALL = {
    "a/bool": np.array([True, False, True]),
    "a/float16": np.arange(6, dtype=np.float16).reshape(2, 3),
    "a/float32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 2, 2),
    "b/empty": np.zeros((0, 3), dtype=np.float32),
    "b/int64_scalar": np.array(-7, dtype=np.int64),
    "c/int8": np.arange(-4, 4, dtype=np.int8),
    "c/uint8": np.arange(250, 256, dtype=np.uint8),
    "c/ünïcode/float64": np.array([np.pi, -np.e]),
}


def read_varints(data, count):
    values, pos = [], 0
    for _ in range(count):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(shared_dir):
    return read_checkpoint(shared_dir / BACKBONE / "model.ckpt")


@pytest.fixture(scope="module")
def synthetic(shared_dir):
    return read_checkpoint(shared_dir / SYNTHETIC / "model.ckpt")


@pytest.fixture
def backbone_copy(shared_dir, tmp_path):
    """A writable copy of the backbone checkpoint (copyfile: the originals are read-only)."""
    for suffix in (".index", DATA_SUFFIX):
        shutil.copyfile(shared_dir / BACKBONE / f"model.ckpt{suffix}", tmp_path / f"model.ckpt{suffix}")
    return tmp_path / "model.ckpt"


def flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# CRC32C and Snappy
# ---------------------------------------------------------------------------

def slow_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(b"") == 0


def test_crc32c_matches_bitwise_definition_for_every_tail_length():
    rng = np.random.default_rng(0)
    for n in range(0, 40):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == slow_crc32c(data)


def test_crc32c_of_arrays_is_crc_of_their_bytes():
    array = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    assert crc32c(array) == crc32c(array.tobytes())
    assert crc32c(array.T) == crc32c(array.T.tobytes())  # non-contiguous: C-order bytes
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789")) == 0xE3069283


def test_mask_roundtrip():
    for crc in [0, 1, 0xE3069283, 0xFFFFFFFF, 0x12345678]:
        assert unmask_crc(mask_crc(crc)) == crc
        assert 0 <= mask_crc(crc) < 2**32
    assert mask_crc(0) == 0xA282EAD8


def test_snappy_hand_made_stream():
    stream = bytes([
        20,                       # preamble: 20 bytes uncompressed
        (3 - 1) << 2, *b"abc",    # literal "abc"
        (5 - 1) << 2 | 2, 3, 0,   # copy2: 5 bytes from 3 back (overlapping) -> "abcab"
        (4 - 4) << 2 | 1, 1,      # copy1: 4 bytes from 1 back -> "bbbb"
        60 << 2, 2 - 1, *b"xy",   # literal whose length-1 is in one extra byte
        (6 - 1) << 2 | 3, 2, 0, 0, 0,  # copy4: 6 bytes from 2 back -> "xyxyxy"
    ])
    assert snappy_decompress(stream) == b"abcabcabbbbbxyxyxyxy"
    assert snappy_decompress(snappy_literals(bytes(range(200)))) == bytes(range(200))


@pytest.mark.parametrize("stream, message", [
    (bytes([4, 0 << 2 | 1, 0]), "copy offset 0"),         # copy before any output
    (bytes([4, 0, 0x61, 1 << 2 | 2, 2, 0]), "copy offset 2"),  # offset past the output
    (bytes([5, 3 << 2, *b"abcd"]), "announced 5"),         # too short
    (bytes([3, 3 << 2, *b"abcd"]), "more than the announced 3"),
    (bytes([9, 8 << 2, *b"ab"]), "bytes expected"),        # truncated literal
    (b"\xff" * 11, "longer than 10 bytes"),
])
def test_snappy_refuses_malformed_streams(stream, message):
    with pytest.raises(CheckpointError, match=message):
        snappy_decompress(stream)


# ---------------------------------------------------------------------------
# The real checkpoints
# ---------------------------------------------------------------------------

def test_backbone_names_shapes_dtypes(backbone):
    expected = expected_shapes(1.0, 0)
    assert len(backbone) == 260
    assert list(backbone) == sorted(expected)  # index order is sorted key order
    for name, shape in expected.items():
        entry = backbone.entries[name]
        assert isinstance(entry, TensorEntry)
        assert (entry.name, entry.shape, entry.dtype) == (name, shape, np.float32)
    assert "MobilenetV2/Logits/Conv2d_1c_1x1/weights" not in backbone
    assert backbone.header.num_shards == 1
    assert [p.name for p in backbone.data_files] == [f"model.ckpt{DATA_SUFFIX}"]
    assert backbone.index_file.name == "model.ckpt.index"


def test_synthetic_names_shapes_dtypes(synthetic):
    model = expected_shapes(0.35, 1001)
    expected = dict(model)
    for name, shape in model.items():
        expected[f"{name}/ExponentialMovingAverage"] = shape
        if is_trainable(name):
            expected[f"{name}/RMSProp"] = expected[f"{name}/RMSProp_1"] = shape
    assert sum(map(is_trainable, model)) == 158
    assert len(synthetic) == 841 == len(expected) + 1
    assert set(synthetic) == set(expected) | {"global_step"}
    for name, shape in expected.items():
        assert (synthetic.entries[name].shape, synthetic.entries[name].dtype) == (shape, np.float32)
    step = synthetic.entries["global_step"]
    assert (step.dtype, step.shape) == (np.dtype("int64"), ())
    value = synthetic["global_step"]
    assert value.shape == () and value.dtype == np.int64 and value >= 0


def test_every_tensor_reads_with_its_entry_shape(backbone, synthetic):
    for ckpt in (backbone, synthetic):
        for name, entry in ckpt.entries.items():
            array = ckpt[name]
            assert array.shape == entry.shape and array.dtype == entry.dtype
            assert array.dtype.isnative and array.flags.writeable and array.flags.owndata
            if array.dtype.kind == "f":
                assert np.isfinite(array).all(), name


def test_known_values(backbone, synthetic, shared_dir):
    # The bytes are where the entry says, little-endian.
    name = "MobilenetV2/Conv/weights"
    entry = backbone.entries[name]
    raw = np.fromfile(backbone.data_files[0], dtype="<f4", count=entry.size // 4, offset=entry.offset)
    np.testing.assert_array_equal(backbone[name], raw.reshape(3, 3, 3, 32))
    assert backbone[name].std() > 0.01  # real trained weights, not zeros
    # Real BatchNorm statistics: variances are positive.
    for key in backbone:
        if key.endswith("moving_variance"):
            assert (backbone[key] > 0).all(), key
    # Synthetic: EMA shadows visibly differ from the raw variables.
    for key in ["MobilenetV2/Conv/weights", "MobilenetV2/Logits/Conv2d_1c_1x1/biases"]:
        raw, ema = synthetic[key], synthetic[key + "/ExponentialMovingAverage"]
        assert raw.shape == ema.shape and not np.array_equal(raw, ema)
    assert synthetic["global_step"] == 1234567
    # Each read is a fresh array.
    first = backbone[name]
    first[...] = 0
    assert backbone[name].std() > 0.01


def test_repr_and_mapping_protocol(backbone):
    assert "260 tensors" in repr(backbone) and len(repr(backbone)) < 200
    assert isinstance(backbone, Checkpoint)
    with pytest.raises(KeyError):
        backbone["MobilenetV2/Logits/Conv2d_1c_1x1/weights"]
    assert backbone.get("nope") is None


def test_prefix_forms_resolve(shared_dir):
    folder = shared_dir / BACKBONE
    forms = [folder / "model.ckpt", str(folder / "model.ckpt"), folder / "model.ckpt.index",
             folder / f"model.ckpt{DATA_SUFFIX}", folder, str(folder)]
    for form in forms:
        ckpt = read_checkpoint(form)
        assert ckpt.prefix == folder / "model.ckpt" and len(ckpt) == 260


def test_read_table_and_parse_bundle_entry(shared_dir):
    pairs = read_table(shared_dir / BACKBONE / "model.ckpt.index")
    assert len(pairs) == 261 and pairs[0][0] == b""
    keys = [key for key, _ in pairs]
    assert keys == sorted(keys)
    entry = parse_bundle_entry(pairs[1][1], pairs[1][0].decode())
    assert entry.name == "MobilenetV2/Conv/BatchNorm/beta"
    assert (entry.shape, entry.offset, entry.size, entry.shard_id) == ((32,), 0, 128, 0)


# ---------------------------------------------------------------------------
# Hand-made checkpoints
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("compression", [0, 1])
def test_small_checkpoint_roundtrip(tmp_path, compression):
    prefix, _ = write_checkpoint(tmp_path, SMALL, per_block=3, restart_interval=2,
                                 compression=compression)
    ckpt = read_checkpoint(prefix)
    assert list(ckpt) == sorted(SMALL, key=str.encode)
    for name, array in SMALL.items():
        assert ckpt[name].dtype == array.dtype
        np.testing.assert_array_equal(ckpt[name], array)


def test_unknown_block_compression(tmp_path):
    prefix, _ = write_checkpoint(tmp_path, SMALL, compression=2)
    with pytest.raises(CheckpointError, match=r"unsupported block compression type 2"):
        read_checkpoint(prefix)


def one_tensor_checkpoint(tmp_path, **kwargs):
    return write_checkpoint(tmp_path, {"x": np.ones((2, 3), np.float32)}, **kwargs)[0]


@pytest.mark.parametrize("fields, message", [
    ({"dtype_enum": 7}, r"tensor 'x'.*unsupported dtype.*\b7\b"),
    ({"dtype_enum": 14}, r"tensor 'x'.*unsupported dtype.*\b14\b"),
    ({"extra": pb_bytes(7, b"")}, r"tensor 'x'.*partitioned variable"),
    ({"shape": (2**40, 2**40)}, r"size 24 bytes, but shape"),
    ({"shape": (-1, 6)}, r"dimension 0 has size -1"),
    ({"shape": (0, 2**62), "size": 0}, r"too large"),
    ({"size": -24}, r"size = -24 is negative"),
    ({"shard_id": 3}, r"tensor 'x' is in shard 3, but the checkpoint has 1"),
    ({"shape": (2**40,), "size": 2**42}, r"runs past the end of .*model\.ckpt\.data"),
    ({"offset": 20}, r"tensor 'x' \(offset 20, 24 bytes\) runs past the end"),
])
def test_bad_entries_are_refused_when_opening(tmp_path, fields, message):
    prefix = one_tensor_checkpoint(tmp_path, fields={"x": fields})
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(prefix)
    assert type(info.value) is CheckpointError
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("header, message", [
    (encode_header(endianness=1), "big-endian"),
    (encode_header(num_shards=0), "num_shards = 0"),
    (encode_header(min_consumer=5), "cannot be read"),
    (b"\x08", "truncated varint"),
    (b"\x0b", "wire type 3"),
])
def test_bad_headers_are_refused(tmp_path, header, message):
    prefix = one_tensor_checkpoint(tmp_path, header=header)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(prefix)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("pair, message", [
    ((b"\xff\xfe", encode_entry(1, (), 0, 4, 0)), "not valid UTF-8"),
    ((b"\x00x", encode_entry(1, (), 0, 4, 0)), "partitioned"),
    ((b"y", b"\x08\x01\x12\x05\x12"), "BundleEntryProto of tensor 'y'"),
    ((b"y", b"\x0d\x01"), "4 bytes expected"),
])
def test_bad_keys_and_protobufs_are_refused(tmp_path, pair, message):
    prefix = one_tensor_checkpoint(tmp_path, extra_pairs=[pair])
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(prefix)
    assert str(tmp_path) in str(info.value)


def test_index_without_header_is_refused(tmp_path):
    write_table(tmp_path / "model.ckpt.index", [(b"x", encode_entry(1, (), 0, 4, 0))])
    with pytest.raises(CheckpointError, match="no BundleHeaderProto"):
        read_checkpoint(tmp_path)


def test_unsorted_table_is_refused(tmp_path):
    path = tmp_path / "t.index"
    write_table(path, [(b"b", b""), (b"a", b"")])
    with pytest.raises(CheckpointError, match=r"key b'a' does not sort after b'b'"):
        read_table(path)


# ---------------------------------------------------------------------------
# Corrupted copies of the real backbone
# ---------------------------------------------------------------------------

def test_flipped_tensor_byte_fails_crc(backbone_copy):
    name = "MobilenetV2/expanded_conv_3/project/weights"
    data_file = backbone_copy.parent / f"model.ckpt{DATA_SUFFIX}"
    entry = read_checkpoint(backbone_copy).entries[name]
    flip_byte(data_file, entry.offset + entry.size // 2)
    ckpt = read_checkpoint(backbone_copy)
    with pytest.raises(ChecksumError, match=re.escape(f"tensor '{name}' in '{data_file}'")):
        ckpt[name]
    ckpt["MobilenetV2/Conv/weights"]  # the other tensors are fine
    unverified = read_checkpoint(backbone_copy, verify=False)[name]
    assert unverified.shape == entry.shape


def test_flipped_index_byte_fails_block_crc(backbone_copy):
    index = backbone_copy.parent / "model.ckpt.index"
    data = index.read_bytes()
    _meta_offset, _meta_size, index_offset, _index_size = read_varints(data[-48:], 4)
    flip_byte(index, 100)  # inside the first (only) data block
    with pytest.raises(ChecksumError, match=re.escape(f"'{index}': index block at offset 0 ")):
        read_checkpoint(backbone_copy)
    flip_byte(index, 100)
    flip_byte(index, index_offset + 1)  # inside the table's index block
    with pytest.raises(ChecksumError, match=f"index block at offset {index_offset} "):
        read_checkpoint(backbone_copy)


def test_bad_magic(backbone_copy):
    index = backbone_copy.parent / "model.ckpt.index"
    flip_byte(index, len(index.read_bytes()) - 1)
    with pytest.raises(CheckpointError, match=r"not a TensorFlow checkpoint index: bad magic") as info:
        read_checkpoint(backbone_copy)
    assert str(index) in str(info.value)


def test_truncated_index(backbone_copy):
    index = backbone_copy.parent / "model.ckpt.index"
    data = index.read_bytes()
    index.write_bytes(data[:30])
    with pytest.raises(CheckpointError, match=r"truncated index: 30 bytes, shorter than"):
        read_checkpoint(backbone_copy)
    index.write_bytes(data[:5000] + data[-48:])  # footer kept, blocks cut
    with pytest.raises(CheckpointError, match=r"runs past byte 5000.*truncated") as info:
        read_checkpoint(backbone_copy)
    assert str(index) in str(info.value)


def test_truncated_shard(backbone_copy):
    data_file = backbone_copy.parent / f"model.ckpt{DATA_SUFFIX}"
    ckpt = read_checkpoint(backbone_copy)
    data = data_file.read_bytes()
    data_file.write_bytes(data[:len(data) // 2])
    # An already opened checkpoint finds out when reading ...
    last = max(ckpt.entries.values(), key=lambda e: e.offset)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{last.name}' in '{data_file}'")):
        ckpt[last.name]
    # ... a new one when opening.
    with pytest.raises(CheckpointError, match=r"runs past the end of .*the data file is truncated") as info:
        read_checkpoint(backbone_copy)
    assert str(data_file) in str(info.value)


def test_missing_shard(backbone_copy):
    data_file = backbone_copy.parent / f"model.ckpt{DATA_SUFFIX}"
    data_file.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"missing data shard '{data_file}' (shard 0 of 1)")):
        read_checkpoint(backbone_copy)


def test_missing_index(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"'{tmp_path / 'model.ckpt.index'}' does not exist")):
        read_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"found \['model.ckpt.data-00000-of-00001'\]"):
        read_checkpoint(tmp_path / "model.ckpt")


def test_directory_must_hold_exactly_one_index(tmp_path):
    with pytest.raises(CheckpointError, match=r"exactly one \*\.index file, found 0"):
        read_checkpoint(tmp_path)
    (tmp_path / "a.index").write_bytes(b"")
    (tmp_path / "b.index").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"found 2.*'a.index', 'b.index'"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------
# Fuzzing: any corruption is a CheckpointError, never another exception
# ---------------------------------------------------------------------------

def load_everything(prefix):
    try:
        ckpt = read_checkpoint(prefix)
        for name in ckpt:
            ckpt[name]
    except CheckpointError:
        pass


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    prefix, handles = write_checkpoint(directory, SMALL, per_block=3, restart_interval=2)
    return prefix, (directory / "model.ckpt.index").read_bytes(), handles


mutations = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=2000)
@given(mutations=mutations, fix_crcs=st.booleans(), cut=st.none() | st.integers(0, 2**20))
def test_fuzzed_small_index_only_raises_checkpoint_errors(small_checkpoint, mutations, fix_crcs, cut):
    """Mutate bytes; with `fix_crcs` the block CRCs are recomputed so that the
    damage reaches the block, protobuf and entry parsers instead of stopping
    at the checksum."""
    prefix, original, handles = small_checkpoint
    data = bytearray(original)
    for position, value in mutations:
        data[position % len(data)] = value
    if fix_crcs:
        for offset, size in handles:
            end = offset + size
            data[end + 1:end + 5] = struct.pack("<I", mask_crc(crc32c(bytes(data[offset:end + 1]))))
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    (prefix.parent / "model.ckpt.index").write_bytes(bytes(data))
    load_everything(prefix)


@pytest.fixture(scope="module")
def backbone_to_fuzz(shared_dir, tmp_path_factory):
    """The backbone's index bytes, and a prefix whose data shard links to the real one."""
    directory = tmp_path_factory.mktemp("fuzz_backbone")
    (directory / f"model.ckpt{DATA_SUFFIX}").symlink_to(shared_dir / BACKBONE / f"model.ckpt{DATA_SUFFIX}")
    return directory / "model.ckpt", (shared_dir / BACKBONE / "model.ckpt.index").read_bytes()


@settings(max_examples=30, deadline=2000)
@given(mutations=mutations)
def test_fuzzed_backbone_index_only_raises_checkpoint_errors(backbone_to_fuzz, mutations):
    prefix, original = backbone_to_fuzz
    data = bytearray(original)
    for position, value in mutations:
        data[position % len(data)] = value
    (prefix.parent / "model.ckpt.index").write_bytes(bytes(data))
    load_everything(prefix)


@settings(max_examples=60, deadline=2000)
@given(st.binary(max_size=64))
def test_parsers_of_arbitrary_bytes_only_raise_checkpoint_errors(data):
    for parse in (parse_bundle_entry, snappy_decompress):
        try:
            parse(data)
        except CheckpointError:
            pass
