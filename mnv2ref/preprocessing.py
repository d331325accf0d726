"""Image loading and TF-slim evaluation preprocessing for MobileNetV2.

The published MobileNetV2 checkpoints were evaluated on images prepared by
TF-slim's ``preprocess_for_eval`` (``preprocessing/inception_preprocessing.py``
in tensorflow/models).  To reproduce TensorFlow's activations, and not merely
approximate them, this module re-implements that pipeline in NumPy with the
same arithmetic, in the same order and at the same (float32) precision::

    uint8 RGB (H, W, 3)                                   load_image
      -> float32 in [0, 1]      x * float32(1/255)        to_unit_float
      -> central 87.5 % crop                               central_crop
      -> bilinear resize to 224 x 224 (legacy TF1 kernel)  resize_bilinear
      -> (x - 0.5) * 2, i.e. [-1, 1]                       preprocess

On the project's golden inputs (computed by TensorFlow) the result is
bit-for-bit identical.  Three details matter for that:

* ``tf.image.convert_image_dtype`` multiplies by the float32 constant
  ``1/255``; it does not divide by 255.  The two differ in the last bit for
  about a third of the pixel values.
* ``tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False)``
  maps output pixel ``i`` to source coordinate ``i * (in/out)``, with the
  scale and the product rounded to float32, and interpolates as
  ``top + (bottom - top) * y_lerp`` with ``top = tl + (tr - tl) * x_lerp``.
* ``tf.image.central_crop`` computes its offset in Python (float64)
  arithmetic and truncates it: ``int((h - h * fraction) / 2)``.

Decoding files is the one place where we cannot share TensorFlow's code:
we use Pillow, and convert every Pillow mode to RGB the way TensorFlow's
``decode_png`` / ``decode_jpeg(channels=3)`` would (see ``load_image``).
"""

from __future__ import annotations

import errno
import os
import re
import threading
import warnings
from typing import Tuple, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mnv2ref.errors import FileError, ImageError, InputError
from mnv2ref.files import check_regular_file
from mnv2ref.text import printable

__all__ = [
    "DEFAULT_SIZE",
    "DEFAULT_CENTRAL_FRACTION",
    "load_image",
    "to_unit_float",
    "central_crop_bounds",
    "central_crop",
    "resize_bilinear",
    "preprocess",
]

#: Input resolution of the published ``mobilenet_v2_1.0_224`` model.
DEFAULT_SIZE = 224
#: TF-slim's ``preprocess_for_eval`` keeps the central 87.5 % of each side.
DEFAULT_CENTRAL_FRACTION = 0.875
#: The formats TensorFlow's decoders read (``tf.io.decode_image``: BMP, GIF,
#: JPEG, PNG; WebP in ``tf.io.decode_webp``).  Pillow is told to try these
#: only, so that no other plugin (PostScript via Ghostscript, ...) ever runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
#: The largest image decoded, in pixels (8192 x 8192): checked from the
#: header, before the pixels are decoded.  Pillow's own limit only warns up
#: to twice its 89 Mpx.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
#: The largest output side of ``preprocess`` / ``resize_bilinear``.
MAX_SIZE = 4096

# ``convert_image_dtype(uint8 -> float32)`` computes ``cast(x) * scale`` where
# ``scale = 1.0 / 255`` is a Python float that TensorFlow turns into a float32
# constant.  Rounding 1/255 to float32 first and multiplying in float32 is what
# makes our output bit-identical; ``x / 255`` is not.
_UINT8_TO_UNIT = np.float32(1.0 / 255)

# A string such as "https://..." or "s3://..." is almost certainly a URL that
# someone hoped we would download.  We read local files only.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

# Pillow's "load truncated images" switch is a module-level global.  We force
# it off while decoding (see ``_decode``); the lock keeps two of *our* threads
# from restoring each other's saved value in the wrong order.
_TRUNCATION_LOCK = threading.Lock()

Size = Union[int, Tuple[int, int]]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file into RGB pixels, as TensorFlow's decoders would.

    Args:
      path: a local file path (``str`` or ``os.PathLike``).  Open file
        objects and URLs are refused: pass the path of a file on disk.

    Returns:
      ``(H, W, 3)`` uint8 array, RGB, rows top to bottom.

    How each Pillow mode becomes RGB (mirroring ``tf.io.decode_png`` /
    ``decode_jpeg`` with ``channels=3``):

    * ``RGB``: as is.  ``L`` / ``1`` / low-bit-depth grey: the grey value is
      repeated in R, G and B (1-bit black/white become 0/255, like libpng's
      ``png_set_expand_gray_1_2_4_to_8``).
    * ``RGBA`` / ``LA`` / ``PA``: the alpha channel is **dropped**, not
      composited over any background -- TensorFlow calls
      ``png_set_strip_alpha``, so a fully transparent pixel keeps its colour.
    * ``P`` (palette), with or without a transparency entry: the palette
      colour, transparency ignored (``png_set_palette_to_rgb`` +
      ``png_set_strip_alpha``).
    * 16-bit samples (``I;16``, ``I;16B``, ``I`` and 16-bit RGB/RGBA PNGs):
      the high byte is kept (``value >> 8``), which is what libpng's
      ``png_set_strip_16`` does for ``decode_png(dtype=uint8)``.  Mode ``I``
      (32-bit integers) is read as 16-bit data and clipped to [0, 65535].
    * ``CMYK`` (JPEG): TensorFlow's integer formula
      ``r = (255 - c) * (255 - k) // 255`` (in Pillow's CMYK convention),
      including TensorFlow's handling of files without an Adobe marker.
      (Pillow's own ``convert("RGB")`` rounds instead of truncating.)
    * ``YCbCr``, ``LAB``, ``HSV`` and other colour modes: Pillow's
      ``convert("RGB")``.  ``F`` (float) images are refused: no TensorFlow
      decoder produces them and their range is unknown.

    The EXIF orientation tag is **not** applied, because TensorFlow's
    decoders ignore it: a photo stored sideways stays sideways.  Colour
    profiles (ICC, gAMA) are ignored too, as in TensorFlow.  For animated
    files the first frame is returned.

    JPEG caveat: Pillow decodes with libjpeg's accurate integer DCT, whereas
    ``tf.io.decode_jpeg`` defaults to ``dct_method="INTEGER_FAST"``, so JPEG
    pixels can differ from TensorFlow's by a few levels.  PNG, being
    lossless, decodes identically.

    Raises:
      InputError: ``path`` is not a path (an open file, a URL, a number...).
      ImageError: the file is missing, empty, not a regular file (a FIFO,
        a device), not in one of ``ACCEPTED_FORMATS``, truncated or corrupt,
        larger than ``MAX_IMAGE_PIXELS``, or has zero width or height.  The
        one-line message names the file.
    """
    name = _as_local_path(path)
    _check_file(name)
    with _decode(name) as img:
        rgb = _pil_to_rgb(img, name)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise _image_error(name, f"image has zero size ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
    # np.asarray(PIL image) is a read-only view of a bytes buffer; hand the
    # caller an ordinary writable array that owns its memory.
    if not rgb.flags.writeable or not rgb.flags.c_contiguous or rgb.dtype != np.uint8:
        rgb = np.array(rgb, dtype=np.uint8, order="C")
    return rgb


def _as_local_path(path) -> str:
    """Return ``path`` as a ``str`` file name, refusing anything that is not a path."""
    if isinstance(path, (str, bytes, os.PathLike)):
        name = os.fsdecode(os.fspath(path))
    else:
        raise InputError(
            f"load_image expects a file path (str or os.PathLike), got {type(path).__name__}; "
            "pass the path of the file, not an open file object"
        )
    if _URL_RE.match(name):
        raise InputError(
            f"load_image reads local files only, got a URL {printable(name)!r}; download it first"
        )
    if not name:
        raise InputError("load_image expects a file path, got an empty string")
    return name


def _check_file(name: str) -> None:
    """Fail early, with a precise message, on paths that cannot be an image file."""
    try:
        st = check_regular_file(name, "image")
    except FileError as exc:
        if exc.errno == errno.ENOENT:
            raise _image_error(name, "no such file") from None
        if exc.errno == errno.EISDIR:
            raise _image_error(name, "is a directory, not an image file") from None
        raise ImageError(str(exc)) from None  # a FIFO, a device, a path below a file...
    if st.st_size == 0:
        raise _image_error(name, "file is empty (0 bytes)")


def _decode(name: str) -> Image.Image:
    """Open ``name`` with Pillow and force a complete decode of the first frame.

    ``Image.open`` only reads the header; the pixel data is decoded by
    ``load()``.  We call it here so that a truncated or corrupt file fails
    now, inside the error translation below, and not later in some NumPy
    call.  Pillow's ``LOAD_TRUNCATED_IMAGES`` switch, when set by other code,
    makes Pillow silently pad truncated files with grey/black; we turn it off
    for the duration of the decode (and restore it afterwards) so that a
    damaged file is an error, as it is for ``tf.io.decode_png``.  Because
    that switch is global, decodes made through this function run one at a
    time (a lock guards the save/restore); correctness first.
    """
    img = None
    with _TRUNCATION_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():  # our MAX_IMAGE_PIXELS is stricter than Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(name, formats=ACCEPTED_FORMATS)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                reason = (f"refusing to decode {img.width}x{img.height} pixels, more than the "
                          f"{MAX_IMAGE_PIXELS:,} mnv2ref decodes (a possible decompression bomb)")
            else:
                img.load()
                return img
        except Image.DecompressionBombError as exc:
            reason = f"refusing to decode a possible decompression bomb ({exc})"
        except UnidentifiedImageError:
            reason = (f"not a recognised image file: mnv2ref reads {', '.join(ACCEPTED_FORMATS)}, "
                      "as TensorFlow's decoders do (another format, or a corrupt header)")
        except FileNotFoundError:
            reason = "no such file"
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes ImageError
            # Pillow reports damage as OSError ("image file is truncated"),
            # SyntaxError ("broken PNG file"), ValueError, EOFError, ...
            text = str(exc) or type(exc).__name__
            if "truncated" in text.lower():
                reason = f"truncated image data ({text})"
            else:
                reason = f"corrupt or undecodable image ({type(exc).__name__}: {text})"
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if img is not None:
        img.close()
    raise _image_error(name, reason)


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Convert a loaded Pillow image to ``(H, W, 3)`` uint8 RGB (see ``load_image``)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "CMYK":
        # Pillow reads every CMYK JPEG as if it followed Adobe's inverted
        # convention.  TensorFlow only assumes that when the Adobe marker is
        # present; without it, it reads the samples the other way round.
        is_jpeg = img.format in ("JPEG", "MPO")
        inverted = is_jpeg and "adobe" not in img.info
        return _cmyk_to_rgb(np.asarray(img), inverted=inverted)
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_grey_to_rgb(np.asarray(img))
    if mode == "F":
        raise _image_error(name, "32-bit float pixels (mode F) are not supported; "
                                 "no TensorFlow decoder produces them")
    try:
        # For RGBA, LA, PA and P-with-transparency Pillow drops alpha here;
        # it does not composite over a background (checked in the tests).
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise _image_error(name, f"cannot convert Pillow mode {mode} to RGB ({exc})") from None


def _sixteen_bit_grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``(H, W)`` 16-bit grey -> ``(H, W, 3)`` uint8 by keeping the high byte.

    ``png_set_strip_16`` truncates (``v >> 8``) rather than rounding
    (``round(v / 257)``); e.g. 0x12FF becomes 0x12, not 0x13.
    """
    wide = np.clip(grey.astype(np.int64), 0, 0xFFFF)
    high = (wide >> 8).astype(np.uint8)
    return np.repeat(high[:, :, None], 3, axis=2)


def _cmyk_to_rgb(cmyk: np.ndarray, inverted: bool = False) -> np.ndarray:
    """``(H, W, 4)`` uint8 CMYK (Pillow's convention) -> ``(H, W, 3)`` uint8 RGB.

    TensorFlow's ``jpeg_mem.cc`` converts with integer arithmetic that
    truncates: ``r = (255 - c) * (255 - k) // 255`` in the usual convention
    (0 = no ink), and ``r = c * k // 255`` when the samples are stored
    inverted, which is how Pillow presents a CMYK JPEG lacking the Adobe
    marker.
    """
    c = cmyk.astype(np.int32)
    ink, black = c[:, :, :3], c[:, :, 3:4]
    if inverted:
        rgb = ink * black // 255
    else:
        rgb = (255 - ink) * (255 - black) // 255
    return rgb.astype(np.uint8)


def _image_error(name: str, reason: str) -> ImageError:
    """Build the one-line ``ImageError`` for file ``name``."""
    return ImageError(f"cannot load image '{printable(name)}': {printable(reason)}")


# --------------------------------------------------------------------------
# Preprocessing steps
# --------------------------------------------------------------------------


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 ``(..., C)`` -> float32 in [0, 1], exactly like ``convert_image_dtype``.

    Computed as ``float32(x) * float32(1/255)``: a multiplication by the
    rounded reciprocal, in float32, not a division (see module docstring).
    """
    if image.dtype != np.uint8:
        raise InputError(f"to_unit_float expects uint8 pixels, got dtype {image.dtype}")
    return image.astype(np.float32) * _UINT8_TO_UNIT


def central_crop_bounds(height: int, width: int,
                        fraction: float = DEFAULT_CENTRAL_FRACTION) -> Tuple[int, int, int, int]:
    """Where ``tf.image.central_crop`` cuts an image of ``height x width``.

    Returns:
      ``(top, left, crop_height, crop_width)``.

    TensorFlow computes the offset in Python floats and truncates it with
    ``int()``, then takes whatever is left: ``size = h - 2 * start``.  So the
    crop is symmetric, and is at least ``h * fraction`` rows (it rounds the
    kept part *up*): 300 rows at 0.875 give start 18 (from 18.75) and 264
    rows, not 262.5.
    """
    fraction = _check_fraction(fraction)
    top = int((float(height) - float(height) * fraction) / 2)
    left = int((float(width) - float(width) * fraction) / 2)
    return top, left, height - 2 * top, width - 2 * left


def central_crop(image: np.ndarray, fraction: float = DEFAULT_CENTRAL_FRACTION) -> np.ndarray:
    """Keep the central ``fraction`` of each side, as ``tf.image.central_crop``.

    Args:
      image: ``(H, W, C)`` or ``(N, H, W, C)`` array of any dtype.
      fraction: float in (0, 1]; 1 returns the image unchanged.

    Returns:
      A view of ``image``, ``(h, w, C)`` or ``(N, h, w, C)``, with ``h, w``
      from ``central_crop_bounds``.  Never empty for a non-empty image: the
      crop keeps at least one row and one column.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise InputError(
            f"central_crop expects an (H, W, C) or (N, H, W, C) array, got shape {image.shape}"
        )
    height, width = image.shape[-3], image.shape[-2]
    top, left, crop_h, crop_w = central_crop_bounds(height, width, fraction)
    return image[..., top:top + crop_h, left:left + crop_w, :]


def resize_bilinear(image: np.ndarray, height: int, width: int, backend: str = "numba") -> np.ndarray:
    """Resize like TF1's ``tf.image.resize_bilinear`` (legacy, no half-pixel centres).

    This is ``align_corners=False, half_pixel_centers=False`` -- the kernel
    TF-slim used -- which samples output pixel ``i`` at source coordinate
    ``i * in_size / out_size``.  It is *not* ``tf.image.resize`` of TF2 (which
    uses half-pixel centres), nor Pillow's or OpenCV's bilinear resize.  The
    grid is anchored at the top-left corner, so the output is shifted by up
    to half a source pixel compared with a centred resampling.

    Args:
      image: ``(H, W, C)`` or ``(N, H, W, C)`` real-valued array.  It is cast
        to float32 first, like TensorFlow's kernel does.
      height, width: output size, positive integers.
      backend: ``"numpy"`` is the readable reference (``_resize_numpy``);
        ``"numba"`` (default) runs the same float32 operations, in the same
        order and without fused multiply-adds, as one compiled loop, about
        ten times faster.  The two give the same bits.

    Returns:
      float32 ``(height, width, C)`` or ``(N, height, width, C)``.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise InputError(
            f"resize_bilinear expects an (H, W, C) or (N, H, W, C) array, got shape {image.shape}"
        )
    if image.dtype.kind not in "uif":
        raise InputError(f"resize_bilinear expects real numbers, got dtype {image.dtype}")
    if image.shape[-3] == 0 or image.shape[-2] == 0:
        raise InputError(f"resize_bilinear cannot resize an empty image of shape {image.shape}")
    if backend not in ("numba", "numpy"):
        raise InputError(f"resize_bilinear backend must be numba or numpy, got {backend!r}")
    out_h, out_w = _parse_size((height, width), "resize_bilinear size")
    pixels = image.astype(np.float32, copy=False)
    in_h, in_w = pixels.shape[-3], pixels.shape[-2]
    if (out_h, out_w) == (in_h, in_w):
        # TensorFlow short-cuts a same-size "resize" to a plain cast.
        return pixels.copy()
    rows = _legacy_interpolation(in_h, out_h)
    columns = _legacy_interpolation(in_w, out_w)
    if backend == "numpy":
        return _resize_numpy(pixels, rows, columns)
    batch = pixels if pixels.ndim == 4 else pixels[None]
    out = np.empty((batch.shape[0], out_h, out_w, batch.shape[3]), np.float32)
    _resize_kernel()(batch, *rows, *columns, out)
    return out if pixels.ndim == 4 else out[0]


def _resize_numpy(pixels: np.ndarray, rows: tuple, columns: tuple) -> np.ndarray:
    """The legacy bilinear resize in NumPy: float32 ``(..., H, W, C)`` ->
    ``(..., out_h, out_w, C)``, from ``(lower, upper, lerp)`` of each axis."""
    y_lower, y_upper, y_lerp = rows
    x_lower, x_upper, x_lerp = columns

    # Gather the four neighbours of every output pixel: rows first, then
    # columns.  Shapes: (..., out_h, in_w, C) -> (..., out_h, out_w, C).
    rows_top = pixels[..., y_lower, :, :]
    rows_bottom = pixels[..., y_upper, :, :]
    top_left, top_right = rows_top[..., x_lower, :], rows_top[..., x_upper, :]
    bottom_left, bottom_right = rows_bottom[..., x_lower, :], rows_bottom[..., x_upper, :]

    # Broadcast the weights: y over rows, x over columns; both float32.
    y_lerp = y_lerp[:, None, None]
    x_lerp = x_lerp[None, :, None]
    # TensorFlow's compute_lerp, operation for operation, all in float32.
    # (Writing it as a weighted sum (1-a)*p + a*q would round differently.)
    top = top_left + (top_right - top_left) * x_lerp
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp


_RESIZE_KERNEL = []


def _resize_kernel():
    """The compiled loop of ``resize_bilinear(backend="numba")``, built on first use
    so that importing this module does not import Numba.

    ``kernel(pixels, y_lower, y_upper, y_lerp, x_lower, x_upper, x_lerp, out)``
    with ``pixels`` float32 ``(N, H, W, C)`` (any strides) and ``out`` float32
    ``(N, out_h, out_w, C)``.  No ``fastmath``: LLVM may then neither fuse a
    multiply and an add nor reorder them, so every value rounds exactly as in
    ``_resize_numpy`` (and in TensorFlow's ``compute_lerp``).
    """
    if not _RESIZE_KERNEL:
        from numba import njit

        @njit(cache=True, nogil=True)
        def legacy_bilinear(pixels, y_lower, y_upper, y_lerp, x_lower, x_upper, x_lerp, out):
            for n in range(out.shape[0]):
                for i in range(out.shape[1]):
                    top_row, bottom_row, dy = y_lower[i], y_upper[i], y_lerp[i]
                    for j in range(out.shape[2]):
                        left, right, dx = x_lower[j], x_upper[j], x_lerp[j]
                        for c in range(out.shape[3]):
                            top_left = pixels[n, top_row, left, c]
                            bottom_left = pixels[n, bottom_row, left, c]
                            top = top_left + (pixels[n, top_row, right, c] - top_left) * dx
                            bottom = bottom_left + (pixels[n, bottom_row, right, c] - bottom_left) * dx
                            out[n, i, j, c] = top + (bottom - top) * dy

        _RESIZE_KERNEL.append(legacy_bilinear)
    return _RESIZE_KERNEL[0]


def _legacy_interpolation(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for one axis of the legacy bilinear resize.

    Mirrors ``compute_interpolation_weights`` with TensorFlow's
    ``LegacyScaler`` (resize_bilinear_op.cc), in float32 throughout::

        scale = float(in_size) / float(out_size)       # float32 division
        in    = float(i) * scale                       # float32 product
        lower = max(floor(in), 0)
        upper = min(ceil(in), in_size - 1)
        lerp  = in - floor(in)

    Returns:
      ``(lower, upper, lerp)``, each of shape ``(out_size,)``; indices int64,
      ``lerp`` float32 in [0, 1).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    floor = np.floor(source)
    # ``in`` < in_size mathematically; the extra clip only guards against
    # float32 rounding on absurd sizes, where TensorFlow would read out of
    # bounds.  It never changes a result for in-range coordinates.
    lower = np.clip(floor.astype(np.int64), 0, in_size - 1)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    lerp = (source - floor).astype(np.float32)
    return lower, upper, lerp


def preprocess(rgb: np.ndarray, size: Size = DEFAULT_SIZE,
               central_fraction: Union[float, None] = DEFAULT_CENTRAL_FRACTION,
               backend: str = "numba") -> np.ndarray:
    """TF-slim ``preprocess_for_eval``: RGB image -> network input in [-1, 1].

    Steps, in TensorFlow's order (``inception_preprocessing.py``)::

        x = convert_image_dtype(rgb, float32)       # x * float32(1/255)
        x = central_crop(x, central_fraction)       # 0.875 by default
        x = resize_bilinear(x[None], size)[0]       # legacy TF1 kernel
        x = (x - 0.5) * 2.0                         # subtract, then multiply

    Args:
      rgb: ``(H, W, 3)`` image, either uint8 (0..255) -- what ``load_image``
        returns -- or floating point already scaled to [0, 1], which TF-slim
        passes through unchanged (it is only cast to float32).  Float values
        outside [0, 1] or not finite are refused: they almost always mean a
        0..255 image stored as floats.  Any size from 1x1 up; a tiny image is
        simply upsampled (a 1x1 image becomes a constant image).
      size: output ``int`` (square) or ``(height, width)``; 224 for the
        published model.  Other sizes (e.g. 192, 160, (225, 193)) work.
      central_fraction: fraction of each side kept by the central crop, in
        (0, 1]; ``None`` skips the crop (TF-slim skips it for any false value).
      backend: the resize's implementation, ``"numba"`` (fast) or
        ``"numpy"`` (the readable reference); both give the same bits.

    Returns:
      float32 array ``(height, width, 3)``.  Add the batch axis yourself
      (``x[None]``) before feeding the network.

    Raises:
      InputError: wrong rank, channel count, dtype or value range; a bad
        ``size`` or ``central_fraction``.
    """
    image = _check_rgb(rgb)
    out_h, out_w = _parse_size(size, "preprocess size")

    if image.dtype == np.uint8:
        x = to_unit_float(image)
    else:
        # convert_image_dtype(float -> float32) is a plain cast.
        x = image.astype(np.float32)
    if central_fraction is not None:
        x = central_crop(x, central_fraction)
    x = resize_bilinear(x[None], out_h, out_w, backend=backend)[0]
    # Two float32 operations, as tf.subtract then tf.multiply; the result is
    # identical to (x - 127.5) / 127.5 on the 0..255 scale only up to rounding.
    x = (x - np.float32(0.5)) * np.float32(2.0)
    return x


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _check_rgb(rgb) -> np.ndarray:
    """Validate a single RGB image for ``preprocess``; return it as an ndarray."""
    try:
        image = np.asarray(rgb)
    except (TypeError, ValueError) as exc:  # e.g. a ragged nested list
        raise InputError(
            f"preprocess expects an (H, W, 3) array, got {type(rgb).__name__} ({exc})"
        ) from None
    if image.ndim != 3 or image.shape[2] != 3:
        hint = ""
        if image.ndim == 4:
            hint = "; preprocess one image at a time (drop the batch axis)"
        elif image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
            hint = "; convert to RGB first (load_image does this)"
        raise InputError(
            f"preprocess expects an RGB image of shape (H, W, 3), got shape {image.shape}{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"preprocess expects a non-empty (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind != "f":
        raise InputError(
            f"preprocess expects uint8 (0..255) or float (0..1) pixels, got dtype {image.dtype}"
        )
    if not np.all(np.isfinite(image)):
        raise InputError("preprocess expects finite float pixels, got NaN or infinity")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise InputError(
            f"preprocess expects float pixels in [0, 1], got values in [{low:g}, {high:g}]; "
            "pass uint8 pixels or divide by 255"
        )
    return image


def _check_fraction(fraction) -> float:
    """``central_fraction`` must be a real number in (0, 1], as TensorFlow demands."""
    is_number = isinstance(fraction, (int, float, np.integer, np.floating))
    if isinstance(fraction, (bool, np.bool_)) or not is_number:
        raise InputError(f"central fraction must be a number in (0, 1], got {fraction!r}")
    value = float(fraction)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise InputError(f"central fraction must be in (0, 1], got {value!r}")
    return value


def _parse_size(size, what: str) -> Tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(height, width)`` of positive ints."""
    if _is_int(size):
        pair = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) for s in size):
        pair = tuple(size)
    else:
        raise InputError(f"{what} must be an int or a (height, width) pair of ints, got {size!r}")
    height, width = int(pair[0]), int(pair[1])
    if height < 1 or width < 1:
        raise InputError(f"{what} must be positive, got {height}x{width}")
    if max(height, width) > MAX_SIZE:
        raise InputError(f"{what} must be at most {MAX_SIZE}, got {height}x{width}")
    return height, width


def _is_int(value) -> bool:
    """True for Python/NumPy integers, but not for ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
