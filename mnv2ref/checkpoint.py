"""Read a TensorFlow V2 checkpoint with nothing but NumPy (and Numba for speed).

A TensorFlow "V2" checkpoint (the format written by ``tf.train.Saver`` and
``tf.train.Checkpoint``) is not one file but a *prefix* naming several::

    model.ckpt.index                    which tensors exist and where they are
    model.ckpt.data-00000-of-00001      the tensors' raw bytes (one or more shards)

This module reads it top-down, in four layers.  Each is small enough to be
studied on its own.

1. **The index is a LevelDB table** (an "SSTable": a sorted string table).
   Its last 48 bytes are the *footer*: two *block handles* (``offset, size``
   as varints) pointing at the *metaindex block* (unused by TensorFlow) and
   the *index block*, zero padding, and the 8-byte magic number
   ``0xdb4775248b80fb57``.  The index block maps, for every *data block*, a
   key at least as large as the block's last key to the block's handle.  A
   block on disk is followed by a 5-byte trailer: one compression-type byte
   (0 = none, 1 = Snappy) and a masked CRC32C of the contents plus that byte.
   Inside a block, entries are ``shared, non_shared, value_len`` varints, the
   ``non_shared`` tail of the key and the value: each key stores only what
   differs from the previous one (prefix compression).  Every few entries a
   key is stored whole; the offsets of those *restart points* end the block
   (``uint32`` each, then their ``uint32`` count), so that a reader could
   binary-search.  We simply read every entry in order.  TensorFlow writes
   uncompressed blocks of up to 256 KiB with a restart every 16 keys, so the
   index of a MobileNetV2 checkpoint (a few hundred tensors) is one data block.

2. **Each table value is a Protocol Buffer.**  The entry under the empty key
   is a ``BundleHeaderProto`` (number of shards, byte order, format version).
   Every other key is a variable name such as ``MobilenetV2/Conv/weights``
   and its value a ``BundleEntryProto``: dtype, shape, shard number, byte
   offset and size in that shard, and the masked CRC32C of the bytes.  We
   decode the protobuf wire format by hand: a message is a sequence of
   ``(field_number << 3 | wire_type)`` varint tags, each followed by a varint,
   8 bytes, a length-prefixed byte string, or 4 bytes.

3. **The data shards are raw little-endian arrays**, concatenated.  A tensor
   is read by seeking to its offset and reading exactly ``size`` bytes, which
   must equal ``prod(shape) * itemsize``.

4. **Everything is checksummed with CRC32C** (the Castagnoli polynomial), and
   the stored value is *masked* (rotated and offset) so that the CRC of data
   that itself contains CRCs is not degenerate.  CRC is a bytewise loop, far
   too slow in pure Python for 27 MB, so it is compiled with Numba.

Not supported, and refused with a clear message: big-endian bundles,
partitioned variables (entries with ``slices``), and dtypes without a NumPy
equivalent or without fixed-size elements (``DT_STRING``, ``DT_BFLOAT16``,
...).  Note that TF2 object-based checkpoints hold a ``DT_STRING`` object
graph; the ``tf.compat.v1.train.Saver`` checkpoints of TF-slim do not.

Every malformed input raises :class:`~mnv2ref.errors.CheckpointError` (or its
subclass :class:`~mnv2ref.errors.ChecksumError`) naming the file and saying
what was expected and what was found: nothing is trusted before it is checked,
and sizes are checked against the file *before* memory is allocated: the
index (at most 16 MB and 100,000 entries), each tensor against its shard, no
two tensors sharing bytes, and all together against what a MobileNetV2
training checkpoint can need (``MAX_CHECKPOINT_BYTES``).  Special files (a
FIFO, a device) are refused before they are opened.

Typical use::

    ckpt = read_checkpoint("checkpoints/mobilenet_v2_1.0_224/model.ckpt")
    kernel = ckpt["MobilenetV2/Conv/weights"]      # np.ndarray, shape (3, 3, 3, 32)
    ckpt.entries["MobilenetV2/Conv/weights"]       # TensorEntry: dtype, shape, offset, ...

References: LevelDB ``doc/table_format.md``; TensorFlow
``core/lib/io/{format,block,table}.cc`` and
``core/util/tensor_bundle/tensor_bundle.{proto,cc}``; Snappy
``format_description.txt``.
"""

from __future__ import annotations

import collections.abc
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from .architecture import MAX_MODEL_VALUES
from .errors import CheckpointError, ChecksumError
from .files import check_regular_file, os_error
from .text import printable

__all__ = [
    "BlockHandle",
    "BundleHeader",
    "Checkpoint",
    "TensorEntry",
    "crc32c",
    "mask_crc",
    "parse_bundle_entry",
    "parse_bundle_header",
    "read_checkpoint",
    "read_table",
    "snappy_decompress",
    "unmask_crc",
]


# ---------------------------------------------------------------------------
# CRC32C
# ---------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial 0x1EDC6F41, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8


def _make_crc_tables() -> np.ndarray:
    """Build the 8 lookup tables of slicing-by-8 CRC32C.

    ``tables[0][b]`` is the CRC register after feeding byte ``b`` into a zero
    register: the classic one-byte-at-a-time table.  ``tables[k][b]`` is the
    effect of byte ``b`` followed by ``k`` zero bytes, which lets the kernel
    fold 8 input bytes with 8 independent look-ups instead of 8 dependent
    ones.  Stored as int64 so that Numba does all arithmetic in one type.
    """
    tables = np.zeros((8, 256), dtype=np.int64)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        tables[0, byte] = crc
    for k in range(1, 8):
        for byte in range(256):
            previous = int(tables[k - 1, byte])
            tables[k, byte] = (previous >> 8) ^ int(tables[0, previous & 0xFF])
    return tables


_CRC_TABLES = _make_crc_tables()


@njit(cache=True)
def _crc32c_kernel(data, tables):  # pragma: no cover - compiled by Numba
    """CRC32C of a uint8 array, 8 bytes per step (slicing-by-8)."""
    crc = 0xFFFFFFFF
    n = data.shape[0]
    i = 0
    while i + 8 <= n:
        low = crc ^ (
            np.int64(data[i])
            | (np.int64(data[i + 1]) << 8)
            | (np.int64(data[i + 2]) << 16)
            | (np.int64(data[i + 3]) << 24)
        )
        crc = (
            tables[7, low & 0xFF]
            ^ tables[6, (low >> 8) & 0xFF]
            ^ tables[5, (low >> 16) & 0xFF]
            ^ tables[4, (low >> 24) & 0xFF]
            ^ tables[3, data[i + 4]]
            ^ tables[2, data[i + 5]]
            ^ tables[1, data[i + 6]]
            ^ tables[0, data[i + 7]]
        )
        i += 8
    while i < n:  # the last 0-7 bytes, one at a time
        crc = tables[0, (crc ^ data[i]) & 0xFF] ^ (crc >> 8)
        i += 1
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """Return the (unmasked) CRC32C of ``data``'s bytes, as an int in [0, 2**32).

    An array is checksummed as its raw bytes in memory (C order).
    """
    if isinstance(data, np.ndarray):
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        raw = np.frombuffer(data, dtype=np.uint8)
    return int(_crc32c_kernel(raw, _CRC_TABLES))


def mask_crc(crc: int) -> int:
    """Mask a CRC the way LevelDB and TensorFlow store it: rotate right 15 bits, add a constant."""
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """Invert :func:`mask_crc`."""
    rotated = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# A bounds-checked byte cursor: varints, fixed-width integers, byte strings
# ---------------------------------------------------------------------------


class _Cursor:
    """Read forward through ``data[pos:end]``, refusing to run past ``end``.

    ``what`` describes the bytes (file, block, message) and starts every error
    message, so that a failure deep inside a parser still names its source.
    Every read either advances ``pos`` or raises, so loops over a cursor
    always terminate.
    """

    def __init__(self, data: bytes, what: str, pos: int = 0, end: int | None = None):
        self.data = data
        self.what = what
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def varint(self) -> int:
        """Decode a base-128 varint: 7 bits per byte, low bits first, high bit = "more"."""
        start = self.pos
        value = 0
        for shift in range(0, 70, 7):  # a 64-bit value needs at most 10 bytes
            if self.pos >= self.end:
                raise CheckpointError(f"{self.what}: truncated varint at byte {start}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value >= 1 << 64:
                    raise CheckpointError(f"{self.what}: varint at byte {start} overflows 64 bits")
                return value
        raise CheckpointError(f"{self.what}: varint at byte {start} is longer than 10 bytes")

    def take(self, n: int) -> bytes:
        """Return the next ``n`` bytes."""
        if n > self.end - self.pos:
            raise CheckpointError(
                f"{self.what}: {n} bytes expected at byte {self.pos}, "
                f"only {self.end - self.pos} remain"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(chunk)

    def uint_le(self, n: int) -> int:
        """Return the next ``n`` bytes as a little-endian unsigned integer."""
        return int.from_bytes(self.take(n), "little")


# ---------------------------------------------------------------------------
# Snappy (block compression type 1)
# ---------------------------------------------------------------------------

_SNAPPY_MAX_RATIO = 22  # a 3-byte copy element yields at most 64 bytes
# What the decoding kernel can report (with the input position and a detail).
_SNAPPY_OK, _SNAPPY_TRUNCATED, _SNAPPY_BAD_OFFSET, _SNAPPY_TOO_LONG = 0, 1, 2, 3


@njit(cache=True)
def _little_endian(data, pos, count):  # pragma: no cover - compiled by Numba
    value = 0
    for k in range(count):
        value |= np.int64(data[pos + k]) << (8 * k)
    return value


@njit(cache=True)
def _snappy_kernel(data, pos, out):  # pragma: no cover - compiled by Numba
    """Decode the elements of ``data[pos:]`` into ``out`` (its announced length).

    Returns ``(status, pos, produced, detail)``: on ``_SNAPPY_TRUNCATED`` the
    bytes needed at ``pos``, on ``_SNAPPY_BAD_OFFSET`` the offset."""
    n, o, expected = data.shape[0], 0, out.shape[0]
    while pos < n:
        tag = np.int64(data[pos])
        pos += 1
        kind = tag & 3
        if kind == 0:
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                if extra > n - pos:
                    return _SNAPPY_TRUNCATED, pos, o, extra
                length = _little_endian(data, pos, extra)
                pos += extra
            length += 1
            if length > n - pos:
                return _SNAPPY_TRUNCATED, pos, o, length
            if length > expected - o:
                return _SNAPPY_TOO_LONG, pos, o, 0
            out[o : o + length] = data[pos : pos + length]
            pos += length
        else:
            extra = 1 if kind == 1 else (2 if kind == 2 else 4)
            if extra > n - pos:
                return _SNAPPY_TRUNCATED, pos, o, extra
            if kind == 1:
                length = 4 + ((tag >> 2) & 7)
                offset = ((tag >> 5) << 8) | np.int64(data[pos])
            else:
                length = (tag >> 2) + 1
                offset = _little_endian(data, pos, extra)
            pos += extra
            if offset == 0 or offset > o:
                return _SNAPPY_BAD_OFFSET, pos, o, offset
            if length > expected - o:
                return _SNAPPY_TOO_LONG, pos, o, 0
            for k in range(length):  # byte by byte: an overlapping copy repeats its pattern
                out[o + k] = out[o - offset + k]
        o += length
    return _SNAPPY_OK, pos, o, 0


def snappy_decompress(data: bytes, what: str = "snappy block", max_length: int | None = None) -> bytes:
    """Decompress one raw Snappy block (no framing format).

    The block starts with the uncompressed length as a varint, then a
    sequence of elements.  The low 2 bits of each element's tag byte give
    its kind:

    * ``00`` literal: ``tag >> 2`` is ``length - 1`` if below 60; 60..63 mean
      that the next 1..4 bytes hold ``length - 1`` (little-endian).  The
      literal bytes follow.
    * ``01`` copy with 1-byte offset: length ``4 + ((tag >> 2) & 7)``, offset
      ``(tag >> 5) << 8 | next byte``.
    * ``10`` copy with 2-byte offset: length ``(tag >> 2) + 1``, offset in the
      next 2 bytes.
    * ``11`` copy with 4-byte offset: same, offset in the next 4 bytes.

    A copy repeats ``length`` bytes starting ``offset`` bytes back in the
    output; it may overlap what it writes (offset 1, length 5 repeats the
    last byte five times), which is run-length encoding for free.

    The work is bounded by the input: the announced length is checked
    against the most ``len(data)`` bytes can expand to (a 3-byte copy makes
    at most 64 bytes) before anything is allocated, and every element
    consumes at least one input byte.  ``max_length``, if given, caps the
    announced length too.  The loop over elements is compiled with Numba: a
    block of a million one-byte copies is legal, and takes seconds in Python.
    """
    cursor = _Cursor(data, what)
    expected = cursor.varint()
    if expected > _SNAPPY_MAX_RATIO * len(data):
        raise CheckpointError(
            f"{what}: uncompressed length {expected} is more than {len(data)} compressed "
            f"bytes can encode (at most {_SNAPPY_MAX_RATIO}x)"
        )
    if max_length is not None and expected > max_length:
        raise CheckpointError(f"{what}: uncompressed length {expected} is more than the {max_length} allowed")
    out = np.empty(expected, dtype=np.uint8)
    status, pos, produced, detail = _snappy_kernel(np.frombuffer(data, dtype=np.uint8), cursor.pos, out)
    if status == _SNAPPY_TRUNCATED:
        raise CheckpointError(f"{what}: {detail} bytes expected at byte {pos}, only {len(data) - pos} remain")
    if status == _SNAPPY_BAD_OFFSET:
        raise CheckpointError(f"{what}: copy offset {detail} at byte {pos} points outside "
                              f"the {produced} bytes decoded so far")
    if status == _SNAPPY_TOO_LONG:
        raise CheckpointError(f"{what}: decodes to more than the announced {expected} bytes")
    if produced != expected:
        raise CheckpointError(f"{what}: decoded {produced} bytes, announced {expected}")
    return out.tobytes()


# ---------------------------------------------------------------------------
# LevelDB table (SSTable): footer, block handles, blocks
# ---------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
# A MobileNetV2 training checkpoint's index is about 20-100 KB for some 1,100
# tensors; these bounds leave a wide margin and keep a hostile index cheap.
_MAX_INDEX_BYTES = 16 << 20
_MAX_TABLE_ENTRIES = 100_000
_FOOTER_SIZE = 48  # two handles of up to 2 * 10 varint bytes, zero padding, 8-byte magic
_HANDLES_SIZE = 40
_BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked CRC32C (4 bytes)
_NO_COMPRESSION, _SNAPPY_COMPRESSION = 0, 1


@dataclass(frozen=True)
class BlockHandle:
    """Where a block lies in a table file: ``size`` bytes at ``offset``, trailer excluded."""

    offset: int
    size: int


def _read_handle(cursor: _Cursor) -> BlockHandle:
    """A block handle is two varints: offset, then size."""
    return BlockHandle(cursor.varint(), cursor.varint())


def _parse_footer(data: bytes, path: Path) -> tuple[BlockHandle, BlockHandle]:
    """Return the (metaindex, index) block handles from the table's last 48 bytes."""
    if len(data) < _FOOTER_SIZE:
        raise CheckpointError(
            f"'{path}': truncated index: {len(data)} bytes, shorter than the "
            f"{_FOOTER_SIZE}-byte table footer"
        )
    footer = data[-_FOOTER_SIZE:]
    magic = int.from_bytes(footer[_HANDLES_SIZE:], "little")
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f"not a TensorFlow checkpoint index: bad magic {magic:#018x} "
            f"(expected {_TABLE_MAGIC:#018x}) at the end of '{path}'"
        )
    cursor = _Cursor(footer, f"'{path}': table footer", end=_HANDLES_SIZE)
    return _read_handle(cursor), _read_handle(cursor)


def _describe_block(path: Path, handle: BlockHandle, role: str) -> str:
    """Name a block for error messages.

    "index block" means a block of the checkpoint's ``.index`` file; ``role``
    says which kind of table block it is (a data block or the table's own
    index block, unfortunately also called "index").
    """
    return f"'{path}': index block at offset {handle.offset} ({role}, {handle.size} bytes)"


def _read_block(data: bytes, handle: BlockHandle, what: str, max_length: int) -> bytes:
    """Check a block's bounds and CRC, and return its (decompressed) contents,
    refusing a Snappy block that would decompress to more than ``max_length``."""
    blocks_end = len(data) - _FOOTER_SIZE
    end = handle.offset + handle.size
    if end + _BLOCK_TRAILER_SIZE > blocks_end:
        raise CheckpointError(
            f"{what} with its {_BLOCK_TRAILER_SIZE}-byte trailer runs past byte {blocks_end}, "
            f"where the footer starts: the file is truncated or corrupt"
        )
    # The CRC covers the block contents and the compression-type byte after them.
    computed = mask_crc(crc32c(memoryview(data)[handle.offset : end + 1]))
    stored = int.from_bytes(data[end + 1 : end + _BLOCK_TRAILER_SIZE], "little")
    if stored != computed:
        raise ChecksumError(
            f"{what} fails its CRC32C check: stored {stored:#010x}, computed {computed:#010x}"
        )
    compression = data[end]
    contents = data[handle.offset : end]
    if compression == _NO_COMPRESSION:
        if len(contents) > max_length:  # e.g. the same block listed over and over
            raise CheckpointError(f"{what}: the index's blocks hold more than {_MAX_INDEX_BYTES} bytes")
        return contents
    if compression == _SNAPPY_COMPRESSION:
        return snappy_decompress(contents, what, max_length)
    raise CheckpointError(
        f"{what}: unsupported block compression type {compression} "
        f"(expected {_NO_COMPRESSION} = none or {_SNAPPY_COMPRESSION} = snappy)"
    )


def _parse_block(block: bytes, what: str,
                 max_entries: int = _MAX_TABLE_ENTRIES) -> list[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed entries, checking its restart array;
    more than ``max_entries`` entries are refused."""
    if len(block) < 4:
        raise CheckpointError(f"{what}: {len(block)} bytes, too short for a restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    if num_restarts > (len(block) - 4) // 4:
        raise CheckpointError(
            f"{what}: claims {num_restarts} restart points, more than its "
            f"{len(block)} bytes can hold"
        )
    entries_end = len(block) - 4 - 4 * num_restarts
    restarts = struct.unpack_from(f"<{num_restarts}I", block, entries_end)

    cursor = _Cursor(block, what, end=entries_end)
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    # Offsets of entries storing their whole key (shared == 0); an empty block
    # still has one restart point, at offset 0.
    whole_key_starts = set() if entries_end else {0}
    while not cursor.at_end():
        start = cursor.pos
        shared, non_shared, value_length = cursor.varint(), cursor.varint(), cursor.varint()
        if shared > len(key):
            raise CheckpointError(
                f"{what}: entry at byte {start} shares {shared} key bytes with a "
                f"previous key of only {len(key)} bytes"
            )
        if shared == 0:
            whole_key_starts.add(start)
        key = key[:shared] + cursor.take(non_shared)
        entries.append((key, cursor.take(value_length)))
        if len(entries) > max_entries:
            raise CheckpointError(f"{what}: more than {_MAX_TABLE_ENTRIES:,} entries in the index")

    # Restart points must be entries whose key is stored whole: that is what
    # makes binary search over them possible.
    stray = sorted(set(restarts) - whole_key_starts)
    if stray:
        raise CheckpointError(
            f"{what}: restart point {stray[0]} is not the start of an entry with a whole key"
        )
    return entries


def read_table(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Return every ``(key, value)`` pair of a LevelDB table file, in key order.

    Reads the footer, then the index block, then each data block it points
    to.  Every block's CRC is verified.  Raises :class:`CheckpointError` if
    the file cannot be read or is malformed, :class:`ChecksumError` if a block
    is corrupted.
    """
    path = Path(path)
    size = check_regular_file(path, "checkpoint index").st_size
    if size > _MAX_INDEX_BYTES:
        raise CheckpointError(
            f"'{printable(path)}': {size:,} bytes is too large for a checkpoint index "
            f"(at most {_MAX_INDEX_BYTES:,}; a MobileNetV2's is about 20 KB)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path, "read checkpoint index") from None

    _metaindex, index_handle = _parse_footer(data, path)  # TensorFlow's metaindex is empty
    index_what = _describe_block(path, index_handle, "table index block")
    # Decompressed, the blocks together may hold no more than an index file may.
    budget = _MAX_INDEX_BYTES
    index_block = _read_block(data, index_handle, index_what, budget)
    budget -= len(index_block)
    pairs: list[tuple[bytes, bytes]] = []
    for _separator, handle_bytes in _parse_block(index_block, index_what):
        handle_cursor = _Cursor(handle_bytes, f"{index_what}: block handle")
        handle = _read_handle(handle_cursor)
        if not handle_cursor.at_end():
            raise CheckpointError(f"{index_what}: block handle has trailing bytes")
        block_what = _describe_block(path, handle, "data block")
        block = _read_block(data, handle, block_what, budget)
        budget -= len(block)
        pairs.extend(_parse_block(block, block_what, _MAX_TABLE_ENTRIES - len(pairs)))

    # Sorted, unique keys are the table's defining property; a table that
    # breaks it is corrupt, and duplicate names would silently shadow each other.
    for (previous, _), (key, _) in zip(pairs, pairs[1:]):
        if key <= previous:
            raise CheckpointError(f"'{path}': key {key!r} does not sort after {previous!r}")
    return pairs


# ---------------------------------------------------------------------------
# Protocol Buffers wire format
# ---------------------------------------------------------------------------

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


def _parse_message(data: bytes, what: str) -> dict[int, list[tuple[int, int | bytes]]]:
    """Split a serialized protobuf message into ``{field number: [(wire type, value), ...]}``.

    Varints and fixed-width fields become ints, length-delimited fields
    (strings, nested messages, packed arrays) stay bytes for the caller to
    interpret, since the wire format alone does not say which they are.
    """
    fields: dict[int, list[tuple[int, int | bytes]]] = {}
    cursor = _Cursor(data, what)
    while not cursor.at_end():
        tag = cursor.varint()
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise CheckpointError(f"{what}: field number 0 at byte {cursor.pos}")
        if wire_type == _WIRE_VARINT:
            value: int | bytes = cursor.varint()
        elif wire_type == _WIRE_FIXED64:
            value = cursor.uint_le(8)
        elif wire_type == _WIRE_BYTES:
            value = cursor.take(cursor.varint())
        elif wire_type == _WIRE_FIXED32:
            value = cursor.uint_le(4)
        else:  # 3 and 4 are the deprecated groups, 6 and 7 do not exist
            raise CheckpointError(f"{what}: field {number} has unsupported wire type {wire_type}")
        fields.setdefault(number, []).append((wire_type, value))
    return fields


def _repeated(fields, number: int, wire_type: int, what: str, name: str) -> list:
    """All values of field ``number``, checking they have the expected wire type."""
    values = []
    for found_type, value in fields.get(number, []):
        if found_type != wire_type:
            raise CheckpointError(
                f"{what}: field {name} (#{number}) has wire type {found_type}, expected {wire_type}"
            )
        values.append(value)
    return values


def _single(fields, number: int, wire_type: int, what: str, name: str, default):
    """The value of a singular field; as in protobuf, the last occurrence wins."""
    values = _repeated(fields, number, wire_type, what, name)
    return values[-1] if values else default


def _signed(value: int, bits: int, what: str, name: str) -> int:
    """Reinterpret a varint as a signed ``bits``-bit integer (negatives use 10-byte varints)."""
    if value >= 1 << 63:
        value -= 1 << 64
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise CheckpointError(f"{what}: {name} = {value} does not fit in int{bits}")
    return value


# ---------------------------------------------------------------------------
# Bundle header and entries
# ---------------------------------------------------------------------------

_MAX_ARRAY_BYTES = np.iinfo(np.intp).max
_BUNDLE_VERSION = 1  # kTensorBundleVersion: the format version this reader implements
_LITTLE_ENDIAN, _BIG_ENDIAN = 0, 1

# TensorFlow DataType enum (types.proto) -> NumPy dtype of the bytes on disk.
_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    8: np.dtype("<c8"),  # DT_COMPLEX64
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    18: np.dtype("<c16"),  # DT_COMPLEX128
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}


@dataclass(frozen=True)
class BundleHeader:
    """The ``BundleHeaderProto`` stored under the empty key of the index."""

    num_shards: int
    producer: int  # VersionDef.producer: format version of the writer
    min_consumer: int  # VersionDef.min_consumer: oldest reader version that may read it


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are and how to interpret them.

    ``crc32c`` is the *masked* CRC32C exactly as stored; compare it with
    ``mask_crc(crc32c(raw_bytes))``.
    """

    name: str
    dtype: np.dtype  # little-endian, as on disk
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int


def parse_bundle_header(value: bytes) -> BundleHeader:
    """Decode a ``BundleHeaderProto``; refuse big-endian or too-new bundles.

    Fields: ``num_shards = 1`` (int32), ``endianness = 2`` (enum: 0 little,
    1 big), ``version = 3`` (``VersionDef``: ``producer = 1``,
    ``min_consumer = 2``, repeated ``bad_consumers = 3``).
    """
    what = "BundleHeaderProto"
    fields = _parse_message(value, what)
    num_shards = _signed(_single(fields, 1, _WIRE_VARINT, what, "num_shards", 0), 32, what, "num_shards")
    endianness = _single(fields, 2, _WIRE_VARINT, what, "endianness", _LITTLE_ENDIAN)
    version = _parse_message(_single(fields, 3, _WIRE_BYTES, what, "version", b""), what + ", version")
    producer = _single(version, 1, _WIRE_VARINT, what, "version.producer", 0)
    min_consumer = _single(version, 2, _WIRE_VARINT, what, "version.min_consumer", 0)
    bad_consumers = _repeated(version, 3, _WIRE_VARINT, what, "version.bad_consumers")

    if endianness == _BIG_ENDIAN:
        raise CheckpointError(f"{what}: big-endian bundles are not supported")
    if endianness != _LITTLE_ENDIAN:
        raise CheckpointError(f"{what}: unknown endianness {endianness}")
    if num_shards < 1:
        raise CheckpointError(f"{what}: num_shards = {num_shards}, expected at least 1")
    if min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in bad_consumers:
        raise CheckpointError(
            f"{what}: bundle version (producer {producer}, min_consumer {min_consumer}, "
            f"bad_consumers {bad_consumers}) cannot be read by a version-{_BUNDLE_VERSION} reader"
        )
    return BundleHeader(num_shards=num_shards, producer=producer, min_consumer=min_consumer)


def _parse_shape(value: bytes, what: str) -> tuple[int, ...]:
    """Decode a ``TensorShapeProto``: repeated ``dim = 2 {size = 1, name = 2}``, ``unknown_rank = 3``."""
    fields = _parse_message(value, what)
    if _single(fields, 3, _WIRE_VARINT, what, "unknown_rank", 0):
        raise CheckpointError(f"{what}: shape has unknown rank")
    shape = []
    for dim_bytes in _repeated(fields, 2, _WIRE_BYTES, what, "dim"):
        dim = _parse_message(dim_bytes, f"{what}, dim {len(shape)}")
        size = _signed(_single(dim, 1, _WIRE_VARINT, what, "dim.size", 0), 64, what, "dim.size")
        if size < 0:
            raise CheckpointError(f"{what}: dimension {len(shape)} has size {size}")
        shape.append(size)
    return tuple(shape)


def parse_bundle_entry(value: bytes, name: str = "?") -> TensorEntry:
    """Decode the ``BundleEntryProto`` of tensor ``name`` into a :class:`TensorEntry`.

    Fields: ``dtype = 1`` (DataType enum), ``shape = 2`` (TensorShapeProto),
    ``shard_id = 3``, ``offset = 4``, ``size = 5`` (varints),
    ``crc32c = 6`` (fixed32, masked), ``slices = 7`` (repeated; only used by
    partitioned variables, which are refused).  The entry is checked for
    internal consistency: a supported dtype, non-negative numbers, and
    ``size == prod(shape) * itemsize``.  Whether the bytes actually exist in
    the shard is for the caller to check.
    """
    what = f"BundleEntryProto of tensor '{name}'"
    fields = _parse_message(value, what)
    if fields.get(7):
        raise CheckpointError(
            f"{what}: tensor is a partitioned variable (has slices), which is not supported"
        )
    dtype_enum = _signed(_single(fields, 1, _WIRE_VARINT, what, "dtype", 0), 32, what, "dtype")
    if dtype_enum not in _DTYPES:
        raise CheckpointError(f"{what}: unsupported dtype: DataType enum value {dtype_enum}")
    dtype = _DTYPES[dtype_enum]
    shape = _parse_shape(_single(fields, 2, _WIRE_BYTES, what, "shape", b""), what + ", shape")
    numbers = {}
    for number, field in [(3, "shard_id"), (4, "offset"), (5, "size")]:
        numbers[field] = _signed(_single(fields, number, _WIRE_VARINT, what, field, 0), 64, what, field)
        if numbers[field] < 0:
            raise CheckpointError(f"{what}: {field} = {numbers[field]} is negative")
    stored_crc = _single(fields, 6, _WIRE_FIXED32, what, "crc32c", 0)

    expected_size = math.prod(shape) * dtype.itemsize
    if numbers["size"] != expected_size:
        raise CheckpointError(
            f"{what}: size {numbers['size']} bytes, but shape {shape} of {dtype.name} "
            f"needs {expected_size}"
        )
    # NumPy refuses shapes whose nonzero dimensions multiply past its index
    # range, even when another dimension is 0 and the array would be empty.
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_ARRAY_BYTES:
        raise CheckpointError(f"{what}: shape {shape} is too large for a NumPy array")
    return TensorEntry(name=name, dtype=dtype, shape=shape, crc32c=stored_crc, **numbers)


# ---------------------------------------------------------------------------
# Checkpoint: the index, the shards, and lazy tensor reads
# ---------------------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_MAX_SHARDS = 99999  # shard file names carry 5-digit numbers


def _data_file(prefix: Path, shard_id: int, num_shards: int) -> Path:
    """Shard files are named ``PREFIX.data-00000-of-00002``, counting from 0."""
    return Path(f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}")


def _resolve_prefix(path: str | os.PathLike) -> Path:
    """Turn a directory, ``.index`` file, data shard or prefix into the checkpoint prefix."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"directory '{path}' must contain exactly one *.index file, "
                f"found {len(indexes)}; its contents: {found[:20]}"
            )
        path = indexes[0]
    text = str(path)
    if text.endswith(".index"):
        return Path(text[: -len(".index")])
    return Path(_DATA_SUFFIX.sub("", text))


class Checkpoint(collections.abc.Mapping):
    """A TensorFlow checkpoint as a read-only mapping: variable name -> ``np.ndarray``.

    Tensors are read lazily: ``ckpt[name]`` reads exactly that tensor's bytes
    from its shard, verifies their CRC32C (if ``verify``) and returns a fresh,
    writable, native-endian array.  Iteration follows the index's sorted key
    order.  Build one with :func:`read_checkpoint`.

    Attributes: ``prefix``, ``index_file``, ``data_files`` (one path per
    shard), ``header`` (:class:`BundleHeader`), ``entries`` (name ->
    :class:`TensorEntry`), ``verify``.
    """

    def __init__(
        self,
        prefix: Path,
        header: BundleHeader,
        entries: dict[str, TensorEntry],
        verify: bool = True,
    ):
        self.prefix = prefix
        self.index_file = Path(f"{prefix}.index")
        self.data_files = tuple(
            _data_file(prefix, shard, header.num_shards) for shard in range(header.num_shards)
        )
        self.header = header
        self.entries = entries
        self.verify = verify

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        return _read_tensor(entry, self.data_files[entry.shard_id], self.verify)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"<Checkpoint '{self.prefix}': {len(self.entries)} tensors "
            f"in {len(self.data_files)} shard(s)>"
        )


def _empty_array(entry: TensorEntry, where: str) -> np.ndarray:
    """Allocate the tensor's array; NumPy caps the rank (32 in 1.x, 64 in 2.x, 254 in TF)."""
    try:
        return np.empty(entry.shape, dtype=entry.dtype)
    except ValueError as exc:
        raise CheckpointError(f"{where}: NumPy cannot hold shape {entry.shape}: {exc}") from None


def _read_tensor(entry: TensorEntry, data_file: Path, verify: bool) -> np.ndarray:
    """Read, check and return one tensor's bytes from its shard."""
    where = f"tensor '{entry.name}' in '{data_file}' (offset {entry.offset}, {entry.size} bytes)"
    try:
        with open(data_file, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            # Check before allocating: a corrupt entry must not cost gigabytes.
            if entry.offset + entry.size > file_size:
                raise CheckpointError(
                    f"{where} runs past the end of the {file_size}-byte shard: "
                    f"the data file is truncated"
                )
            array = _empty_array(entry, where)
            raw = array.reshape(-1).view(np.uint8)  # the same memory, as bytes
            f.seek(entry.offset)
            got = f.readinto(raw)
    except OSError as exc:
        raise os_error(exc, data_file, f"read tensor '{printable(entry.name)}' from") from None
    if got != entry.size:
        raise CheckpointError(f"{where}: read only {got} bytes, the data file is truncated")
    if verify:
        computed = mask_crc(crc32c(raw))
        if computed != entry.crc32c:
            raise ChecksumError(
                f"{where} fails its CRC32C check: stored {entry.crc32c:#010x}, "
                f"computed {computed:#010x}"
            )
    if not array.dtype.isnative:  # only on big-endian machines
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _decode_name(key: bytes, index_file: Path) -> str:
    """A tensor's name is its UTF-8 key; keys starting with NUL encode partition slices."""
    if key.startswith(b"\x00"):
        raise CheckpointError(
            f"'{index_file}': key {key!r} is a slice of a partitioned variable, which is not supported"
        )
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"'{index_file}': tensor name {key!r} is not valid UTF-8: {exc}") from None


def _shard_sizes(prefix: Path, header: BundleHeader, index_file: Path) -> list[int]:
    """Return the size in bytes of every data shard, refusing a missing one."""
    if header.num_shards > _MAX_SHARDS:
        raise CheckpointError(
            f"'{index_file}': header claims {header.num_shards} shards, "
            f"at most {_MAX_SHARDS} are possible"
        )
    sizes = []
    for shard in range(header.num_shards):
        path = _data_file(prefix, shard, header.num_shards)
        if not path.exists():
            raise CheckpointError(
                f"checkpoint '{printable(prefix)}': missing data shard '{printable(path)}' "
                f"(shard {shard} of {header.num_shards})"
            )
        sizes.append(check_regular_file(path, "checkpoint data shard").st_size)
    return sizes


# A training checkpoint holds each variable up to four times (value, moving
# average, two optimizer slots), in float32: 16 bytes per value of the
# largest network mnv2ref loads, about 197 MB.
MAX_CHECKPOINT_BYTES = 16 * MAX_MODEL_VALUES


def _check_layout(entries: dict[str, TensorEntry], index_file: Path) -> None:
    """Refuse entries whose bytes overlap (a tiny index can point thousands
    of tensors at one block and cost gigabytes to read) and a total larger
    than ``MAX_CHECKPOINT_BYTES``, before any tensor is read."""
    total = sum(entry.size for entry in entries.values())
    if total > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"'{printable(index_file)}': its tensors declare {total:,} bytes, more than the "
            f"{MAX_CHECKPOINT_BYTES:,} a MobileNetV2 checkpoint can need"
        )
    spans = sorted((e.shard_id, e.offset, e.offset + e.size, e.name) for e in entries.values() if e.size)
    for (shard, _, end, name), (next_shard, start, _, next_name) in zip(spans, spans[1:]):
        if shard == next_shard and start < end:
            raise CheckpointError(
                f"'{printable(index_file)}': tensors '{printable(name)}' and '{printable(next_name)}' "
                f"share bytes {start}-{end} of shard {shard}: each tensor must have bytes of its own"
            )


def read_checkpoint(prefix: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Open a TensorFlow V2 checkpoint and read its index (tensors are read on access).

    ``prefix`` may be the checkpoint prefix (``dir/model.ckpt``), its
    ``.index`` file, one of its ``.data-NNNNN-of-MMMMM`` shards, or a
    directory holding exactly one ``*.index`` file.  With ``verify=False``
    tensor CRCs are not checked (the index blocks' CRCs always are).

    Every entry is checked against the header and the shard sizes now, so
    that a bad checkpoint fails here rather than halfway through loading.
    """
    prefix = _resolve_prefix(prefix)
    index_file = Path(f"{prefix}.index")
    if not index_file.exists():
        parent = index_file.parent
        nearby = sorted(p.name for p in parent.glob(f"{prefix.name}*")) if parent.is_dir() else []
        raise CheckpointError(
            f"checkpoint index not found: '{index_file}' does not exist"
            + (f" (found {nearby})" if nearby else "")
        )

    pairs = read_table(index_file)
    if not pairs or pairs[0][0] != b"":
        raise CheckpointError(f"'{index_file}': no BundleHeaderProto under the empty key")
    try:
        header = parse_bundle_header(pairs[0][1])
    except CheckpointError as exc:
        raise CheckpointError(f"'{index_file}': {exc}") from None
    shard_sizes = _shard_sizes(prefix, header, index_file)

    entries = {}
    for key, value in pairs[1:]:
        name = _decode_name(key, index_file)
        try:
            entry = parse_bundle_entry(value, name)
        except CheckpointError as exc:
            raise CheckpointError(f"'{index_file}': {exc}") from None
        if entry.shard_id >= header.num_shards:
            raise CheckpointError(
                f"'{index_file}': tensor '{name}' is in shard {entry.shard_id}, "
                f"but the checkpoint has {header.num_shards}"
            )
        if entry.offset + entry.size > shard_sizes[entry.shard_id]:
            data_file = _data_file(prefix, entry.shard_id, header.num_shards)
            raise CheckpointError(
                f"tensor '{name}' (offset {entry.offset}, {entry.size} bytes) runs past the end "
                f"of '{data_file}' ({shard_sizes[entry.shard_id]} bytes): the data file is truncated"
            )
        entries[name] = entry
    _check_layout(entries, index_file)
    return Checkpoint(prefix, header, entries, verify=verify)
