"""One module per runtime; `load_foreign` picks one from the file type."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...errors import InputError, MissingDependencyError
from ...files import check_regular_file

INSTALL_HINT = 'pip install "mnv2ref[verify]"'
SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".tflite": "tflite", ".keras": "keras",
            ".npz": "activations", ".h5": "h5", ".hdf5": "h5"}


def missing(runtime: str, package: str, error: Exception) -> MissingDependencyError:
    """The error for an absent optional runtime, naming the extra."""
    return MissingDependencyError(f"verifying a {runtime} model needs {package}, which is not "
                                  f"installed ({error}): {INSTALL_HINT}")


def load_foreign(model, threads: Optional[int] = None, interface: Optional[dict] = None):
    """A `ForeignModel` for a path (.onnx, OpenVINO .xml, .tflite, Keras
    .h5/.keras, an activation dump .npz/.h5) or a callable f(x) -> {name: array}.

    `.run(native_x)` gives every exposed tensor by name; `.predict(x)` takes
    our interface (N, H, W, 3) RGB [-1, 1] and converts it to `interface`
    ({"layout", "color", "scale"}; default: the one the model declares, else
    the one `detect_interface` finds). `threads`: the runtime's thread count."""
    foreign = _load(model, threads)
    if interface is not None:
        from ..interface import ORIGINAL

        foreign.interface = {**ORIGINAL, **interface}
    return foreign


def _load(model, threads):
    if callable(model) and not isinstance(model, (str, Path)):
        from .function import CallableModel

        return CallableModel(model)
    path = Path(model)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"cannot verify {path}: expected an .onnx, OpenVINO .xml, .tflite, Keras "
                         f".h5/.keras file, or an .npz/.h5 activation dump")
    check_regular_file(path, "model")
    if kind == "h5":
        from .activations import is_dump

        kind = "activations" if is_dump(path) else "keras"
    if kind == "onnx":
        from .onnx import load
    elif kind == "openvino":
        from .openvino import load
    elif kind == "tflite":
        from .tflite import load
    elif kind == "keras":
        from .keras import load
    else:
        from .activations import load
    return load(path, threads=threads)
