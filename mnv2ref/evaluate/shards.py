"""`mnv2ref embed -o DIR --shard-size N`: embeddings of large image sets as shards.

    DIR/shard-00000.npz   embeddings (n, 1280) float32, images (n,) the rows' files,
    DIR/shard-00001.npz   skipped (m,) the shard's unreadable files
    ...
    DIR/index.json        {"format": "mnv2ref-embeddings", "version": 1, "weights", "shard_size",
                           "images", "shards": [{"file", "first", "images", "rows", "skipped"}]}

Shard k holds images k*N .. k*N+N-1 of the sorted list. Each shard file is
written whole (`files.atomic_write`) when its last batch is done, and the
index once every shard is, so a crash loses at most the shards in progress;
running the same command again keeps every complete shard (a file covering
exactly its images) and computes only the others.
Both engines serve it: the process pool on this machine, or Dask (``dask=``).
"""

from __future__ import annotations

import sys
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..files import atomic_write, write_json
from ..text import printable
from .datasets import Sample
from .pipeline import Job, _reference, chunks, load_samples, preprocessed_batches

FORMAT = "mnv2ref-embeddings"


def shard_file(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _complete(path: Path, images: Sequence[str]) -> bool:
    """Whether the shard file exists and covers exactly `images`."""
    if not path.is_file():
        return False
    with np.load(path) as shard:
        return sorted([*shard["images"], *shard["skipped"]]) == sorted(images)


def _write_shard(path: Path, images, embeddings: np.ndarray, skipped) -> None:
    with atomic_write(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=embeddings, images=np.array(images, dtype=str),
                 skipped=np.array(skipped, dtype=str))


def embed_shards(paths: Sequence, folder, weights: str, use_ema: bool = True, shard_size: int = 1024,
                 batch_size: int = 16, workers: Optional[int] = None, dask: Optional[str] = None,
                 size: int = 224, backend: str = "numba", progress: bool = True) -> dict:
    """Embed the images `paths` into shards in `folder` (module docstring); returns the index.
    `shard_size` is rounded up to a multiple of `batch_size`."""
    from tqdm import tqdm

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"-o {folder}: with --shard-size the output is a folder, and this is a file")
    shard_size = -(-shard_size // batch_size) * batch_size
    job = Job(str(weights), use_ema=use_ema, size=size, backend=backend)
    shards = [[str(p) for p in part] for part in chunks(list(paths), shard_size)]
    pending = [k for k, images in enumerate(shards) if not _complete(shard_file(folder, k), images)]
    index = {"format": FORMAT, "version": 1, "weights": str(weights), "shard_size": shard_size,
             "images": sum(map(len, shards)), "shards": []}
    with tqdm(total=index["images"], initial=index["images"] - sum(len(shards[k]) for k in pending),
              unit="img", file=sys.stderr, disable=None if progress else True) as bar:
        if dask:
            from .dask import run_dask_shards

            done = run_dask_shards(dask, [(k, shards[k]) for k in pending], job, batch_size)
        else:
            done = _local_shards([(k, shards[k]) for k in pending], job, batch_size, workers)
        for k, images, embeddings, skipped in done:
            _write_shard(shard_file(folder, k), images, embeddings, skipped)
            for image in skipped:
                tqdm.write(f"mnv2ref: warning: skipping unreadable image {printable(image)}", file=sys.stderr)
            bar.update(len(shards[k]))
    for k, images in enumerate(shards):
        with np.load(shard_file(folder, k)) as shard:
            index["shards"].append({"file": shard_file(folder, k).name, "first": k * shard_size,
                                    "images": len(images), "rows": len(shard["images"]),
                                    "skipped": [str(s) for s in shard["skipped"]]})
    write_json(folder / "index.json", index)
    return index


def _local_shards(pending, job: Job, batch_size: int, workers: Optional[int]):
    """Yield (shard number, images read, embeddings, skipped) of each pending
    shard, from one process pool over all of their images: the batches never
    straddle two shards because every shard but the last is a whole number of
    batches."""
    samples = [Sample(image) for _, images in pending for image in images]
    batches = preprocessed_batches(samples, batch_size, workers, job.size,
                                   partial(_reference, job.weights, job.use_ema))
    try:
        for k, images in pending:
            yield (k, *_embed_batches(job, islice(batches, -(-len(images) // batch_size))))
    finally:
        batches.close()


def embed_shard(job: Job, images: Sequence[str], batch_size: int):
    """On a Dask worker: one shard's (images read, embeddings, skipped)."""
    parts = chunks([Sample(image) for image in images], batch_size)
    return _embed_batches(job, (load_samples(part, job.size) for part in parts))


def _embed_batches(job: Job, batches):
    """(images read, (n, C) embeddings, images skipped) of `pipeline` batches."""
    read, features, skipped = [], [], []
    for batch_read, batch, failures in batches:
        read += [s.image for s in batch_read]
        if len(batch):
            features.append(job.embed(batch))
        skipped += [s.image for s, _ in failures]
    if not features:  # every image of the shard unreadable
        features = [np.zeros((0, _reference(job.weights, job.use_ema).embedding_size), np.float32)]
    return read, np.concatenate(features), skipped
