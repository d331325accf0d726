"""Benchmark the backends against the engines people use, each in its own process.

    from mnv2ref.bench import run_bench, format_bench, write_json
    result = run_bench(model, tflite="mobilenet_v2_1.0_224.tflite")
    print(format_bench(result))               # headline: numba / the fastest peer, per cell
    write_json(result, "bench.json")
    print(format_layers(run_layers(model)))   # numba's layers beside OpenVINO's PERF_COUNT

What is measured, for every engine x thread count x batch size
--------------------------------------------------------------
Every (engine, threads, batch) measurement has a worker process of its own,
which loads the weights (dumped once to a temporary .npz; a peer gets the
same weights as a file of its own format), makes a seeded random batch in
[-1, 1] and then runs rounds when the parent says so. The timed runs are
split into `rounds` rounds, and the rounds alternate between the workers:
every worker's round 1 (engine A, engine B, ..., for every cell), then every
worker's round 2, and so on (`plan_rounds`). So slow drift on a noisy
machine (another process starting, the CPU's clock changing) hits every
engine alike instead of whichever engine happened to run at that moment.
The workers stay warm between their rounds, waiting on their stdin, rather
than being started again per round: a fresh process per round would pay its
start-up (imports, loading, compiling a graph: 0.5-3 s) once per round and
measure a cold start each time. Round 1 begins with `warmup` untimed runs,
every later round with REWARM untimed runs, because the other workers'
rounds in between evicted this one's weights from the caches. Each run is
timed with `time.perf_counter` around one call. From the timings: the
median latency and its spread (p10 / p90, min, max, mean), ms per image,
images per second and the achieved GFLOP/s (FLOPs per image from
`mnv2ref.cost`, 0.615 GFLOP for 1.0/224, times the batch, over the median).

The output of each engine is compared with the NumPy backend's (or, without
it, the numba backend's) on the same input: max|out - ref| / max|ref|.

Our backends run `model.predict` (or `model.embed` for a backbone without
classifier). The NumPy backend takes ~30 ms per image, so it gets at most
`NUMPY_MAX_REPEAT` timed runs and one warm-up.

The headline is the ratio of each of our backends' median latency to the
fastest peer's at the same threads and batch (`ratios`; the peer is named).

Peak memory: one process per measurement makes the peak resident set size
(RSS) that engine's own. It is read from `/proc/self/status` (`VmHWM`, in
kB) where it exists, because on Linux `getrusage(RUSAGE_SELF).ru_maxrss` of a
freshly exec'd child still includes the *parent's* peak when the child was
spawned with vfork (as Python's subprocess does): a 400 MB parent makes every
child report >= 400 MB. Elsewhere `ru_maxrss` is used (kB on Linux, bytes on
macOS).

Peers, on the same weights
--------------------------
* onnxruntime: this model exported with `onnx_export.export_onnx` (BatchNorm
  folded, TF SAME padding as explicit pads), `intra_op_num_threads` = the
  thread count, spinning off (`session.intra_op.allow_spinning` = 0: an idle
  pool that spins would steal the core of the next engine's round);
* openvino: the same ONNX graph, reshaped to the batch, compiled for the CPU
  with OPENVINO_CONFIG (float32 inference, the thread count, one stream,
  latency hint);
* litert: LiteRT (TF Lite) with its default XNNPACK delegate on a `.tflite`
  of the same weights (`tflite=`; by default the file beside the weights
  with the same stem, as `mnv2ref fetch` keeps the published archive's),
  input resized to the batch; its output is the softmax, so it needs a
  model with classifier and a .tflite made for the bench's resolution;
* TensorFlow and PyTorch, only if installed: the same network written with
  their conv ops from our folded weights (`_TFOps`, `_TorchOps`; TF pads
  "SAME" itself, PyTorch gets the asymmetric pads explicitly).
A peer that is not installed, or cannot run this model, is listed as skipped
with the reason.

Threads: a thread count T sets `numba.set_num_threads(T)` (and
NUMBA_NUM_THREADS), every peer's intra-op threads, and OMP_NUM_THREADS /
OPENBLAS_NUM_THREADS / MKL_NUM_THREADS for the BLAS behind the NumPy backend.
By default 1 and all available CPUs.

Compile time (with the numba backend): one subprocess with NUMBA_CACHE_DIR
pointing at a fresh empty folder is timed from spawn to its first prediction
(interpreter start + imports + loading the weights + JIT compilation + one
forward pass), then a second subprocess with the now warm cache: the targets
are that they reach their first prediction within `COLD_START_TARGET_S` and
`WARM_START_TARGET_S`.

Per layer (`run_layers`, `mnv2ref bench --layers`)
--------------------------------------------------
Our layers timed by `mnv2ref.trace` on the numba fast path (each layer as
`fast.run` runs it, on its real input) beside OpenVINO's own per-node
counters (`PERF_COUNT`, `request.get_profiling_info()`), each in its own
process per thread count. OpenVINO's nodes keep the names of the ONNX graph,
which are TF-slim's scopes (`MobilenetV2/expanded_conv_3/expand/...`), so
they are summed per layer of ours (`openvino_layer`); what OpenVINO adds
itself (layout reorders of the input) is the row "other". Both sides report
the per-layer mean of `repeat` runs, their sum and the end-to-end median.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .architecture import LOGITS_SCOPE, SCOPE, same_padding
from .contention import available_cpus
from .errors import InputError
from .onnx_export import INPUT_NAME

__all__ = ["run_bench", "format_bench", "run_layers", "format_layers", "write_json", "plan_rounds",
           "BACKENDS", "PEERS", "SCHEMA", "LAYERS_SCHEMA"]

SCHEMA = "mnv2ref-bench/2"
LAYERS_SCHEMA = "mnv2ref-bench-layers/1"
BACKENDS = ("numba", "numpy")
PEERS = ("onnxruntime", "openvino", "litert", "tensorflow", "torch")
PEER_MODULES = {  # a peer runs when, for each entry, one of its modules is installed
    "onnxruntime": (("onnx",), ("onnxruntime",)),
    "openvino": (("onnx",), ("openvino",)),
    "litert": (("ai_edge_litert", "tflite_runtime"),),
    "tensorflow": (("tensorflow",),),
    "torch": (("torch",),),
}
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
ROUNDS = 5
REWARM = 1  # untimed runs at the start of every round after the first
NUMPY_MAX_REPEAT = 5
NUMPY_MAX_WARMUP = 1
COLD_START_TARGET_S = 10.0
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


def _check_count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


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
    run, skipped = [], []
    for peer in dict.fromkeys(wanted):
        missing = [" or ".join(choices) for choices in PEER_MODULES[peer]
                   if not any(installed(m) for m in choices)]
        if missing:
            skipped.append({"backend": peer, "reason": f"{', '.join(missing)} not installed"})
        else:
            run.append(peer)
    return run, skipped


def default_tflite(source: str) -> Path:
    """Where a .tflite of the same weights is looked for: beside them, same
    stem (`mobilenet_v2_1.0_224.h5` or `mobilenet_v2_1.0_224.ckpt.index` ->
    `mobilenet_v2_1.0_224.tflite`, as the published archive names it)."""
    path = Path(source)
    if path.suffix == ".index":
        path = path.with_suffix("")
    return path.with_suffix(".tflite")


def _litert_interpreter():
    """LiteRT's Interpreter class (ai_edge_litert, else the older tflite_runtime)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def _litert_problem(path: Optional[Path], model, resolution: tuple, explicit: bool) -> Optional[str]:
    """Why LiteRT cannot run this bench on the .tflite at `path` (None: it can)."""
    if path is None or not path.is_file():
        how = "no such file" if explicit else "no .tflite beside the weights"
        return f"{how}: {path} (pass --tflite FILE, a .tflite of the same weights)"
    if not model.num_classes:
        return "the .tflite outputs class probabilities; these weights have no classifier to compare with"
    interpreter = _litert_interpreter()(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    if list(inp["shape"][1:]) != [*resolution, 3] or list(out["shape"][1:]) != [model.num_classes]:
        return (f"{path.name} maps {list(inp['shape'][1:])} to {list(out['shape'][1:])}; this bench "
                f"needs {[*resolution, 3]} to [{model.num_classes}] (--size {inp['shape'][1]}?)")
    return None


def flops_per_image(depth_multiplier: float, resolution: tuple, num_classes: int) -> tuple:
    """(FLOPs of one forward pass, where the number comes from), from `cost()`."""
    from .accounting import cost

    return int(cost(depth_multiplier, tuple(resolution), num_classes).totals.flops), "mnv2ref.cost"


def split_runs(total: int, rounds: int) -> list:
    """`total` runs as near-equal counts for at most `rounds` rounds, none empty:
    (20, 5) -> [4, 4, 4, 4, 4]; (7, 3) -> [3, 2, 2]; (2, 5) -> [1, 1]."""
    rounds = min(rounds, total)
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


def plan_rounds(repeats: Sequence[int], rounds: int) -> list:
    """The order in which the workers run: [(round, job index, timed runs)].

    Job j's `repeats[j]` timed runs are split over at most `rounds` rounds
    (`split_runs`), and the order is round-major: round 0 of every job in
    job order, then round 1 of every job, ... (a job with fewer runs drops
    out of the last rounds). Alternating like this spreads slow drift on a
    noisy machine over all the engines."""
    shares = [split_runs(r, rounds) for r in repeats]
    return [(k, j, share[k]) for k in range(max(map(len, shares), default=0))
            for j, share in enumerate(shares) if k < len(share)]


# ---------------------------------------------------------------------------
# The parent: plan the runs, start the workers, summarise


def run_bench(model, batches: Sequence[int] = (1, 8), repeat: int = 20, warmup: int = 3,
              threads: Union[None, int, Sequence[int]] = None,
              backends: Sequence[str] = BACKENDS, peers: Union[bool, Sequence[str]] = True,
              progress: bool = True, resolution: Union[int, tuple] = 224,
              compile_time: Optional[bool] = None, seed: int = 0, rounds: int = ROUNDS,
              tflite: Union[None, str, os.PathLike] = None, contended: bool = False) -> dict:
    """Benchmark `model` (a `MobileNetV2`); returns a JSON-serialisable dict.

    batches: batch sizes; repeat / warmup: timed and untimed runs per
    measurement (the NumPy backend gets at most NUMPY_MAX_REPEAT and
    NUMPY_MAX_WARMUP); rounds: the timed runs are split into this many
    rounds, alternating between the engines (see the module docstring);
    threads: an int or a list (default: 1 and all CPUs); backends: ours, from
    ("numba", "numpy"); peers: True for every installed peer, False for none,
    or a list from PEERS; tflite: the .tflite for LiteRT (default: beside the
    weights, `default_tflite`); resolution: the input's H x W (int or pair);
    compile_time: time the numba cold / warm cache start (default: when
    "numba" is among the backends and not `contended`). `contended`: run
    every measurement while another process keeps one CPU busy
    (`contention.busy_core`), and report each engine's latency on its most
    threads over its latency on 1 thread (`thread_scaling`: above 1 means
    more threads made it slower). A tqdm progress bar goes to stderr unless
    `progress` is False.

    Keys: schema, model, flops_per_image, flops_source, machine, settings,
    results (one row per engine x threads x batch), ratios (each of our rows
    over the fastest peer of its cell), thread_scaling, compile, errors,
    skipped. See `format_bench`."""
    from .contention import busy_core
    from .onnx_export import _resolution

    batches = _positive_ints(batches, "batches")
    thread_counts = default_threads() if threads is None else _positive_ints(threads, "threads")
    repeat, warmup = _check_count("repeat", repeat, 1), _check_count("warmup", warmup, 0)
    rounds = _check_count("rounds", rounds, 1)
    backends = list(dict.fromkeys([backends] if isinstance(backends, str) else backends))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise InputError(f"unknown backend {unknown[0]!r}; backends are {', '.join(BACKENDS)}")
    peer_names, skipped = _peer_list(peers)
    height, width = _resolution(resolution)
    output = "Predictions" if model.num_classes else "global_pool"
    tflite_path = Path(tflite) if tflite is not None else default_tflite(model.source)
    if "litert" in peer_names:
        problem = _litert_problem(tflite_path, model, (height, width), explicit=tflite is not None)
        if problem:
            peer_names.remove("litert")
            skipped.append({"backend": "litert", "reason": problem})
    if not backends and not peer_names:
        raise InputError("nothing to benchmark: no backend and no peer that can run")
    if compile_time is None:
        compile_time = "numba" in backends and not contended
    flops, flops_source = flops_per_image(model.depth_multiplier, (height, width), model.num_classes)

    result = {
        "schema": SCHEMA,
        "model": _model_info(model, (height, width), output),
        "flops_per_image": flops,
        "flops_source": flops_source,
        "machine": machine_info(),
        "settings": {"batches": batches, "repeat": repeat, "warmup": warmup, "rounds": rounds,
                     "rewarm": REWARM, "threads": thread_counts, "backends": backends, "peers": peer_names,
                     "numpy_max_repeat": NUMPY_MAX_REPEAT, "seed": int(seed),
                     "tflite": str(tflite_path) if "litert" in peer_names else None,
                     "openvino_config": OPENVINO_CONFIG, "contended": bool(contended)},
        "results": [], "ratios": [], "thread_scaling": [], "compile": None, "errors": [], "skipped": skipped,
    }

    with tempfile.TemporaryDirectory(prefix="mnv2ref-bench-") as tmp:
        tmp = Path(tmp)
        common = _common_job(model, tmp, (height, width), output, seed)
        if "litert" in peer_names:
            common["tflite"] = str(tflite_path)
        _export_for_peers(model, tmp, (height, width), common, peer_names, result["errors"])

        engines = backends + peer_names
        jobs = []
        for t in thread_counts:
            for batch in batches:
                for engine in engines:
                    slow = engine == "numpy"
                    jobs.append(dict(common, mode="bench", backend=engine, threads=t, batch=batch,
                                     repeat=min(repeat, NUMPY_MAX_REPEAT) if slow else repeat,
                                     warmup=max(min(warmup, NUMPY_MAX_WARMUP) if slow else warmup, 1)))
        startup = []
        if compile_time:
            cache = tmp / "numba-cache"
            cache.mkdir()
            for phase in ("cold", "warm"):
                startup.append(dict(common, mode="startup", backend="numba", phase=phase,
                                    threads=max(thread_counts), batch=1, numba_cache_dir=str(cache)))

        plan = plan_rounds([job["repeat"] for job in jobs], rounds)
        untimed = {(k, j): jobs[j]["warmup"] if k == 0 else REWARM for k, j, _ in plan}
        total = sum(n + untimed[k, j] for k, j, n in plan) + 2 * len(startup)
        bar = _progress_bar(total, progress)
        outputs = {}
        try:
            with busy_core() if contended else contextlib.nullcontext():
                rows = _run_rounds(jobs, plan, untimed, tmp, bar, result["errors"])
            for j, row in rows.items():
                result["results"].append(_summarise(jobs[j], row, flops))
                outputs[(jobs[j]["backend"], jobs[j]["threads"], jobs[j]["batch"])] = jobs[j]["output_path"]
            if startup:
                result["compile"] = _start_up(startup, tmp, bar, max(thread_counts))
            _agreement(result["results"], outputs, engines)
        finally:
            bar.close()
    result["ratios"] = _ratios(result["results"])
    result["thread_scaling"] = _thread_scaling(result["results"])
    return result


def _thread_scaling(rows: list) -> list:
    """For each engine and batch measured at 1 and at more threads: median
    latency on the most threads over the 1-thread median."""
    by_cell = {(r["backend"], r["batch"], r["threads"]): r["latency_ms"]["median"] for r in rows}
    scaling = []
    for (engine, batch, threads), ms in sorted(by_cell.items()):
        one = by_cell.get((engine, batch, 1))
        most = max(t for e, b, t in by_cell if (e, b) == (engine, batch))
        if threads == most > 1 and one:
            scaling.append({"backend": engine, "batch": batch, "threads": threads,
                            "ms": ms, "one_thread_ms": one, "ratio": ms / one})
    return scaling


def _model_info(model, resolution: tuple, output: str) -> dict:
    return {"depth_multiplier": float(model.depth_multiplier), "num_classes": int(model.num_classes),
            "source": str(model.source), "resolution": list(resolution), "output": output}


def _common_job(model, tmp: Path, resolution: tuple, output: str, seed: int) -> dict:
    """What every worker needs: the weights (as an .npz in `tmp`) and the input."""
    weights = tmp / "variables.npz"
    np.savez(weights, **{name: np.asarray(value) for name, value in model.variables.items()})
    return {"weights": str(weights), "source": str(model.source), "output": output,
            "resolution": list(resolution), "seed": int(seed),
            "metadata": json.loads(json.dumps(dict(model.metadata), default=str))}


def _export_for_peers(model, tmp: Path, resolution: tuple, common: dict, peer_names: list,
                      errors: list) -> None:
    """The ONNX graph for onnxruntime and OpenVINO, as common["onnx"]; if the
    export fails, those peers are dropped with an error row."""
    users = [p for p in ("onnxruntime", "openvino") if p in peer_names]
    if not users:
        return
    from .onnx_export import export_onnx

    try:
        common["onnx"] = str(export_onnx(model, tmp / "model.onnx", resolution=resolution))
    except Exception as error:  # noqa: BLE001 - reported, the other engines still run
        for peer in users:
            peer_names.remove(peer)
            errors.append({"backend": peer, "threads": None, "batch": None,
                           "error": f"export failed: {type(error).__name__}: {error}"})


# Pause between two workers' rounds. The workers of every engine stay alive
# for the whole run; OpenVINO's and XNNPACK's thread pools spin for a while
# after each inference, and on 2 cores that spinning took a core from the next
# engine: numba at 2 threads measured 8.9 ms beside the other workers against
# 6.2 ms alone (AMD EPYC, 2026-12-02).
SETTLE_S = 0.1


def _run_rounds(jobs: list, plan: list, untimed: dict, tmp: Path, bar, errors: list) -> dict:
    """Run `plan` (from `plan_rounds`) with one warm worker per job; return
    {job index: {"times_s", "warmup_s", "rounds", "report"}} for the jobs
    that succeeded, and append an error row for each that failed."""
    last_round = {j: k for k, j, _ in plan}
    expected = {}
    for k, j, n in plan:
        expected[j] = expected.get(j, 0) + n + untimed[k, j]
    workers, rows, failed = {}, {}, set()
    try:
        for k, j, n in plan:
            if j in failed:
                continue
            job = jobs[j]
            bar.set_description(f"round {k + 1}: {job['backend']} {job['threads']}t b{job['batch']}")
            if j not in workers:
                job["output_path"] = str(tmp / f"output_{j}.npy")
                workers[j] = _Worker(job, tmp / f"job_{j}")
                rows[j] = {"times_s": [], "warmup_s": [], "rounds": 0}
            time.sleep(SETTLE_S)  # let the previous engine's idle threads stop spinning
            done = workers[j].run_round(untimed[k, j], n, bar)
            if done is not None:
                rows[j]["times_s"] += done["times_s"]
                rows[j]["rounds"] += 1
                if k == 0:
                    rows[j]["warmup_s"] = done["warmup_s"]
            if done is None or k == last_round[j]:
                report = workers.pop(j).close(bar)
                if done is None or "error" in report:
                    bar.update(max(expected[j] - report.get("ticks", 0), 0))
                    failed.add(j)
                    rows.pop(j)
                    errors.append({"backend": job["backend"], "threads": job["threads"], "batch": job["batch"],
                                   "error": report.get("error", "worker stopped without a result")})
                else:
                    rows[j]["report"] = report
    finally:
        for worker in workers.values():  # interrupted: stop the workers we started
            worker.kill()
    return rows


def _start_up(startup: list, tmp: Path, bar, threads: int) -> dict:
    """Time the cold- and warm-cache start of numba (one-shot workers)."""
    info = {"target_s": {"cold": COLD_START_TARGET_S, "warm": WARM_START_TARGET_S}, "threads": threads}
    for index, job in enumerate(startup):
        bar.set_description(f"numba start, {job['phase']} cache")
        info[job["phase"]] = _Worker(job, tmp / f"startup_{index}").close(bar)
    for phase, target in info["target_s"].items():
        start = info.get(phase, {})
        info[f"{phase}_meets_target"] = (None if "error" in start or "to_first_prediction_s" not in start
                                         else start["to_first_prediction_s"] <= target)
    return info


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


class _Worker:
    """One worker process (`_worker_main` in a fresh interpreter), kept warm:
    `run_round` tells it to time one round and returns that round's
    timings; `close` ends it (EOF on its stdin) and returns its final report.

    The protocol is lines on the worker's stdin and stdout: the parent sends
    {"warmup": w, "repeat": r} as JSON; the worker answers "." per run (for
    the progress bar) and then "round {json}"; a one-shot worker (start-up
    timing) prints "first" at its first prediction. The final report goes to
    a JSON file, so that nothing a library prints can corrupt it."""

    def __init__(self, job: dict, stem: Path):
        spec, self.result_path, self.stderr_path = (stem.with_suffix(s) for s in
                                                    (".json", ".result.json", ".stderr"))
        job = dict(job, result_path=str(self.result_path))
        spec.write_text(json.dumps(job))
        self.ticks, self.first = 0, None
        self.started = time.perf_counter()
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER_CODE, str(spec)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         env=worker_env(job["threads"], job.get("numba_cache_dir")))

    def _read(self, bar, until: Optional[str] = None) -> Optional[dict]:
        """Read the worker's lines up to one starting with `until` (its JSON
        payload is returned), or to the end of its output (None)."""
        for line in self.proc.stdout:
            line = line.strip()
            if line in (".", "first"):
                self.ticks += 1
                bar.update(1)
            if line == "first":
                self.first = time.perf_counter() - self.started
            if until and line.startswith(until + " "):
                return json.loads(line[len(until) + 1:])
        return None

    def run_round(self, warmup: int, repeat: int, bar) -> Optional[dict]:
        """{"times_s", "warmup_s"} of one round, or None if the worker died."""
        try:
            self.proc.stdin.write(json.dumps({"warmup": warmup, "repeat": repeat}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it has exited already: close() reads why
            return None
        return self._read(bar, "round")

    def close(self, bar) -> dict:
        """Let the worker finish and return its report ({"error": ...} if it failed)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._read(bar)
        code = self.proc.wait()
        self.proc.stdout.close()
        try:
            done = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            tail = [line for line in self.stderr_path.read_text(errors="replace").splitlines() if line.strip()]
            done = {"error": (tail[-1] if tail else f"worker exited with status {code} and no result")}
        if self.first is not None:
            done["to_first_prediction_s"] = round(self.first, 4)
        done["process_wall_s"] = round(time.perf_counter() - self.started, 4)
        done["ticks"] = self.ticks
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _stats(seconds: Iterable[float]) -> dict:
    ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
    return {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)), "min": float(ms.min()), "max": float(ms.max()),
            "mean": float(ms.mean()), "n": int(ms.size)}


def _summarise(job: dict, row: dict, flops: int) -> dict:
    latency = _stats(row["times_s"])
    median_s = latency["median"] / 1e3
    batch = job["batch"]
    report = row["report"]
    return {
        "backend": job["backend"], "kind": "peer" if job["backend"] in PEERS else "mnv2ref",
        "threads": job["threads"], "batch": batch, "repeat": job["repeat"], "warmup": job["warmup"],
        "rounds": row["rounds"],
        "latency_ms": latency,
        "warmup_ms": [round(s * 1e3, 3) for s in row["warmup_s"]],
        "per_image_ms": latency["median"] / batch,
        "images_per_s": batch / median_s,
        "gflops": flops * batch / median_s / 1e9,
        "peak_rss_mb": report["peak_rss_kb"] / 1024,
        "rss_after_load_mb": report["rss_after_load_kb"] / 1024,
        "rss_source": report["rss_source"],
        "versions": report.get("versions", {}),
        "process_wall_s": report["process_wall_s"],
    }


def _agreement(rows: list, outputs: dict, order: list) -> None:
    """Each row's max|out - ref| / max|ref| against another engine's output on
    the same batch: the NumPy backend's (the readable reference), else the
    numba backend's, or for the reference itself the next engine's."""
    from .compare import relative_error

    for row in rows:
        key = (row["backend"], row["threads"], row["batch"])
        refs = [k for k in outputs if k[2] == row["batch"] and k[0] != row["backend"]]
        refs.sort(key=lambda k: (k[0] != "numpy", order.index(k[0]), k[1]))
        row["reference"], row["max_rel_diff"] = None, None
        if not refs:
            continue
        ours, ref = np.load(outputs[key]), np.load(outputs[refs[0]])
        row["reference"] = refs[0][0]
        if ours.shape == ref.shape:
            row["max_rel_diff"] = relative_error(ours, ref)


def _ratios(rows: list) -> list:
    """Each row's median latency over the fastest peer's at the same threads
    and batch (over the fastest engine when no peer ran): the headline."""
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
                           "ms": row["latency_ms"]["median"], "peer_ms": fastest["latency_ms"]["median"],
                           "noisy": _noisy(row["latency_ms"]) or _noisy(fastest["latency_ms"])})
    return ratios


def cpu_info() -> dict:
    """{"vendor", "model"} of the CPU, from /proc/cpuinfo where it exists."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = {"vendor_id": "vendor", "model name": "model"}.get(key.strip())
                if key and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return {"vendor": found.get("vendor", platform.machine()),
            "model": found.get("model", platform.processor() or platform.machine())}


def machine_info() -> dict:
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    from . import __version__

    cpu = cpu_info()
    return {"platform": platform.platform(), "cpu": cpu["model"], "cpu_vendor": cpu["vendor"],
            "cpus": os.cpu_count(), "cpus_available": available_cpus(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mnv2ref": __version__,
            "versions": {p: version(p) for p in ("numpy", "numba", "onnx", "onnxruntime", "openvino",
                                                 "ai-edge-litert", "tflite-runtime", "tensorflow", "torch")
                         if version(p)}}


# ---------------------------------------------------------------------------
# Output


def _thread_label(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _header(result: dict) -> list:
    """The first lines of a report: the model, the machine, the date."""
    m = result["model"]
    h, w = m["resolution"]
    mach = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
    return [
        f"MobileNetV2 {m['depth_multiplier']}/{h}x{w}, "
        + (f"{m['num_classes']} classes" if m["num_classes"] else "backbone")
        + f" -> {m['output']}; {result['flops_per_image'] / 1e9:.4f} GFLOP/image ({result['flops_source']})",
        f"CPU: {mach['cpu']} ({mach['cpu_vendor']}), {mach['cpus_available']}/{mach['cpus']} CPUs; {mach['date']}",
        f"python {mach['python']}, {versions}",
        "",
    ]


def _align(table: list, numeric: set) -> list:
    """Rows of cells as aligned lines, a rule under the header."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(cell.rjust(widths[j]) if j in numeric else cell.ljust(widths[j])
                               for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * wd for wd in widths))
    return lines


def format_bench(result: dict) -> str:
    """The result of `run_bench` as text: the headline (each of our backends
    over the fastest peer, per threads x batch), the table of every
    measurement, the Numba start-up times, errors and skipped peers."""
    lines = _header(result)
    headline = ([q for q in result["ratios"] if q["backend"] == "numba"] or result["ratios"])
    if headline:
        lines.append("Headline: median latency over the fastest peer's (lower is better; < 1: faster than all)")
        table = [("threads", "batch", "backend", "ms", "fastest peer", "ms", "ratio")]
        for q in sorted(headline, key=lambda q: (q["backend"], q["threads"], q["batch"])):
            table.append((str(q["threads"]), str(q["batch"]), q["backend"], f"{q['ms']:.2f}", q["peer"],
                          f"{q['peer_ms']:.2f}", f"{q['ratio']:.2f}x" + (" *" if q.get("noisy") else "")))
        lines += ["  " + line for line in _align(table, {0, 1, 3, 5, 6})] + [""]

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
    lines += _align(table, set(range(1, 9)))
    if result.get("thread_scaling"):
        busy = " with a busy process on one CPU" if result["settings"].get("contended") else ""
        lines += ["", f"Thread scaling{busy}: median on the most threads over the median on 1 thread "
                  "(above 1: the extra threads made it slower)"]
        lines += [f"  {q['backend']:<12} batch {q['batch']}: {q['threads']} threads {q['ms']:.2f} ms / "
                  f"1 thread {q['one_thread_ms']:.2f} ms = {q['ratio']:.2f}" for q in result["thread_scaling"]]
    if not result["results"]:
        lines.append("(no successful measurement)")
    if any(_noisy(r["latency_ms"]) for r in result["results"]):
        lines.append(f"* noisy: p90 / p10 > {NOISY_SPREAD:g} (other load on the machine?); rerun before trusting it")

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
        for phase in ("cold", "warm"):
            if c.get(f"{phase}_meets_target") is not None:
                lines.append(f"  {phase}-cache target <= {c['target_s'][phase]:g} s: "
                             + ("met" if c[f"{phase}_meets_target"] else "NOT met"))

    lines += _errors_and_skipped(result)
    settings = result["settings"]
    lines += ["", (f"Timings: median of {settings['repeat']} runs in {settings['rounds']} rounds alternating "
                   f"between the engines, after {settings['warmup']} untimed (+{settings['rewarm']} per "
                   f"later round; numpy: at most {settings['numpy_max_repeat']} runs), each engine in its own "
                   f"process; peak RSS per process ({_rss_note(result)}).")]
    return "\n".join(lines)


def _errors_and_skipped(result: dict) -> list:
    lines = []
    if result["errors"]:
        lines += ["", "Errors:"]
        for e in result["errors"]:
            where = ", ".join(x for x in (e["threads"] and _thread_label(e["threads"]),
                                          e.get("batch") and f"batch {e['batch']}") if x)
            lines.append(f"  {e['backend']}" + (f" ({where})" if where else "") + f": {e['error']}")
    if result["skipped"]:
        lines += ["", "Skipped: " + ", ".join(f"{s['backend']} ({s['reason']})" for s in result["skipped"])]
    return lines


def _noisy(latency: dict) -> bool:
    return latency["p90"] > NOISY_SPREAD * latency["p10"]


def _rss_note(result: dict) -> str:
    sources = {r["rss_source"] for r in result["results"]}
    return "VmHWM" if sources == {"VmHWM"} else "ru_maxrss" if sources else "n/a"


def write_json(result: dict, path: Union[str, os.PathLike]) -> Path:
    """Write `result` as JSON, atomically (temp file + rename)."""
    from .files import write_json as write

    write(path, result)
    return Path(path)


# ---------------------------------------------------------------------------
# Per layer: our trace beside OpenVINO's counters


def run_layers(model, threads: Union[None, int, Sequence[int]] = None, batch: int = 1, repeat: int = 20,
               warmup: int = 3, peers: Union[bool, Sequence[str]] = True, progress: bool = True,
               resolution: Union[int, tuple] = 224, seed: int = 0) -> dict:
    """Per-layer times of the numba fast path (`mnv2ref.trace`) beside
    OpenVINO's per-node counters summed per layer, for each thread count,
    each engine in its own process. `peers`: True (OpenVINO if installed),
    False, or a list (only "openvino" has per-layer counters here).

    Keys: schema, model, flops_per_image, flops_source, machine, settings,
    layers (our layer names, then "other"), profiles (one per engine x
    threads: {"engine", "threads", "layers": {name: ms}, "layers_ms",
    "end_to_end_ms", "ratio"}), errors, skipped. See `format_layers`."""
    from .onnx_export import _resolution

    thread_counts = default_threads() if threads is None else _positive_ints(threads, "threads")
    batch = _positive_ints(batch, "batch")[0]
    repeat, warmup = _check_count("repeat", repeat, 1), _check_count("warmup", warmup, 0)
    peer_names, skipped = _peer_list(["openvino"] if peers is True else peers)
    for peer in [p for p in peer_names if p != "openvino"]:
        peer_names.remove(peer)
        skipped.append({"backend": peer, "reason": "no per-layer counters in this bench"})
    height, width = _resolution(resolution)
    output = "Predictions" if model.num_classes else "global_pool"
    flops, flops_source = flops_per_image(model.depth_multiplier, (height, width), model.num_classes)
    result = {
        "schema": LAYERS_SCHEMA, "model": _model_info(model, (height, width), output),
        "flops_per_image": flops, "flops_source": flops_source, "machine": machine_info(),
        "settings": {"threads": thread_counts, "batch": batch, "repeat": repeat, "warmup": warmup,
                     "peers": peer_names, "seed": int(seed), "openvino_config": OPENVINO_CONFIG},
        "layers": model.layer_names + ["other"], "profiles": [], "errors": [], "skipped": skipped,
    }
    with tempfile.TemporaryDirectory(prefix="mnv2ref-layers-") as tmp:
        tmp = Path(tmp)
        common = _common_job(model, tmp, (height, width), output, seed)
        _export_for_peers(model, tmp, (height, width), common, peer_names, result["errors"])
        jobs = [dict(common, mode="layers", backend=engine, threads=t, batch=batch, repeat=repeat, warmup=warmup)
                for t in thread_counts for engine in ["numba"] + peer_names]
        bar = _progress_bar(len(jobs), progress)
        try:
            for index, job in enumerate(jobs):
                bar.set_description(f"per layer: {job['backend']} {job['threads']}t")
                done = _Worker(job, tmp / f"layers_{index}").close(bar)
                bar.update(1)
                if "error" in done:
                    result["errors"].append({"backend": job["backend"], "threads": job["threads"],
                                             "batch": batch, "error": done["error"]})
                    continue
                result["profiles"].append({"engine": job["backend"], "threads": job["threads"],
                                           **{k: done[k] for k in ("layers", "layers_ms", "end_to_end_ms")},
                                           "ratio": done["layers_ms"] / done["end_to_end_ms"],
                                           "versions": done["versions"]})
        finally:
            bar.close()
    return result


def layer_prefixes(model) -> list:
    """[(name prefix, layer)]: which of our layers an ONNX node of
    `export_onnx` (and so an OpenVINO node) belongs to, by its name."""
    prefixes = [(spec.scope + "/", spec.endpoint) for spec in model.specs]
    prefixes += [(f"{SCOPE}/Logits/AvgPool", "global_pool"), (LOGITS_SCOPE + "/", "Logits"),
                 (f"{SCOPE}/Predictions/", "Predictions")]
    prefixes += [(name + "/", name) for name in model.layer_names]
    return prefixes


def openvino_layer(node_name: str, prefixes: list) -> str:
    """Our layer for an OpenVINO profile entry (the longest matching prefix
    from `layer_prefixes`, or the layer's own endpoint name), else "other"."""
    matches = [(len(prefix), layer) for prefix, layer in prefixes
               if node_name.startswith(prefix) or node_name + "/" == prefix]
    return max(matches)[1] if matches else "other"


def format_layers(result: dict) -> str:
    """The result of `run_layers` as text: one row per layer, one column pair
    (numba, OpenVINO, their ratio) per thread count, and total lines."""
    lines = _header(result)
    profiles = {(p["engine"], p["threads"]): p for p in result["profiles"]}
    threads = result["settings"]["threads"]
    engines = ["numba"] + [p for p in result["settings"]["peers"]]
    header = ["layer"]
    for t in threads:
        header += [f"{engine} {t}t" for engine in engines] + (["ratio"] if len(engines) > 1 else [])

    def cells(get):
        row = []
        for t in threads:
            values = [get(profiles[e, t]) if (e, t) in profiles else None for e in engines]
            row += ["" if v is None else f"{v:.3f}" for v in values]
            if len(engines) > 1:
                ok = values[0] is not None and values[1]
                row.append(f"{values[0] / values[1]:.2f}x" if ok else "")
        return row

    table = [tuple(header)]
    for name in result["layers"]:
        if name == "other" and not any(p["layers"].get("other") for p in result["profiles"]):
            continue
        table.append(tuple([name] + cells(lambda p: p["layers"].get(name))))
    table.append(tuple(["sum of layers"] + cells(lambda p: p["layers_ms"])))
    table.append(tuple(["end to end"] + cells(lambda p: p["end_to_end_ms"])))
    ratios = ["sum / end to end"]
    for t in threads:
        ratios += ["" if (e, t) not in profiles else f"{profiles[e, t]['ratio']:.2f}" for e in engines]
        ratios += [""] if len(engines) > 1 else []
    table.append(tuple(ratios))
    s = result["settings"]
    lines.append(f"Per layer, batch {s['batch']}: ms, the mean of {s['repeat']} runs after {s['warmup']} "
                 "warm-up (numba: mnv2ref.trace, each layer as fast.run runs it, on its real input; "
                 "openvino: its PERF_COUNT counters summed per layer; each in its own process)")
    lines += _align(table, set(range(1, len(header))))
    lines += _errors_and_skipped(result)
    return "\n".join(lines)


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


def _worker_main(spec_path: str) -> int:
    """Entry point of a worker process: run the job in `spec_path`, write the
    result JSON (or {"error": ...}) to the job's result_path. The protocol
    (see `_Worker`) has stdout to itself: whatever the engines print on file
    descriptor 1 goes to stderr."""
    started = time.perf_counter()
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    job = json.loads(Path(spec_path).read_text())
    modes = {"startup": lambda: _startup(job, started, protocol), "bench": lambda: _serve(job, protocol),
             "layers": lambda: _layer_profile(job)}
    try:
        done = modes[job["mode"]]()
        code = 0
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line
        import traceback

        traceback.print_exc()
        done = {"error": f"{type(error).__name__}: {error}"}
        code = 1
    Path(job["result_path"]).write_text(json.dumps(done))
    protocol.close()
    return code


def _tick(protocol, text: str = ".") -> None:
    protocol.write(text + "\n")
    protocol.flush()


def _load(job: dict):
    from .model import MobileNetV2

    with np.load(job["weights"]) as data:
        variables = {name: data[name] for name in data.files}
    return MobileNetV2(variables, job["metadata"], job["source"])


def _input(job: dict) -> np.ndarray:
    h, w = job["resolution"]
    rng = np.random.default_rng(job["seed"])
    return rng.uniform(-1, 1, (job["batch"], h, w, 3)).astype(np.float32)


def _serve(job: dict, protocol) -> dict:
    """A warm worker: load, then time one round per command read from stdin
    until it closes; then save the last output and report the memory."""
    model = _load(job)
    forward, versions = _runner(job["backend"], model, job)
    x = _input(job)
    rss_loaded, _ = peak_rss_kb()
    y = None
    for line in sys.stdin:
        command = json.loads(line)
        timings = {"warmup_s": [], "times_s": []}
        for key, count in (("warmup_s", command["warmup"]), ("times_s", command["repeat"])):
            for _ in range(count):
                t0 = time.perf_counter()
                y = forward(x)
                timings[key].append(time.perf_counter() - t0)
                _tick(protocol)
        _tick(protocol, "round " + json.dumps(timings))
    peak, source = peak_rss_kb()
    if y is not None:
        np.save(job["output_path"], np.asarray(y, dtype=np.float32).reshape(len(x), -1))
    return {"rss_after_load_kb": rss_loaded, "peak_rss_kb": peak, "rss_source": source, "versions": versions}


def _startup(job: dict, started: float, protocol) -> dict:
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
    _tick(protocol, "first")
    forward(x)
    t4 = time.perf_counter()
    _tick(protocol)
    return {"phase": job["phase"], "import_s": t1 - started, "load_s": t2 - t1, "first_predict_s": t3 - t2,
            "second_predict_s": t4 - t3, "compile_s_estimate": (t3 - t2) - (t4 - t3),
            "in_process_to_first_s": t3 - started, "before_main_s": t0 - started, "versions": versions}


def _layer_profile(job: dict) -> dict:
    """Per-layer ms (mean over the runs: means add up, see `mnv2ref.trace`),
    their sum and the end-to-end median, for numba (`trace`) or OpenVINO
    (PERF_COUNT)."""
    model = _load(job)
    x = _input(job)
    if job["backend"] == "numba":
        from .trace import trace

        _, versions = _runner("numba", model, job)  # sets the thread count
        rows = trace(model, x, backend="numba", repeat=job["repeat"], warmup=job["warmup"])
        return {"layers": {row.name: row.ms for row in rows}, "layers_ms": rows.layers_ms,
                "end_to_end_ms": rows.end_to_end_ms, "versions": versions}
    request, port, versions = _openvino_request(job, perf_count=True)
    prefixes = layer_prefixes(model)
    for _ in range(job["warmup"]):
        request.infer({INPUT_NAME: x})
    per_layer, passes = {}, []
    for _ in range(job["repeat"]):
        t0 = time.perf_counter()
        request.infer({INPUT_NAME: x})
        passes.append((time.perf_counter() - t0) * 1e3)
        sums = {}
        for node in request.get_profiling_info():
            layer = openvino_layer(node.node_name, prefixes)
            sums[layer] = sums.get(layer, 0.0) + node.real_time.total_seconds() * 1e3
        for layer, ms in sums.items():
            per_layer.setdefault(layer, []).append(ms)
    layers = {layer: float(np.mean(ms)) for layer, ms in per_layer.items()}
    return {"layers": layers, "layers_ms": sum(layers.values()), "end_to_end_ms": float(np.median(passes)),
            "versions": versions}


def _openvino_request(job: dict, perf_count: bool = False) -> tuple:
    """(infer request, output port, versions): the ONNX graph reshaped to the
    batch and compiled with OPENVINO_CONFIG on the job's threads."""
    import openvino

    core = openvino.Core()
    network = core.read_model(job["onnx"])
    network.reshape({INPUT_NAME: [job["batch"], *job["resolution"], 3]})
    config = dict(OPENVINO_CONFIG, INFERENCE_NUM_THREADS=job["threads"])
    if perf_count:
        config["PERF_COUNT"] = True
    compiled = core.compile_model(network, "CPU", config)
    return compiled.create_infer_request(), compiled.output(job["output"]), {"openvino": openvino.__version__}


def _runner(backend: str, model, job: dict) -> tuple:
    """(forward(x) -> output array, {package: version}) for one engine."""
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

        session = onnx_session(job["onnx"], threads=threads, spinning=False)
        return (lambda x: session.run([output], {INPUT_NAME: x})[0]), {"onnxruntime": onnxruntime.__version__}
    if backend == "openvino":
        request, port, versions = _openvino_request(job)
        return (lambda x: request.infer({INPUT_NAME: x})[port]), versions
    if backend == "litert":
        interpreter = _litert_interpreter()(model_path=job["tflite"], num_threads=threads)
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        interpreter.resize_tensor_input(inp["index"], [job["batch"], *job["resolution"], 3])
        interpreter.allocate_tensors()

        def forward(x):
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"])

        module = type(interpreter).__module__.split(".")[0]
        return forward, {module: metadata.version(module.replace("_", "-"))}
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
