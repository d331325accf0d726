"""`mnv2ref.fetch`: download, safe unpacking and conversion, against a local
HTTP server on 127.0.0.1 that serves archives built from the synthetic
0.35/224 checkpoint in the shared fixtures (the network is never used)."""

import hashlib
import io
import os
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import QuietHandler, local_http_server

from mnv2ref import fetch as fetch_module
from mnv2ref.errors import FetchError
from mnv2ref.fetch import checkpoint_name, fetch
from mnv2ref.weights import EMA_SUFFIX, read_h5

NAME = "mobilenet_v2_0.35_224"


# ---------------------------------------------------------------------------
# Fixtures: the synthetic checkpoint, archives, and a local HTTP server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_prefix(shared_dir) -> Path:
    prefix = shared_dir / "checkpoints" / "synthetic_mobilenet_v2_0.35_224" / "model.ckpt"
    if not Path(f"{prefix}.index").is_file():
        pytest.fail(f"{prefix}.index is missing from the shared fixtures at {shared_dir}")
    return prefix


def _add_bytes(archive, name, data, **attributes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    for key, value in attributes.items():
        setattr(info, key, value)
    if not info.isfile():
        info.size = 0
    archive.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _add_checkpoint(archive, prefix, name=NAME, folder=""):
    """The zoo's checkpoint members; `prefix` None adds tiny stand-ins (for
    archives that must be refused before the checkpoint is ever read)."""
    for suffix in (".index", ".data-00000-of-00001"):
        arcname = f"{folder}{name}.ckpt{suffix}"
        if prefix is None:
            _add_bytes(archive, arcname, b"not read")
        else:
            archive.add(f"{prefix}{suffix}", arcname=arcname)
    _add_bytes(archive, f"{folder}{name}_info.txt", b"Model: synthetic, for tests\n")


def make_archive(path, prefix=None, extra=(), name=NAME, folder="", checkpoint=True):
    """A .tgz laid out like the zoo's: the checkpoint members at top level
    (or under `folder`), after the `extra` (name, data, attributes) members."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for member_name, data, attributes in extra:
            _add_bytes(archive, member_name, data, **attributes)
        if checkpoint:
            _add_checkpoint(archive, prefix, name, folder)
    return path


@pytest.fixture(scope="module")
def good_archive(synthetic_prefix, tmp_path_factory) -> bytes:
    """The synthetic checkpoint as the zoo would publish it, built once."""
    path = tmp_path_factory.mktemp("archives") / f"{NAME}.tgz"
    return make_archive(path, synthetic_prefix).read_bytes()


class Handler(QuietHandler):
    """Serves the directory; `/truncated/X` announces X's full length but sends
    half of it, `/slow/X` never answers within the client's timeout."""

    def do_GET(self):
        if self.path.startswith("/truncated/"):
            data = (Path(self.directory) / self.path[len("/truncated/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/slow/"):
            time.sleep(1.0)  # the client has given up by now
            self.close_connection = True
            return
        super().do_GET()

@pytest.fixture
def server(tmp_path):
    """(served directory, base URL) of a threaded HTTP server on 127.0.0.1."""
    with local_http_server(tmp_path, Handler) as served:
        yield served


@pytest.fixture
def out_dir(tmp_path):
    path = tmp_path / "sandbox" / "weights"
    path.mkdir(parents=True)
    return path


@pytest.fixture(autouse=True)
def no_url_env(monkeypatch):
    monkeypatch.delenv("MNV2REF_FETCH_URL", raising=False)


def tree(path):
    """Every path below `path`, relative, as a set."""
    return {str(p.relative_to(path)) for p in Path(path).rglob("*")}


def assert_refused(url, out_dir, *fragments):
    """fetch(url) raises a FetchError containing every fragment and leaves
    the sandbox around out_dir exactly as it was."""
    sandbox = out_dir.parent
    before = tree(sandbox)
    with pytest.raises(FetchError) as caught:
        fetch(0.35, 224, out_dir=out_dir, url=url, progress=False)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    assert tree(sandbox) == before, "a failed fetch left files behind"
    return message


# ---------------------------------------------------------------------------
# Success
# ---------------------------------------------------------------------------

def test_fetch_converts_the_ema_weights(server, out_dir, synthetic_prefix, good_archive, monkeypatch):
    from mnv2ref.checkpoint import read_checkpoint

    root, base = server
    (root / f"{NAME}.tgz").write_bytes(good_archive)
    monkeypatch.setenv("MNV2REF_FETCH_URL", base + "/{name}.tgz")

    result = fetch(depth_multiplier=0.35, resolution=224, out_dir=out_dir, progress=False)

    assert result == out_dir / f"{NAME}.h5"
    assert sorted(os.listdir(out_dir)) == [f"{NAME}.h5"]  # no temporaries, no archive
    variables, attributes = read_h5(result)
    assert attributes["use_ema"] is True
    assert attributes["depth_multiplier"] == pytest.approx(0.35)
    assert attributes["num_classes"] == 1001
    checkpoint = read_checkpoint(synthetic_prefix)
    shadows = {name[: -len(EMA_SUFFIX)] for name in checkpoint if name.endswith(EMA_SUFFIX)}
    assert set(variables) == shadows
    for name, value in variables.items():
        np.testing.assert_array_equal(value, checkpoint[name + EMA_SUFFIX], err_msg=name)


def test_fetch_accepts_dot_slash_members_and_keeps_archive(server, out_dir, synthetic_prefix, capsys):
    root, base = server
    make_archive(root / "mirror.tgz", synthetic_prefix, folder="./")
    result = fetch(0.35, 224, out_dir=out_dir, url=f"{base}/mirror.tgz", progress=True,
                   keep_archive=True)
    out, err = capsys.readouterr()  # the bar shows only on a terminal
    digest = hashlib.sha256((root / "mirror.tgz").read_bytes()).hexdigest()
    assert (out, err) == ("", f"mnv2ref: {NAME}.tgz has SHA-256 {digest} (no pinned digest to check "
                              "it against; it is recorded in the weights' metadata)\n")
    assert read_h5(result)[1]["archive_sha256"] == digest
    assert sorted(os.listdir(out_dir)) == [f"{NAME}.h5", f"{NAME}.tgz"]
    assert (out_dir / f"{NAME}.tgz").read_bytes() == (root / "mirror.tgz").read_bytes()
    assert read_h5(result)[1]["num_classes"] == 1001


# ---------------------------------------------------------------------------
# Names and URLs
# ---------------------------------------------------------------------------

def test_checkpoint_names_and_default_url():
    assert checkpoint_name(1, 224) == "mobilenet_v2_1.0_224"
    assert checkpoint_name(0.5, 96) == "mobilenet_v2_0.5_96"
    assert checkpoint_name("1.4", "224") == "mobilenet_v2_1.4_224"
    assert fetch_module.checkpoint_url("mobilenet_v2_0.35_224") == \
        "https://storage.googleapis.com/mobilenet_v2/checkpoints/mobilenet_v2_0.35_224.tgz"
    assert len(fetch_module.PUBLISHED_CHECKPOINTS) == 22


@pytest.mark.parametrize("depth, resolution", [(1.4, 192), (1.3, 96), (0.25, 224), (1.0, 200), ("x", 224)])
def test_unpublished_checkpoint_is_refused_with_the_list(depth, resolution, out_dir):
    with pytest.raises(FetchError) as caught:
        fetch(depth, resolution, out_dir=out_dir, url="http://127.0.0.1:9/never", progress=False)
    message = str(caught.value)
    for valid in ("1.4/224", "1.3/224", "1.0/96", "0.75/160", "0.5/128", "0.35/192"):
        assert valid in message
    assert os.listdir(out_dir) == []


# ---------------------------------------------------------------------------
# Unsafe archives
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("member, attributes, reason", [
    ("../evil.txt", {}, "'..'"),
    ("ok/../../evil.txt", {}, "'..'"),
    ("/tmp/mnv2ref-evil.txt", {}, "absolute"),
    ("evil-link", {"type": tarfile.SYMTYPE, "linkname": "../../../etc/passwd"}, "symbolic link"),
    ("inside-link", {"type": tarfile.SYMTYPE, "linkname": f"{NAME}_info.txt"}, "symbolic link"),
    ("evil-hardlink", {"type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, "hard link"),
    ("evil-device", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "device"),
    ("evil-fifo", {"type": tarfile.FIFOTYPE}, "fifo"),
])
def test_unsafe_archive_is_refused(server, out_dir, member, attributes, reason):
    root, base = server
    make_archive(root / "evil.tgz", extra=[(member, b"pwned\n", attributes)])
    message = assert_refused(f"{base}/evil.tgz", out_dir, repr(member), reason)
    assert "refusing" in message
    assert not (out_dir.parent / "evil.txt").exists()
    assert not Path("/tmp/mnv2ref-evil.txt").exists()


def test_member_resolving_outside_the_target_is_refused(tmp_path):
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (target / "sub").symlink_to(outside)
    with pytest.raises(FetchError, match="'sub/x.txt' would be extracted outside"):
        fetch_module.check_members([tarfile.TarInfo("sub/x.txt")], target, "test.tgz")
    fetch_module.check_members([tarfile.TarInfo("./x.txt"), tarfile.TarInfo("d/x.txt")], target, "test.tgz")


def test_archive_without_checkpoint_lists_members(server, out_dir):
    root, base = server
    make_archive(root / "empty.tgz", checkpoint=False,
                 extra=[(f"{NAME}_info.txt", b"info\n", {}), (f"{NAME}.tflite", b"tflite", {})])
    assert_refused(f"{base}/empty.tgz", out_dir, f"{NAME}.ckpt.index", f"{NAME}_info.txt",
                   f"{NAME}.tflite")


def test_checkpoint_of_another_depth_is_refused(server, out_dir, synthetic_prefix):
    root, base = server
    make_archive(root / "wrong.tgz", synthetic_prefix, name="mobilenet_v2_0.5_224")
    with pytest.raises(FetchError, match="depth multiplier 0.35, expected 0.5"):
        fetch(0.5, 224, out_dir=out_dir, url=f"{base}/wrong.tgz", progress=False)
    assert os.listdir(out_dir) == []


# ---------------------------------------------------------------------------
# Network and archive failures
# ---------------------------------------------------------------------------

def test_http_404_names_status_and_url(server, out_dir):
    _, base = server
    url = f"{base}/missing.tgz"
    assert_refused(url, out_dir, "404", url)


def test_connection_refused_names_url(out_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}.tgz"
    assert_refused(url, out_dir, url)


def test_timeout_names_url(server, out_dir, monkeypatch):
    _, base = server
    monkeypatch.setattr(fetch_module, "TIMEOUT", 0.2)
    url = f"{base}/slow/{NAME}.tgz"
    assert_refused(url, out_dir, url, "timed out")


def test_truncated_download_is_refused(server, out_dir, good_archive):
    root, base = server
    (root / f"{NAME}.tgz").write_bytes(good_archive)
    url = f"{base}/truncated/{NAME}.tgz"
    assert_refused(url, out_dir, url, "incomplete", "Content-Length")


def test_not_a_tarball_is_refused(server, out_dir):
    root, base = server
    (root / "page.tgz").write_text("<html>Not a tarball</html>\n")
    url = f"{base}/page.tgz"
    assert_refused(url, out_dir, url, "gzip")


def test_corrupt_archive_is_refused(server, out_dir, good_archive):
    root, base = server
    (root / "cut.tgz").write_bytes(good_archive[: len(good_archive) // 2])  # a complete download of a cut file
    assert_refused(f"{base}/cut.tgz", out_dir, "corrupt")


def test_existing_weights_survive_a_failed_fetch(server, out_dir, good_archive):
    root, base = server
    existing = out_dir / f"{NAME}.h5"
    existing.write_bytes(b"previous weights")
    (root / f"{NAME}.tgz").write_bytes(good_archive)
    for url in (f"{base}/missing.tgz", f"{base}/truncated/{NAME}.tgz"):
        with pytest.raises(FetchError):
            fetch(0.35, 224, out_dir=out_dir, url=url, progress=False)
        assert existing.read_bytes() == b"previous weights"
        assert sorted(os.listdir(out_dir)) == [existing.name]
