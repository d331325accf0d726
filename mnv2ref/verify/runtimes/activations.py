"""Activation dumps from someone's own port: an `.npz` or `.h5` with an
`input` array and their intermediate tensors under their own names (e.g.
PyTorch's `features.0` ... `features.18`, NCHW), in the order they were computed.

A dump cannot be run on other inputs: `verify` compares our network, run on
their `input`, with their tensors, and their `input` with our preprocessing.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ...errors import InputError
from ..foreign import ForeignModel, TensorInfo


def is_dump(path) -> bool:
    """True for an HDF5 file holding an `input` dataset (not a Keras file)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "input" in f and isinstance(f["input"], h5py.Dataset)


def _natural(name: str) -> list:
    """`features.10` after `features.9`: numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_dump(path) -> dict:
    """{name: float32 array} of a dump, `input` first, then the tensors in
    the order they were stored (.npz) or in natural name order (.h5)."""
    if str(path).lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    else:
        arrays = _read_h5(path)
    if "input" not in arrays:
        raise InputError(f"{path}: an activation dump needs an `input` array (the network input), "
                         f"found {', '.join(list(arrays)[:8]) or 'nothing'}")
    kept = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.ndim >= 1:
            kept[name] = value.astype(np.float32)
    return kept


def _read_h5(path) -> dict:
    """Every dataset of an HDF5 dump, named by its `endpoint` attribute where
    it has one (`mnv2ref golden` writes `layer_3/expansion_output` as the
    dataset `layer_3.expansion_output`), in the order of the root attribute
    `endpoints` if there is one, else in natural name order."""
    import json

    import h5py

    from ...weights import _decode_attribute, check_self_contained, refuse_links_out

    arrays = {}
    with h5py.File(path, "r") as f:
        refuse_links_out(f, path)  # a dump, like a weights or golden file, reads no other file

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                check_self_contained(obj, path)
                arrays[str(_decode_attribute(obj.attrs.get("endpoint", name)))] = obj[()]

        f.visititems(visit)
        order = f.attrs.get("endpoints")
    try:
        order = json.loads(order) if isinstance(order, (str, bytes)) else list(order or ())
    except (TypeError, ValueError):
        order = []
    rank = {name: i for i, name in enumerate(["input", *order])}
    return {name: arrays[name] for name in sorted(arrays, key=lambda n: (rank.get(n, len(rank)), _natural(n)))}


class DumpModel(ForeignModel):
    """Stored tensors: `run` returns them for their own `input` only."""

    def __init__(self, path):
        self.source = str(path)
        self.arrays = read_dump(path)
        self.input = self.arrays.pop("input")
        self.input_shape = self.input.shape
        self.tensors = [TensorInfo(name) for name in self.arrays]
        self.precision = "float32"
        self.output_name = self.tensors[-1].name if self.tensors else None

    def _run(self, native_x):
        if native_x.shape != self.input.shape or not np.array_equal(native_x, self.input):
            raise InputError(f"{self.source} is a dump of activations: it holds tensors for its own "
                             "`input` only and cannot be run on other inputs")
        return dict(self.arrays)


def load(path, threads: Optional[int] = None) -> DumpModel:
    return DumpModel(path)
