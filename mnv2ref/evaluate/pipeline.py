"""The single-machine engine: decode + preprocess in a process pool, infer in this one.

    worker 1:  load_image -> preprocess  x batch_size  ─┐
    worker 2:  load_image -> preprocess  x batch_size  ─┼─> main: predict(batch) -> records
    ...        (up to 2 batches per worker queued)     ─┘

Decoding a JPEG and the TF-slim preprocessing are plain single-threaded
Python/C work per image, while `MobileNetV2.predict` is Numba kernels that
release the GIL and use every core; running the first in K worker processes
lets both proceed at once. Processes, not threads: `load_image` decodes
under a lock (Pillow's truncated-file switch is global), so threads would
decode one at a time. Batches are yielded in order, so the results of a
run do not depend on K, and each image is preprocessed by exactly the same
code (`load_batch`) as in the Dask engine and a serial loop.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..contention import available_cpus
from ..errors import Mnv2refError, WeightsError
from ..preprocessing import load_image, preprocess
from .datasets import Sample

TOP_K = 5


def load_batch(paths: Sequence[str], size: int) -> Tuple[List[int], np.ndarray, List[Tuple[int, str]]]:
    """Decode and preprocess images: -> (positions read, (n, size, size, 3)
    float32 batch of those, [(position, error message)] of the unreadable)."""
    read, arrays, failures = [], [], []
    for position, path in enumerate(paths):
        try:
            arrays.append(preprocess(load_image(path), size=size))
            read.append(position)
        except Mnv2refError as error:  # unreadable, missing, a URL...: skip this one image
            failures.append((position, str(error)))
    batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)
    return read, batch, failures


def load_samples(samples: Sequence[Sample], size: int):
    """`load_batch` of the samples' images -> (samples read, batch, [(sample, error)])."""
    return _resolve(samples, load_batch([s.image for s in samples], size))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of `size` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def preprocessed_batches(samples: Sequence[Sample], batch_size: int, workers: Optional[int],
                         size: int, meanwhile: Optional[Callable[[], object]] = None
                         ) -> Iterator[Tuple[List[Sample], np.ndarray, List[Tuple[Sample, str]]]]:
    """Yield (samples read, their batch, [(sample, error)]) for consecutive
    batches of `samples`, in order. `workers` processes decode in parallel
    (None: one per CPU; 0: all in this process). `meanwhile()` (e.g. loading
    the model) runs here while the workers start, before the first batch."""
    workers = available_cpus() if workers is None else workers
    if workers == 0:
        if meanwhile:
            meanwhile()
        for part in chunks(samples, batch_size):
            yield load_samples(part, size)
        return
    # "spawn": a fresh interpreter per worker, safe whatever threads this
    # process already runs (Numba's, tqdm's); they need NumPy, Pillow and the
    # resize kernel only.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    queued = deque()
    parts = chunks(samples, batch_size)
    try:
        with interrupts_ignored():  # the workers start at the first submit
            for part in parts:
                queued.append((part, pool.submit(load_batch, [s.image for s in part], size)))
                if len(queued) >= 2 * workers:
                    break
        if meanwhile:
            meanwhile()
        while queued:
            part, future = queued.popleft()
            result = future.result()
            following = next(parts, None)
            if following is not None:
                queued.append((following, pool.submit(load_batch, [s.image for s in following], size)))
            yield _resolve(part, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _resolve(part, result):
    read, batch, failures = result
    return [part[i] for i in read], batch, [(part[i], message) for i, message in failures]


@contextmanager
def interrupts_ignored():
    """SIGINT ignored while the body starts processes, which inherit that (and
    Python keeps an inherited SIG_IGN), so that a Ctrl-C at the terminal stops
    this process cleanly and it stops the workers, instead of killing them
    mid-task with a traceback each."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def top_k(probs: np.ndarray, k: int = TOP_K) -> Tuple[np.ndarray, np.ndarray]:
    """(N, classes) -> the k most probable classes per row, most probable first
    (ties: lower class first), and their probabilities."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def score(samples: Sequence[Sample], probs: np.ndarray,
          reference: Optional[np.ndarray] = None) -> List[dict]:
    """Per-image records from the (N, classes) probabilities of `samples`;
    with the reference's `reference` probabilities also its top-5 and the gap."""
    classes, top = top_k(probs)
    records = [{"image": s.image, "label": s.label, "top5": [int(c) for c in cs],
                "probs": [float(p) for p in ps]} for s, cs, ps in zip(samples, classes, top)]
    if reference is not None:
        ref_classes, ref_top = top_k(reference)
        gaps = np.abs(probs.astype(np.float64) - reference).max(axis=1)
        for record, cs, ps, gap in zip(records, ref_classes, ref_top, gaps):
            record.update(reference_top5=[int(c) for c in cs], reference_probs=[float(p) for p in ps],
                          gap=float(gap))
    return records


def failed(failures: Sequence[Tuple[Sample, str]]) -> List[dict]:
    """The records of unreadable images."""
    return [{"image": s.image, "label": s.label, "error": message} for s, message in failures]


@dataclass(frozen=True)
class Job:
    """What to run on every batch, picklable so that Dask workers can rebuild
    it: the reference weights (a path), EMA or raw, an optional foreign model
    file, the input size, the backend and Numba threads (None: all)."""

    weights: str
    use_ema: bool = True
    foreign: Optional[str] = None
    size: int = 224
    backend: str = "numba"
    threads: Optional[int] = None

    def records(self, read: Sequence[Sample], batch, failures: Sequence[Tuple[Sample, str]]) -> List[dict]:
        """The records of one batch: `failures` as error records, then the
        images `read`, whose preprocessed (N, size, size, 3) batch is `batch`."""
        if not len(read):
            return failed(failures)
        reference, foreign = _classifiers(self.weights, self.use_ema, self.foreign)
        ours = self._run(reference.predict, batch)
        if foreign is None:
            return failed(failures) + score(read, ours)
        return failed(failures) + score(read, _tf_slim_classes(foreign.predict(batch), ours.shape[1],
                                                               self.foreign), reference=ours)


    def embed(self, batch) -> np.ndarray:
        """The reference's (N, 1280) global-pool embeddings of a preprocessed batch."""
        return self._run(_reference(self.weights, self.use_ema).embed, batch)

    def _run(self, method, batch):
        from ..fast import _threads  # Numba threads for this call (None: as they are)

        with _threads(self.threads):
            return method(batch, backend=self.backend)


def _tf_slim_classes(probs: np.ndarray, classes: int, source: str) -> np.ndarray:
    """A foreign model's (N, classes) probabilities in TF-slim's numbering. A
    1000-class model (Keras Applications drop the background class) gets a
    zero column 0, so that its class k is TF-slim's k + 1."""
    if probs.shape[1] == classes - 1:
        return np.concatenate([np.zeros((len(probs), 1), probs.dtype), probs], axis=1)
    if probs.shape[1] != classes:
        raise WeightsError(f"{source} gives {probs.shape[1]} classes, the reference {classes}")
    return probs


@lru_cache(maxsize=4)
def _reference(weights: str, use_ema: bool):
    """The reference model, loaded once per process."""
    from ..model import MobileNetV2

    return MobileNetV2.load(weights, use_ema=use_ema)


@lru_cache(maxsize=4)
def _classifiers(weights: str, use_ema: bool, foreign: Optional[str]):
    """The reference classifier and the foreign one, loaded once per process."""
    reference = _reference(weights, use_ema)
    if not reference.num_classes:
        raise WeightsError(f"{weights} has no classifier (MobilenetV2/Logits is absent): evaluate "
                           "needs a full checkpoint; run `mnv2ref fetch`")
    return reference, (load_foreign(foreign, reference) if foreign else None)


def load_foreign(path, reference=None):
    """A foreign model (ONNX, OpenVINO IR, TF Lite; `mnv2ref.verify.load_foreign`)
    with `.predict(x)`: our (N, 224, 224, 3) float32 RGB [-1, 1] input ->
    (N, classes) probabilities. Its input interface (layout, colour order,
    scale), unless the file declares it, is found by comparing its outputs
    with those of `reference`, the model it is meant to equal."""
    from ..verify import load_foreign as load

    foreign = load(str(path))
    if reference is not None and hasattr(foreign, "detect_interface"):
        foreign.detect_interface(reference=reference)
    return foreign


def run_local(samples: Sequence[Sample], job: Job, batch_size: int,
              workers: Optional[int]) -> Iterator[List[dict]]:
    """The records of `samples`, one list per batch, decoded by `workers`
    processes; the models load here while those start."""
    load = partial(_classifiers, job.weights, job.use_ema, job.foreign)
    for read, batch, failures in preprocessed_batches(samples, batch_size, workers, job.size, load):
        yield job.records(read, batch, failures)
