"""The fast path's run-time behaviour: fewer threads while other processes
keep CPUs busy, and one line on stderr before a cold compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnv2ref import contention
from mnv2ref import fast as F
from mnv2ref import kernels as K

REPO = Path(__file__).resolve().parent.parent
NOTICE = "mnv2ref: compiling the Numba kernels once (about"


@pytest.fixture
def fresh_load_check(monkeypatch):
    """Forget the last look at the load, so the next call looks again."""
    monkeypatch.setattr(contention, "_load_check", [-1.0, 0, 0])


def _looks(requested: int, times: int) -> list:
    """threads_free after each of `times` fresh looks at the load."""
    answers = []
    for _ in range(times):
        contention._load_check[0] = -1.0  # the last look is old: look again
        answers.append(contention.threads_free(requested))
    return answers


@pytest.mark.parametrize("busy,cpus,requested,expected", [
    (0, 2, 2, 2), (1, 2, 2, 1), (5, 2, 2, 1), (1, 8, 4, 4), (6, 8, 4, 2), (3, 2, 1, 1)])
def test_threads_free_leaves_the_busy_cpus(monkeypatch, fresh_load_check, busy, cpus, requested, expected):
    monkeypatch.setattr(contention, "busy_cpus_elsewhere", lambda: busy)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert _looks(requested, contention.BUSY_LOOKS)[-1] == expected


def test_a_passing_blip_of_load_keeps_the_threads(monkeypatch, fresh_load_check):
    """Load seen by fewer looks in a row than BUSY_LOOKS is ignored; a look
    without load resets the count."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    loads = iter([1, 1, 0, 1, 1, 1])
    monkeypatch.setattr(contention, "busy_cpus_elsewhere", lambda: next(loads))
    assert _looks(2, 6) == [2, 2, 2, 2, 2, 1]


def test_a_busy_process_is_seen():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("needs Linux's /proc")
    with contention.busy_core() as child:
        assert child.poll() is None
        assert contention.busy_cpus_elsewhere() >= 1
    assert child.poll() is not None


def test_busy_machine_uses_fewer_threads_same_results(synthetic, monkeypatch, fresh_load_check):
    """Under load the model runs on the threads left over, and (any thread
    count giving the same bits) returns what it returns on an idle machine."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)
    monkeypatch.setattr(contention, "busy_cpus_elsewhere", lambda: 0)
    monkeypatch.setattr(F, "_REPLAY_MAX_PIXELS", 0)  # every call through the layers, which K._threads sees
    fast = F.FastMobileNetV2(synthetic, num_threads=2)
    idle = fast.run(x)
    seen = []
    monkeypatch.setattr(contention, "busy_cpus_elsewhere", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    _looks(2, contention.BUSY_LOOKS)  # the load has been seen long enough
    monkeypatch.setattr(K, "_threads", lambda: seen.append(F.get_num_threads()) or seen[-1])
    busy = fast.run(x)
    assert seen and set(seen) == {1}
    np.testing.assert_array_equal(busy, idle)
    fast.adaptive_threads = False
    seen.clear()
    fast.run(x)
    assert set(seen) == {min(2, F.numba.config.NUMBA_NUM_THREADS)}


def _compile_in_subprocess(cache_dir=None) -> str:
    """stderr of a child that compiles (or loads) the float32 kernels. With
    an empty cache it stops at the first kernel, after the notice: the
    notice is the point, not the 10 s of compiling."""
    code = ("import numpy as np\nfrom mnv2ref import kernels as K\n"
            "def stop(signature):\n    raise SystemExit(0)\n"
            f"if {cache_dir is not None}:\n    K._gemm.compile = stop\n"
            "K.compile_kernels(np.float32)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stderr


def test_cold_cache_notice(tmp_path):
    K.compile_kernels(np.float32)  # the default cache now holds them
    assert NOTICE not in _compile_in_subprocess()
    lines = _compile_in_subprocess(tmp_path / "empty-cache").splitlines()
    assert len([line for line in lines if line.startswith(NOTICE)]) == 1
    assert lines[-1].endswith("s); later runs load them from the cache")


def test_cold_start_shares_the_compiling_with_a_second_process(tmp_path):
    """From an empty cache the kernels of _HELPER_SHARE come from the cache
    the helper process filled, the rest are compiled here; a later process
    finds them all in the cache and computes the same bits. The helper
    imports the same kernels.py even from a folder holding another mnv2ref
    (a checkout of an older version, say)."""
    decoy = tmp_path / "elsewhere" / "mnv2ref"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy package was imported')\n")
    code = (f"import json, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "import numpy as np\nfrom mnv2ref import kernels as K\n"
            "K.compile_kernels(np.float32)\n"
            "x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 7, 16)).astype(np.float32)\n"
            "w = K.pack_gemm(np.linspace(-1, 1, 16 * 96).reshape(16, 96), np.ones(96), np.float32)\n"
            "d = K.pack_depthwise(np.linspace(-1, 1, 9 * 96).reshape(3, 3, 96, 1), np.ones(96), np.float32)\n"
            "p = K.pack_gemm(np.linspace(1, -1, 96 * 16).reshape(96, 16), np.ones(16), np.float32)\n"
            "out = K.inverted_residual(x, w, d, p, 1, True)\n"
            "print(json.dumps({'hits': {k.py_func.__name__: sum(k.stats.cache_hits.values())\n"
            "                           for k in K._signatures(np.float32)},\n"
            "                  'sum': float(out.astype(np.float64).sum())}))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=600, check=True, cwd=decoy.parent)
        runs.append((json.loads(done.stdout.splitlines()[-1]), done.stderr))
    (cold, cold_err), (warm, warm_err) = runs
    shared = {k.py_func.__name__ for k in K._HELPER_SHARE}
    if contention.available_cpus() >= 2:
        assert {name for name, hits in cold["hits"].items() if hits} == shared
    else:  # no helper on one CPU: all compiled here
        assert not any(cold["hits"].values())
    assert NOTICE in cold_err and NOTICE not in warm_err
    assert all(warm["hits"].values())
    assert warm["sum"] == cold["sum"]


@pytest.mark.parametrize("until", [None, "layer_4", "global_pool"])
def test_replay_gives_the_bits_of_a_fresh_run(synthetic, until):
    """Later inputs of a shape are replayed into the first one's buffers: each
    result is what the layer-by-layer path gives, and owns its memory."""
    fast = F.FastMobileNetV2(synthetic, num_threads=1)
    pack = fast._pack(np.float32)
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-1, 1, (2, 48, 40, 3)).astype(np.float32) for _ in range(3)]
    results = [fast.run(x, until) for x in xs]
    assert len(fast._replays.__dict__) == 1
    replay = next(iter(fast._replays.__dict__.values()))
    weights = {id(F._owner(a)) for pair in pack.arrays() for a in pair}
    buffers = {id(F._owner(arg)) for _, args, _ in replay.steps for arg in args
               if isinstance(arg, np.ndarray) and F._owner(arg).dtype == np.uint8
               and id(F._owner(arg)) not in weights}
    assert 2 <= len(buffers) <= 4 < len(replay.steps)  # the tensors share a few buffers
    for x, result in zip(xs, results):
        expected = fast._layers(x, until or "Predictions", pack, None)
        np.testing.assert_array_equal(result, expected)
    assert not np.array_equal(results[0], results[1])
    results[2][...] = 0  # the caller's array, not a buffer of the replay
    np.testing.assert_array_equal(fast.run(xs[1], until), results[1])


def test_replays_are_per_calling_thread(synthetic):
    from concurrent.futures import ThreadPoolExecutor

    fast = F.FastMobileNetV2(synthetic, num_threads=1)
    rng = np.random.default_rng(4)
    xs = [rng.uniform(-1, 1, (1, 40, 40, 3)).astype(np.float32) for _ in range(8)]
    expected = [fast.run(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(fast.run, xs), expected):
                np.testing.assert_array_equal(got, want)


def test_packed_weights_start_on_a_cache_line():
    """The GEMM tile loads 16-float weight rows as one vector each: the
    packs start on ALIGN bytes so that no row straddles two cache lines."""
    rng = np.random.default_rng(0)
    for cout in (8, 24, 40):
        weights = rng.standard_normal((3, cout)).astype(np.float32)
        packed = K.pack_gemm(weights, rng.standard_normal(cout))
        assert packed.w.ctypes.data % K.ALIGN == 0 and packed.b.ctypes.data % K.ALIGN == 0
        np.testing.assert_array_equal(packed.w[0, :, :min(cout, K.NR)], weights[:, :K.NR])
    depthwise = K.pack_depthwise(rng.standard_normal((3, 3, 24, 1)), rng.standard_normal(24))
    assert depthwise.w.ctypes.data % K.ALIGN == 0


@pytest.mark.parametrize("replayed", [True, False])
def test_layer_seconds_time_every_layer_of_one_pass(synthetic, monkeypatch, replayed):
    """The profile `trace` uses: every layer, once, as `run` runs it (through
    the replay for small inputs, layer by layer beyond its size)."""
    if not replayed:
        monkeypatch.setattr(F, "_REPLAY_MAX_PIXELS", 0)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 48, 48, 3)).astype(np.float32)
    fast = F.FastMobileNetV2(synthetic)
    seconds = fast.layer_seconds(x)
    assert list(seconds) == synthetic.layer_names
    assert all(value > 0 for value in seconds.values())
    assert bool(fast._replays.__dict__) == replayed
