"""Benchmark the backends and their peers, one fresh process per measurement.

    from mnv2ref.bench import run_bench, format_bench, write_json
    result = run_bench(model)                 # numba + numpy, onnxruntime (+ TF/PyTorch if installed)
    print(format_bench(result))
    write_json(result, "bench.json")

What is measured, for every backend x thread count x batch size
---------------------------------------------------------------
Each measurement runs in its own Python subprocess, which loads the model's
weights (dumped once to a temporary .npz), makes a seeded random batch in
[-1, 1], runs `warmup` untimed forward passes and then `repeat` timed ones
(`time.perf_counter` around each call). From the timings: the median latency
and its spread (p10 / p90, min, max, mean), ms per image, images per second
and the achieved GFLOP/s (FLOPs per image from `mnv2ref.cost`, 0.615 GFLOP for
1.0/224, times the batch, over the median latency). The output of each run is
compared with the NumPy backend's (or the first backend's) on the same input.

Our backends run `model.predict` (or `model.embed` for a backbone without
classifier). The NumPy backend takes ~0.25 s per image, so it gets at most
`NUMPY_MAX_REPEAT` timed runs and one warm-up.

Peak memory: a subprocess per measurement makes the peak resident set size
(RSS) that backend's own. It is read from `/proc/self/status` (`VmHWM`, in
kB) where it exists, because on Linux `getrusage(RUSAGE_SELF).ru_maxrss` of a
freshly exec'd child still includes the *parent's* peak when the child was
spawned with vfork (as Python's subprocess does): a 400 MB parent makes every
child report >= 400 MB. Elsewhere `ru_maxrss` is used (kB on Linux, bytes on
macOS).

Peers, in the same run and on the same weights
----------------------------------------------
* onnxruntime: this model exported with `onnx_export.export_onnx` (BatchNorm
  folded, TF SAME padding as explicit pads), `intra_op_num_threads` = the
  thread count;
* TensorFlow and PyTorch, only if installed: the same network written with
  their conv ops from our folded weights (`_TFOps`, `_TorchOps`; TF pads
  "SAME" itself, PyTorch gets the asymmetric pads explicitly).

Threads: a thread count T sets `numba.set_num_threads(T)` (and
NUMBA_NUM_THREADS), onnxruntime's intra-op threads, TF's / PyTorch's intra-op
threads, and OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS for the
BLAS behind the NumPy backend. By default 1 and all available CPUs.

Compile time (with the numba backend): one subprocess with NUMBA_CACHE_DIR
pointing at a fresh empty folder is timed from spawn to its first prediction
(interpreter start + imports + loading the weights + JIT compilation + one
forward pass), then a second subprocess with the now warm cache: the target
is that it reaches its first prediction within `WARM_START_TARGET_S`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .architecture import same_padding
from .errors import InputError

__all__ = ["run_bench", "format_bench", "write_json", "BACKENDS", "PEERS", "SCHEMA"]

SCHEMA = "mnv2ref-bench/1"
BACKENDS = ("numba", "numpy")
PEERS = ("onnxruntime", "tensorflow", "torch")
NUMPY_MAX_REPEAT = 5
NUMPY_MAX_WARMUP = 1
WARM_START_TARGET_S = 2.0
NOISY_SPREAD = 1.5  # a row whose p90 / p10 exceeds this is flagged in the table
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
WORKER_CODE = "import sys; from mnv2ref.bench import _worker_main; sys.exit(_worker_main(sys.argv[1]))"


# ---------------------------------------------------------------------------
# Arguments


def _positive_ints(value, what: str) -> list:
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                         for v in values):
        raise InputError(f"{what} must be positive integers, got {value!r}")
    return list(dict.fromkeys(int(v) for v in values))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> list:
    return sorted({1, available_cpus()})


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _peer_list(peers) -> tuple:
    """The peers to run and the ones skipped: ([names], [{backend, reason}])."""
    wanted = PEERS if peers is True else () if not peers else tuple(peers)
    unknown = [p for p in wanted if p not in PEERS]
    if unknown:
        raise InputError(f"unknown peer {unknown[0]!r}; peers are {', '.join(PEERS)}")
    needs = {"onnxruntime": ("onnx", "onnxruntime"), "tensorflow": ("tensorflow",), "torch": ("torch",)}
    run, skipped = [], []
    for peer in wanted:
        missing = [m for m in needs[peer] if not installed(m)]
        if missing:
            skipped.append({"backend": peer, "reason": f"{', '.join(missing)} not installed"})
        else:
            run.append(peer)
    return run, skipped


def flops_per_image(depth_multiplier: float, resolution: tuple, num_classes: int) -> tuple:
    """(FLOPs of one forward pass, where the number comes from), from `cost()`."""
    from .accounting import cost

    return int(cost(depth_multiplier, tuple(resolution), num_classes).totals.flops), "mnv2ref.cost"


# ---------------------------------------------------------------------------
# The parent: plan the runs, start the workers, summarise


def run_bench(model, batches: Sequence[int] = (1, 8), repeat: int = 20, warmup: int = 3,
              threads: Union[None, int, Sequence[int]] = None,
              backends: Sequence[str] = BACKENDS, peers: Union[bool, Sequence[str]] = True,
              progress: bool = True, resolution: Union[int, tuple] = 224,
              compile_time: Optional[bool] = None, seed: int = 0) -> dict:
    """Benchmark `model` (a `MobileNetV2`); returns a JSON-serialisable dict.

    batches: batch sizes; repeat / warmup: timed and untimed runs per
    measurement (the NumPy backend gets at most NUMPY_MAX_REPEAT and
    NUMPY_MAX_WARMUP); threads: an int or a list (default: 1 and all CPUs);
    backends: ours, from ("numba", "numpy"); peers: True for every installed
    peer, False for none, or a list from PEERS; resolution: the input's H x W
    (int or pair); compile_time: time the numba cold / warm cache start
    (default: when "numba" is among the backends). A tqdm progress bar goes
    to stderr unless `progress` is False.

    Keys: schema, model, flops_per_image, flops_source, machine, settings,
    results (one row per backend x threads x batch), ratios, compile,
    errors, skipped. See `format_bench`."""
    from .onnx_export import _resolution

    batches = _positive_ints(batches, "batches")
    thread_counts = default_threads() if threads is None else _positive_ints(threads, "threads")
    for name, value, low in (("repeat", repeat, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    backends = list(dict.fromkeys([backends] if isinstance(backends, str) else backends))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r}; backends are {', '.join(BACKENDS)}")
    peer_names, skipped = _peer_list(peers)
    if not backends and not peer_names:
        raise InputError("nothing to benchmark: no backend and no installed peer")
    height, width = _resolution(resolution)
    if compile_time is None:
        compile_time = "numba" in backends
    output = "Predictions" if model.num_classes else "global_pool"
    flops, flops_source = flops_per_image(model.depth_multiplier, (height, width), model.num_classes)

    result = {
        "schema": SCHEMA,
        "model": {"depth_multiplier": float(model.depth_multiplier), "num_classes": int(model.num_classes),
                  "source": str(model.source), "resolution": [height, width], "output": output},
        "flops_per_image": flops,
        "flops_source": flops_source,
        "machine": machine_info(),
        "settings": {"batches": batches, "repeat": int(repeat), "warmup": int(warmup),
                     "threads": thread_counts, "backends": backends, "peers": peer_names,
                     "numpy_max_repeat": NUMPY_MAX_REPEAT, "seed": int(seed)},
        "results": [], "ratios": [], "compile": None, "errors": [], "skipped": skipped,
    }

    with tempfile.TemporaryDirectory(prefix="mnv2ref-bench-") as tmp:
        tmp = Path(tmp)
        weights = tmp / "variables.npz"
        np.savez(weights, **{name: np.asarray(value) for name, value in model.variables.items()})
        common = {"weights": str(weights), "source": str(model.source), "output": output,
                  "resolution": [height, width], "seed": int(seed),
                  "metadata": json.loads(json.dumps(dict(model.metadata), default=str))}
        if "onnxruntime" in peer_names:
            from .onnx_export import export_onnx

            try:
                common["onnx"] = str(export_onnx(model, tmp / "model.onnx", resolution=(height, width)))
            except Exception as error:  # noqa: BLE001 - reported, the other backends still run
                peer_names.remove("onnxruntime")
                result["errors"].append({"backend": "onnxruntime", "threads": None, "batch": None,
                                         "error": f"export failed: {type(error).__name__}: {error}"})

        jobs = []
        for t in thread_counts:
            for backend in backends + peer_names:
                slow = backend == "numpy"
                r = min(repeat, NUMPY_MAX_REPEAT) if slow else int(repeat)
                w = min(warmup, NUMPY_MAX_WARMUP) if slow else int(warmup)
                for batch in batches:
                    jobs.append(dict(common, mode="bench", backend=backend, threads=t, batch=batch,
                                     repeat=r, warmup=max(w, 1)))
        startup = []
        if compile_time:
            cache = tmp / "numba-cache"
            cache.mkdir()
            for phase in ("cold", "warm"):
                startup.append(dict(common, mode="startup", backend="numba", phase=phase,
                                    threads=max(thread_counts), batch=1, numba_cache_dir=str(cache)))

        total = sum(j["warmup"] + j["repeat"] for j in jobs) + 2 * len(startup)
        bar = _progress_bar(total, progress)
        outputs = {}
        try:
            for index, job in enumerate(jobs):
                bar.set_description(f"{job['backend']} {job['threads']}t b{job['batch']}")
                job["output_path"] = str(tmp / f"output_{index}.npy")
                done = _run_worker(job, tmp / f"job_{index}", bar)
                if "error" in done:
                    result["errors"].append({"backend": job["backend"], "threads": job["threads"],
                                             "batch": job["batch"], "error": done["error"]})
                    continue
                row = _summarise(job, done, flops)
                result["results"].append(row)
                outputs[(job["backend"], job["threads"], job["batch"])] = job["output_path"]
            if startup:
                compile_info = {"target_s": WARM_START_TARGET_S, "threads": max(thread_counts)}
                for index, job in enumerate(startup):
                    bar.set_description(f"numba start, {job['phase']} cache")
                    done = _run_worker(job, tmp / f"startup_{index}", bar)
                    compile_info[job["phase"]] = done
                warm = compile_info.get("warm", {})
                compile_info["warm_meets_target"] = (None if "error" in warm else
                                                     warm.get("to_first_prediction_s", 1e9)
                                                     <= WARM_START_TARGET_S)
                result["compile"] = compile_info
            _agreement(result["results"], outputs, backends + peer_names)
        finally:
            bar.close()
    result["ratios"] = _ratios(result["results"])
    return result


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a missing bar is no reason to fail
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n=1): pass
            def set_description(self, text): pass
            def close(self): pass
        return _Silent()
    return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)


def worker_env(threads: int, numba_cache_dir: Optional[str] = None) -> dict:
    """The environment of a worker: thread counts for every threading library,
    and this package importable even when it is not installed."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    if numba_cache_dir:
        env["NUMBA_CACHE_DIR"] = numba_cache_dir
    return env


def _run_worker(job: dict, stem: Path, bar) -> dict:
    """Run one worker to completion, advancing `bar` as it reports; return
    its result dict ({"error": ...} if it failed)."""
    spec, result_path, stderr_path = (stem.with_suffix(s) for s in (".json", ".result.json", ".stderr"))
    job = dict(job, result_path=str(result_path))
    spec.write_text(json.dumps(job))
    with open(stderr_path, "w") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, str(spec)], stdout=subprocess.PIPE,
                                stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                                env=worker_env(job["threads"], job.get("numba_cache_dir")))
        first, ticks = None, 0
        try:
            for line in proc.stdout:
                line = line.strip()
                if line in (".", "first"):
                    ticks += 1
                    bar.update(1)
                if line == "first":
                    first = time.perf_counter() - start
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: stop the worker we started
                proc.kill()
                proc.wait()
    expected = job.get("warmup", 0) + job.get("repeat", 0) if job["mode"] == "bench" else 2
    bar.update(max(expected - ticks, 0))  # a failed worker's remaining share of the bar
    wall = time.perf_counter() - start
    try:
        done = json.loads(result_path.read_text())
    except (OSError, ValueError):
        tail = [line for line in stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        done = {"error": (tail[-1] if tail else f"worker exited with status {code} and no result")}
    if first is not None:
        done["to_first_prediction_s"] = round(first, 4)
    done["process_wall_s"] = round(wall, 4)
    return done


def _stats(seconds: Iterable[float]) -> dict:
    ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
    return {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)), "min": float(ms.min()), "max": float(ms.max()),
            "mean": float(ms.mean()), "n": int(ms.size)}


def _summarise(job: dict, done: dict, flops: int) -> dict:
    latency = _stats(done["times_s"])
    median_s = latency["median"] / 1e3
    batch = job["batch"]
    return {
        "backend": job["backend"], "kind": "peer" if job["backend"] in PEERS else "mnv2ref",
        "threads": job["threads"], "batch": batch, "repeat": job["repeat"], "warmup": job["warmup"],
        "latency_ms": latency,
        "warmup_ms": [round(s * 1e3, 3) for s in done["warmup_s"]],
        "per_image_ms": latency["median"] / batch,
        "images_per_s": batch / median_s,
        "gflops": flops * batch / median_s / 1e9,
        "peak_rss_mb": done["peak_rss_kb"] / 1024,
        "rss_after_load_mb": done["rss_after_load_kb"] / 1024,
        "rss_source": done["rss_source"],
        "versions": done.get("versions", {}),
        "process_wall_s": done["process_wall_s"],
    }


def _agreement(rows: list, outputs: dict, order: list) -> None:
    """Each row's max|out - ref| / max|ref| against another backend's output on
    the same batch: the NumPy backend's (the readable reference), or for the
    NumPy backend itself the first other backend's."""
    for row in rows:
        key = (row["backend"], row["threads"], row["batch"])
        refs = [k for k in outputs if k[2] == row["batch"] and k[0] != row["backend"]]
        refs.sort(key=lambda k: (k[0] != "numpy", order.index(k[0]), k[1]))
        row["reference"], row["max_rel_diff"] = None, None
        if not refs:
            continue
        ours, ref = np.load(outputs[key]).astype(np.float64), np.load(outputs[refs[0]]).astype(np.float64)
        row["reference"] = refs[0][0]
        if ours.shape == ref.shape:
            row["max_rel_diff"] = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _ratios(rows: list) -> list:
    """Each row's median latency over the fastest peer's at the same threads
    and batch (over the fastest backend when no peer ran)."""
    ratios = []
    for row in rows:
        same = [r for r in rows if r["threads"] == row["threads"] and r["batch"] == row["batch"]]
        pool = [r for r in same if r["kind"] == "peer"] or same
        fastest = min(pool, key=lambda r: r["latency_ms"]["median"])
        row["vs"] = fastest["backend"]
        row["vs_ratio"] = row["latency_ms"]["median"] / fastest["latency_ms"]["median"]
        if row["kind"] == "mnv2ref" and fastest is not row:
            ratios.append({"threads": row["threads"], "batch": row["batch"], "backend": row["backend"],
                           "peer": fastest["backend"], "ratio": row["vs_ratio"],
                           "noisy": _noisy(row["latency_ms"]) or _noisy(fastest["latency_ms"])})
    return ratios


def machine_info() -> dict:
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from . import __version__

    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "cpus_available": available_cpus(), "python": platform.python_version(),
            "mnv2ref": __version__,
            "versions": {p: version(p) for p in ("numpy", "numba", "onnx", "onnxruntime", "tensorflow", "torch")
                         if version(p)}}


# ---------------------------------------------------------------------------
# Output


def _thread_label(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def format_bench(result: dict) -> str:
    """The result of `run_bench` as a text table, with ratios to the fastest
    peer, the Numba start-up times, errors and skipped peers."""
    m = result["model"]
    h, w = m["resolution"]
    mach = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
    lines = [
        f"MobileNetV2 {m['depth_multiplier']}/{h}x{w}, "
        + (f"{m['num_classes']} classes" if m["num_classes"] else "backbone")
        + f" -> {m['output']}; {result['flops_per_image'] / 1e9:.4f} GFLOP/image ({result['flops_source']})",
        f"{mach['cpu']}, {mach['cpus_available']}/{mach['cpus']} CPUs; python {mach['python']}, {versions}",
        "",
    ]
    header = ("backend", "thr", "batch", "median ms", "p10-p90 ms", "ms/img", "img/s", "GFLOP/s",
              "peak RSS", "max rel diff", "vs fastest peer")
    table = [header]
    for r in sorted(result["results"], key=lambda r: (r["threads"], r["batch"], r["latency_ms"]["median"])):
        lat = r["latency_ms"]
        diff = "" if r.get("max_rel_diff") is None else f"{r['max_rel_diff']:.1e} vs {r['reference']}"
        vs = "" if r.get("vs_ratio") is None else (
            "fastest" if r["vs"] == r["backend"] else f"{r['vs_ratio']:.2f}x {r['vs']}")
        table.append((r["backend"], str(r["threads"]), str(r["batch"]), f"{lat['median']:.2f}",
                      f"{lat['p10']:.2f}-{lat['p90']:.2f}" + (" *" if _noisy(lat) else ""), f"{r['per_image_ms']:.2f}",
                      f"{r['images_per_s']:.1f}", f"{r['gflops']:.2f}", f"{r['peak_rss_mb']:.0f} MB",
                      diff, vs))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = set(range(1, 9))
    for i, row in enumerate(table):
        lines.append("  ".join(cell.rjust(widths[j]) if j in numeric else cell.ljust(widths[j])
                               for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    if not result["results"]:
        lines.append("(no successful measurement)")
    if any(_noisy(r["latency_ms"]) for r in result["results"]):
        lines.append(f"* noisy: p90 / p10 > {NOISY_SPREAD:g} (other load on the machine?); rerun before trusting it")

    if result["ratios"]:
        lines += ["", "Ratios of median latency to the fastest peer (lower is better):"]
        groups = {}
        for q in result["ratios"]:
            groups.setdefault((q["threads"], q["batch"]), []).append(
                f"{q['backend']} / {q['peer']} = {q['ratio']:.2f}x" + (" *" if q.get("noisy") else ""))
        for (t, b), items in sorted(groups.items()):
            lines.append(f"  {_thread_label(t)}, batch {b}: " + ", ".join(items))

    c = result.get("compile")
    if c:
        lines += ["", f"Numba start-up ({_thread_label(c['threads'])}, spawn -> first prediction of 1 image):"]
        for phase in ("cold", "warm"):
            p = c.get(phase, {})
            if "error" in p:
                lines.append(f"  {phase} cache: error: {p['error']}")
                continue
            lines.append(
                f"  {phase} cache: {p['to_first_prediction_s']:.2f} s (imports {p['import_s']:.2f} s, "
                f"load {p['load_s']:.2f} s, first predict {p['first_predict_s']:.2f} s; "
                f"a second predict takes {p['second_predict_s'] * 1e3:.1f} ms)")
        if c.get("warm_meets_target") is not None:
            lines.append(f"  warm-cache target <= {c['target_s']:g} s: "
                         + ("met" if c["warm_meets_target"] else "NOT met"))

    if result["errors"]:
        lines += ["", "Errors:"]
        for e in result["errors"]:
            where = ", ".join(x for x in (e["threads"] and _thread_label(e["threads"]),
                                          e["batch"] and f"batch {e['batch']}") if x)
            lines.append(f"  {e['backend']}" + (f" ({where})" if where else "") + f": {e['error']}")
    if result["skipped"]:
        lines += ["", "Skipped: " + ", ".join(f"{s['backend']} ({s['reason']})" for s in result["skipped"])]
    settings = result["settings"]
    lines += ["", (f"Timings: median of {settings['repeat']} runs after {settings['warmup']} warm-up "
                   f"(numpy: at most {settings['numpy_max_repeat']}), each backend in its own process; "
                   f"peak RSS per process ({_rss_note(result)}).")]
    return "\n".join(lines)


def _noisy(latency: dict) -> bool:
    return latency["p90"] > NOISY_SPREAD * latency["p10"]


def _rss_note(result: dict) -> str:
    sources = {r["rss_source"] for r in result["results"]}
    return "VmHWM" if sources == {"VmHWM"} else "ru_maxrss" if sources else "n/a"


def write_json(result: dict, path: Union[str, os.PathLike]) -> Path:
    """Write `result` as JSON, atomically (temp file + rename)."""
    from .files import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------
# The worker (runs in the subprocess)


def peak_rss_kb() -> tuple:
    """(peak resident set size of this process in kB, where it was read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak // 1024 if sys.platform == "darwin" else peak), "ru_maxrss"


def _tick(text: str = ".") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _worker_main(spec_path: str) -> int:
    """Entry point of a worker process: run the job in `spec_path`, write the
    result JSON (or {"error": ...}) to the job's result_path."""
    started = time.perf_counter()
    job = json.loads(Path(spec_path).read_text())
    try:
        done = _startup(job, started) if job["mode"] == "startup" else _measure(job)
        code = 0
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line
        import traceback

        traceback.print_exc()
        done = {"error": f"{type(error).__name__}: {error}"}
        code = 1
    Path(job["result_path"]).write_text(json.dumps(done))
    return code


def _load(job: dict):
    from .model import MobileNetV2

    with np.load(job["weights"]) as data:
        variables = {name: data[name] for name in data.files}
    return MobileNetV2(variables, job["metadata"], job["source"])


def _input(job: dict) -> np.ndarray:
    h, w = job["resolution"]
    rng = np.random.default_rng(job["seed"])
    return rng.uniform(-1, 1, (job["batch"], h, w, 3)).astype(np.float32)


def _measure(job: dict) -> dict:
    model = _load(job)
    forward, versions = _runner(job["backend"], model, job)
    x = _input(job)
    rss_loaded, _ = peak_rss_kb()
    warm, times = [], []
    y = None
    for _ in range(job["warmup"]):
        t0 = time.perf_counter()
        y = forward(x)
        warm.append(time.perf_counter() - t0)
        _tick()
    for _ in range(job["repeat"]):
        t0 = time.perf_counter()
        y = forward(x)
        times.append(time.perf_counter() - t0)
        _tick()
    peak, source = peak_rss_kb()
    if job.get("output_path") and y is not None:
        np.save(job["output_path"], np.asarray(y, dtype=np.float32).reshape(len(x), -1))
    return {"times_s": times, "warmup_s": warm, "rss_after_load_kb": rss_loaded, "peak_rss_kb": peak,
            "rss_source": source, "versions": versions}


def _startup(job: dict, started: float) -> dict:
    """Time import, load, first and second prediction with numba."""
    t0 = time.perf_counter()
    import numba  # noqa: F401 - timed: the imports a user's first prediction pays for

    from . import model as _model  # noqa: F401

    t1 = time.perf_counter()
    model = _load(job)
    forward, versions = _runner("numba", model, job)
    x = _input(job)
    t2 = time.perf_counter()
    forward(x)
    t3 = time.perf_counter()
    _tick("first")
    forward(x)
    t4 = time.perf_counter()
    _tick()
    return {"phase": job["phase"], "import_s": t1 - started, "load_s": t2 - t1, "first_predict_s": t3 - t2,
            "second_predict_s": t4 - t3, "compile_s_estimate": (t3 - t2) - (t4 - t3),
            "in_process_to_first_s": t3 - started, "before_main_s": t0 - started, "versions": versions}


def _runner(backend: str, model, job: dict) -> tuple:
    """(forward(x) -> output array, {package: version}) for one backend."""
    threads = job["threads"]
    output = job["output"]
    if backend in BACKENDS:
        versions = {"numpy": np.__version__}
        if backend == "numba":
            import numba

            from .fast import set_num_threads  # imports the kernels first: see GOMP_SPINCOUNT there

            set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            versions["numba"] = numba.__version__
        call = model.predict if output == "Predictions" else model.embed
        return (lambda x: call(x, backend=backend)), versions
    if backend == "onnxruntime":
        import onnxruntime

        from .onnx_export import onnx_session

        session = onnx_session(job["onnx"], threads=threads)
        return (lambda x: session.run([output], {"input": x})[0]), {"onnxruntime": onnxruntime.__version__}
    if backend == "tensorflow":
        ops = _TFOps(threads)
        forward = ops.compile(_Plan(model, ops))
        return (lambda x: forward(x).numpy()), {"tensorflow": ops.tf.__version__}
    if backend == "torch":
        ops = _TorchOps(threads)
        plan = _Plan(model, ops)
        return (lambda x: ops.run(plan, x)), {"torch": ops.torch.__version__}
    raise InputError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------------------
# The network from folded weights, for any framework's ops


class _Plan:
    """The network as a list of layers of folded convs, weights converted by
    `ops.weights` / `ops.bias`; `run(ops, x)` is the forward pass."""

    def __init__(self, model, ops):
        self.layers = []
        for layer in model.layers:
            convs = ([layer.conv] if hasattr(layer, "conv") else
                     [c for c in (getattr(layer, "expand", None), getattr(layer, "depthwise", None),
                                  getattr(layer, "project", None)) if c is not None])
            if not convs:
                continue
            steps = []
            for conv in convs:
                weights, bias = conv.folded()
                depthwise = conv.spec.kind == "depthwise"
                steps.append((ops.weights(weights.astype(np.float32), depthwise),
                              ops.bias(bias.astype(np.float32)), conv.spec.kernel, conv.spec.stride,
                              depthwise, conv.spec.relu6))
            self.layers.append((steps, bool(getattr(getattr(layer, "spec", None), "residual", False))))
        self.logits = None
        if model.num_classes:
            head = next(layer for layer in model.layers if type(layer).__name__ == "Logits")
            self.logits = (ops.weights(head.weights.reshape(head.weights.shape[-2:]).astype(np.float32), False),
                           ops.bias(head.biases.astype(np.float32)))

    def run(self, ops, x):
        for steps, residual in self.layers:
            h = x
            for weights, bias, kernel, stride, depthwise, relu6 in steps:
                h = ops.conv(h, weights, bias, kernel, stride, depthwise)
                if relu6:
                    h = ops.relu6(h)
            x = ops.add(h, x) if residual else h
        x = ops.pool(x)  # (N, C)
        if self.logits is not None:
            x = ops.softmax(ops.dense(x, *self.logits))
        return x


class _NumpyOps:
    """The plan's ops in NumPy (NHWC), from `layers.py`: checks `_Plan` itself."""

    def weights(self, w, depthwise):
        return w

    def bias(self, b):
        return b

    def conv(self, x, w, b, kernel, stride, depthwise):
        from . import layers as L

        return (L.depthwise_conv2d(x, w, stride) if depthwise else L.conv2d(x, w, stride)) + b

    def relu6(self, x):
        from . import layers as L

        return L.relu6(x)

    def add(self, a, b):
        return a + b

    def pool(self, x):
        return x.mean(axis=(1, 2))

    def dense(self, x, w, b):
        return x @ w + b

    def softmax(self, x):
        from . import layers as L

        return L.softmax(x)


class _TFOps:
    """TensorFlow, NHWC: `padding="SAME"` is TF's own, weights stay HWIO."""

    def __init__(self, threads):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        self.tf = tf

    def weights(self, w, depthwise):
        return self.tf.constant(w)

    def bias(self, b):
        return self.tf.constant(b)

    def conv(self, x, w, b, kernel, stride, depthwise):
        nn = self.tf.nn
        if depthwise:
            return nn.depthwise_conv2d(x, w, [1, stride, stride, 1], "SAME") + b
        return nn.conv2d(x, w, stride, "SAME") + b

    def relu6(self, x):
        return self.tf.nn.relu6(x)

    def add(self, a, b):
        return a + b

    def pool(self, x):
        return self.tf.reduce_mean(x, axis=[1, 2])

    def dense(self, x, w, b):
        return self.tf.matmul(x, w) + b

    def softmax(self, x):
        return self.tf.nn.softmax(x)

    def compile(self, plan):
        return self.tf.function(lambda x: plan.run(self, x))


class _TorchOps:
    """PyTorch, NCHW: weights OIHW, the TF SAME pads (odd pixel after) by F.pad."""

    def __init__(self, threads):
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        self.torch, self.F = torch, F

    def weights(self, w, depthwise):
        if w.ndim == 2:  # the logits, (C, classes)
            return self.torch.from_numpy(np.ascontiguousarray(w))
        return self.torch.from_numpy(np.ascontiguousarray(w.transpose((2, 3, 0, 1) if depthwise else (3, 2, 0, 1))))

    def bias(self, b):
        return self.torch.from_numpy(np.ascontiguousarray(b))

    def conv(self, x, w, b, kernel, stride, depthwise):
        top, bottom, _ = same_padding(x.shape[2], kernel, stride)
        left, right, _ = same_padding(x.shape[3], kernel, stride)
        x = self.F.pad(x, (left, right, top, bottom))
        return self.F.conv2d(x, w, b, stride=stride, groups=x.shape[1] if depthwise else 1)

    def relu6(self, x):
        return self.F.relu6(x)

    def add(self, a, b):
        return a + b

    def pool(self, x):
        return x.mean(dim=(2, 3))

    def dense(self, x, w, b):
        return x @ w + b

    def softmax(self, x):
        return self.torch.softmax(x, dim=1)

    def run(self, plan, x):
        with self.torch.inference_mode():
            return plan.run(self, self.torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
