"""Writing files so that nothing half-written is ever seen.

Every output of mnv2ref (HDF5 weights, `.npy` embeddings, ONNX graphs, JSON,
figures, downloads) goes through `atomic_write`: the data is written to a
temporary file beside the destination and renamed over it only once complete,
so a crash, a full disk or Ctrl-C leaves either the old file or the new one,
never a mixture. The file gets the permissions `open()` would give it (0666
less the umask), not `mkstemp`'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import FileError


def umask_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def os_error(error: OSError, path, doing: str) -> FileError:
    """An OSError as a FileError naming `path` and what was being done, e.g.
    "cannot write out.h5: [Errno 28] No space left on device"."""
    reason = error.strerror or str(error)
    return FileError(error.errno, f"cannot {doing} {path}: {reason}", str(path))


@contextlib.contextmanager
def atomic_write(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the body completes, give it
    the umask's mode and rename it over `path`. On any failure the temporary
    file is removed and `path` is left as it was. OS errors (no such folder,
    permission denied, disk full, `path` is a folder) become `FileError`s
    naming `path`.

        with atomic_write("out.npy", suffix=".npy") as tmp:
            np.save(tmp, array)
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(21, f"cannot write {path}: it is a folder", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise os_error(error, path, "write") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as error:
        raise os_error(error, path, "write") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
