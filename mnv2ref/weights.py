"""From a TF-slim checkpoint to the model's variables, and to and from HDF5.

A training checkpoint holds, for every model variable `X`, its moving average
`X/ExponentialMovingAverage`, the optimizer slots `X/RMSProp` and
`X/RMSProp_1`, and a `global_step`. TF-slim evaluation restores the moving
averages; so does `select_variables` by default (`use_ema=False` takes the
raw values instead).

HDF5 layout written by `convert` (format version 1): one float32 dataset per
model variable at its TF-slim name (`MobilenetV2/Conv/weights`, ...), and on
the root group the attributes `format` ("mnv2ref-weights"), `format_version`,
`depth_multiplier`, `num_classes`, `use_ema`, `source_files` and
`source_sha256` (JSON), `mnv2ref_version`.

The file starts with a 512-byte HDF5 user block (which HDF5 skips) holding
`mnv2ref-weights sha256 <hex>`: the SHA-256 of everything after it. libhdf5
can crash the process on a corrupted file instead of reporting an error, so a
file whose digest does not match (or that has none: written by other tools,
or edited since) is first read in a throw-away child process; only if that
survives is it read here.

Weights from anywhere pass one check before a model is built from them,
`check_variables`: the network's tensors present with their shapes, stored
as floats, finite, moving variances non-negative. An HDF5 file is read only
if it is self-contained (`check_self_contained`, `refuse_links_out`): no
external storage, virtual datasets, external links or filter plugins, which
would make libhdf5 read other files or run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from .architecture import MAX_MODEL_VALUES, PUBLISHED_DEPTH_MULTIPLIERS, variable_shapes
from .errors import FileError, Mnv2refError, Mnv2refWarning, WeightsError
from .files import atomic_write, check_not_overwriting, check_regular_file, os_error
from .text import printable

EMA_SUFFIX = "/ExponentialMovingAverage"
OPTIMIZER_SUFFIXES = ("/RMSProp", "/RMSProp_1", "/Momentum", "/Adam", "/Adam_1")
NON_MODEL_VARIABLES = ("global_step",)
H5_FORMAT = "mnv2ref-weights"
H5_FORMAT_VERSION = 1
USER_BLOCK_SIZE = 512


def is_model_variable(name: str) -> bool:
    """True for the network's own variables, False for EMA shadows, optimizer
    slots and bookkeeping such as `global_step`."""
    return not (name in NON_MODEL_VARIABLES or name.endswith(EMA_SUFFIX)
                or name.endswith(OPTIMIZER_SUFFIXES))


def select_variables(checkpoint: Mapping, use_ema: bool = True, source: str = "checkpoint") -> tuple:
    """Pick the value of every model variable: its EMA shadow when `use_ema`
    and the checkpoint has shadows, else the raw value.

    Returns ({name: array}, used_ema). A checkpoint with shadows for some
    model variables but not others is refused: it was not written by one
    TF-slim training run, and mixing the two silently would be wrong."""
    names = [name for name in checkpoint if is_model_variable(name)]
    shadowed = [name for name in names if name + EMA_SUFFIX in checkpoint]
    used_ema = use_ema and bool(shadowed)
    if used_ema and len(shadowed) != len(names):
        missing = sorted(set(names) - set(shadowed))
        raise WeightsError(f"{source}: {len(missing)} model variables have no "
                           f"ExponentialMovingAverage shadow (first: {missing[0]}); "
                           "load the raw values with use_ema=False")
    variables = {name: checkpoint[name + EMA_SUFFIX] if used_ema else checkpoint[name]
                 for name in names}
    return variables, used_ema


def infer_config(variables: Mapping, source: str = "weights", label=str) -> tuple:
    """(depth_multiplier, num_classes) of a set of MobileNetV2 variables,
    from their shapes alone (they may be HDF5 datasets not yet read).

    Each published depth multiplier is tried in turn and the one whose every
    expected tensor is present with the right shape wins; otherwise the error
    names the first tensor that is missing or wrongly shaped for the closest
    candidate (`label(name)` says where that tensor comes from). A classifier
    so wide that the network would exceed `MAX_MODEL_VALUES` (e.g. 200,000
    classes) is refused here, before anything is read."""
    biases = variables.get("MobilenetV2/Logits/Conv2d_1c_1x1/biases")
    num_classes = int(biases.shape[0]) if biases is not None and biases.ndim == 1 else 0
    best = None
    for depth_multiplier in PUBLISHED_DEPTH_MULTIPLIERS:
        shapes = variable_shapes(depth_multiplier, num_classes)
        problems = shape_problems(variables, shapes, label)
        if not problems:
            values = sum(math.prod(shape) for shape in shapes.values())
            if values > MAX_MODEL_VALUES:
                raise WeightsError(f"{source}: a MobileNetV2 {depth_multiplier} with {num_classes:,} "
                                   f"classes has {values:,} values, more than the {MAX_MODEL_VALUES:,} "
                                   "mnv2ref loads")
            return depth_multiplier, num_classes
        if best is None or len(problems) < len(best[1]):
            best = depth_multiplier, problems
    depth_multiplier, problems = best
    raise WeightsError(f"{source} is not a MobileNetV2 of a published depth multiplier: "
                       f"closest is {depth_multiplier} with {len(problems)} problems, first: {problems[0]}")


def check_dtype(name: str, dtype, source: str) -> None:
    """Refuse a tensor that is not stored as floating-point numbers (int32,
    bool, complex64, strings, ...): converting it would silently change the
    weights, and no MobileNetV2 was trained with such variables."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise WeightsError(f"{source}: tensor {printable(name)} has dtype {dtype}, "
                           "expected a floating-point dtype (float32)")


def check_variables(variables: Mapping, source: str = "weights") -> tuple:
    """The one validation of weights, wherever they come from (checkpoint,
    HDF5, Keras): the network's tensors must be present with their shapes
    (`infer_config`), floating-point (`check_dtype`), finite, and every
    BatchNorm moving variance non-negative, or the network would output NaN.
    WeightsError names the tensor, the count of bad values and the first
    one's index. Returns (depth_multiplier, num_classes).

    Tensors the network does not use are not looked at."""
    depth_multiplier, num_classes = infer_config(variables, source)
    for name in variable_shapes(depth_multiplier, num_classes):
        value = variables[name]
        check_dtype(name, value.dtype, source)
        value = np.asarray(value)
        _refuse_where(~np.isfinite(value), name, value, "NaN or infinite values", source)
        if name.endswith("/moving_variance"):
            _refuse_where(value < 0, name, value, "negative moving variances", source)
    return depth_multiplier, num_classes


def _refuse_where(bad: np.ndarray, name: str, value: np.ndarray, what: str, source: str) -> None:
    count = int(np.count_nonzero(bad))
    if count:
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), value.shape))
        raise WeightsError(f"{source}: tensor {printable(name)} has {count} {what} "
                           f"(first at index {first}: {value[first]})")


def shape_problems(variables: Mapping, expected: Mapping, label=str) -> list:
    """Each expected tensor that is missing or has the wrong shape, in words;
    `label(name)` names the tensor (e.g. with where in a file it was read)."""
    problems = []
    for name, shape in expected.items():
        if name not in variables:
            problems.append(f"tensor {label(name)} is missing (expected shape {shape})")
        elif tuple(variables[name].shape) != tuple(shape):
            problems.append(f"tensor {label(name)} has shape {tuple(variables[name].shape)}, expected {shape}")
    return problems


def sha256_of(path: os.PathLike, start: int = 0) -> str:
    """SHA-256 of a file's bytes from `start` on, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _user_block(digest: str) -> bytes:
    return f"{H5_FORMAT} sha256 {digest}\n".encode().ljust(USER_BLOCK_SIZE, b"\0")


def has_intact_digest(path: Path) -> bool:
    """True when the file starts with our header and its digest matches: it
    is byte for byte what `write_h5` wrote. A header whose digest does not
    match is worth a warning: the file changed after it was written."""
    with open(path, "rb") as f:
        words = f.read(USER_BLOCK_SIZE).split(b"\n", 1)[0].split()
    if len(words) != 3 or words[:2] != [H5_FORMAT.encode(), b"sha256"]:
        return False
    if sha256_of(path, USER_BLOCK_SIZE) == words[2].decode("ascii", "replace"):
        return True
    warnings.warn(f"{path} has changed since mnv2ref wrote it (its SHA-256 no longer matches "
                  "its header): it may be corrupt", Mnv2refWarning, stacklevel=3)
    return False


PROBE_SECONDS = 60


def probe_h5(path: Path) -> None:
    """Read the file as `read_h5` does, in a child process, and refuse it if
    that crashes or hangs. A Python-level failure is left for the real read
    to report (it fails the same way, cleanly)."""
    import subprocess
    import sys

    code = "import sys; from mnv2ref.weights import read_h5_datasets; read_h5_datasets(sys.argv[1])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path)], env=env,
                                capture_output=True, timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        raise WeightsError(f"{path}: reading it as HDF5 did not finish in {PROBE_SECONDS} s: "
                           "the file is corrupt") from None
    if result.returncode < 0:
        raise WeightsError(f"{path}: the HDF5 library crashed reading it (signal {-result.returncode}): "
                           "the file is corrupt")


def write_h5(path: os.PathLike, variables: Mapping, attributes: Mapping) -> Path:
    """Write variables and root attributes to `path` atomically."""
    import h5py

    path = Path(path)
    with atomic_write(path) as tmp:
        try:
            with h5py.File(tmp, "w", userblock_size=USER_BLOCK_SIZE) as f:
                for name in sorted(variables):
                    f.create_dataset(name, data=np.asarray(variables[name], dtype=np.float32))
                f.attrs["format"] = H5_FORMAT
                f.attrs["format_version"] = H5_FORMAT_VERSION
                for key, value in attributes.items():
                    f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        except RuntimeError as error:  # how h5py reports some failed writes (disk full)
            raise FileError(errno.EIO, f"cannot write {printable(path)}: {error}", str(path)) from None
        with open(tmp, "r+b") as f:
            f.write(_user_block(sha256_of(tmp, USER_BLOCK_SIZE)))
    return path


def convert(prefix, out_h5, use_ema: bool = True, metadata: Mapping = None) -> Path:
    """Convert a TF-slim MobileNetV2 checkpoint to the HDF5 layout above.

    Only model variables are kept (EMA shadows by default, raw values with
    `use_ema=False`); optimizer slots and `global_step` are dropped.
    `metadata` adds root attributes (e.g. `fetch`'s archive URL and SHA-256)."""
    from . import __version__
    from .checkpoint import read_checkpoint

    checkpoint = read_checkpoint(prefix)
    sources = [Path(checkpoint.index_file), *map(Path, checkpoint.data_files)]
    check_not_overwriting(out_h5, sources)
    variables, used_ema = select_variables(checkpoint, use_ema, source=str(checkpoint.index_file))
    depth_multiplier, num_classes = check_variables(variables, source=str(checkpoint.index_file))
    return write_h5(out_h5, variables, {
        "depth_multiplier": depth_multiplier,
        "num_classes": num_classes,
        "use_ema": used_ema,
        "source_files": [p.name for p in sources],
        "source_sha256": {p.name: sha256_of(p) for p in sources},
        "mnv2ref_version": __version__,
        **(metadata or {}),
    })


def weights_file(path) -> Path:
    """`path` as a Path, refused unless it is an existing regular file
    (never a FIFO or device, which would block or never end)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{printable(path)}: no such weights file")
    check_regular_file(path, "weights file")
    return path


def read_h5(path) -> tuple:
    """Read an HDF5 weights file written by `convert`: ({name: array}, attributes).

    Only the datasets of the MobileNetV2 the file's shapes describe are read
    (so memory stays bounded whatever the file holds); a missing or wrongly
    shaped tensor is named in the WeightsError."""
    path = weights_file(path)
    try:
        intact = has_intact_digest(path)
    except OSError as error:  # permission denied, an I/O error
        raise os_error(error, path, "read weights file") from None
    if not intact:
        probe_h5(path)
    return read_h5_datasets(path)


def read_h5_datasets(path) -> tuple:
    """The reading part of `read_h5`, without the crash guard."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get("format")
            if found is not None and found != H5_FORMAT:
                raise WeightsError(f"{path}: not an mnv2ref weights file "
                                   f"(attribute format is {found!r}, expected {H5_FORMAT!r})")
            datasets = _datasets(f, path)
            refuse_links_out(f, path)
            depth_multiplier, num_classes = infer_config(datasets, source=str(path))
            variables = {}
            for name in variable_shapes(depth_multiplier, num_classes):
                check_dtype(name, datasets[name].dtype, str(path))
                check_self_contained(datasets[name], path)
                variables[name] = np.asarray(datasets[name][()], dtype=np.float32)
            attributes = {key: _decode_attribute(_read_attribute(f, key, path)) for key in f.attrs}
    except Mnv2refError:
        raise
    except Exception as error:  # h5py turns HDF5 failures into many exception types
        raise WeightsError(f"{path}: cannot read as HDF5 weights ({type(error).__name__}: {error})") from None
    return variables, attributes


# Filters that only compress or checksum the bytes in the file: gzip, shuffle,
# Fletcher-32 and LZF (what h5py writes). Any other filter is a plugin
# libhdf5 would load from disk, and run, to read the data.
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
MAX_ATTRIBUTE_BYTES = 1 << 20
MAX_OBJECTS = 10_000
# h5py's own chunks are 8 KiB to 1 MiB, so no tensor of the network needs
# more than about a thousand; tiny chunks only make reading slow.
MAX_CHUNKS = 16_384


def _datasets(f, path) -> dict:
    """{name: h5py.Dataset} of every dataset in the file; more than
    `MAX_OBJECTS` groups and datasets (a MobileNetV2 has about 300) are refused."""
    import h5py

    datasets, objects = {}, [0]

    def visit(name, node):
        objects[0] += 1
        if isinstance(node, h5py.Dataset):
            datasets[name] = node
        return True if objects[0] > MAX_OBJECTS else None  # True stops the visit

    if f.visititems(visit):
        raise WeightsError(f"{printable(path)}: more than {MAX_OBJECTS:,} groups and datasets; "
                           "a MobileNetV2 weights file has a few hundred")
    return datasets


def refuse_links_out(f, path) -> None:
    """Refuse an HDF5 file with external links (or user-defined ones): a
    weights (or golden) file must be self-contained, not read parts of other
    files."""
    import h5py

    found = f.visititems_links(lambda name, link: None if isinstance(link, (h5py.HardLink, h5py.SoftLink))
                               else (name, link))  # the first other link stops the visit
    if found:
        name, link = found
        raise WeightsError(f"{printable(path)}: {printable(name)} is an {type(link).__name__} "
                           f"to {printable(getattr(link, 'filename', '?'))}; mnv2ref reads only "
                           "self-contained HDF5 files")


def check_self_contained(dataset, path) -> None:
    """Look at a dataset's storage layout (without reading it) and refuse
    what would make libhdf5 read other files or run code, or make values up:
    external raw storage, virtual-dataset mappings, no storage at all (fill
    values), filters other than `ALLOWED_FILTERS`; and more than `MAX_CHUNKS`
    chunks, which only make reading slow."""
    from h5py import h5d

    plist = dataset.id.get_create_plist()
    where = f"{printable(path)}: dataset {printable(dataset.name)}"
    if plist.get_layout() == h5d.VIRTUAL:
        raise WeightsError(f"{where} is a virtual dataset (its data lives in other files); "
                           "mnv2ref reads only self-contained HDF5 files")
    if plist.get_external_count():
        external = printable(plist.get_external(0)[0].decode("utf-8", "replace"))
        raise WeightsError(f"{where} stores its data in an external file ({external}); "
                           "mnv2ref reads only self-contained HDF5 files")
    if dataset.size and not dataset.id.get_storage_size():
        raise WeightsError(f"{where} has no data stored (declared, never written: its values would "
                           "be HDF5 fill values)")
    if dataset.chunks:
        chunks = math.prod(-(-size // chunk) for size, chunk in zip(dataset.shape, dataset.chunks))
        if chunks > MAX_CHUNKS:
            raise WeightsError(f"{where} is stored in {chunks:,} chunks, more than the {MAX_CHUNKS:,} "
                               "mnv2ref reads")
    for index in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(index)
        if code not in ALLOWED_FILTERS:
            raise WeightsError(f"{where} uses HDF5 filter {code} ({printable(name.decode('utf-8', 'replace'))}); "
                               f"only {', '.join(ALLOWED_FILTERS.values())} are read")


def _read_attribute(f, key: str, path):
    """One root attribute, refused if it is larger than `MAX_ATTRIBUTE_BYTES`."""
    size = f.attrs.get_id(key).get_storage_size()
    if size > MAX_ATTRIBUTE_BYTES:
        raise WeightsError(f"{printable(path)}: attribute {printable(key)} holds {size:,} bytes, "
                           f"more than the {MAX_ATTRIBUTE_BYTES:,} of metadata mnv2ref reads")
    return f.attrs[key]


def _decode_attribute(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
