"""Golden files: every endpoint of the reference on given images, for other
projects' test suites.

    write_golden(model, ["cat.png", "cup.png"], "golden.npz", layout="NCHW")
    arrays, metadata = read_golden("golden.npz")

A golden file holds the preprocessed `input` and every endpoint of
`model.endpoints(x, backend="numpy")` — `layer_1`, `layer_2/depthwise_output`,
`layer_3/expansion_output`, ..., `layer_19`, `global_pool`, `Logits`,
`Predictions` — computed by the readable NumPy path, the images stacked along
the batch axis. With `layout="NCHW"` every 4-d array is transposed to
(N, C, H, W); `Logits` and `Predictions` stay (N, classes).

Two containers, both readable without mnv2ref:

  .npz  one array per endpoint under its name (`np.load(path)["layer_3"]`);
        the metadata as a JSON string in the 0-d array `__metadata__`
        (`json.loads(str(np.load(path)["__metadata__"]))`); no pickles.
  .h5   one dataset per endpoint at the root, named with `.` for `/`
        (`layer_3.expansion_output`: HDF5 would read `/` as a group, and
        `layer_3` is itself an endpoint), with the real name in the dataset's
        attribute `endpoint`; the metadata as root attributes (strings and
        numbers as they are, lists and dicts as JSON strings).

The metadata says what made the numbers (`METADATA_FIELDS`), including the
tolerance a faithful implementation meets: max|theirs - golden| / max|golden|
per endpoint: 5e-5 in float32 (the project's tolerance against TensorFlow's
float32 goldens, worst measured 3.7e-5), also for a float32 port checked
against a float64 file; 1e-12 for a float64 port against a float64 file (our
two backends, which sum in different orders, one with fused multiply-adds,
agree with it to 8e-14 at worst).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, Mnv2refError
from .files import atomic_write, check_regular_file, os_error
from .interfaces import LAYOUTS, _check_choice

FORMAT = "mnv2ref-golden"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
DTYPES = ("float32", "float64")
TOLERANCES = {"float32": 5e-5, "float64": 1e-12}
TOLERANCE_MEASURE = "max|theirs - golden| / max|golden|, per endpoint"
PREPROCESSING = {
    "name": "TF-slim inception_preprocessing.preprocess_for_eval",
    "decode": "RGB uint8 -> float32 in [0, 1] (x * float32(1/255))",
    "central_crop": 0.875,
    "resize": "bilinear, legacy TF1 kernel (align_corners=False, half_pixel_centers=False)",
    "scale": "(x - 0.5) * 2, i.e. [-1, 1]",
}
METADATA_FIELDS = {
    "format": f"{FORMAT!r}",
    "format_version": f"{FORMAT_VERSION}",
    "mnv2ref_version": "the mnv2ref that wrote the file",
    "endpoints": "the array names, in network order (`input` first)",
    "layout": "NHWC or NCHW (of every 4-d array)",
    "dtype": "float32 or float64: the precision of the computation and of every array",
    "images": "the image names, in batch order",
    "size": "[height, width] of the network input",
    "preprocessing": "how the images became `input` (TF-slim eval preprocessing)",
    "weights": "the weights file (a TF checkpoint's .index, an .h5, a Keras .h5)",
    "weights_sha256": "{file name: SHA-256} of every file the weights were read from",
    "weights_values": "ema (ExponentialMovingAverage shadows), raw, or unknown (a Keras file)",
    "depth_multiplier": "the model's depth multiplier",
    "num_classes": "1001 (TF-slim), 1000 (Keras), 0 (backbone)",
    "classes": "what the class indices mean",
    "backend": "numpy: the readable reference path (BatchNorm unfolded)",
    "tolerance": "the recommended tolerance for this file's dtype",
    "tolerances": "{dtype: tolerance}: compare a float32 implementation with 5e-5 even against a float64 file",
    "tolerance_measure": TOLERANCE_MEASURE,
}

_LAYER_ENDPOINT = re.compile(r"layer_(\d+)(?:/(\w+))?")
_BLOCK_PARTS = ("expansion_output", "depthwise_output", "projection_output", None)
_TOP = ("global_pool", "Logits", "Predictions")


def endpoint_order(name: str) -> tuple:
    """A sort key putting endpoint names in network order: `input`,
    `layer_1`, `layer_2/depthwise_output`, `layer_2`, ..., `global_pool`,
    `Logits`, `Predictions`, then unknown names."""
    if name == "input":
        return (0,)
    match = _LAYER_ENDPOINT.fullmatch(name)
    if match and match.group(2) in _BLOCK_PARTS:
        return (1, int(match.group(1)), _BLOCK_PARTS.index(match.group(2)))
    if name in _TOP:
        return (2, _TOP.index(name))
    return (3,)


# The axes that take a 4-d array (or its shape, or an index) into a layout from the other one.
TO_LAYOUT = {"NCHW": (0, 3, 1, 2), "NHWC": (0, 2, 3, 1)}


def transpose_layout(array: np.ndarray, source: str, target: str) -> np.ndarray:
    """A 4-d array from layout `source` to `target` (NHWC <-> NCHW); other
    ranks unchanged."""
    array = np.asarray(array)
    if source == target or array.ndim != 4:
        return array
    return np.ascontiguousarray(array.transpose(TO_LAYOUT[target]))


def weights_files(source: str) -> list:
    """The files a model's weights were read from: a checkpoint's .index and
    its data shards, or the one .h5."""
    path = Path(source)
    if path.suffix == ".index":
        prefix = path.with_suffix("")
        return [path, *sorted(prefix.parent.glob(prefix.name + ".data-*"))]
    return [path]


def make_golden(model, images: Sequence, layout: str = "NHWC", dtype: str = "float32",
                size=224) -> tuple:
    """({name: array}, metadata) for the images (paths, or (H, W, 3) uint8 RGB
    arrays): TF-slim eval preprocessing to `size`, the network run by the
    NumPy reference in `dtype`, 4-d arrays in `layout`."""
    from . import __version__
    from .keras import describe_classes
    from .preprocessing import load_image, preprocess
    from .weights import sha256_of

    _check_choice("layout", layout, LAYOUTS)
    _check_choice("dtype", dtype, DTYPES)
    if not len(images):
        raise InputError("no images given: a golden file needs at least one")
    names = [f"array {i}" if isinstance(image, np.ndarray) else str(image) for i, image in enumerate(images)]
    x = np.stack([preprocess(image if isinstance(image, np.ndarray) else load_image(image), size=size)
                  for image in images]).astype(dtype)
    endpoints = {"input": x, **model.endpoints(x, backend="numpy")}
    arrays = {name: transpose_layout(value, "NHWC", layout) for name, value in endpoints.items()}
    use_ema = model.metadata.get("use_ema")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mnv2ref_version": __version__,
        "endpoints": list(arrays),
        "layout": layout,
        "dtype": dtype,
        "images": names,
        "size": list(x.shape[1:3]),
        "preprocessing": PREPROCESSING,
        "weights": model.source,
        "weights_sha256": {p.name: sha256_of(p) for p in weights_files(model.source) if p.is_file()},
        "weights_values": {True: "ema", False: "raw"}.get(use_ema, "unknown"),
        "depth_multiplier": model.depth_multiplier,
        "num_classes": model.num_classes,
        "classes": describe_classes(model.num_classes),
        "backend": "numpy",
        "tolerance": TOLERANCES[dtype],
        "tolerances": TOLERANCES,
        "tolerance_measure": TOLERANCE_MEASURE,
    }
    return arrays, metadata


def write_golden(model, images: Sequence, path, layout: str = "NHWC", dtype: str = "float32",
                 size=224):
    """Write a golden file (format in this module's docstring) of `model` on
    `images` to `path`: .npz or .h5/.hdf5 by its suffix, atomically; or, for
    a writable binary stream (stdout), an .npz into it. Returns `path`."""
    if not hasattr(path, "write"):
        path = Path(path)
        if path.suffix.lower() not in (".npz", ".h5", ".hdf5"):
            raise InputError(f"golden file {path} must end in .npz, .h5 or .hdf5")
    arrays, metadata = make_golden(model, images, layout, dtype, size)
    if hasattr(path, "write"):
        _write_npz(path, arrays, metadata)
    elif path.suffix.lower() == ".npz":
        with atomic_write(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            _write_npz(f, arrays, metadata)
    else:
        with atomic_write(path, suffix=".h5") as tmp:
            _write_h5(tmp, arrays, metadata)
    return path


def _write_npz(stream, arrays: dict, metadata: dict) -> None:
    np.savez(stream, **arrays, **{METADATA_KEY: np.array(json.dumps(metadata))})


def _write_h5(path: Path, arrays: dict, metadata: dict) -> None:
    import h5py

    with h5py.File(path, "w", track_order=True) as f:
        for name, value in arrays.items():
            f.create_dataset(h5_name(name), data=value).attrs["endpoint"] = name
        for key, value in metadata.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def h5_name(endpoint: str) -> str:
    """The dataset name of an endpoint in a golden .h5: `/` becomes `.`."""
    return endpoint.replace("/", ".")


def read_golden(path) -> tuple:
    """({endpoint: array}, metadata) of a golden .npz or .h5, arrays in
    network order and as stored (see `metadata["layout"]`). A plain .npz of
    endpoints without metadata (e.g. TensorFlow's goldens) gives metadata {}."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".h5", ".hdf5"):
        raise InputError(f"golden file {path} must end in .npz, .h5 or .hdf5")
    check_regular_file(path, "golden file")  # a FIFO would block the reader
    try:
        arrays, metadata = _read_npz(path) if suffix == ".npz" else _read_h5(path)
    except OSError as error:
        raise os_error(error, path, "read") from None
    except Mnv2refError:
        raise
    except Exception as error:  # a damaged zip or HDF5 file, a pickled array
        raise InputError(f"{path}: cannot read as a golden file ({type(error).__name__}: {error})") from None
    order = metadata.get("endpoints") or sorted(arrays, key=endpoint_order)
    return {name: arrays[name] for name in order if name in arrays}, metadata


def _read_npz(path: Path) -> tuple:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name != METADATA_KEY}
        metadata = json.loads(str(data[METADATA_KEY])) if METADATA_KEY in data.files else {}
    return arrays, metadata


def _read_h5(path: Path) -> tuple:
    import h5py

    from .weights import _decode_attribute, check_self_contained, refuse_links_out

    with h5py.File(path, "r") as f:
        refuse_links_out(f, path)
        datasets = {key: node for key, node in f.items() if isinstance(node, h5py.Dataset)}
        for node in datasets.values():
            check_self_contained(node, path)
        arrays = {_decode_attribute(node.attrs.get("endpoint", key)): node[()] for key, node in datasets.items()}
        metadata = {key: _decode_attribute(value) for key, value in f.attrs.items()}
    return arrays, metadata
