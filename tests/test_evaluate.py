"""`mnv2ref evaluate` / `mnv2ref.evaluate`: datasets, pipeline, results, Dask, shards.

One labelled set is made per session from the shared photos: 16 JPEGs of
64-128 px at three qualities, named like ImageNet validation files, plus a
17th that is truncated. Image i is labelled with the API's own
top-(i mod 7) class for i mod 7 < 5 and with a class outside its top 5
otherwise, so the exact top-1 / top-5 counts are known beforehand.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnv2ref.errors import InputError
from mnv2ref.preprocessing import load_image, preprocess, resize_bilinear

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((64, 80), (96, 64), (128, 100), (75, 75), (100, 128))
COUNT = 16


@pytest.fixture(scope="session")
def weights(tmp_path_factory, synthetic_prefix):
    """The synthetic 0.35 checkpoint's EMA weights as .h5: quicker for each new process to load."""
    from mnv2ref.weights import convert

    return convert(synthetic_prefix, tmp_path_factory.mktemp("weights") / "synthetic_0.35.h5")


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, synthetic):
    """(folder of ILSVRC2012_val_*.JPEG, labels file, {image: API probs}, {image: label})."""
    from mnv2ref.evaluate.bench import make_jpegs
    from mnv2ref.evaluate.datasets import wordnet_classes

    folder = tmp_path_factory.mktemp("ilsvrc")
    paths = make_jpegs(folder, COUNT, sizes=SIZES, quality=(70, 85, 95), seed=1)
    corrupt = folder / f"ILSVRC2012_val_{COUNT + 1:08d}.JPEG"
    corrupt.write_bytes(paths[0].read_bytes()[:400])
    wnids = {index: wnid for wnid, index in wordnet_classes().items()}
    probs, labels = {}, {}
    for i, path in enumerate(paths):
        p = synthetic.predict(preprocess(load_image(path))[None])[0]
        ranked = np.argsort(-p, kind="stable")
        labels[str(path)] = int(ranked[i % 7] if i % 7 < 5 else ranked[100 + i])
        probs[str(path)] = p
    labels[str(corrupt)] = 1
    labels_file = folder.parent / "labels.txt"
    labels_file.write_text("".join(f"{wnids[labels[str(p)]]}\n" for p in [*paths, corrupt]))
    return folder, labels_file, probs, labels


def run(labelled, weights, **options):
    import mnv2ref

    folder, labels_file, _, _ = labelled
    options.setdefault("workers", 0)
    return mnv2ref.evaluate(options.pop("dataset", folder), weights=weights,
                    labels=options.pop("labels", labels_file), progress=False, **options)


def read_records(path):
    return {r["image"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


# --------------------------------------------------------------------------
# The resize fast path
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out", [((375, 500), (224, 224)), ((37, 51), (224, 224)),
                                       ((1, 1), (5, 3)), ((300, 451), (225, 193)), ((9, 7), (4, 11)),
                                       ((224, 224), (97, 97))])
def test_numba_resize_gives_the_numpy_bits(shape, out):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.random((2, *shape, 3), dtype=np.float32)
    fast = resize_bilinear(pixels, *out)
    assert fast.dtype == np.float32
    assert np.array_equal(fast, resize_bilinear(pixels, *out, backend="numpy"))
    view = pixels[:, ::-1, ::2]  # any strides
    assert np.array_equal(resize_bilinear(view, *out), resize_bilinear(view, *out, backend="numpy"))


def test_preprocess_backends_agree_on_the_photos(shared_dir):
    for name in ("chelsea", "coffee"):
        rgb = load_image(shared_dir / "images" / f"{name}.png")
        assert np.array_equal(preprocess(rgb), preprocess(rgb, backend="numpy"))
    with pytest.raises(InputError, match="backend"):
        resize_bilinear(np.zeros((4, 4, 3)), 2, 2, backend="opencv")


# --------------------------------------------------------------------------
# Datasets and summaries
# --------------------------------------------------------------------------


def test_summary_equals_the_api_image_by_image(labelled, weights, tmp_path):
    folder, _, probs, labels = labelled
    out = tmp_path / "results.jsonl"
    summary = run(labelled, weights, output=out, workers=2, batch_size=3)
    expected_top1 = sum(i % 7 == 0 for i in range(COUNT))
    expected_top5 = sum(i % 7 < 5 for i in range(COUNT))
    assert (summary["images"], summary["skipped"]) == (COUNT, 1)
    assert summary["top1_correct"] == expected_top1 and summary["top5_correct"] == expected_top5
    assert summary["top1"] == expected_top1 / COUNT and summary["top5"] == expected_top5 / COUNT
    assert summary["top1_ci"][0] < summary["top1"] < summary["top1_ci"][1]
    assert summary["skipped_images"] == [str(folder / f"ILSVRC2012_val_{COUNT + 1:08d}.JPEG")]
    assert summary["card"] == {"top1": 0.7185, "top5": 0.9069}
    records = read_records(out)
    assert len(records) == COUNT + 1 and "error" in records[summary["skipped_images"][0]]
    for image, p in probs.items():
        top5 = np.argsort(-p, kind="stable")[:5]
        assert records[image]["label"] == labels[image]
        assert records[image]["top5"] == top5.tolist()
        assert records[image]["probs"] == p[top5].tolist()  # the same bits, whatever the batch


def test_the_three_dataset_forms_give_the_same_records(labelled, weights, tmp_path):
    from mnv2ref.evaluate.datasets import load_dataset, wordnet_classes

    folder, labels_file, _, labels = labelled
    wnids = {index: wnid for wnid, index in wordnet_classes().items()}
    wordnet = tmp_path / "val"
    lines = []
    for sample in load_dataset(folder, labels=labels_file):
        target = wordnet / wnids[sample.label] / Path(sample.image).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.image, target)
        label = sample.label if len(lines) % 2 else wnids[sample.label]  # both label kinds
        lines.append(f"{os.path.relpath(sample.image, tmp_path)}\t{label}\n")
    listed = tmp_path / "list.txt"
    listed.write_text("# path<TAB>label\n" + "".join(lines))
    by_name = {}
    for dataset, labels_arg in ((folder, labels_file), (wordnet, None), (listed, None)):
        records = run(labelled, weights, dataset=dataset, labels=labels_arg,
                      output=tmp_path / "r.jsonl", batch_size=5)
        by_name[str(dataset)] = {Path(k).name: {**v, "image": None, "error": "error" in v} for k, v in
                                 read_records(tmp_path / "r.jsonl").items()}
        assert records["images"] == COUNT
    first, *others = by_name.values()
    for other in others:
        assert other == first
    assert len(load_dataset(folder, labels=labels_file, limit=4)) == 4


def test_cli_prints_the_comparison_with_the_card(labelled, weights, tmp_path, capsys):
    from mnv2ref.cli import main

    folder, labels_file, _, _ = labelled
    code = main(["evaluate", str(folder), "--labels", str(labels_file), "-w", str(weights),
                 "--workers", "0", "--limit", "8", "--json", str(tmp_path / "s.json"), "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and "images 8, skipped 0" in out
    assert "model card top1 71.85% is outside the 95 % interval" in out  # 2 of 8 right
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["top1_correct"] == 2 and summary["images"] == 8 and summary["images_per_s"] > 0
    assert set(summary) >= {"images", "top1", "top5", "top1_ci", "top5_ci", "skipped", "images_per_s", "card"}


def test_results_to_stdout(labelled, weights, capsys):
    from mnv2ref.cli import main
    from mnv2ref.evaluate import load_dataset

    folder, labels_file, _, labels = labelled
    code = main(["evaluate", str(folder), "--labels", str(labels_file), "-w", str(weights),
                 "--workers", "0", "--limit", "3", "-o", "-", "-q"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["image"] for r in records] == [s.image for s in load_dataset(folder, limit=3)]
    assert [r["label"] for r in records] == [labels[r["image"]] for r in records]
    assert "images 3, skipped 0" in err  # the summary goes to stderr then


def test_dataset_errors_name_the_place(tmp_path, labelled):
    from mnv2ref.evaluate.datasets import load_dataset

    folder, labels_file, _, _ = labelled
    listed = tmp_path / "list.txt"
    listed.write_text("a.jpg\tn99999999\n")
    with pytest.raises(InputError, match=r"list.txt:1: 'n99999999' is not one of"):
        load_dataset(listed)
    listed.write_text("a.jpg 5\n")
    with pytest.raises(InputError, match=r"list.txt:1: expected 'path<TAB>label'"):
        load_dataset(listed)
    short = tmp_path / "short.txt"
    short.write_text("n01440764\n")
    with pytest.raises(InputError, match="no label for image 2"):
        load_dataset(folder, labels=short)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither ILSVRC2012_val"):
        load_dataset(tmp_path / "empty")


def test_default_validation_labels_are_tf_slims(shared_dir):
    from mnv2ref.evaluate.datasets import default_validation_labels, read_validation_labels

    import hashlib
    assert default_validation_labels() == shared_dir / "imagenet_2012_validation_synset_labels.txt"
    digest = hashlib.sha256(default_validation_labels().read_bytes()).hexdigest()
    assert digest == "313fc3f23c864dde9183c9a368809065765dd1b657a6904fded44e3e46d34604"
    labels = read_validation_labels()
    assert len(labels) == 50_000 and np.bincount(labels, minlength=1001)[1:].tolist() == [50] * 1000


def test_without_fixtures_the_labels_must_be_given(tmp_path, monkeypatch):
    from mnv2ref.evaluate.datasets import load_dataset

    monkeypatch.setenv("MNV2REF_SHARED", str(tmp_path / "nowhere"))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(InputError, match="give --labels imagenet_2012_validation_synset_labels.txt"):
        load_dataset(tmp_path / "val")


def test_wilson_interval():
    from mnv2ref.evaluate.results import card_comparison, wilson_interval

    assert wilson_interval(0, 10) == [0.0, pytest.approx(0.27753, abs=1e-5)]
    assert wilson_interval(10, 10) == [pytest.approx(0.72247, abs=1e-5), 1.0]
    low, high = wilson_interval(35925, 50000)  # 71.85 % of the validation set
    assert low == pytest.approx(0.714540, abs=1e-5) and high == pytest.approx(0.722424, abs=1e-5)
    summary = {"top1": 0.7185, "top5": 0.5, "top1_ci": [low, high], "top5_ci": [0.49, 0.51]}
    assert "71.85% is inside" in card_comparison(summary)[0]
    assert "90.69% is outside" in card_comparison(summary)[1]


# --------------------------------------------------------------------------
# Engines: Dask, interruption, foreign models, embeddings
# --------------------------------------------------------------------------


def test_dask_local_2_equals_the_local_run(labelled, weights, tmp_path):
    pytest.importorskip("distributed")
    local = run(labelled, weights, output=tmp_path / "local.jsonl", batch_size=4)
    dask = run(labelled, weights, output=tmp_path / "dask.jsonl", batch_size=2, dask="local:2")
    assert read_records(tmp_path / "dask.jsonl") == read_records(tmp_path / "local.jsonl")
    assert {k: v for k, v in dask.items() if k != "images_per_s"} == \
        {k: v for k, v in local.items() if k != "images_per_s"}


def test_without_dask_the_error_names_the_extra(monkeypatch):
    from mnv2ref.errors import MissingDependencyError
    from mnv2ref.evaluate.dask import connect

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "mnv2ref\[dask\]"'):
        with connect("local:1"):
            pass


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mnv2ref", "evaluate", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop_after(process, out, lines: int, stop) -> str:
    """Send `stop` once `out` has `lines` lines; the process's stderr."""
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= lines) and time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it was stopped: {process.communicate()}")
        time.sleep(0.01)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().count("\n") == 0 and "rerun with --resume" in err
    return err


def test_stopped_runs_resume_with_every_image_once(labelled, weights, tmp_path):
    """SIGINT after the first batches, then SIGTERM during the resumed run, then
    a second resume: every image once, with the API's answers."""
    _, _, probs, _ = labelled
    many = tmp_path / "many"  # 96 images, so that each run is still going when stopped
    for copy in range(6):
        for image in probs:
            target = many / "n01440764" / f"{copy}_{Path(image).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image)
    out = tmp_path / "results.jsonl"
    common = [many, "-w", weights, "-o", out, "--batch-size", 1, "--workers", 0, "-q"]
    _stop_after(_cli(*common), out, 2, signal.SIGINT)
    first = out.read_text().splitlines()
    assert 2 <= len(first) < 96 and all(json.loads(line)["top5"] for line in first)
    _stop_after(_cli(*common, "--resume"), out, len(first) + 2, signal.SIGTERM)
    assert out.read_text().splitlines()[:len(first)] == first
    process = _cli(*common, "--resume", "--json", "-")
    report, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in lines) == sorted(str(p) for p in many.rglob("*.JPEG"))
    assert json.loads(report)["images"] == 96
    for record in lines:
        p = probs[str(Path(record["image"]).resolve())]
        assert record["top5"] == np.argsort(-p, kind="stable")[:5].tolist()


def test_resume_cuts_an_incomplete_last_line(tmp_path):
    from mnv2ref.evaluate.results import ResultsLog

    path = tmp_path / "r.jsonl"
    path.write_text('{"image": "a", "label": 1, "top5": [1], "probs": [0.5]}\n{"image": "b", "la')
    with ResultsLog(path, resume=True) as log:
        assert list(log.done) == ["a"]
        log.append([{"image": "b", "label": 2, "top5": [2], "probs": [0.25]}])
    assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == ["a", "b"]
    path.write_text("not json\n")
    with pytest.raises(InputError, match="not a results line"):
        ResultsLog(path, resume=True)


def test_tflite_peer_agrees_with_the_reference(labelled, weights, shared_dir):
    pytest.importorskip("ai_edge_litert")
    summary = run(labelled, weights, model=shared_dir / "peers/tflite_mobilenet_v2_0.35_224.tflite",
                  batch_size=8)
    assert summary["top1_agreement"] == 1.0 and summary["top1_differs"] == []
    assert summary["max_gap"] < 1e-4
    assert summary["top1"] == summary["reference_top1"] == sum(i % 7 == 0 for i in range(COUNT)) / COUNT


def test_embedding_shards_equal_embed_and_resume(labelled, synthetic, weights, tmp_path):
    from mnv2ref.cli import main
    from mnv2ref.evaluate.shards import embed_shards

    folder, _, probs, _ = labelled
    images = sorted(folder.iterdir())
    index = embed_shards(images, tmp_path / "emb", weights, shard_size=5, batch_size=3,
                         workers=0, progress=False)
    assert [s["images"] for s in index["shards"]] == [6, 6, 5] and index["shards"][-1]["skipped"]
    expected = synthetic.embed(np.stack([preprocess(load_image(p)) for p in probs]))

    def stored():
        shards = [np.load(tmp_path / "emb" / s["file"]) for s in index["shards"]]
        return np.concatenate([s["embeddings"] for s in shards]), sum((list(s["images"]) for s in shards), [])

    embeddings, names = stored()
    assert names == list(probs) and np.array_equal(embeddings, expected)
    (tmp_path / "emb" / "shard-00001.npz").unlink()  # as if the run had crashed there
    before = (tmp_path / "emb" / "shard-00000.npz").stat().st_mtime_ns
    code = main(["embed", str(folder), "-o", str(tmp_path / "emb"), "--shard-size", "5",
                 "--batch-size", "3", "--workers", "0", "-w", str(weights)])
    assert code == 1  # the unreadable image
    assert (tmp_path / "emb" / "shard-00000.npz").stat().st_mtime_ns == before
    assert np.array_equal(stored()[0], expected)
    assert json.loads((tmp_path / "emb" / "index.json").read_text())["images"] == COUNT + 1


def test_a_1000_class_model_is_numbered_like_tf_slim():
    from mnv2ref.errors import WeightsError
    from mnv2ref.evaluate.pipeline import _tf_slim_classes

    keras = np.full((2, 1000), 1e-4, np.float32)
    keras[:, 281] = 0.9  # Keras's tabby cat is TF-slim's class 282
    assert _tf_slim_classes(keras, 1001, "k.h5").argmax(axis=1).tolist() == [282, 282]
    with pytest.raises(WeightsError, match="k.h5 gives 10 classes, the reference 1001"):
        _tf_slim_classes(np.ones((1, 10)), 1001, "k.h5")
