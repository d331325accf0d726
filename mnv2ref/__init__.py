"""mnv2ref: a from-scratch NumPy/Numba reference implementation of TF-slim's
MobileNetV2, checked endpoint by endpoint against TensorFlow.

    import mnv2ref
    model = mnv2ref.MobileNetV2.from_checkpoint("mobilenet_v2_1.0_224.ckpt")
    x = mnv2ref.preprocess(mnv2ref.load_image("cat.jpg"))[None]
    probs = model.predict(x)
"""

from importlib import import_module

from .errors import (CheckpointError, ChecksumError, FetchError, ImageError, InputError,
                     MissingDependencyError, Mnv2refError, Mnv2refWarning, WeightsError)

__version__ = "0.1.0"

# Submodules are imported on first use (PEP 562) so that `import mnv2ref` and
# the CLI start fast: Numba and h5py load only when something needs them.
_PUBLIC = {
    "read_checkpoint": "checkpoint",
    "convert": "weights",
    "MobileNetV2": "model",
    "load_image": "preprocessing",
    "preprocess": "preprocessing",
    "cost": "accounting",
    "trace": "trace",
    "verify": "verify",
    "evaluate": "evaluate",
}


def __getattr__(name):
    if name in _PUBLIC:
        module = import_module(f".{_PUBLIC[name]}", __name__)
        # `verify` and `evaluate` are packages that are also callable (see their __init__.py).
        return module if name in ("verify", "evaluate") else getattr(module, name)
    raise AttributeError(f"module 'mnv2ref' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])


__all__ = [*_PUBLIC, "Mnv2refError", "CheckpointError", "ChecksumError", "WeightsError",
           "ImageError", "InputError", "FetchError", "MissingDependencyError", "Mnv2refWarning", "__version__"]
