"""Download a published MobileNetV2 checkpoint and convert it to HDF5.

The TF-slim model zoo (tensorflow/models, `research/slim/nets/mobilenet/README.md`)
publishes 22 MobileNetV2 ImageNet checkpoints, one `.tgz` per
(depth multiplier, input resolution):

    https://storage.googleapis.com/mobilenet_v2/checkpoints/mobilenet_v2_{depth}_{resolution}.tgz

with depth 0.35, 0.5, 0.75 or 1.0 at resolution 96, 128, 160, 192 or 224, and
depth 1.3 or 1.4 at 224 only. Each archive holds, at its top level,
`{name}.ckpt.data-00000-of-00001`, `{name}.ckpt.index`, `{name}.ckpt.meta`,
`{name}_frozen.pb`, `{name}.tflite`, `{name}_info.txt` and `{name}_eval.pbtxt`.

`fetch` downloads one archive into a private temporary folder inside the
output folder, checks every member before unpacking anything (no absolute
paths, no `..`, no links, devices or fifos, nothing that would land outside
the folder), unpacks only the checkpoint (`.ckpt.index` and `.ckpt.data-*`),
converts it with `mnv2ref.weights.convert` (EMA weights) and moves the result
to `{out_dir}/{name}.h5`. On any failure it raises `FetchError`, removes its
temporary files and leaves an existing `.h5` untouched.

The URL is, in order of precedence: the `url` argument (the whole URL), the
environment variable `MNV2REF_FETCH_URL` (a template in which `{name}` is
replaced, for mirrors and tests), then `MODEL_ZOO_URL`.

Integrity: the archive's size and SHA-256 are checked before anything is
unpacked. `PINNED_ARCHIVES` holds the published 1.0/224 archive's
(78,306,834 bytes, the digest Open Model Zoo pins for this model card); the
environment variable `MNV2REF_FETCH_SHA256` sets the expected digest instead
(for a mirror, or a test serving its own archive). For an archive with no
known digest the computed one is printed on stderr. Either way the digest is
recorded in the weights' HDF5 metadata (`archive_sha256`).

Bounds: a download is refused when it announces or delivers more than it
can be (the pinned size, else `MAX_DOWNLOAD_BYTES`), when no byte arrives for
`TIMEOUT` seconds, when fewer than `MIN_PROGRESS_BYTES` arrive in any
`PROGRESS_WINDOW` seconds (a server dripping bytes), or when it is not done
after `DEADLINE` seconds. A `file://` URL must name a regular file (never a
FIFO or a device). Archive members are checked against `MAX_MEMBER_BYTES`
and their sum against `MAX_UNPACKED_BYTES` as their headers are read, before
any of their data is decompressed, and sparse members are refused.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from .architecture import PUBLISHED_DEPTH_MULTIPLIERS, PUBLISHED_RESOLUTIONS
from .errors import FetchError, FileError, Mnv2refError
from .text import printable

MODEL_ZOO_URL = "https://storage.googleapis.com/mobilenet_v2/checkpoints/{name}.tgz"
URL_ENV = "MNV2REF_FETCH_URL"
SHA256_ENV = "MNV2REF_FETCH_SHA256"
TIMEOUT = 30.0  # seconds without a byte before a download is abandoned
PROGRESS_WINDOW = 30.0  # seconds over which ...
MIN_PROGRESS_BYTES = 64 << 10  # ... at least this much must arrive
DEADLINE = 3600.0  # seconds for a whole download
MAX_DOWNLOAD_BYTES = 512 << 20  # no published archive comes near (1.4/224: about 170 MB)
MAX_MEMBER_BYTES = 512 << 20  # one unpacked member
MAX_UNPACKED_BYTES = 1 << 30  # all members' declared sizes together
MAX_MEMBERS = 1000
CHUNK = 1 << 16
URL_SCHEMES = ("http", "https", "file")

# (size in bytes, SHA-256) of published archives whose digests are known:
# mobilenet_v2_1.0_224 as pinned by OpenVINO's Open Model Zoo for the model card.
PINNED_ARCHIVES = {
    "mobilenet_v2_1.0_224": (78_306_834, "318084bc1b63d6d7b854553e09cdf77078b1c0168be27c59a0d44253b5ed49dc"),
}

# Every (depth multiplier, resolution) of the zoo: depths above 1 exist at 224 only.
PUBLISHED_CHECKPOINTS = tuple(
    (depth, resolution)
    for depth in sorted(PUBLISHED_DEPTH_MULTIPLIERS, reverse=True)
    for resolution in sorted(PUBLISHED_RESOLUTIONS, reverse=True)
    if depth <= 1.0 or resolution == 224
)


# ---------------------------------------------------------------------------
# Names and URLs
# ---------------------------------------------------------------------------

def _published_list() -> str:
    return ", ".join(f"{depth}/{resolution}" for depth, resolution in PUBLISHED_CHECKPOINTS)


def checkpoint_name(depth_multiplier=1.0, resolution=224) -> str:
    """The zoo's name for a published checkpoint, e.g. `mobilenet_v2_0.35_224`.

    Refuses any (depth multiplier, resolution) the zoo does not publish, with
    the list of those it does."""
    try:
        depth = float(depth_multiplier)
        size = int(resolution)
        if size != float(resolution):
            raise ValueError
    except (TypeError, ValueError):
        raise FetchError(f"depth multiplier {depth_multiplier!r} and resolution {resolution!r} "
                         f"must be numbers; published depth/resolution: {_published_list()}") from None
    for published_depth, published_size in PUBLISHED_CHECKPOINTS:
        if abs(depth - published_depth) < 1e-9 and size == published_size:
            return f"mobilenet_v2_{published_depth}_{published_size}"
    raise FetchError(f"no published MobileNetV2 checkpoint for depth multiplier {depth_multiplier} "
                     f"at resolution {resolution}; published depth/resolution: {_published_list()}")


def checkpoint_url(name: str, url: str | None = None) -> str:
    """The URL to download checkpoint `name` from: `url` if given, else the
    `MNV2REF_FETCH_URL` template, else the model zoo."""
    if url:
        return url
    template = os.environ.get(URL_ENV) or MODEL_ZOO_URL
    return template.replace("{name}", name)


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

def expected_archive(name: str) -> tuple:
    """(size or None, SHA-256 or None) expected of archive `name`:
    `$MNV2REF_FETCH_SHA256` if set (size unknown), else the pinned pair."""
    override = os.environ.get(SHA256_ENV, "").strip().lower()
    if override:
        if not re.fullmatch(r"[0-9a-f]{64}", override):
            raise FetchError(f"${SHA256_ENV} must be 64 hexadecimal digits, got {printable(override)!r}")
        return None, override
    return PINNED_ARCHIVES.get(name, (None, None))


def _content_length(response):
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _progress_bar(total, label: str, progress: bool):
    from tqdm import tqdm

    enabled = progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                file=sys.stderr, disable=not enabled)


def _check_file_url(url: str) -> None:
    """A file:// URL must name a regular file: opening a FIFO blocks forever
    and a device such as /dev/zero never ends."""
    from .files import check_regular_file

    try:
        check_regular_file(urllib.request.url2pathname(urllib.parse.urlparse(url).path), "download")
    except FileError as error:
        raise FetchError(f"cannot download {printable(url)}: {error}") from None


def download(url: str, destination: Path, progress: bool = True, max_bytes: int = MAX_DOWNLOAD_BYTES) -> str:
    """Download `url` to the file `destination`; return the SHA-256 of what arrived.

    Every network failure (unreachable host, HTTP error status, timeout, a
    download too slow or too large, connection closed before
    `Content-Length` bytes) is a `FetchError` naming the URL. `destination`
    may be left partly written: the caller owns it and removes it."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in URL_SCHEMES:
        raise FetchError(f"cannot download {printable(url)!r}: the URL scheme must be one of "
                         f"{', '.join(URL_SCHEMES)}")
    if scheme == "file":
        _check_file_url(url)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            total = _content_length(response)
            if total is not None and total > max_bytes:
                raise FetchError(f"download of {printable(url)} refused: it announces {total:,} bytes, "
                                 f"more than the {max_bytes:,} expected at most")
            received, digest = _copy_response(response, destination, total, url, progress, max_bytes)
    except urllib.error.HTTPError as error:
        raise FetchError(f"download of {printable(url)} failed: HTTP {error.code} "
                         f"{printable(error.reason)}") from None
    except urllib.error.URLError as error:
        raise FetchError(f"download of {printable(url)} failed: {printable(error.reason)}") from None
    except TimeoutError:
        raise FetchError(f"download of {printable(url)} failed: no data for {TIMEOUT:g} s (timed out)") from None
    except (http.client.HTTPException, OSError) as error:
        raise FetchError(f"download of {printable(url)} failed: {type(error).__name__}: "
                         f"{printable(error)}") from None
    if total is not None and received != total:
        raise FetchError(f"download of {printable(url)} is incomplete: received {received} of the "
                         f"{total} bytes announced by Content-Length")
    return digest


def _copy_response(response, destination: Path, total, url: str, progress: bool, max_bytes: int) -> tuple:
    """Copy the body to `destination`, hashing it, within the size and time bounds."""
    received, digest = 0, hashlib.sha256()
    start = window_start = time.monotonic()
    window_bytes = 0
    # read1 returns what has arrived instead of waiting for a whole chunk, so
    # the time bounds are checked even while a server drips bytes.
    read = getattr(response, "read1", response.read)
    with open(destination, "wb") as out, _progress_bar(total, Path(url).name or url, progress) as bar:
        while True:
            chunk = read(CHUNK)
            if not chunk:
                return received, digest.hexdigest()
            received += len(chunk)
            if received > max_bytes:
                raise FetchError(f"download of {printable(url)} refused: more than the {max_bytes:,} "
                                 "bytes expected at most")
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
            now, window_bytes = time.monotonic(), window_bytes + len(chunk)
            if now - start > DEADLINE:
                raise FetchError(f"download of {printable(url)} abandoned: not complete after "
                                 f"{DEADLINE:g} s ({received:,} bytes received)")
            if now - window_start >= PROGRESS_WINDOW:
                if window_bytes < MIN_PROGRESS_BYTES:
                    raise FetchError(f"download of {printable(url)} abandoned: too slow ({window_bytes:,} bytes "
                                     f"in {now - window_start:.0f} s)")
                window_start, window_bytes = now, 0


def check_archive(path: Path, name: str, digest: str, url: str) -> None:
    """Refuse an archive whose size or SHA-256 is not the expected one; print
    the digest of an archive for which none is known."""
    size, expected = expected_archive(name)
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        raise FetchError(f"{printable(url)}: the archive has {found_size:,} bytes, expected {size:,} "
                         f"(SHA-256 {digest}, expected {expected})")
    if expected is None:
        print(f"mnv2ref: {name}.tgz has SHA-256 {digest} (no pinned digest to check it against; "
              f"it is recorded in the weights' metadata)", file=sys.stderr)
    elif digest != expected:
        raise FetchError(f"{printable(url)}: SHA-256 mismatch: the archive has {digest}, expected "
                         f"{expected}; nothing was kept")


# ---------------------------------------------------------------------------
# Safe unpacking
# ---------------------------------------------------------------------------

def _open_archive(path: Path, url: str) -> tuple:
    """Open a gzip-compressed tar archive and read its member list (`_members`)."""
    try:
        archive = tarfile.open(path, "r:gz")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise FetchError(f"{printable(url)} is not a gzip-compressed tar archive: {printable(error)}") from None
    try:
        return archive, _members(archive, url)
    except BaseException:
        archive.close()
        raise


def _members(archive: tarfile.TarFile, url: str) -> list:
    """The archive's members, refused as soon as a header declares more than a
    checkpoint archive can hold (before that member's data is decompressed to
    skip over it)."""
    members, declared = [], 0
    try:
        for member in archive:
            if member.issparse():
                raise FetchError(f"{printable(url)}: refusing the archive: member {printable(member.name)!r} "
                                 "is a sparse file")
            if member.size > MAX_MEMBER_BYTES:
                raise FetchError(f"{printable(url)}: refusing the archive: member {printable(member.name)!r} "
                                 f"declares {member.size:,} bytes, more than {MAX_MEMBER_BYTES:,}")
            declared += member.size
            members.append(member)
            if declared > MAX_UNPACKED_BYTES or len(members) > MAX_MEMBERS:
                raise FetchError(f"{printable(url)}: refusing the archive: its members declare more than "
                                 f"{MAX_UNPACKED_BYTES:,} bytes or number more than {MAX_MEMBERS}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise FetchError(f"{printable(url)}: the archive is corrupt or truncated: {printable(error)}") from None
    return members


def _unsafe_reason(member: tarfile.TarInfo, target: Path) -> str | None:
    """Why extracting `member` into `target` would be unsafe, or None."""
    name = member.name
    if not name or "\x00" in name:
        return "has an empty or invalid name"
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' path component"
    if member.issym() or member.islnk():
        return f"is a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is a device, fifo or other special file"
    root = os.path.realpath(target)
    landing = os.path.realpath(os.path.join(root, name))
    if landing != root and not landing.startswith(root + os.sep):
        return f"would be extracted outside the target folder (to {landing})"
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, str(target))
        except tarfile.FilterError as error:
            return f"is refused by tarfile.data_filter ({error})"
    return None


def check_members(members, target: Path, url: str) -> None:
    """Refuse the whole archive if any member is unsafe to extract into `target`."""
    for member in members:
        reason = _unsafe_reason(member, target)
        if reason:
            raise FetchError(f"{url}: refusing the archive: member {member.name!r} {reason}")


def _member_list(members) -> str:
    names = [member.name for member in members]
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    return shown or "(none)"


def checkpoint_members(members, name: str, url: str) -> list:
    """The `{name}.ckpt.index` member and its `.ckpt.data-*` shards beside it."""
    files = [member for member in members if member.isfile()]
    indexes = [m for m in files if os.path.basename(m.name) == f"{name}.ckpt.index"]
    if not indexes:
        raise FetchError(f"{url}: the archive holds no checkpoint {name}.ckpt.index; "
                         f"its members: {_member_list(members)}")
    if len(indexes) > 1:
        raise FetchError(f"{url}: the archive holds {len(indexes)} members named {name}.ckpt.index "
                         f"({', '.join(m.name for m in indexes)}); refusing the ambiguity")
    folder = os.path.dirname(indexes[0].name)
    shard = re.compile(re.escape(name) + r"\.ckpt\.data-\d{5}-of-\d{5}$")
    shards = [m for m in files if os.path.dirname(m.name) == folder
              and shard.match(os.path.basename(m.name))]
    if not shards:
        raise FetchError(f"{url}: the archive has {indexes[0].name} but no {name}.ckpt.data-* shard; "
                         f"its members: {_member_list(members)}")
    basenames = [os.path.basename(m.name) for m in shards]
    if len(set(basenames)) != len(basenames):
        raise FetchError(f"{url}: the archive holds duplicate checkpoint shards; refusing the ambiguity")
    return [indexes[0], *shards]


def unpack_checkpoint(archive_path: Path, name: str, target: Path, url: str) -> Path:
    """Check every member of the archive, then copy only the checkpoint files
    (and the `{name}.tflite` twin when the archive has one, for `bench`)
    into `target` (flat); return the checkpoint prefix there."""
    archive, members = _open_archive(archive_path, url)
    with archive:
        check_members(members, target, url)
        wanted = checkpoint_members(members, name, url)
        wanted += [m for m in members if m.isfile() and os.path.basename(m.name) == f"{name}.tflite"][:1]
        target.mkdir(parents=True, exist_ok=True)
        for member in wanted:
            _copy_member(archive, member, target / os.path.basename(member.name), url)
    return target / f"{name}.ckpt"


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path, url: str) -> None:
    try:
        source = archive.extractfile(member)
        with source, open(path, "xb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise FetchError(f"{url}: cannot unpack {member.name!r} (corrupt or truncated archive, "
                         f"or the disk is full): {error}") from None
    if path.stat().st_size != member.size:
        raise FetchError(f"{url}: member {member.name!r} unpacked to {path.stat().st_size} bytes, "
                         f"expected {member.size}")


# ---------------------------------------------------------------------------
# Conversion and the whole pipeline
# ---------------------------------------------------------------------------

def _convert_checked(prefix: Path, out_h5: Path, depth_multiplier: float, url: str, metadata: dict) -> None:
    """Convert the unpacked checkpoint and check it is the network asked for."""
    import h5py

    from .weights import convert

    try:
        convert(prefix, out_h5, use_ema=True, metadata=metadata)
    except Mnv2refError as error:
        raise FetchError(f"{printable(url)}: the archive's checkpoint cannot be converted: {error}") from error
    with h5py.File(out_h5, "r") as f:
        found = float(f.attrs["depth_multiplier"])
    if abs(found - float(depth_multiplier)) > 1e-9:
        raise FetchError(f"{printable(url)}: the archive's checkpoint has depth multiplier {found}, "
                         f"expected {depth_multiplier}")


def fetch(depth_multiplier=1.0, resolution=224, out_dir="weights", url=None,
          progress=True, keep_archive=False) -> Path:
    """Download, check, safely unpack and convert a published MobileNetV2 checkpoint.

    Returns the path of `{out_dir}/{name}.h5` (name e.g. `mobilenet_v2_1.0_224`),
    holding the checkpoint's ExponentialMovingAverage weights in the layout
    of `mnv2ref.weights.convert`, with the archive's URL and SHA-256 in its
    metadata. The archive's `{name}.tflite`, if it has one, is kept beside it
    (`mnv2ref bench` runs it with LiteRT). With `keep_archive` the downloaded
    archive is kept as `{out_dir}/{name}.tgz`. Prints the download progress
    bar (on stderr, when `progress` and stderr is a terminal) and, for an
    archive with no known digest, its SHA-256.

    Raises `FetchError` for an unpublished (depth, resolution), any network
    failure, a size or SHA-256 mismatch, a corrupt or unsafe archive, or one
    without the checkpoint; then no temporary file remains and an existing
    `.h5` is left untouched."""
    from .files import os_error, umask_mode

    name = checkpoint_name(depth_multiplier, resolution)
    source = checkpoint_url(name, url)
    expected_size, _ = expected_archive(name)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.fetch-", dir=out_dir))
    except OSError as error:
        raise os_error(error, out_dir, "create the folder") from None
    try:
        archive = work / f"{name}.tgz.part"
        digest = download(source, archive, progress, max_bytes=expected_size or MAX_DOWNLOAD_BYTES)
        check_archive(archive, name, digest, source)
        prefix = unpack_checkpoint(archive, name, work / "checkpoint", source)
        converted = work / f"{name}.h5.part"
        _convert_checked(prefix, converted, depth_multiplier, source,
                         {"archive_url": source, "archive_sha256": digest})
        result = out_dir / f"{name}.h5"
        tflite = prefix.parent / f"{name}.tflite"
        moves = [(converted, result)] + [(tflite, out_dir / tflite.name)] * tflite.is_file()
        moves += [(archive, out_dir / f"{name}.tgz")] * keep_archive
        for path, destination in moves:
            os.chmod(path, umask_mode())
            os.replace(path, destination)
    except OSError as error:
        raise os_error(error, out_dir, "write into") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed first download leaves no trace, not even the cache folder
    return result
