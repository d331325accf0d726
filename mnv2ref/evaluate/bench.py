"""`mnv2ref bench --evaluate`: the evaluation pipeline against a serial loop.

Three ways of getting the top-5 of the same JPEGs, timed in this process:

* serial, NumPy resize -- `load_image` -> `preprocess(backend="numpy")` ->
  `predict`, one image at a time: the loop one writes with the API as it was
  before the resize got its fast path;
* serial -- the same loop with today's `preprocess` (Numba resize);
* pipeline -- `evaluate`'s engine: `workers` processes decoding and
  preprocessing batches while this one predicts.

The JPEGs are made from the shared photos at ImageNet-like sizes (about
500 x 375, quality 90). The rounds alternate the three loops, and the rates
are medians of per-image (per-batch) times in the best round, because the
machine may be shared; the pipeline's is its steady state, once its queue has filled,
which is what 50,000 images see, and the projection uses it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..bench import cpu_info
from ..contention import available_cpus
from ..errors import InputError
from ..preprocessing import load_image, preprocess
from .datasets import Sample
from .pipeline import Job, _classifiers, run_local

IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (333, 500))
VALIDATION_IMAGES = 50_000


def make_jpegs(folder, count: int, sizes: Sequence = IMAGENET_LIKE_SIZES, quality=90,
               seed: int = 0, name: str = "ILSVRC2012_val_{:08d}.JPEG") -> List[Path]:
    """Write `count` JPEGs cut from the shared photos (chelsea, coffee): a
    random window of each, resized to one of `sizes` (width, height), saved
    at `quality` (a number, or a sequence cycled through); named ``name.format(i)``
    for i = 1..count. Returns their paths."""
    from PIL import Image

    from ..resources import shared_dir

    rng = np.random.default_rng(seed)
    sources = [shared_dir() / "images" / f"{name}.png" for name in ("chelsea", "coffee")]
    if not all(p.is_file() for p in sources):
        raise InputError(f"the benchmark's JPEGs are made from {sources[0].parent}/chelsea.png and "
                         "coffee.png, which are missing: set MNV2REF_SHARED to the shared fixtures")
    photos = [Image.open(p).convert("RGB") for p in sources]
    qualities = [quality] if np.isscalar(quality) else list(quality)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        photo = photos[i % len(photos)]
        width, height = photo.size
        w, h = int(width * rng.uniform(0.6, 1.0)), int(height * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        window = photo.crop((left, top, left + w, top + h)).resize(tuple(sizes[i % len(sizes)]),
                                                                   Image.BILINEAR)
        path = folder / name.format(i)
        window.save(path, quality=int(qualities[i % len(qualities)]))
        paths.append(path)
    return paths


def default_weights() -> Path:
    """The shared 1.0/224 bench checkpoint (real backbone, random classifier:
    the real model's cost) if present, else the weights `find_weights` picks."""
    from ..resources import find_weights, shared_dir

    bench = shared_dir() / "checkpoints/bench_mobilenet_v2_1.0_224/model.ckpt"
    return bench if Path(f"{bench}.index").is_file() else find_weights()


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _serial(model, paths, backend: str):
    """(seconds of each image, CPU seconds) of the one-image-at-a-time API loop."""
    cpu, times = _cpu_seconds(), []
    for path in paths:
        start = time.perf_counter()
        model.predict(preprocess(load_image(path), backend=backend)[None])
        times.append(time.perf_counter() - start)
    return np.array(times), _cpu_seconds() - cpu


def _pipeline(job: Job, samples, batch_size: int, workers: int):
    """(seconds per image of each batch after the pipeline filled, CPU seconds,
    seconds in all). A batch's time is the interval since the one before."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    arrivals, sizes = [], []
    for records in run_local(samples, job, batch_size, workers):
        arrivals.append(time.perf_counter())
        sizes.append(len(records))
    settled = 2 * workers + 1  # the batches queued at the start come out at once
    per_image = np.diff(arrivals)[settled - 1:] / np.array(sizes[settled:])
    return per_image, _cpu_seconds() - cpu, time.perf_counter() - start


def run_evaluate_bench(weights: str, images: int = 128, batch_size: int = 16,
                       workers: Optional[int] = None, repeat: int = 3,
                       threads: Optional[int] = None) -> dict:
    """Time the three loops (module docstring) on `images` JPEGs, `repeat`
    rounds; returns a dict of images/s and CPU ms per image for each loop,
    the speed-ups, the load average around the run and the projected time
    for 50,000 images. A rate is 1 / the median time per image (per image for
    the serial loops, per batch once the pipeline has filled) of the best
    round, robust to the bursts of other jobs on a shared machine; ``wall``
    gives images over the best round's whole time instead, pool start-up
    included."""
    workers = available_cpus() if workers is None else workers
    if images < batch_size * (2 * workers + 3):
        raise InputError(f"bench --evaluate needs at least {batch_size * (2 * workers + 3)} images "
                         f"for {workers} workers and batches of {batch_size}, got {images}")
    job = Job(str(weights), threads=threads)
    model = _classifiers(job.weights, job.use_ema, None)[0]
    load_before = os.getloadavg()[0]
    loops = ("serial_numpy_resize", "serial", "pipeline")
    times = {loop: [] for loop in loops}
    cpu = {loop: np.inf for loop in loops}
    wall = {loop: np.inf for loop in loops}
    with tempfile.TemporaryDirectory(prefix="mnv2ref-bench-") as folder:
        paths = make_jpegs(folder, images)
        samples = [Sample(str(p), 1) for p in paths]
        model.predict(preprocess(load_image(paths[0]))[None])  # compile / load the kernels
        for _ in range(repeat):
            for loop, backend in (("serial_numpy_resize", "numpy"), ("serial", "numba")):
                each, seconds = _serial(model, paths, backend)
                times[loop].append(each)
                cpu[loop], wall[loop] = min(cpu[loop], seconds), min(wall[loop], each.sum())
            each, seconds, total = _pipeline(job, samples, batch_size, workers)
            times["pipeline"].append(each)
            cpu["pipeline"], wall["pipeline"] = min(cpu["pipeline"], seconds), min(wall["pipeline"], total)
    rate = {loop: 1 / min(float(np.median(each)) for each in times[loop]) for loop in loops}
    return {
        "images": images, "batch_size": batch_size, "workers": workers, "repeat": repeat,
        "threads": threads or available_cpus(),
        "weights": str(weights), "cpu": cpu_info()["model"], "cpus": available_cpus(),
        "load_average": [load_before, os.getloadavg()[0]],
        "images_per_s": rate,
        "images_per_s_wall": {loop: images / wall[loop] for loop in loops},
        "cpu_ms_per_image": {loop: cpu[loop] / images * 1e3 for loop in loops},
        "speedup_vs_serial_numpy_resize": rate["pipeline"] / rate["serial_numpy_resize"],
        "speedup_vs_serial": rate["pipeline"] / rate["serial"],
        "projected_validation_s": VALIDATION_IMAGES / rate["pipeline"],
    }


def format_evaluate_bench(result: dict) -> str:
    """The benchmark as the lines `mnv2ref bench --evaluate` prints."""
    rate, wall, cpu = result["images_per_s"], result["images_per_s_wall"], result["cpu_ms_per_image"]
    names = {"serial_numpy_resize": "serial load_image -> preprocess(NumPy resize) -> predict",
             "serial": "serial load_image -> preprocess -> predict",
             "pipeline": f"pipeline, {result['workers']} decoding workers"}
    lines = [
        f"evaluate pipeline, {result['images']} JPEGs of about 500x375, weights {result['weights']}",
        f"{result['cpu']}, {result['cpus']} CPUs; {result['threads']} Numba threads, batch "
        f"{result['batch_size']}, {result['repeat']} rounds; load average "
        f"{result['load_average'][0]:.1f} before, {result['load_average'][1]:.1f} after",
        "",
        f"{'loop':56}  img/s (median)  img/s (wall)  CPU ms/img",
    ]
    for loop, name in names.items():
        lines.append(f"{name:56}  {rate[loop]:14.1f}  {wall[loop]:12.1f}  {cpu[loop]:10.1f}")
    lines += [
        "",
        f"speed-up (median rates): {result['speedup_vs_serial_numpy_resize']:.2f}x the serial loop with the "
        f"NumPy resize, {result['speedup_vs_serial']:.2f}x the serial loop with today's preprocess",
        f"projected for the 50,000 ILSVRC2012 validation images: "
        f"{result['projected_validation_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)
