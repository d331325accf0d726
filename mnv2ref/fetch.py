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
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from .architecture import PUBLISHED_DEPTH_MULTIPLIERS, PUBLISHED_RESOLUTIONS
from .errors import FetchError, Mnv2refError

MODEL_ZOO_URL = "https://storage.googleapis.com/mobilenet_v2/checkpoints/{name}.tgz"
URL_ENV = "MNV2REF_FETCH_URL"
TIMEOUT = 60.0  # seconds without progress before a download is abandoned
CHUNK = 1 << 16
URL_SCHEMES = ("http", "https", "file")

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

def _content_length(response) -> int | None:
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


def download(url: str, destination: Path, progress: bool = True) -> int:
    """Download `url` to the file `destination`; return the number of bytes.

    Every network failure (unreachable host, HTTP error status, timeout,
    connection closed before `Content-Length` bytes) is a `FetchError`
    naming the URL. `destination` may be left partly written: the caller
    owns it and removes it."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in URL_SCHEMES:
        raise FetchError(f"cannot download {url!r}: the URL scheme must be one of {', '.join(URL_SCHEMES)}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            total = _content_length(response)
            received = _copy_response(response, destination, total, url, progress)
    except urllib.error.HTTPError as error:
        raise FetchError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise FetchError(f"download of {url} failed: {error.reason}") from None
    except TimeoutError:
        raise FetchError(f"download of {url} failed: no data for {TIMEOUT:g} s (timed out)") from None
    except (http.client.HTTPException, OSError) as error:
        raise FetchError(f"download of {url} failed: {type(error).__name__}: {error}") from None
    if total is not None and received != total:
        raise FetchError(f"download of {url} is incomplete: received {received} of the "
                         f"{total} bytes announced by Content-Length")
    return received


def _copy_response(response, destination: Path, total, url: str, progress: bool) -> int:
    received = 0
    with open(destination, "wb") as out, _progress_bar(total, Path(url).name or url, progress) as bar:
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                return received
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))


# ---------------------------------------------------------------------------
# Safe unpacking
# ---------------------------------------------------------------------------

def _open_archive(path: Path, url: str) -> tuple:
    """Open a gzip-compressed tar archive and read its member list."""
    try:
        archive = tarfile.open(path, "r:gz")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise FetchError(f"{url} is not a gzip-compressed tar archive: {error}") from None
    try:
        return archive, archive.getmembers()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        archive.close()
        raise FetchError(f"{url}: the archive is corrupt or truncated: {error}") from None


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
    into `target` (flat); return the checkpoint prefix there."""
    archive, members = _open_archive(archive_path, url)
    with archive:
        check_members(members, target, url)
        wanted = checkpoint_members(members, name, url)
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

def _convert_checked(prefix: Path, out_h5: Path, depth_multiplier: float, url: str) -> None:
    """Convert the unpacked checkpoint and check it is the network asked for."""
    import h5py

    from .weights import convert

    try:
        convert(prefix, out_h5, use_ema=True)
    except Mnv2refError as error:
        raise FetchError(f"{url}: the archive's checkpoint cannot be converted: {error}") from error
    with h5py.File(out_h5, "r") as f:
        found = float(f.attrs["depth_multiplier"])
    if abs(found - float(depth_multiplier)) > 1e-9:
        raise FetchError(f"{url}: the archive's checkpoint has depth multiplier {found}, "
                         f"expected {depth_multiplier}")


def fetch(depth_multiplier=1.0, resolution=224, out_dir="weights", url=None,
          progress=True, keep_archive=False) -> Path:
    """Download, safely unpack and convert a published MobileNetV2 checkpoint.

    Returns the path of `{out_dir}/{name}.h5` (name e.g. `mobilenet_v2_1.0_224`),
    holding the checkpoint's ExponentialMovingAverage weights in the layout
    of `mnv2ref.weights.convert`. With `keep_archive` the downloaded archive is
    kept as `{out_dir}/{name}.tgz`. Prints nothing but the download progress
    bar (on stderr, when `progress` and stderr is a terminal).

    Raises `FetchError` for an unpublished (depth, resolution), any network
    failure, a corrupt or unsafe archive, or one without the checkpoint; then
    no temporary file remains and an existing `.h5` is left untouched."""
    name = checkpoint_name(depth_multiplier, resolution)
    source = checkpoint_url(name, url)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.fetch-", dir=out_dir))
    try:
        archive = work / f"{name}.tgz.part"
        download(source, archive, progress)
        prefix = unpack_checkpoint(archive, name, work / "checkpoint", source)
        converted = work / f"{name}.h5.part"
        _convert_checked(prefix, converted, depth_multiplier, source)
        result = out_dir / f"{name}.h5"
        os.replace(converted, result)
        if keep_archive:
            os.replace(archive, out_dir / f"{name}.tgz")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
