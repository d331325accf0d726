"""The first run of a new user: weights downloaded once on first use, checked
against a pinned or given SHA-256, cached; a demo that runs on random weights
when nothing can be had; bounded downloads; file modes that follow the umask.

A local HTTP server on 127.0.0.1 serves an archive in the published layout
(`./mobilenet_v2_1.0_224.ckpt.*`, `.tflite`, `_frozen.pb`, `_eval.pbtxt`,
`_info.txt`) built from the shared `bench_mobilenet_v2_1.0_224` checkpoint."""

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import QuietHandler, local_http_server

import mnv2ref
from mnv2ref import fetch as fetch_module
from mnv2ref.cli import main
from mnv2ref.errors import FetchError
from mnv2ref.resources import REPO_ROOT, _weights_in, cache_dir, weights_or_download

NAME = "mobilenet_v2_1.0_224"
REPO = Path(__file__).resolve().parent.parent
PINNED_SIZE, PINNED_SHA256 = fetch_module.PINNED_ARCHIVES[NAME]


def _add_bytes(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def published_archive(shared_dir, tmp_path_factory) -> bytes:
    """The bench checkpoint laid out as the model zoo publishes the 1.0/224 archive."""
    prefix = shared_dir / "checkpoints" / "bench_mobilenet_v2_1.0_224" / "model.ckpt"
    path = tmp_path_factory.mktemp("zoo") / f"{NAME}.tgz"
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for suffix in (".data-00000-of-00001", ".index"):
            archive.add(f"{prefix}{suffix}", arcname=f"./{NAME}.ckpt{suffix}")
        archive.add(shared_dir / "peers" / "tflite_bench_mobilenet_v2_1.0_224.tflite",
                    arcname=f"./{NAME}.tflite")
        _add_bytes(archive, f"./{NAME}_frozen.pb", b"stand-in for the frozen graph")
        _add_bytes(archive, f"./{NAME}_eval.pbtxt", b"stand-in for the eval graph")
        _add_bytes(archive, f"./{NAME}_info.txt", b"Model: MobileNetV2 1.0/224, for tests\n")
    return path.read_bytes()


class Handler(QuietHandler):
    """Serves a folder and counts requests; `/drip/X` sends a byte every 50 ms,
    `/endless/X` streams zeros without end, `/huge/X` announces 1 TB."""

    requests = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/evil/"):
            self.send_response(410, "Gone\n\x1b[31mred")
            self.end_headers()
            return
        if self.path.startswith(("/drip/", "/endless/", "/huge/")):
            self.send_response(200)
            if self.path.startswith("/huge/"):
                self.send_header("Content-Length", str(10 ** 12))
            self.end_headers()
            try:
                for _ in range(400):
                    if self.path.startswith("/drip/"):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.05)
                    else:
                        self.wfile.write(bytes(1 << 20))
            except OSError:
                pass  # the client hung up, as it should
            self.close_connection = True
            return
        super().do_GET()

@pytest.fixture
def server(tmp_path):
    """(served directory, base URL, requests seen) of a local HTTP server."""
    Handler.requests = []
    with local_http_server(tmp_path, Handler) as (root, base):
        yield root, base, Handler.requests


@pytest.fixture
def new_user(tmp_path, monkeypatch):
    """A user with no weights anywhere: empty cache, no fixtures, no weights/."""
    if _weights_in(REPO_ROOT / "weights"):
        pytest.skip(f"this checkout has weights in {REPO_ROOT / 'weights'}, which are found first")
    home = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNV2REF_HOME", str(home))
    monkeypatch.setenv("MNV2REF_SHARED", str(tmp_path / "no-fixtures"))
    for name in ("MNV2REF_WEIGHTS", "MNV2REF_FETCH_URL", "MNV2REF_FETCH_SHA256"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MNV2REF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("MNV2REF_HOME")
    assert cache_dir() == tmp_path / "xdg" / "mnv2ref"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "mnv2ref"


def test_first_use_downloads_once_then_uses_the_cache(server, new_user, published_archive, monkeypatch, capsys):
    root, base, requests = server
    (root / f"{NAME}.tgz").write_bytes(published_archive)
    monkeypatch.setenv("MNV2REF_FETCH_URL", base + "/{name}.tgz")
    monkeypatch.setenv("MNV2REF_FETCH_SHA256", hashlib.sha256(published_archive).hexdigest())

    assert main(["classify", "--top", "1", str(mnv2ref.resources.EXAMPLE_IMAGE)]) == 0
    out, err = capsys.readouterr()
    assert requests == [f"/{NAME}.tgz"]
    assert sorted(os.listdir(new_user)) == [f"{NAME}.h5", f"{NAME}.tflite"]
    assert "downloaded the published mobilenet_v2_1.0_224 weights" in err
    assert out.startswith(str(mnv2ref.resources.EXAMPLE_IMAGE) + "\t")

    model = mnv2ref.MobileNetV2.pretrained()  # the API finds the cached copy: no second request
    assert weights_or_download() == new_user / f"{NAME}.h5"
    assert requests == [f"/{NAME}.tgz"]
    assert model.metadata["archive_sha256"] == hashlib.sha256(published_archive).hexdigest()
    assert model.metadata["use_ema"] is False  # the bench checkpoint has no EMA shadows
    assert (model.depth_multiplier, model.num_classes) == (1.0, 1001)


def test_wrong_digest_is_refused_and_nothing_is_kept(server, new_user, published_archive, monkeypatch):
    root, base, requests = server
    (root / f"{NAME}.tgz").write_bytes(published_archive)
    monkeypatch.setenv("MNV2REF_FETCH_URL", base + "/{name}.tgz")
    monkeypatch.setenv("MNV2REF_FETCH_SHA256", "0" * 64)
    with pytest.raises(FetchError) as caught:
        weights_or_download()
    message = str(caught.value)
    assert hashlib.sha256(published_archive).hexdigest() in message and "0" * 64 in message
    assert "--weights" in message  # says how to provide weights instead
    assert not new_user.exists()  # no archive, no partial file, no .h5, not even the folder
    assert requests == [f"/{NAME}.tgz"]


def test_pinned_size_and_digest_are_checked_without_override(server, new_user, published_archive, monkeypatch):
    root, base, _ = server
    (root / f"{NAME}.tgz").write_bytes(published_archive)  # not the published bytes
    monkeypatch.setenv("MNV2REF_FETCH_URL", base + "/{name}.tgz")
    with pytest.raises(FetchError, match=f"expected {PINNED_SIZE:,}"):
        mnv2ref.MobileNetV2.pretrained()
    assert not new_user.exists()
    assert (PINNED_SIZE, PINNED_SHA256) == (
        78_306_834, "318084bc1b63d6d7b854553e09cdf77078b1c0168be27c59a0d44253b5ed49dc")


def test_malformed_digest_override_is_refused(new_user, monkeypatch):
    monkeypatch.setenv("MNV2REF_FETCH_SHA256", "not-a-digest")
    with pytest.raises(FetchError, match="64 hexadecimal digits"):
        fetch_module.expected_archive(NAME)


def test_offline_demo_runs_on_random_weights(new_user, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MNV2REF_FETCH_URL="http://127.0.0.1:9/{name}.tgz")
    result = subprocess.run([sys.executable, "-m", "mnv2ref", "demo", "--size", "96"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if not line.startswith("mnv2ref: compiling")]
    assert len(notices) == 1 and "http://127.0.0.1:9/mobilenet_v2_1.0_224.tgz" in notices[0]
    assert "--weights" in notices[0]
    assert "RANDOM WEIGHTS" in result.stdout and "timings below are real" in result.stdout
    assert "layer_19" in result.stdout and "top-5" not in result.stdout
    names = {name for name in mnv2ref.resources.labels()[1:] if len(name) > 4}
    assert not [name for name in names if name in result.stdout]
    assert not new_user.exists()


def test_random_model_is_seeded_and_sane():
    a, b = mnv2ref.MobileNetV2.random(seed=3), mnv2ref.MobileNetV2.random(seed=3)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    pa = a.predict(x, backend="numpy")
    np.testing.assert_array_equal(pa, b.predict(x, backend="numpy"))
    assert np.isfinite(pa).all() and pa.shape == (1, 1001)
    assert not np.array_equal(pa, mnv2ref.MobileNetV2.random(seed=4).predict(x, backend="numpy"))


# ---------------------------------------------------------------------------
# Bounded downloads
# ---------------------------------------------------------------------------

def _refused(url, out_dir, *fragments, **fetch_args):
    with pytest.raises(FetchError) as caught:
        fetch_module.fetch(0.35, 224, out_dir=out_dir, url=url, progress=False, **fetch_args)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert not out_dir.exists()


def test_dripping_server_is_cut_off(server, tmp_path, monkeypatch):
    _, base, _ = server
    monkeypatch.setattr(fetch_module, "PROGRESS_WINDOW", 0.5)
    monkeypatch.setattr(fetch_module, "MIN_PROGRESS_BYTES", 1000)
    start = time.monotonic()
    _refused(f"{base}/drip/x.tgz", tmp_path / "out", "too slow")
    assert time.monotonic() - start < 10


def test_endless_body_is_capped(server, tmp_path, monkeypatch):
    _, base, _ = server
    monkeypatch.setattr(fetch_module, "MAX_DOWNLOAD_BYTES", 3 << 20)
    _refused(f"{base}/endless/x.tgz", tmp_path / "out", f"{3 << 20:,}")


def test_announced_size_beyond_the_cap_is_refused_before_reading(server, tmp_path):
    _, base, _ = server
    _refused(f"{base}/huge/x.tgz", tmp_path / "out", "announces 1,000,000,000,000 bytes")


def test_special_files_are_not_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(fifo.as_uri(), tmp_path / "out", "not a regular file")
    _refused("file:///dev/zero", tmp_path / "out", "not a regular file")


def test_http_reason_with_control_characters_stays_one_line(server, tmp_path):
    """What a server says is escaped: a reason with a newline and an escape
    sequence cannot split the one-line error or reach the terminal raw."""
    _, base, _ = server
    with pytest.raises(FetchError) as caught:
        fetch_module.fetch(0.35, 224, out_dir=tmp_path / "out", url=f"{base}/evil/x.tgz", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert "HTTP 410 Gone" in message


@pytest.mark.parametrize("declared,sparse,reason", [
    (fetch_module.MAX_MEMBER_BYTES + 1, False, "declares"),
    (100, True, "sparse"),
])
def test_archive_headers_are_checked_before_their_data(tmp_path, declared, sparse, reason):
    """A header declaring a huge (or sparse) member, with no data behind it:
    refused on reading the header, before anything is decompressed."""
    info = tarfile.TarInfo(f"{NAME}.ckpt.data-00000-of-00001")
    info.size = declared
    if sparse:
        info.type = tarfile.GNUTYPE_SPARSE
    archive = tmp_path / "bomb.tgz"
    archive.write_bytes(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
    with pytest.raises(FetchError, match=reason):
        fetch_module.unpack_checkpoint(archive, NAME, tmp_path / "out", "bomb.tgz")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_follow_the_umask(umask_022, synthetic_prefix, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    image = str(mnv2ref.resources.EXAMPLE_IMAGE)
    outputs = {"convert": tmp_path / "w.h5", "embed": tmp_path / "e.npy", "plot": tmp_path / "c.png",
               "onnx": tmp_path / "m.onnx", "json": tmp_path / "b.json"}
    assert main(["convert", str(synthetic_prefix), str(outputs["convert"])]) == 0
    assert main(["embed", "--weights", str(outputs["convert"]), "--size", "64", image,
                 "-o", str(outputs["embed"])]) == 0
    assert main(["plot-cost", str(outputs["plot"])]) == 0
    assert main(["export-onnx", "--weights", str(outputs["convert"]), "--size", "64",
                 str(outputs["onnx"])]) == 0
    from mnv2ref.bench import write_json

    write_json({"results": []}, outputs["json"])
    modes = {name: oct(path.stat().st_mode & 0o777) for name, path in outputs.items()}
    assert modes == {name: "0o644" for name in outputs}
    os.umask(0o027)
    assert main(["convert", str(synthetic_prefix), str(tmp_path / "private.h5")]) == 0
    assert oct((tmp_path / "private.h5").stat().st_mode & 0o777) == "0o640"


def test_fetched_files_follow_the_umask(umask_022, server, tmp_path, published_archive, monkeypatch):
    root, base, _ = server
    (root / "mirror.tgz").write_bytes(published_archive)
    monkeypatch.setenv("MNV2REF_FETCH_SHA256", hashlib.sha256(published_archive).hexdigest())
    result = fetch_module.fetch(1.0, 224, out_dir=tmp_path / "w", url=f"{base}/mirror.tgz",
                                progress=False, keep_archive=True)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in result.parent.iterdir()}
    assert modes == {f"{NAME}.h5": "0o644", f"{NAME}.tflite": "0o644", f"{NAME}.tgz": "0o644"}


def test_sigterm_during_fetch_leaves_nothing_behind(server, tmp_path):
    """SIGTERM is handled like Ctrl-C: the partial download is removed, one line, exit 143."""
    import signal

    _, base, _ = server
    out = tmp_path / "w"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "mnv2ref", "fetch", "-d", "0.35", "--out", str(out),
                             "--url", f"{base}/drip/x.tgz"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(out.glob(".*.fetch-*/*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(out.glob(".*.fetch-*/*.part")), "the download never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines() == ["mnv2ref: terminated"]
    assert list(out.iterdir()) == []


def _tiny_archive() -> bytes:
    """A small archive in the published layout, for header fuzzing."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        _add_bytes(archive, f"./{NAME}.ckpt.index", b"index bytes")
        _add_bytes(archive, f"./{NAME}.ckpt.data-00000-of-00001", b"data bytes")
    return buffer.getvalue()


TINY_TAR = _tiny_archive()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=12))
def test_fuzzed_archive_headers_are_refused_cleanly(edits, tmp_path):
    """Bytes of the two members' 512-byte headers changed at random (names,
    sizes, types, checksums): unpacking either succeeds inside the folder or is
    a FetchError; never another exception, never a file outside the folder."""
    data = bytearray(TINY_TAR)
    for offset, value in edits:
        data[(offset // 512) * 1024 + offset % 512 if offset >= 512 else offset] = value
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    archive = work / "fuzz.tgz"
    archive.write_bytes(gzip.compress(bytes(data)))
    target = work / "out"
    try:
        fetch_module.unpack_checkpoint(archive, NAME, target, "fuzz.tgz")
    except FetchError:
        pass
    outside = {p for p in work.rglob("*")} - {archive, target} - set(target.rglob("*"))
    assert not outside
