"""Accuracy over labelled image sets: `mnv2ref evaluate` and `mnv2ref.evaluate`.

    import mnv2ref
    summary = mnv2ref.evaluate("ILSVRC2012_img_val/", output="results.jsonl")
    summary["top1"], summary["top1_ci"]          # 0.7185..., [0.7145..., 0.7224...]

One pipeline for every engine: `datasets` lists (image, label) pairs,
`pipeline.load_batch` decodes and preprocesses exactly as `preprocess` does,
the reference model (and a foreign model, with `model=`) predict, and
`pipeline.score` turns probabilities into per-image records, which
`results.ResultsLog` appends to a JSONL file that `resume=True` continues.
The engines differ only in where the work runs: `pipeline` (a process pool
for decoding on this machine) or `dask` (shards on a Dask cluster).
"""

from __future__ import annotations

import sys
import time
import types
from typing import Optional

from ..errors import InputError
from ..signals import sigterm_raises
from .datasets import Sample, load_dataset
from .pipeline import Job, _classifiers, load_foreign, run_local
from .results import ResultsLog, card_comparison, format_summary, summarize, write_summary

__all__ = ["evaluate", "Job", "Interrupted", "Sample", "load_foreign", "load_dataset", "summarize",
           "format_summary", "card_comparison", "write_summary"]

DEFAULT_BATCH_SIZE = 16


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped `evaluate`; `done` of `total` images are in `output`."""

    def __init__(self, done: int, total: int, output):
        self.done, self.total, self.output = done, total, output
        where = (f"; {done} of {total} images are in {output}, rerun with --resume to continue"
                 if output is not None else f" after {done} of {total} images")
        super().__init__(f"interrupted{where}")


def evaluate(dataset, weights=None, raw: bool = False, model: Optional[str] = None, labels=None,
             limit: Optional[int] = None, batch_size: int = DEFAULT_BATCH_SIZE,
             workers: Optional[int] = None, output=None, resume: bool = False,
             dask: Optional[str] = None, size: int = 224, backend: str = "numba",
             threads: Optional[int] = None, progress: bool = True) -> dict:
    """Evaluate the reference model (or the foreign `model`) on DATASET.

    Args:
      dataset: a folder of ILSVRC2012_val_*.JPEG, of WordNet-id folders, or a
        ``path<TAB>label`` list file (`datasets.load_dataset`); `labels`
        names the validation labels (default: the shared fixtures' copy); `limit` keeps the first N.
      weights, raw: the reference weights as elsewhere (`resources.weights_or_download`: found, or
        downloaded once).
      model: a foreign ONNX / OpenVINO / TF Lite file to evaluate through
        the same pipeline, compared with the reference image by image.
      batch_size, workers: images per batch; decoding processes (None: one per CPU).
      output, resume: the JSONL results file, flushed per batch; `resume`
        keeps the images already in it and evaluates only the others.
      dask: ``"local:N"`` (a LocalCluster of N processes) or a scheduler
        address ``"tcp://host:8786"``: run the shards there instead.
      threads: Numba threads for the model here (None: all CPUs; a Dask
        LocalCluster's workers use one each).

    Returns the summary (`results.summarize`) over every image of the
    dataset, plus ``images_per_s`` of this run. Ctrl-C or SIGTERM stop after
    the last complete batch written, raising `Interrupted` (a
    KeyboardInterrupt saying how far it got); a rerun with `resume` continues."""
    from ..resources import weights_or_download
    from tqdm import tqdm

    samples = load_dataset(dataset, labels=labels, limit=limit)
    if workers is not None and workers < 0:
        raise InputError(f"workers must be 0 (decode in this process) or more, got {workers}")
    if resume and output is None:
        raise InputError("resume needs the results file of the interrupted run "
                         "(-o RESULTS.jsonl, output=)")
    job = Job(str(weights_or_download(weights)), use_ema=not raw, foreign=str(model) if model else None,
              size=size, backend=backend, threads=threads)
    log = ResultsLog(output, resume=resume) if output is not None else None
    done = log.done if log else {}
    pending = [s for s in samples if s.image not in done]
    fresh, batches = [], None
    start = time.perf_counter()
    try:
        with sigterm_raises(), tqdm(total=len(samples), initial=len(samples) - len(pending),
                                           unit="img", file=sys.stderr, dynamic_ncols=True,
                                           disable=None if progress else True) as bar:
            if dask:
                from .dask import run_dask

                _classifiers(job.weights, job.use_ema, job.foreign)  # fail here, not on every worker
                batches = run_dask(dask, pending, job, batch_size)
            else:
                batches = run_local(pending, job, batch_size, workers)
            for records in batches:
                if log:
                    log.append(records)
                fresh += records
                bar.update(len(records))
                for record in records:
                    if "error" in record:
                        tqdm.write(f"mnv2ref: warning: skipping {record['error']}", file=sys.stderr)
    except KeyboardInterrupt:
        raise Interrupted(len(done) + len(fresh), len(samples), output) from None
    finally:
        if batches is not None:
            batches.close()  # stops the pool or the cluster
        if log:
            log.close()
    seconds = time.perf_counter() - start
    records = {**done, **{r["image"]: r for r in fresh}}
    summary = summarize(records[s.image] for s in samples)
    scored = sum("error" not in r for r in fresh)
    summary["images_per_s"] = scored / seconds if scored else None
    return summary


class _CallablePackage(types.ModuleType):
    """`mnv2ref.evaluate` is this package and, called, the `evaluate` function:
    `mnv2ref.evaluate(dataset)` and `mnv2ref.evaluate.load_dataset(dataset)` both
    work (as for `mnv2ref.verify`)."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
