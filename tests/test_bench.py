"""The benchmark harness: a tiny real run, its table and JSON, and the peers' network plan."""

import json
import os
import time

import numpy as np
import pytest

import mnv2ref
from mnv2ref import bench

ORT = bench.installed("onnx") and bench.installed("onnxruntime")
if not ORT and os.environ.get("CI") == "true":
    pytest.fail("onnx and onnxruntime are required on CI", pytrace=False)


@pytest.fixture(scope="module")
def tiny_run(backbone):
    start = time.perf_counter()
    result = bench.run_bench(backbone, batches=(1,), repeat=2, warmup=1, threads=1, backends=("numpy",),
                             peers=["onnxruntime"] if ORT else False, progress=False, resolution=96)
    result["_elapsed"] = time.perf_counter() - start
    return result


def test_tiny_run_measures_numpy_and_onnxruntime(tiny_run):
    result = tiny_run
    assert result.pop("_elapsed") < 30
    assert result["schema"] == bench.SCHEMA
    for key in ("model", "flops_per_image", "flops_source", "machine", "settings", "results", "ratios",
                "compile", "errors", "skipped"):
        assert key in result, key
    assert result["errors"] == []
    assert result["compile"] is None  # no numba: no start-up timing
    assert result["model"] == {"depth_multiplier": 1.0, "num_classes": 0, "source": result["model"]["source"],
                               "resolution": [96, 96], "output": "global_pool"}
    # 96x96 costs (96/224)^2 of 224x224 for the convs: ~0.11 GFLOP
    assert 0.10e9 < result["flops_per_image"] < 0.12e9
    expected = {"numpy", "onnxruntime"} if ORT else {"numpy"}
    assert {row["backend"] for row in result["results"]} == expected
    for row in result["results"]:
        assert (row["threads"], row["batch"], row["repeat"], row["warmup"]) == (1, 1, 2, 1)
        lat = row["latency_ms"]
        assert lat["n"] == 2 and 0 < lat["min"] <= lat["p10"] <= lat["median"] <= lat["p90"] <= lat["max"]
        for key in ("per_image_ms", "images_per_s", "gflops", "peak_rss_mb", "rss_after_load_mb"):
            assert row[key] > 0, key
        assert row["images_per_s"] == pytest.approx(1e3 / lat["median"])
        # per process: far below what a shared parent would report, above the model's size
        assert 20 < row["peak_rss_mb"] < 2000 and row["peak_rss_mb"] >= row["rss_after_load_mb"]
    if ORT:
        numpy_row = next(r for r in result["results"] if r["backend"] == "numpy")
        assert numpy_row["reference"] == "onnxruntime" and numpy_row["max_rel_diff"] < 1e-4
        assert numpy_row["vs"] == "onnxruntime" and numpy_row["vs_ratio"] > 0
        assert result["ratios"] == [{"threads": 1, "batch": 1, "backend": "numpy", "peer": "onnxruntime",
                                     "ratio": numpy_row["vs_ratio"], "noisy": result["ratios"][0]["noisy"]}]
    assert result["skipped"] == []  # only the peers asked for are considered


def test_format_and_json_round_trip(tiny_run, tmp_path):
    text = bench.format_bench(tiny_run)
    assert "MobileNetV2 1.0/96x96, backbone" in text
    assert "numpy" in text and "GFLOP/s" in text and "peak RSS" in text
    if ORT:
        assert "numpy / onnxruntime = " in text
    path = bench.write_json(tiny_run, tmp_path / "sub" / "bench.json")
    assert json.loads(path.read_text()) == tiny_run
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]


@pytest.mark.parametrize("worker_code, message", [
    # the worker raises inside the measurement: a structured error
    ("import sys, mnv2ref.bench as b; b._input = lambda job: 1 / 0; sys.exit(b._worker_main(sys.argv[1]))",
     "ZeroDivisionError: division by zero"),
    # the worker dies without a result: the last line of its stderr
    ("import sys; sys.exit('worker crashed: boom')", "worker crashed: boom"),
])
def test_errors_are_reported_not_raised(backbone, monkeypatch, worker_code, message):
    """A backend that fails is an error row; the run and the table go on."""
    monkeypatch.setattr(bench, "WORKER_CODE", worker_code)
    result = bench.run_bench(backbone, batches=1, repeat=1, warmup=0, threads=1, backends=["numpy"],
                             peers=False, progress=False, resolution=32)
    assert result["results"] == [] and result["compile"] is None
    assert result["errors"] == [{"backend": "numpy", "threads": 1, "batch": 1, "error": message}]
    text = bench.format_bench(result)
    assert "Errors:" in text and "no successful measurement" in text and message in text


def test_arguments_are_checked(backbone):
    for bad in (dict(batches=[0]), dict(repeat=0), dict(warmup=-1), dict(threads=[1, 0]),
                dict(backends=["jax"]), dict(peers=["jax"]), dict(resolution=0),
                dict(backends=[], peers=False)):
        with pytest.raises(mnv2ref.InputError):
            bench.run_bench(backbone, progress=False, **bad)


def test_worker_env_sets_every_thread_count():
    env = bench.worker_env(3, numba_cache_dir="/tmp/cache")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        assert env[name] == "3"
    assert env["NUMBA_CACHE_DIR"] == "/tmp/cache"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == bench.PACKAGE_PARENT
    assert bench.default_threads()[0] == 1


@pytest.mark.parametrize("which", ["backbone", "synthetic"])
def test_peer_network_plan_matches_the_model(request, which):
    """The folded-weights network the TF / PyTorch peers run, executed with
    NumPy ops: the same walk over the layers must give the model's output."""
    model = request.getfixturevalue(which)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 45, 38, 3)).astype(np.float32)
    ops = bench._NumpyOps()
    out = bench._Plan(model, ops).run(ops, x)
    expected = model.predict(x, backend="numpy") if model.num_classes else model.embed(x, backend="numpy")
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-5


def test_flops_come_from_the_cost_accounting():
    flops, source = bench.flops_per_image(1.0, (224, 224), 1001)
    assert source.startswith("mnv2ref.")
    assert round(flops / 1e9, 3) == 0.615  # the published "0.615 GFLOPs" of 1.0/224
    assert flops == mnv2ref.cost(1.0, 224, 1001).totals.flops


def test_peers_true_lists_the_missing_ones_as_skipped():
    run, skipped = bench._peer_list(True)
    assert set(run) | {s["backend"] for s in skipped} == set(bench.PEERS)
    assert all("not installed" in s["reason"] for s in skipped)
    assert bench._peer_list(False) == ([], [])
