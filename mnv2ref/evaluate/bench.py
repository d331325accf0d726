"""`mnv2ref bench --evaluate`: the evaluation pipeline against a serial loop.

Three ways of getting the top-5 of the same JPEGs, timed in this process:

* serial, NumPy resize -- `load_image` -> `preprocess(backend="numpy")` ->
  `predict`, one image at a time: the loop one writes with the API as it was
  before the resize got its fast path;
* serial -- the same loop with today's `preprocess` (Numba resize);
* pipeline -- `evaluate`'s engine: `workers` processes decoding and
  preprocessing batches while this one predicts.

The JPEGs are made from the shared photos at ImageNet-like sizes (about
500 x 375, quality 90). Every run takes the best of `repeat` rounds,
alternating the three, because the machine may be shared. The pipeline's
rate is also given in steady state (from its first batch on), which is what
50,000 images see; the projection for the validation set uses that rate.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..preprocessing import load_image, preprocess
from .datasets import Sample
from .pipeline import Job, _classifiers, default_workers, run_local

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
    photos = [Image.open(shared_dir() / "images" / f"{n}.png").convert("RGB") for n in ("chelsea", "coffee")]
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
    """(seconds, CPU seconds) of the one-image-at-a-time API loop."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for path in paths:
        model.predict(preprocess(load_image(path), backend=backend)[None])
    return time.perf_counter() - start, _cpu_seconds() - cpu


def _pipeline(job: Job, samples, batch_size: int, workers: int):
    """(seconds, CPU seconds, seconds per image from the first batch on)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    first, after = None, 0
    for records in run_local(samples, job, batch_size, workers):
        if first is None:
            first = time.perf_counter()
        else:
            after += len(records)
    end = time.perf_counter()
    return end - start, _cpu_seconds() - cpu, (end - first) / after


def run_evaluate_bench(weights: str, images: int = 128, batch_size: int = 16,
                       workers: Optional[int] = None, repeat: int = 3,
                       threads: Optional[int] = None) -> dict:
    """Time the three loops (module docstring) on `images` JPEGs; returns a dict
    of images/s and CPU ms per image for each loop, the speed-ups, the load
    average around the run and the projected time for 50,000 images."""
    workers = default_workers() if workers is None else workers
    job = Job(str(weights), threads=threads)
    model = _classifiers(job.weights, job.use_ema, None)[0]
    load_before = os.getloadavg()[0]
    best = {"serial_numpy_resize": (np.inf, np.inf), "serial": (np.inf, np.inf),
            "pipeline": (np.inf, np.inf), "pipeline_steady": (np.inf, np.inf)}
    with tempfile.TemporaryDirectory(prefix="mnv2ref-bench-") as folder:
        paths = make_jpegs(folder, images)
        samples = [Sample(str(p), 1) for p in paths]
        model.predict(preprocess(load_image(paths[0]))[None])  # compile / load the kernels
        for _ in range(repeat):
            best["serial_numpy_resize"] = min(best["serial_numpy_resize"], _serial(model, paths, "numpy"))
            best["serial"] = min(best["serial"], _serial(model, paths, "numba"))
            seconds, cpu, per_image = _pipeline(job, samples, batch_size, workers)
            best["pipeline"] = min(best["pipeline"], (seconds, cpu))
            best["pipeline_steady"] = min(best["pipeline_steady"], (per_image * images, cpu))
    rate = {key: images / seconds for key, (seconds, _) in best.items()}
    return {
        "images": images, "batch_size": batch_size, "workers": workers, "repeat": repeat,
        "threads": threads or default_workers(),
        "weights": str(weights), "cpu": _cpu_name(), "cpus": default_workers(),
        "load_average": [load_before, os.getloadavg()[0]],
        "images_per_s": rate,
        "cpu_ms_per_image": {key: cpu / images * 1e3 for key, (_, cpu) in best.items()
                             if key != "pipeline_steady"},
        "speedup_vs_serial_numpy_resize": rate["pipeline_steady"] / rate["serial_numpy_resize"],
        "speedup_vs_serial": rate["pipeline_steady"] / rate["serial"],
        "projected_validation_s": VALIDATION_IMAGES / rate["pipeline_steady"],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def format_evaluate_bench(result: dict) -> str:
    """The benchmark as the lines `mnv2ref bench --evaluate` prints."""
    rate, cpu = result["images_per_s"], result["cpu_ms_per_image"]
    hours = result["projected_validation_s"] / 3600
    return "\n".join([
        f"evaluate pipeline, {result['images']} JPEGs of about 500x375, weights {result['weights']}",
        f"{result['cpu']}, {result['cpus']} CPUs; {result['workers']} decoding workers, "
        f"{result['threads']} Numba threads in the pipeline, batch {result['batch_size']}, "
        f"best of {result['repeat']}; load average {result['load_average'][0]:.1f} before, "
        f"{result['load_average'][1]:.1f} after",
        "",
        f"serial load_image -> preprocess(NumPy resize) -> predict  {rate['serial_numpy_resize']:7.1f} img/s"
        f"  {cpu['serial_numpy_resize']:6.1f} CPU ms/img",
        f"serial load_image -> preprocess -> predict                {rate['serial']:7.1f} img/s"
        f"  {cpu['serial']:6.1f} CPU ms/img",
        f"pipeline, including pool start-up                        {rate['pipeline']:7.1f} img/s"
        f"  {cpu['pipeline']:6.1f} CPU ms/img (all processes)",
        f"pipeline, steady state                                   {rate['pipeline_steady']:7.1f} img/s",
        "",
        f"speed-up: {result['speedup_vs_serial_numpy_resize']:.2f}x the serial loop with the NumPy resize, "
        f"{result['speedup_vs_serial']:.2f}x the serial loop with today's preprocess",
        f"projected for the 50,000 ILSVRC2012 validation images: {hours * 60:.1f} min",
    ])
