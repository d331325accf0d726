"""Labelled image sets: which files to evaluate and the TF-slim class of each.

Three forms of DATASET are understood (`load_dataset`):

* a folder of ``ILSVRC2012_val_NNNNNNNN.JPEG`` files, the ImageNet validation
  set as distributed: image NNNNNNNN has the WordNet id on line NNNNNNNN of
  TF-slim's ``imagenet_2012_validation_synset_labels.txt`` (``labels=``;
  by default the copy among the shared fixtures, `default_validation_labels`);
* a folder of WordNet-id sub-folders, ``val/n01440764/*.JPEG`` (torchvision's
  ``ImageFolder`` layout);
* a list file, one ``path<TAB>label`` per line, the label a WordNet id or a
  TF-slim class index, relative paths relative to the list file's folder.

Labels are TF-slim class indices: 0 is background, 1..1000 the synsets in
sorted WordNet-id order (line i of ``imagenet_labels_1001.tsv``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

from ..errors import InputError
from ..files import check_regular_file
from ..text import printable
from ..resources import DATA_DIR, shared_dir

VALIDATION_LABELS_NAME = "imagenet_2012_validation_synset_labels.txt"
ILSVRC_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
WORDNET_ID = re.compile(r"^n\d{8}$")
NUM_CLASSES = 1001


@dataclass(frozen=True)
class Sample:
    """One image: its path (as listed, a str) and TF-slim class index (None
    when unlabelled, as for embeddings)."""

    image: str
    label: Optional[int] = None


@lru_cache(maxsize=1)
def wordnet_classes() -> dict:
    """WordNet id -> TF-slim class index (1..1000), from ``imagenet_labels_1001.tsv``."""
    classes = {}
    with open(DATA_DIR / "imagenet_labels_1001.tsv", encoding="utf-8") as f:
        for index, line in enumerate(f):
            wnid = line.partition("\t")[0].strip()
            if WORDNET_ID.match(wnid):
                classes[wnid] = index
    return classes


def parse_label(text: str, where: str) -> int:
    """A WordNet id (``n02123045``) or a class index (``282``) -> class index.
    `where` (e.g. ``list.txt:7``) names the place in errors."""
    text = text.strip()
    if WORDNET_ID.match(text):
        if text not in wordnet_classes():
            raise InputError(f"{where}: {text!r} is not one of the 1000 ImageNet WordNet ids")
        return wordnet_classes()[text]
    if text.isdigit() and int(text) < NUM_CLASSES:
        return int(text)
    raise InputError(f"{where}: expected a WordNet id (n########) or a class index "
                     f"0..{NUM_CLASSES - 1}, got {text!r}")


def default_validation_labels() -> Path:
    """TF-slim's validation labels among the shared fixtures (`resources.shared_dir`);
    InputError saying how to give them when they are not there."""
    path = shared_dir() / VALIDATION_LABELS_NAME
    if not path.is_file():
        raise InputError(f"no labels for the ILSVRC2012_val_* images: give --labels "
                         f"{VALIDATION_LABELS_NAME} (TF-slim's ground truth, one WordNet id a line; "
                         f"looked for it at {path})")
    return path


def read_validation_labels(path=None) -> List[int]:
    """TF-slim's ground-truth file (line i = label of image i) -> class indices
    (default: `default_validation_labels()`)."""
    path = Path(path) if path is not None else default_validation_labels()
    lines = _lines(path, "labels file")
    return [parse_label(line, f"{path}:{number}") for number, line in enumerate(lines, 1)]


def load_dataset(dataset, labels=None, limit: Optional[int] = None) -> List[Sample]:
    """The samples of DATASET (a folder or a list file, see the module docstring),
    in a fixed order (by file number, WordNet id then name, or list order),
    at most `limit` of them, with absolute paths. `labels` names the validation labels
    for an ``ILSVRC2012_val_*`` folder."""
    path = Path(dataset)
    if path.is_file():
        if labels is not None:
            raise InputError(f"--labels is for a folder of ILSVRC2012_val_*.JPEG files; "
                             f"{path} is a list file, which holds its own labels")
        samples = _from_list_file(path)
    elif path.is_dir():
        samples = _from_folder(path, labels)
    else:
        raise InputError(f"dataset {path} not found: expected a folder of images or a "
                         "path<TAB>label list file")
    if not samples:
        raise InputError(f"dataset {path} holds no images")
    # Absolute paths: the same names for a run resumed from another folder
    # and for Dask workers started elsewhere.
    samples = [Sample(os.path.abspath(s.image), s.label) for s in samples]
    return samples[:limit] if limit else samples


def _from_folder(folder: Path, labels) -> List[Sample]:
    entries = sorted(folder.iterdir())
    numbered = [(int(m.group(1)), p) for p in entries if p.is_file() and (m := ILSVRC_NAME.match(p.name))]
    if numbered:
        truth = read_validation_labels(labels)
        source = labels or "the ILSVRC2012 validation labels"
        samples = []
        for number, image in sorted(numbered):
            if not 1 <= number <= len(truth):
                raise InputError(f"{image.name}: no label for image {number}; {source} "
                                 f"has {len(truth)} lines")
            samples.append(Sample(str(image), truth[number - 1]))
        return samples
    if labels is not None:
        raise InputError(f"--labels is for a folder of ILSVRC2012_val_*.JPEG files; "
                         f"{folder} has none")
    classes = [p for p in entries if p.is_dir() and WORDNET_ID.match(p.name)]
    if not classes:
        raise InputError(f"{folder} has neither ILSVRC2012_val_*.JPEG files nor WordNet-id "
                         "sub-folders (n01440764/...)")
    return [Sample(str(image), parse_label(wnid.name, str(wnid)))
            for wnid in classes
            for image in sorted(wnid.iterdir()) if image.is_file() and not image.name.startswith(".")]


def _lines(path: Path, what: str) -> List[str]:
    """The lines of a text file, refused first if it is not a regular file
    (a FIFO would block the read forever)."""
    check_regular_file(path, what)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {what} {printable(path)}: {error}") from None


def _from_list_file(path: Path) -> List[Sample]:
    lines = _lines(path, "list file")
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        image, tab, label = line.rpartition("\t")
        if not tab or not image:
            raise InputError(f"{path}:{number}: expected 'path<TAB>label', got {line!r}")
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        samples.append(Sample(str(image_path), parse_label(label, f"{path}:{number}")))
    return samples
