"""Shared pytest fixtures.

The read-only test fixtures (checkpoints, images, TensorFlow goldens) live
outside the repository, at ``$MNV2REF_SHARED`` or ``<repo>/../shared/mnv2``.
"""

import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from mnv2ref.resources import BACKBONE, shared_dir as locate_shared_dir

SYNTHETIC = "checkpoints/synthetic_mobilenet_v2_0.35_224/model.ckpt"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared ``mnv2`` fixtures folder; skip (fail on CI) when it is missing."""
    path = locate_shared_dir()  # the same lookup the CLI and the notebooks use
    if not path.is_dir():
        message = (f"shared test fixtures not found at {path}: set MNV2REF_SHARED or place "
                   "the fixtures at ../shared/mnv2; get real weights with `mnv2ref fetch`")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def backbone_prefix(shared_dir) -> Path:
    """The real published 1.0/224 weights up to Conv_1 (no classifier)."""
    return shared_dir / BACKBONE


@pytest.fixture(scope="session")
def synthetic_prefix(shared_dir) -> Path:
    """A synthetic full 0.35/224 training checkpoint (EMA shadows, RMSProp slots)."""
    return shared_dir / SYNTHETIC


@pytest.fixture(scope="session")
def backbone(backbone_prefix):
    import mnv2ref

    return mnv2ref.MobileNetV2.from_checkpoint(backbone_prefix)


@pytest.fixture(scope="session")
def synthetic(synthetic_prefix):
    import mnv2ref

    return mnv2ref.MobileNetV2.from_checkpoint(synthetic_prefix)


@pytest.fixture(scope="session")
def golden(shared_dir):
    """golden("backbone_1.0_224_chelsea") -> {endpoint: array} computed by TensorFlow."""
    from mnv2ref.compare import load_golden

    return lambda name: load_golden(shared_dir / "golden" / f"{name}.npz")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, without logging each request on stderr."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_http_server(tmp_path: Path, handler=QuietHandler):
    """Serve a new folder `tmp_path/served` with `handler` (a QuietHandler
    subclass) on 127.0.0.1 from a thread; yields (folder, base URL).
    Nothing leaves this machine."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
