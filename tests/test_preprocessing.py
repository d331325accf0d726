"""Image loading and TF-slim eval preprocessing.

* ``preprocess(load_image(...))`` against TensorFlow's own output (goldens).
* ``resize_bilinear`` against slow loops; ``central_crop`` against hand-computed bounds.
* ``load_image`` on every Pillow mode, written to ``tmp_path``, and on broken files.
"""

import math
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from mnv2ref.errors import ImageError, InputError, Mnv2refError
from mnv2ref.preprocessing import (_pil_to_rgb, central_crop, central_crop_bounds, load_image, preprocess,
                                   resize_bilinear, to_unit_float)

GOLDENS = [
    ("backbone_1.0_224_chelsea.npz", "chelsea.png"),
    ("backbone_1.0_224_coffee.npz", "coffee.png"),
    ("synthetic_0.35_224_chelsea_ema.npz", "chelsea.png"),
]


# ---------------------------------------------------------------------------
# Against TensorFlow
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("golden, image", GOLDENS)
def test_matches_tensorflow_golden_input(shared_dir, golden, image):
    expected = np.load(shared_dir / "golden" / golden)["input"]
    got = preprocess(load_image(shared_dir / "images" / image))[None]
    assert got.shape == expected.shape == (1, 224, 224, 3)
    assert got.dtype == np.float32
    max_err = float(np.max(np.abs(got.astype(np.float64) - expected)))
    print(f"{golden}: max abs error vs TensorFlow = {max_err:.3g}")
    assert max_err <= 1e-6
    # The arithmetic follows TensorFlow operation for operation, so the match
    # is exact; losing that means an operation order or precision changed.
    assert np.array_equal(got, expected), f"no longer bit-exact (max error {max_err:.3g})"


def test_multiplying_by_reciprocal_is_not_dividing():
    """Why to_unit_float multiplies: x * float32(1/255) != x / 255 for many x."""
    x = np.arange(256, dtype=np.uint8)
    mul = to_unit_float(x)
    div = x.astype(np.float32) / np.float32(255)
    assert mul.dtype == np.float32
    assert mul[0] == 0 and mul[255] == np.float32(1.0 / 255) * 255
    assert np.count_nonzero(mul != div) > 10


# ---------------------------------------------------------------------------
# resize_bilinear
# ---------------------------------------------------------------------------


def loop_resize_tf(x, out_h, out_w):
    """resize_bilinear_op.cc transcribed literally: scalar float32 arithmetic."""
    n, in_h, in_w, c = x.shape
    f32 = np.float32
    out = np.empty((n, out_h, out_w, c), dtype=np.float32)
    h_scale, w_scale = f32(in_h) / f32(out_h), f32(in_w) / f32(out_w)
    for b in range(n):
        for y in range(out_h):
            in_y = f32(y) * h_scale
            y0, y1 = max(int(math.floor(in_y)), 0), min(int(math.ceil(in_y)), in_h - 1)
            ly = in_y - f32(math.floor(in_y))
            for xx in range(out_w):
                in_x = f32(xx) * w_scale
                x0, x1 = max(int(math.floor(in_x)), 0), min(int(math.ceil(in_x)), in_w - 1)
                lx = in_x - f32(math.floor(in_x))
                for ch in range(c):
                    tl, tr = f32(x[b, y0, x0, ch]), f32(x[b, y0, x1, ch])
                    bl, br = f32(x[b, y1, x0, ch]), f32(x[b, y1, x1, ch])
                    top = tl + (tr - tl) * lx
                    bottom = bl + (br - bl) * lx
                    out[b, y, xx, ch] = top + (bottom - top) * ly
    return out


def loop_resize_textbook(x, out_h, out_w):
    """Bilinear interpolation from its definition, in float64.

    Output pixel (y, x) samples the source at (y * in_h / out_h, x * in_w / out_w)
    -- corner-anchored, no half-pixel offset -- clamped at the bottom/right edge.
    """
    n, in_h, in_w, c = x.shape
    out = np.zeros((n, out_h, out_w, c), dtype=np.float64)
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(sy)
        y1 = min(y0 + 1, in_h - 1)
        wy = sy - y0
        for xx in range(out_w):
            sx = xx * in_w / out_w
            x0 = int(sx)
            x1 = min(x0 + 1, in_w - 1)
            wx = sx - x0
            out[:, y, xx] = ((1 - wy) * (1 - wx) * x[:, y0, x0] + (1 - wy) * wx * x[:, y0, x1]
                             + wy * (1 - wx) * x[:, y1, x0] + wy * wx * x[:, y1, x1])
    return out


RESIZE_CASES = [
    ((5, 7), (9, 11)),     # upscale
    ((12, 10), (5, 3)),    # downscale
    ((7, 9), (7, 4)),      # one axis unchanged
    ((3, 13), (8, 5)),     # up in y, down in x
    ((1, 1), (4, 3)),      # a single pixel
    ((6, 6), (1, 1)),      # down to a single pixel
    ((11, 17), (13, 19)),  # odd, coprime sizes
]


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("in_size, out_size", RESIZE_CASES)
def test_resize_bilinear_against_loops(in_size, out_size, channels):
    rng = np.random.default_rng(sum(in_size) * 100 + sum(out_size) + channels)
    x = rng.uniform(-2, 3, size=(2, *in_size, channels)).astype(np.float32)
    got = resize_bilinear(x, *out_size)
    assert got.shape == (2, *out_size, channels) and got.dtype == np.float32
    np.testing.assert_array_equal(got, loop_resize_tf(x, *out_size))
    np.testing.assert_allclose(got, loop_resize_textbook(x.astype(np.float64), *out_size),
                               rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(in_h=st.integers(1, 9), in_w=st.integers(1, 9), out_h=st.integers(1, 12),
       out_w=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_resize_bilinear_property(in_h, in_w, out_h, out_w, seed):
    x = np.random.default_rng(seed).uniform(0, 1, size=(1, in_h, in_w, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_bilinear(x, out_h, out_w), loop_resize_tf(x, out_h, out_w))


def test_resize_bilinear_tensorflow_unit_test_values():
    """resize_bilinear_op_test.cc: 2x2 -> 3x3 and 2x2 -> 1x1."""
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)[:, :, None]
    expected = np.array([[1, 5 / 3, 2], [7 / 3, 3, 10 / 3], [3, 11 / 3, 4]])
    np.testing.assert_allclose(resize_bilinear(x, 3, 3)[:, :, 0], expected, atol=1e-6)
    assert resize_bilinear(x, 1, 1)[0, 0, 0] == 1.0  # samples the top-left corner


def test_resize_bilinear_shapes_dtypes_and_identity():
    x = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    y = resize_bilinear(x, 2, 4)                 # 3-D in, 3-D out; same size
    assert y.shape == (2, 4, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))
    assert resize_bilinear(x.astype(np.float64), 5, 7).dtype == np.float32
    np.testing.assert_array_equal(resize_bilinear(np.full((1, 1, 3), 0.25), 6, 5),
                                  np.full((6, 5, 3), 0.25, np.float32))


@pytest.mark.parametrize("args", [
    (np.zeros((4, 4)), 2, 2),                    # rank 2
    (np.zeros((1, 1, 4, 4, 3)), 2, 2),           # rank 5
    (np.zeros((0, 4, 3)), 2, 2),                 # empty
    (np.zeros((4, 4, 3), dtype=bool), 2, 2),     # not numbers
    (np.zeros((4, 4, 3)), 0, 2),                 # zero size
    (np.zeros((4, 4, 3)), 2.5, 2),               # not an int
])
def test_resize_bilinear_refuses(args):
    with pytest.raises(InputError):
        resize_bilinear(*args)


# ---------------------------------------------------------------------------
# central_crop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size, fraction, start, length", [
    (300, 0.875, 18, 264),   # (300 - 262.5) / 2 = 18.75 -> 18
    (451, 0.875, 28, 395),   # (451 - 394.625) / 2 = 28.1875 -> 28
    (224, 0.875, 14, 196),   # exactly 14
    (10, 0.875, 0, 10),      # 0.625 -> 0: nothing cropped
    (17, 0.5, 4, 9),         # 4.25 -> 4
    (16, 0.5, 4, 8),
    (3, 0.1, 1, 1),          # 1.35 -> 1
    (1, 0.875, 0, 1),        # a 1-pixel side is kept
    (1, 0.01, 0, 1),
    (257, 1.0, 0, 257),
])
def test_central_crop_bounds(size, fraction, start, length):
    assert central_crop_bounds(size, size, fraction) == (start, start, length, length)


def test_central_crop_values_and_ranks():
    img = np.arange(11 * 8 * 2).reshape(11, 8, 2)
    top, left, h, w = central_crop_bounds(11, 8, 0.5)
    assert (top, left, h, w) == (2, 2, 7, 4)   # (11-5.5)/2=2.75 -> 2; (8-4)/2 = 2
    np.testing.assert_array_equal(central_crop(img, 0.5), img[2:9, 2:6])
    batch = np.stack([img, img + 1])
    np.testing.assert_array_equal(central_crop(batch, 0.5), batch[:, 2:9, 2:6])
    assert central_crop(img, 1.0).shape == img.shape


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "0.5", None, True])
def test_central_crop_refuses_bad_fraction(fraction):
    with pytest.raises(InputError):
        central_crop(np.zeros((4, 4, 3)), fraction)


def test_central_crop_refuses_bad_rank():
    with pytest.raises(InputError, match=r"\(4, 4\)"):
        central_crop(np.zeros((4, 4)))


# ---------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------


def manual_preprocess(rgb, out_h, out_w, fraction=0.875):
    """The TF-slim steps, written out."""
    x = rgb.astype(np.float32) * np.float32(1 / 255)
    top, left, h, w = central_crop_bounds(x.shape[0], x.shape[1], fraction)
    x = x[top:top + h, left:left + w]
    x = loop_resize_tf(x[None], out_h, out_w)[0]
    return (x - np.float32(0.5)) * np.float32(2.0)


@pytest.mark.parametrize("size, shape", [(192, (192, 192)), (160, (160, 160)),
                                         ((225, 193), (225, 193)), ((7, 5), (7, 5))])
def test_preprocess_other_sizes(size, shape):
    rgb = np.random.default_rng(0).integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    x = preprocess(rgb, size=size)
    assert x.shape == (*shape, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    if shape[0] * shape[1] < 100:
        np.testing.assert_array_equal(x, manual_preprocess(rgb, *shape))


def test_preprocess_tiny_images():
    one = preprocess(np.array([[[0, 128, 255]]], dtype=np.uint8))
    assert one.shape == (224, 224, 3)
    np.testing.assert_array_equal(one[..., 0], -1.0)
    np.testing.assert_array_equal(one[..., 2], 1.0)
    assert np.all(one[..., 1] == one[0, 0, 1])
    two = np.random.default_rng(1).integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(two, size=(5, 4)), manual_preprocess(two, 5, 4))


def test_preprocess_float_input_is_taken_as_unit_range():
    rgb = np.random.default_rng(2).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    unit = to_unit_float(rgb)
    np.testing.assert_array_equal(preprocess(unit, 16), preprocess(rgb, 16))
    assert preprocess(unit.astype(np.float64), 16).dtype == np.float32


def test_preprocess_without_crop():
    rgb = np.random.default_rng(3).integers(0, 256, size=(9, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(rgb, 4, central_fraction=None),
                                  manual_preprocess(rgb, 4, 4, fraction=1.0))


@pytest.mark.parametrize("array, match", [
    (np.zeros((8, 8), np.uint8), r"\(H, W, 3\).*\(8, 8\)"),
    (np.zeros((8, 8, 1), np.uint8), r"\(8, 8, 1\)"),
    (np.zeros((8, 8, 4), np.uint8), r"\(8, 8, 4\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), r"\(1, 8, 8, 3\).*batch"),
    (np.zeros((0, 8, 3), np.uint8), r"non-empty"),
    (np.zeros((8, 8, 3), np.int64), r"int64"),
    (np.zeros((8, 8, 3), np.uint16), r"uint16"),
    (np.zeros((8, 8, 3), bool), r"bool"),
    (np.full((8, 8, 3), 200.0, np.float32), r"\[0, 1\].*200"),
    (np.full((8, 8, 3), -0.5), r"\[0, 1\]"),
    (np.full((8, 8, 3), np.nan, np.float32), r"NaN"),
    ([[1, 2, 3]], r"\(1, 3\)"),
    ([[[1, 2, 3]], [[1, 2]]], r"list"),
])
def test_preprocess_refuses_bad_arrays(array, match):
    with pytest.raises(InputError, match=match):
        preprocess(array)


@pytest.mark.parametrize("kwargs", [
    {"size": 0}, {"size": -3}, {"size": 2.5}, {"size": True}, {"size": (224,)},
    {"size": (224, 224, 3)}, {"size": "224"}, {"central_fraction": 0},
    {"central_fraction": 1.5},
])
def test_preprocess_refuses_bad_arguments(kwargs):
    with pytest.raises(InputError):
        preprocess(np.zeros((8, 8, 3), np.uint8), **kwargs)


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        preprocess(np.zeros((8, 8), np.uint8))


# ---------------------------------------------------------------------------
# load_image: modes
# ---------------------------------------------------------------------------


def write_png(path, samples, color_type, bit_depth, extra_chunks=()):
    """Write a minimal PNG by hand, for bit depths and modes Pillow cannot save.

    samples: (H, W, C) integers already at ``bit_depth``.
    """
    samples = np.asarray(samples)
    rows = []
    for row in samples:
        if bit_depth == 16:
            raw = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            raw = row.astype(np.uint8).tobytes()
        else:
            bits = np.unpackbits(row.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - bit_depth:]
            raw = np.packbits(bits.ravel()).tobytes()
        rows.append(b"\0" + raw)  # filter type 0

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    h, w = samples.shape[:2]
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + b"".join(chunk(k, d) for k, d in extra_chunks)
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return path


def pil_read(path):
    """(mode, info, pixels) as Pillow itself decodes the file, closing it afterwards."""
    with Image.open(path) as img:
        return img.mode, dict(img.info), np.asarray(img)


def pil_to_rgb(path):
    """The mode conversion of load_image on a file of any Pillow format
    (load_image itself reads only TensorFlow's formats: TIFF is refused)."""
    with Image.open(path) as img:
        img.load()
        return np.array(_pil_to_rgb(img, str(path)))


def check_rgb(arr, shape):
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8 and arr.shape == (*shape, 3)
    assert arr.flags.writeable and arr.flags.c_contiguous


def test_load_rgb_png_is_exact(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got = load_image(tmp_path / "rgb.png")
    check_rgb(got, (5, 7))
    np.testing.assert_array_equal(got, rgb)
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb.png")), rgb)  # str path too


def test_load_grey(tmp_path):
    grey = np.array([[0, 17, 255], [128, 1, 254]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    got = load_image(tmp_path / "l.png")
    check_rgb(got, (2, 3))
    np.testing.assert_array_equal(got, np.repeat(grey[:, :, None], 3, axis=2))


def test_load_grey_alpha_drops_alpha(tmp_path):
    la = np.array([[[10, 0], [200, 255]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    got = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(got, [[[10] * 3, [200] * 3]])


def test_load_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png")
    # A fully transparent pixel keeps its colour: not black, not white.
    np.testing.assert_array_equal(got, rgba[:, :, :3])


def test_load_palette(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"),
                                  [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    img.info["transparency"] = 1          # tRNS: index 1 fully transparent
    img.save(tmp_path / "pt.png", transparency=1)
    assert "transparency" in pil_read(tmp_path / "pt.png")[1]
    np.testing.assert_array_equal(load_image(tmp_path / "pt.png"),
                                  [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])


def test_load_palette_gif(tmp_path):
    img = Image.new("P", (2, 2))
    img.putpalette([9, 8, 7, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1, 1, 0])
    img.save(tmp_path / "p.gif", transparency=0)
    got = load_image(tmp_path / "p.gif")
    np.testing.assert_array_equal(got, [[[9, 8, 7], [200, 100, 50]], [[200, 100, 50], [9, 8, 7]]])


def test_load_bilevel(tmp_path):
    img = Image.new("1", (3, 2))
    img.putdata([0, 1, 0, 1, 1, 0])
    img.save(tmp_path / "b.png")
    got = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(got[:, :, 0], [[0, 255, 0], [255, 255, 0]])
    assert np.all(got == got[:, :, :1])


def test_load_low_bit_depth_grey_png(tmp_path):
    write_png(tmp_path / "g2.png", [[[0], [1], [2], [3]]], color_type=0, bit_depth=2)
    np.testing.assert_array_equal(load_image(tmp_path / "g2.png")[0, :, 0], [0, 85, 170, 255])
    write_png(tmp_path / "g4.png", [[[0], [5], [15]]], color_type=0, bit_depth=4)
    np.testing.assert_array_equal(load_image(tmp_path / "g4.png")[0, :, 0], [0, 85, 255])


def test_load_16_bit_grey_keeps_high_byte(tmp_path):
    grey = np.array([[0x0000, 0x12FF, 0x8000], [0xFF00, 0xFFFF, 0x00FF]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert pil_read(tmp_path / "g16.png")[0].startswith("I")
    got = load_image(tmp_path / "g16.png")
    check_rgb(got, (2, 3))
    # Truncation, like png_set_strip_16: 0x12FF -> 0x12, not round(0x12FF / 257) = 0x13.
    np.testing.assert_array_equal(got[:, :, 1], [[0x00, 0x12, 0x80], [0xFF, 0xFF, 0x00]])
    assert np.all(got == got[:, :, :1])


def test_load_16_bit_big_endian_and_int32_tiff(tmp_path):
    grey = np.array([[0x1234, 0xABCD]], dtype=np.uint16)
    Image.frombytes("I;16B", (2, 1), grey.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    assert pil_read(tmp_path / "g16b.tif")[0] == "I;16B"
    np.testing.assert_array_equal(pil_to_rgb(tmp_path / "g16b.tif")[0, :, 0], [0x12, 0xAB])
    wide = np.array([[-5, 0x1234, 70000]], dtype=np.int32)   # clipped to [0, 65535]
    Image.fromarray(wide, mode="I").save(tmp_path / "i32.tif")
    assert pil_read(tmp_path / "i32.tif")[0] == "I"
    np.testing.assert_array_equal(pil_to_rgb(tmp_path / "i32.tif")[0, :, 0], [0x00, 0x12, 0xFF])


def test_load_16_bit_rgb_and_rgba_png(tmp_path):
    rgb16 = [[[0x1234, 0xABFF, 0xFF00], [0x00FF, 0x8080, 0xFFFF]]]
    write_png(tmp_path / "rgb16.png", rgb16, color_type=2, bit_depth=16)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb16.png"),
                                  [[[0x12, 0xAB, 0xFF], [0x00, 0x80, 0xFF]]])
    rgba16 = [[[0x1234, 0xABFF, 0xFF00, 0x0000]]]
    write_png(tmp_path / "rgba16.png", rgba16, color_type=6, bit_depth=16)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba16.png"), [[[0x12, 0xAB, 0xFF]]])


def _strip_adobe_marker(data: bytes) -> bytes:
    """Remove the APP14 'Adobe' segment from a JPEG byte string."""
    at = data.find(b"\xff\xee")
    assert at > 0 and data[at + 4:at + 9] == b"Adobe"
    length = struct.unpack(">H", data[at + 2:at + 4])[0]
    return data[:at] + data[at + 2 + length:]


def test_load_cmyk_jpeg_uses_tensorflow_formula(tmp_path):
    cmyk = (10, 200, 30, 40)
    Image.new("CMYK", (16, 16), cmyk).save(tmp_path / "cmyk.jpg", quality=100)
    mode, info, decoded = pil_read(tmp_path / "cmyk.jpg")
    assert mode == "CMYK" and "adobe" in info
    decoded = decoded.astype(int)                        # JPEG is lossy: use what was decoded
    got = load_image(tmp_path / "cmyk.jpg")
    check_rgb(got, (16, 16))
    c, k = decoded[..., :3], decoded[..., 3:]
    np.testing.assert_array_equal(got, (255 - c) * (255 - k) // 255)
    # Close to the ideal conversion of the colour we wrote.
    ideal = [(255 - v) * (255 - cmyk[3]) / 255 for v in cmyk[:3]]   # 206.6, 46.4, 189.7
    assert np.all(np.abs(got.astype(float) - ideal) <= 4)

    # Without the Adobe marker TensorFlow reads the samples with the opposite
    # polarity (while Pillow still inverts them): r = c * k // 255.
    (tmp_path / "plain.jpg").write_bytes(_strip_adobe_marker((tmp_path / "cmyk.jpg").read_bytes()))
    mode, info, decoded = pil_read(tmp_path / "plain.jpg")
    assert mode == "CMYK" and "adobe" not in info
    decoded = decoded.astype(int)
    np.testing.assert_array_equal(load_image(tmp_path / "plain.jpg"),
                                  decoded[..., :3] * decoded[..., 3:] // 255)


def test_load_rgb_jpeg(tmp_path):
    Image.new("RGB", (16, 8), (200, 100, 50)).save(tmp_path / "rgb.jpg", quality=95)
    got = load_image(tmp_path / "rgb.jpg")
    check_rgb(got, (8, 16))
    assert np.all(np.abs(got.astype(int) - [200, 100, 50]) <= 3)


def test_load_ycbcr_tiff(tmp_path):
    Image.new("RGB", (4, 3), (30, 160, 220)).convert("YCbCr").save(tmp_path / "y.tif")
    assert pil_read(tmp_path / "y.tif")[0] == "YCbCr"
    got = pil_to_rgb(tmp_path / "y.tif")
    check_rgb(got, (3, 4))
    assert np.all(np.abs(got.astype(int) - [30, 160, 220]) <= 3)


def test_load_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    got = load_image(tmp_path / "one.png")
    np.testing.assert_array_equal(got, [[[1, 2, 3]]])
    assert preprocess(got).shape == (224, 224, 3)


def test_exif_orientation_is_not_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((3, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    got = load_image(tmp_path / "rot.jpg")
    assert got.shape == (2, 4, 3)                      # stored orientation, as TensorFlow
    assert got[0, 3].min() > 200


def test_float_mode_is_refused(tmp_path):
    Image.new("F", (3, 2), 0.5).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match=r"f\.tif.*mode F"):
        pil_to_rgb(tmp_path / "f.tif")


# ---------------------------------------------------------------------------
# load_image: errors
# ---------------------------------------------------------------------------


def noisy_image_bytes(tmp_path, fmt):
    rgb = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"full.{fmt}"
    Image.fromarray(rgb).save(path)
    return path.read_bytes()


def assert_image_error(path, *fragments):
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert os.fspath(path) in message
    for fragment in fragments:
        assert fragment in message
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, Mnv2refError)
    return message


def test_missing_file(tmp_path):
    assert_image_error(tmp_path / "nope.png", "no such file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert_image_error(tmp_path / "empty.png", "empty")


def test_directory(tmp_path):
    assert_image_error(tmp_path, "directory")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels\n" * 10)
    assert_image_error(tmp_path / "notes.png", "not a recognised image")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file(tmp_path, fmt, keep):
    data = noisy_image_bytes(tmp_path, fmt)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[:int(len(data) * keep)])
    assert_image_error(path, "truncated")


def test_truncated_file_even_if_pillow_is_told_to_accept_them(tmp_path, monkeypatch):
    data = noisy_image_bytes(tmp_path, "jpg")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert_image_error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True      # restored for its owner


def test_corrupt_png_checksum(tmp_path):
    data = bytearray(noisy_image_bytes(tmp_path, "png"))
    data[29] ^= 0xFF                                     # inside the IHDR CRC
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert_image_error(tmp_path / "bad.png", "corrupt")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # error above 2 * 100 pixels
    assert_image_error(tmp_path / "big.png", "decompression bomb")


@pytest.mark.parametrize("bad", [None, 3, b"".join, ["a.png"]])
def test_non_path_arguments(bad):
    with pytest.raises(InputError, match="file path"):
        load_image(bad)


def test_open_file_object_is_refused(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png")
    with open(tmp_path / "x.png", "rb") as fh, pytest.raises(InputError, match="open file"):
        load_image(fh)


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "s3://bucket/cat.png"])
def test_urls_are_refused(url):
    with pytest.raises(InputError, match="URL"):
        load_image(url)
