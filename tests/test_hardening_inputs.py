"""Inputs as users really hold them, and images that are traps (issue 14, parts 1, 4, 10).

Arrays that are memory-mapped, read-only or non-contiguous must give exactly
the results of an ordinary array on both backends; image files that declare
absurd sizes, carry compressed bombs or are in formats TensorFlow never reads
must be refused before any work is done.
"""

import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnv2ref.errors import ImageError, InputError
from mnv2ref.preprocessing import ACCEPTED_FORMATS, MAX_IMAGE_PIXELS, MAX_SIZE, load_image, preprocess, resize_bilinear

SIZE = 40  # small inputs: the point is the array's memory, not its size


@pytest.fixture(scope="module")
def reference(synthetic):
    x = np.random.default_rng(3).uniform(-1, 1, size=(2, SIZE, SIZE, 3)).astype(np.float32)
    return x


def read_only_variants(x, tmp_path):
    """The same values as x, held in the ways that broke the Numba backend."""
    np.save(tmp_path / "x.npy", x)
    frozen = x.copy()
    frozen.flags.writeable = False
    wide = np.zeros((x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3]), dtype=x.dtype)
    wide[:, :, ::2] = x
    return {
        "mmap": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "frombuffer": np.frombuffer(x.tobytes(), dtype=x.dtype).reshape(x.shape),
        "writeable=False": frozen,
        "strided view": wide[:, :, ::2],
        "Fortran order": np.asfortranarray(x),
        "reversed view": np.ascontiguousarray(x[:, ::-1])[:, ::-1],
    }


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_only_and_strided_inputs_give_identical_results(synthetic, reference, tmp_path, backend, dtype):
    x = reference.astype(dtype)
    probs = synthetic.predict(x, backend=backend)
    features = synthetic.embed(x, backend=backend)
    layer_5 = synthetic.endpoints(x, backend=backend, until="layer_5")
    for kind, variant in read_only_variants(x, tmp_path).items():
        np.testing.assert_array_equal(synthetic.predict(variant, backend=backend), probs, err_msg=kind)
        np.testing.assert_array_equal(synthetic.embed(variant, backend=backend), features, err_msg=kind)
        got = synthetic.endpoints(variant, backend=backend, until="layer_5")
        for name in layer_5:
            np.testing.assert_array_equal(got[name], layer_5[name], err_msg=f"{kind}: {name}")
        assert not np.shares_memory(got["layer_1"], variant)


def test_one_layer_on_read_only_inputs(synthetic, reference, tmp_path):
    stem = synthetic.fast.layer("layer_1", reference)
    block = synthetic.fast.layer("layer_3", synthetic.fast.layer("layer_2", stem))
    for kind, variant in read_only_variants(reference, tmp_path).items():
        np.testing.assert_array_equal(synthetic.fast.layer("layer_1", variant), stem, err_msg=kind)
    for kind, variant in read_only_variants(synthetic.fast.layer("layer_2", stem), tmp_path).items():
        np.testing.assert_array_equal(synthetic.fast.layer("layer_3", variant), block, err_msg=kind)
    numpy_stem = synthetic.layers[0](reference)          # the NumPy layers, one at a time
    numpy_block = synthetic.layers[1](numpy_stem)
    for kind, variant in read_only_variants(reference, tmp_path).items():
        np.testing.assert_array_equal(synthetic.layers[0](variant), numpy_stem, err_msg=kind)
    for kind, variant in read_only_variants(numpy_stem, tmp_path).items():
        np.testing.assert_array_equal(synthetic.layers[1](variant), numpy_block, err_msg=kind)


def test_converted_interface_on_a_memory_mapped_nchw_batch(synthetic, reference, tmp_path):
    bgr = np.ascontiguousarray(((reference + 1) * 127.5)[..., ::-1].transpose(0, 3, 1, 2))
    np.save(tmp_path / "nchw.npy", bgr)
    mapped = np.load(tmp_path / "nchw.npy", mmap_mode="r")
    interface = dict(layout="NCHW", color="BGR", scale="0-255")
    np.testing.assert_array_equal(synthetic.predict(mapped, **interface), synthetic.predict(bgr, **interface))


# ---------------------------------------------------------------------------
# Resolution limits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [10**6, 60000, (224, MAX_SIZE + 1)])
def test_preprocess_refuses_sizes_beyond_the_limit(size):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(InputError, match=f"at most {MAX_SIZE}"):
        preprocess(image, size=size)
    with pytest.raises(InputError, match=f"at most {MAX_SIZE}"):
        resize_bilinear(image, *(size if isinstance(size, tuple) else (size, size)))


def test_preprocess_at_the_limit_works():
    assert preprocess(np.zeros((2, 2, 3), dtype=np.uint8), size=(1, MAX_SIZE)).shape == (1, MAX_SIZE, 3)


# ---------------------------------------------------------------------------
# Image files that are traps
# ---------------------------------------------------------------------------

def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, idat=b"", extra_chunks=(), color_type=0, bit_depth=1):
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + b"".join(extra_chunks)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def test_image_declaring_13300_squared_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(13300, 13300, zlib.compress(b"\0" * 4096)))
    assert path.stat().st_size < 512 * 1024
    with pytest.raises(ImageError, match=f"13300x13300 pixels, more than the {MAX_IMAGE_PIXELS:,}"):
        load_image(path)


def test_an_image_at_the_limit_is_not_refused_for_its_size(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5)
    path = tmp_path / "large.png"  # a valid header, truncated pixels: fails later, while decoding
    path.write_bytes(png(side, side, zlib.compress(b"\0" * 64)))
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "more than the" not in str(info.value)


@pytest.mark.parametrize("chunk", [b"zTXt", b"iCCP"])
def test_compressed_png_chunk_bomb_is_refused_cleanly(tmp_path, chunk):
    bomb = zlib.compress(b"\0" * (64 << 20), 9)     # 64 MiB of zeros in ~64 KB
    body = b"comment\0\0" + bomb if chunk == b"zTXt" else b"profile\0\0" + bomb
    row = b"\0" + b"\xff"                              # one filter byte, 8 white pixels
    path = tmp_path / f"{chunk.decode()}.png"
    path.write_bytes(png(8, 1, zlib.compress(row), [png_chunk(chunk, body)]))
    try:
        pixels = load_image(path)
    except ImageError as error:
        assert "too large" in str(error).lower() or "decompress" in str(error).lower()
    else:  # Pillow skipped the chunk: then the pixels must be right
        np.testing.assert_array_equal(pixels, np.full((1, 8, 3), 255, dtype=np.uint8))


def test_postscript_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "cat.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n"
                     b"showpage\n%%EOF\n")
    with pytest.raises(ImageError, match="not a recognised image file: mnv2ref reads JPEG, PNG, GIF, BMP, WEBP"):
        load_image(path)
    assert not marker.exists()
    # The stand-in is real: Pillow left to itself does hand the file to it.
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    with pytest.raises(Exception):
        with Image.open(path) as img:
            img.load()
    assert marker.exists()


@pytest.mark.parametrize("fmt,suffix", [("TIFF", "tif"), ("PPM", "ppm"), ("ICO", "ico")])
def test_formats_tensorflow_does_not_read_are_refused_by_name(tmp_path, fmt, suffix):
    path = tmp_path / f"x.{suffix}"
    Image.new("RGB", (4, 4)).save(path, format=fmt)
    with pytest.raises(ImageError, match="reads JPEG, PNG, GIF, BMP, WEBP"):
        load_image(path)


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_accepted_formats_load(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (4, 3), (0, 128, 255)).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert load_image(path).shape == (3, 4, 3)


def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="pipe.png.*FIFO"):
        load_image(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="character device"):
        load_image("/dev/zero")


def test_image_names_with_control_characters_stay_on_one_line(tmp_path):
    path = tmp_path / "evil\n\x1b[31mname\t.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "\t" not in message
    assert "evil\\n\\x1b[31mname\\t.png" in message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       color_type=st.sampled_from([0, 2, 3, 4, 6]), bit_depth=st.sampled_from([1, 8, 16]),
       pixels=st.binary(max_size=64))
def test_fuzzed_png_headers_decode_or_fail_cleanly(tmp_path, width, height, color_type, bit_depth, pixels):
    path = tmp_path / "fuzz.png"
    path.write_bytes(png(width, height, zlib.compress(pixels), color_type=color_type, bit_depth=bit_depth))
    try:
        rgb = load_image(path)
    except ImageError as error:
        assert "\n" not in str(error)
        if width * height > MAX_IMAGE_PIXELS:  # refused from the header (Pillow's IHDR checks come first)
            assert any(reason in str(error) for reason in ("decompression bomb", "corrupt", "recognised"))
    else:
        assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
