"""Where things are: bundled data, the shared fixtures, and weights.

Weights are looked for in this order: an explicit path (`--weights`),
`$MNV2REF_WEIGHTS`, the `weights/` folder (of the current directory, then of
the source checkout), then the real 1.0/224 backbone among the shared test
fixtures (`$MNV2REF_SHARED`, default `../shared/mnv2` beside the checkout).
"""

from __future__ import annotations

import os
import stat
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
    "no MobileNetV2 weights found: run `mnv2ref fetch` (downloads the published "
    "mobilenet_v2_1.0_224 checkpoint into weights/), or pass --weights PATH "
    "(a .h5 from `mnv2ref convert` or a TF checkpoint prefix), or set $MNV2REF_WEIGHTS, "
    "or place the test fixtures at ../shared/mnv2 (or set $MNV2REF_SHARED)")


def shared_dir() -> Path:
    """The shared fixtures folder (it may not exist)."""
    return Path(os.environ.get("MNV2REF_SHARED") or REPO_ROOT.parent / "shared" / "mnv2")


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
    for folder in (Path.cwd() / "weights", REPO_ROOT / "weights"):
        found = _weights_in(folder)
        if found:
            return found
    backbone = shared_dir() / BACKBONE
    if Path(str(backbone) + ".index").is_file():
        return backbone
    raise WeightsError(HOW_TO_GET_WEIGHTS)


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
    """A class name, or `class N` for a classifier that is not the ImageNet one."""
    return labels()[index] if num_classes == len(labels()) else f"class {index}"
