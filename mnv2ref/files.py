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
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import FileError
from .text import printable


def umask_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def os_error(error: OSError, path, doing: str) -> FileError:
    """An OSError as a FileError naming `path` and what was being done, e.g.
    "cannot write out.h5: [Errno 28] No space left on device"."""
    reason = error.strerror or str(error)
    return FileError(error.errno, f"cannot {doing} {printable(path)}: {reason}", str(path))


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path, what: str = "file") -> os.stat_result:
    """Refuse, before anything opens it, a `path` that is not a regular file
    (after symlinks): missing, a folder, or a FIFO, device or socket, which
    would block a reader forever or never end. Raises FileError naming
    `what` ("image", "weights file", ...) and the path; returns its stat.

    Every input mnv2ref reads goes through this first."""
    try:
        st = os.stat(path)
    except OSError as error:
        raise os_error(error, path, f"read {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileError(errno.EISDIR, f"cannot read {what} {printable(path)}: it is a folder", str(path))
    for is_kind, kind in _SPECIAL_KINDS:
        if is_kind(st.st_mode):
            raise FileError(errno.EINVAL, f"cannot read {what} {printable(path)}: it is {kind}, "
                            "not a regular file", str(path))
    return st


def check_not_overwriting(output, inputs) -> None:
    """Refuse to write `output` when it is one of `inputs` (the same file, by
    `os.path.samefile`, so links and other spellings count): writing the
    result would destroy what it is made from."""
    if not os.path.exists(output):
        return
    for source in inputs:
        try:
            same = os.path.samefile(output, source)
        except OSError:  # a missing input cannot be overwritten
            continue
        if same:
            raise FileError(errno.EEXIST, f"refusing to write {printable(output)}: it is "
                            f"the input {printable(source)}", str(output))


@contextlib.contextmanager
def atomic_write(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the body completes, give it
    the umask's mode and rename it over `path`. On any failure the temporary
    file is removed and `path` is left as it was. OS errors (no such folder,
    permission denied, disk full, `path` is a folder) become `FileError`s
    naming `path`. A `path` that is a device or FIFO (`/dev/null`) is
    yielded itself, to be written in place.

        with atomic_write("out.npy", suffix=".npy") as tmp:
            np.save(tmp, array)
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(errno.EISDIR, f"cannot write {printable(path)}: it is a folder", str(path))
    if path.exists() and not path.is_file():
        # /dev/null, /dev/stdout, a FIFO: written in place. Renaming over it
        # would replace the device itself (as root, /dev/null with a file).
        try:
            yield path
        except FileError:
            raise
        except OSError as error:
            raise os_error(error, path, "write") from None
        return
    for parent in path.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise FileError(errno.ENOTDIR, f"cannot write {printable(path)}: {printable(parent)} "
                                "is not a folder", str(path))
            break
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
    except FileError:
        raise  # already names its path
    except OSError as error:
        raise os_error(error, path, "write") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json(path, value, indent: int = 1) -> None:
    """`value` as JSON text, to `path` through `atomic_write`, or to standard
    output when `path` is "-"."""
    import json
    import sys

    text = json.dumps(value, indent=indent) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    with atomic_write(path, suffix=".json") as tmp:
        tmp.write_text(text, encoding="utf-8")
