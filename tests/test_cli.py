"""The command line: results on stdout, one-line errors on stderr, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnv2ref.cli import main
from mnv2ref.resources import EXAMPLE_IMAGE, labels



def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_labels_are_the_tf_slim_1001():
    names = labels()
    assert len(names) == 1001 and names[0] == "background" and names[282] == "tabby"


def test_convert_info_classify(shared_dir, tmp_path, capsys, backbone_prefix, synthetic_prefix):
    out = tmp_path / "synthetic.h5"
    code, stdout, _ = run(capsys, "convert", synthetic_prefix, out)
    assert code == 0 and stdout.strip() == str(out) and out.is_file()

    code, stdout, _ = run(capsys, "info", out)
    assert code == 0
    assert "MobilenetV2/Logits/Conv2d_1c_1x1/weights\t(1, 1, 1280, 1001)" in stdout
    assert "depth_multiplier=0.35 num_classes=1001" in stdout

    code, stdout, _ = run(capsys, "info", "--json", backbone_prefix)
    info = json.loads(stdout)
    assert code == 0 and len(info["variables"]) == 260

    image = shared_dir / "images" / "chelsea.png"
    code, stdout, _ = run(capsys, "classify", "--weights", out, "--top", 3, "--backend", "numpy", image)
    assert code == 0
    path, *top = stdout.strip().split("\t")
    assert path == str(image) and len(top) == 3
    import mnv2ref
    model = mnv2ref.MobileNetV2.from_h5(out)
    probs = model.predict(mnv2ref.preprocess(mnv2ref.load_image(image))[None], backend="numpy")[0]
    assert int(top[0].split(":")[0]) == int(probs.argmax())


def test_embed_writes_npy(shared_dir, tmp_path, capsys, backbone_prefix):
    out = tmp_path / "emb.npy"
    images = [shared_dir / "images" / "chelsea.png", shared_dir / "images" / "coffee.png"]
    code, _, _ = run(capsys, "embed", "--weights", backbone_prefix, "--backend", "numpy",
                     *images, "-o", out)
    assert code == 0
    embeddings = np.load(out)
    assert embeddings.shape == (2, 1280) and embeddings.dtype == np.float32
    golden = np.load(shared_dir / "golden" / "backbone_1.0_224_chelsea.npz")["global_pool"]
    assert np.abs(embeddings[0] - golden.ravel()).max() / np.abs(golden).max() <= 5e-5


def test_classify_with_backbone_says_classifier_is_missing(capsys, backbone_prefix):
    code, stdout, stderr = run(capsys, "classify", "--weights", backbone_prefix, EXAMPLE_IMAGE)
    assert code == 1 and stdout == ""
    assert stderr.startswith("mnv2ref: error:") and "no classifier" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_demo_with_backbone_prints_trace_and_embedding(capsys, backbone_prefix):
    code, stdout, _ = run(capsys, "demo", "--weights", backbone_prefix, "--backend", "numpy")
    assert code == 0
    for name in ("layer_1 ", "layer_19 ", "global_pool"):
        assert name in stdout
    assert "(1, 7, 7, 1280)" in stdout
    assert "no classifier" in stdout and "1280-d" in stdout


def test_demo_with_full_model_prints_top5(capsys, synthetic_prefix):
    code, stdout, _ = run(capsys, "demo", "--weights", synthetic_prefix, "--backend", "numpy")
    assert code == 0 and "top-5:" in stdout
    assert len([line for line in stdout.split("top-5:")[1].splitlines() if "%" in line]) == 5


def test_classify_without_weights_or_network_says_how_to_get_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MNV2REF_WEIGHTS", "MNV2REF_FETCH_SHA256")}
    env.update(MNV2REF_SHARED=str(tmp_path / "nowhere"), MNV2REF_HOME=str(tmp_path / "cache"),
               MNV2REF_FETCH_URL="http://127.0.0.1:9/{name}.tgz",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run([sys.executable, "-m", "mnv2ref", "classify", "x.png"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("mnv2ref: error: no MobileNetV2 weights found, and downloading them failed")
    assert "http://127.0.0.1:9/mobilenet_v2_1.0_224.tgz" in result.stderr and "--weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,expected", [
    (["info", "/no/such/file.h5"], "/no/such/file.h5"),
    (["convert", "/no/such/model.ckpt", "out.h5"], "/no/such/model.ckpt"),
    (["classify", "--weights", "/no/such.h5", "x.png"], "/no/such.h5"),
])
def test_errors_are_one_line_without_traceback(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(capsys, *argv)
    assert code == 1 and stdout == ""
    assert stderr.startswith("mnv2ref: error:") and expected in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.h5").exists()


def test_closed_pipe_is_quiet(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run(f"{sys.executable} -m mnv2ref summary | head -n 1", shell=True, env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.startswith("Model:") or result.stdout.strip()
    assert result.stderr == ""


def test_unexpected_errors_are_one_line(monkeypatch, capsys):
    import mnv2ref.accounting

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mnv2ref.accounting, "cost", broken)
    monkeypatch.delenv("MNV2REF_DEBUG", raising=False)
    code, stdout, stderr = run(capsys, "summary")
    assert code == 1 and "internal error: ZeroDivisionError: a bug" in stderr
    assert len(stderr.strip().splitlines()) == 1
    monkeypatch.setenv("MNV2REF_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["summary"])


def test_empty_directory_is_an_error(tmp_path, capsys, backbone_prefix):
    code, _, stderr = run(capsys, "embed", "--weights", backbone_prefix, tmp_path, "-o", tmp_path / "e.npy")
    assert code == 1 and "no image files" in stderr
