"""Where things are: bundled data, the shared fixtures, the cache, and weights.

Weights are looked for in this order: an explicit path (`--weights`),
`$MNV2REF_WEIGHTS`, the `weights/` folder (of the current directory, then of
the source checkout), the download cache (`cache_dir()`), then the real
1.0/224 backbone among the shared test fixtures (`$MNV2REF_SHARED`, default
`../shared/mnv2` beside the checkout). When none is found, `weights_or_download`
downloads the published 1.0/224 checkpoint into the cache, once.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .errors import Mnv2refWarning, WeightsError
from .text import printable

DATA_DIR = Path(__file__).parent / "data"
EXAMPLE_IMAGE = DATA_DIR / "chelsea.jpg"
REPO_ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "checkpoints/mobilenet_v2_1.0_224_backbone/model.ckpt"

HOW_TO_GET_WEIGHTS = (
    "pass --weights PATH (a .h5 from `mnv2ref convert`, or a TF checkpoint prefix), or set "
    "$MNV2REF_WEIGHTS, or put the published archive's weights in weights/ (`mnv2ref fetch "
    "--url FILE_OR_MIRROR_URL`)")


def shared_dir() -> Path:
    """The shared fixtures folder (it may not exist)."""
    return Path(os.environ.get("MNV2REF_SHARED") or REPO_ROOT.parent / "shared" / "mnv2")


def cache_dir() -> Path:
    """Where downloaded weights are kept: `$MNV2REF_HOME`, else
    `$XDG_CACHE_HOME/mnv2ref`, else `~/.cache/mnv2ref` (it may not exist yet)."""
    if os.environ.get("MNV2REF_HOME"):
        return Path(os.environ["MNV2REF_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mnv2ref"


def _weights_in(folder: Path) -> Optional[Path]:
    """The best .h5 in a folder: the full 1.0/224 model if there, else the newest.
    A dangling link, unreadable file or non-file among them is skipped with a
    warning, so that one bad entry does not stop every command."""
    if not folder.is_dir():
        return None
    readable = {}
    for path in folder.glob("*.h5"):
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK):
                raise PermissionError("not a readable regular file")
        except OSError as error:
            warnings.warn(f"skipping {printable(path)}: {printable(error.strerror or error)}", Mnv2refWarning)
            continue
        readable[path] = st.st_mtime
    candidates = sorted(readable, key=readable.get, reverse=True)
    preferred = [p for p in candidates if p.name == "mobilenet_v2_1.0_224.h5"]
    return (preferred or candidates or [None])[0]


def find_weights(explicit: Optional[str] = None) -> Path:
    """The weights to use, by the search order above; WeightsError if none."""
    for given in (explicit, os.environ.get("MNV2REF_WEIGHTS")):
        if given:
            return Path(given)
    for folder in (Path.cwd() / "weights", REPO_ROOT / "weights", cache_dir()):
        found = _weights_in(folder)
        if found:
            return found
    backbone = shared_dir() / BACKBONE
    if Path(str(backbone) + ".index").is_file():
        return backbone
    raise WeightsError(f"no MobileNetV2 weights found: {HOW_TO_GET_WEIGHTS}")


def pretrained_weights(depth_multiplier=1.0, resolution=224, progress: bool = True) -> Path:
    """The published checkpoint's weights in the cache, downloaded, checked
    and converted on first use (`mnv2ref.fetch.fetch`); later calls make no
    request. FetchError when the download fails."""
    from .fetch import checkpoint_name, fetch

    cached = cache_dir() / f"{checkpoint_name(depth_multiplier, resolution)}.h5"
    if cached.is_file():
        return cached
    fetched = fetch(depth_multiplier, resolution, out_dir=cache_dir(), progress=progress)
    print(f"mnv2ref: downloaded the published {cached.stem} weights into {fetched} "
          "(once: later runs use this copy)", file=sys.stderr)
    return fetched


def weights_or_download(explicit: Optional[str] = None) -> Path:
    """`find_weights`, or else the published 1.0/224 weights, downloaded into
    the cache on first use. A failed download is a FetchError that says where
    it tried and how to provide weights instead."""
    from .errors import FetchError

    try:
        return find_weights(explicit)
    except WeightsError:
        pass
    try:
        return pretrained_weights()
    except FetchError as error:
        raise FetchError(f"no MobileNetV2 weights found, and downloading them failed: {error}. "
                         f"To provide weights: {HOW_TO_GET_WEIGHTS}") from None


@lru_cache(maxsize=1)
def labels() -> tuple:
    """The 1001 class names in TF-slim order: 0 is background, then the
    ImageNet synsets by WordNet id. Each entry is the synset's first name."""
    names = []
    with open(DATA_DIR / "imagenet_labels_1001.tsv", encoding="utf-8") as f:
        for line in f:
            _, _, words = line.rstrip("\n").partition("\t")
            names.append(words.split(",")[0].strip())
    return tuple(names)


def label(index: int, num_classes: int = 1001) -> str:
    """The name of class `index` of a classifier with `num_classes` outputs:
    TF-slim's 1001 (0 is background), or Keras's 1000 (background dropped,
    so Keras class k is TF-slim class k + 1); `class N` for any other."""
    names = labels()
    if num_classes == len(names):
        return names[index]
    if num_classes == len(names) - 1:
        return names[index + 1]
    return f"class {index}"
