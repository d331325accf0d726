"""One exception hierarchy for everything mnv2ref refuses to do.

Every error names the file, tensor or argument at fault and says what was
expected and what was found, so that the CLI can print it as one line.
"""


class Mnv2refError(Exception):
    """Base class of every error raised on purpose by mnv2ref."""


class CheckpointError(Mnv2refError):
    """A TensorFlow checkpoint is missing, truncated or not what it claims to be."""


class ChecksumError(CheckpointError):
    """A block or tensor fails its masked CRC32C check."""


class WeightsError(Mnv2refError):
    """Weights are missing, wrongly shaped, or not those of a MobileNetV2."""


class ImageError(Mnv2refError):
    """An image file cannot be decoded into RGB pixels."""


class InputError(Mnv2refError, ValueError):
    """An array or argument given to the model is not of the expected form."""


class FetchError(Mnv2refError):
    """Downloading or unpacking a published checkpoint archive failed."""


class FileError(Mnv2refError, OSError):
    """A file cannot be read or written (missing, permission denied, disk full,
    a folder where a file was expected). It is also an OSError, so
    `except OSError` keeps working; `filename` names the path."""

    def __str__(self):
        return self.strerror or super().__str__()


class MissingDependencyError(Mnv2refError):
    """An optional dependency (matplotlib, onnx, ...) is not installed."""


class Mnv2refWarning(UserWarning):
    """Something is off but the work can go on (e.g. a weights file edited since it was written)."""
