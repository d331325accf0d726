"""Files, signals, arguments and output of the command line (issue 14, parts 4-9, 11, 12).

Each case builds its own bad input: special files, paths that cannot be
written, absurd numbers, names with control characters, a SIGTERM in the
middle of `convert`, an output that is the command's own input.
"""

import contextlib
import errno
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mnv2ref
from mnv2ref.checkpoint import read_checkpoint, snappy_decompress
from mnv2ref.cli import main
from mnv2ref.errors import CheckpointError, FileError, InputError, Mnv2refWarning, WeightsError
from mnv2ref.files import check_not_overwriting, check_regular_file
from mnv2ref.resources import find_weights
from mnv2ref.text import printable
from test_checkpoint import DATA_SUFFIX, pb_bytes, varint, write_checkpoint
from test_cli import run
from test_hardening_weights import VARIABLES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_prefix(tmp_path_factory):
    """A 0.35 backbone of random weights as a TF checkpoint: quick to convert."""
    prefix, _ = write_checkpoint(tmp_path_factory.mktemp("ckpt"), VARIABLES)
    return prefix


def one_line_error(code, stdout, stderr, *fragments, status=1):
    assert code == status and stdout == ""
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith(("mnv2ref: error:", "mnv2ref ")) and "internal error" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or ".tmp" in p.name)


# ---------------------------------------------------------------------------
# printable: text from outside, escaped
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,shown", [
    ("plain name.png", "plain name.png"),
    ("tab\there", "tab\\there"),
    ("line\nbreak\r", "line\\nbreak\\r"),
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    ("nul\0del\x7f", "nul\\0del\\x7f"),
    ("zero\u200bwidth\u2028sep", "zero\\u200bwidth\\u2028sep"),
    ("caf\u00e9 \u732b", "caf\u00e9 \u732b"),
    (os.fsdecode(b"bad\xffbyte"), "bad\\xffbyte"),
])
def test_printable_escapes_what_would_reach_the_terminal(text, shown):
    assert printable(text) == shown
    assert printable(text).isprintable()


# ---------------------------------------------------------------------------
# Special files: refused before anything opens them
# ---------------------------------------------------------------------------

@pytest.fixture
def special_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    yield {"fifo": (tmp_path / "fifo", "FIFO"), "socket": (tmp_path / "sock", "socket"),
           "device": (Path("/dev/zero"), "character device"), "folder": (tmp_path, "folder")}
    server.close()


def test_check_regular_file_refuses_special_files(special_files, tmp_path):
    for path, kind in special_files.values():
        with pytest.raises(FileError, match=kind) as info:
            check_regular_file(path, "input")
        assert isinstance(info.value, OSError) and info.value.filename == str(path)
    with pytest.raises(FileError, match="No such file") as info:
        check_regular_file(tmp_path / "missing", "input")
    assert info.value.errno == errno.ENOENT
    (tmp_path / "file").write_bytes(b"x")
    assert check_regular_file(tmp_path / "file").st_size == 1


def test_checkpoint_on_special_files_does_not_block(special_files, small_prefix, tmp_path):
    fifo, _ = special_files["fifo"]
    (tmp_path / "a.index").symlink_to(fifo)
    with pytest.raises(FileError, match="FIFO"):
        read_checkpoint(tmp_path / "a")
    (tmp_path / "b.index").symlink_to(Path(f"{small_prefix}.index"))
    (tmp_path / f"b{DATA_SUFFIX}").symlink_to(fifo)
    with pytest.raises(FileError, match="checkpoint data shard .* FIFO"):
        read_checkpoint(tmp_path / "b")


def test_cli_on_a_fifo_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "w.h5")
    os.mkfifo(tmp_path / "m.index")
    one_line_error(*run(capsys, "info", tmp_path / "w.h5"), "w.h5: it is a FIFO")
    one_line_error(*run(capsys, "convert", tmp_path / "m", tmp_path / "out.h5"), "m.index: it is a FIFO")
    assert sorted(os.listdir(tmp_path)) == ["m.index", "w.h5"]


# ---------------------------------------------------------------------------
# Snappy and protobuf: work bounded by the input
# ---------------------------------------------------------------------------

def test_snappy_block_announcing_more_than_it_can_hold_is_refused_before_allocating():
    stream = varint(2**32 - 1) + bytes([0 << 2]) + b"a"   # 4 GiB announced, 3 bytes given
    with pytest.raises(CheckpointError, match="more than .* compressed bytes can encode"):
        snappy_decompress(stream)


def test_snappy_block_of_many_tiny_far_copies_decodes_correctly():
    """The old decoder copied the whole 64 KiB window for every 1-byte copy."""
    period = bytes(range(256)) * 255 + bytes(range(255))      # 65535 bytes
    copies = 300_000
    literal = bytes([62 << 2]) + (len(period) - 1).to_bytes(3, "little") + period
    copy = bytes([(1 - 1) << 2 | 2]) + (65535).to_bytes(2, "little")   # 1 byte from 65535 back
    total = len(period) + copies
    stream = varint(total) + literal + copy * copies
    assert len(stream) < 1e6
    out = snappy_decompress(stream)
    assert len(out) == total and out == (period * 6)[:total]


def test_index_listing_one_block_over_and_over_is_refused(tmp_path):
    from test_checkpoint import build_block, write_table
    from mnv2ref.checkpoint import mask_crc, crc32c, read_table

    path = tmp_path / "model.ckpt.index"
    handles = write_table(path, [(b"", b"header"), (b"k" * 1000, b"v" * 60000)], per_block=2)
    data = bytearray(path.read_bytes())
    block = varint(handles[0][0]) + varint(handles[0][1])
    listing = build_block([(b"%08d" % i, block) for i in range(3000)], 1)   # 3000 x 61 KB = 183 MB
    offset = len(data) - 48
    trailer = bytes([0]) + mask_crc(crc32c(listing + b"\0")).to_bytes(4, "little")
    footer = varint(handles[1][0]) + varint(handles[1][1]) + varint(offset) + varint(len(listing))
    path.write_bytes(bytes(data[:offset]) + listing + trailer + footer.ljust(40, b"\0") + bytes(data[-8:]))
    with pytest.raises(CheckpointError, match="blocks hold more than"):
        read_table(path)


def test_index_of_too_many_entries_is_refused(tmp_path):
    from test_checkpoint import write_table
    from mnv2ref.checkpoint import read_table

    path = tmp_path / "model.ckpt.index"
    write_table(path, [(b"%07d" % i, b"") for i in range(100_001)], per_block=100_001)
    assert path.stat().st_size < 2e6
    with pytest.raises(CheckpointError, match="more than 100,000 entries"):
        read_table(path)


def test_protobuf_length_beyond_the_buffer_is_refused():
    from mnv2ref.checkpoint import parse_bundle_entry

    for length in (100, 2**40, 2**63):
        with pytest.raises(CheckpointError, match="bytes expected"):
            parse_bundle_entry(varint(2 << 3 | 2) + varint(length) + b"abc")
    with pytest.raises(CheckpointError, match="varint"):
        parse_bundle_entry(pb_bytes(2, b"") + b"\x80" * 11)


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------

SIGTERM_MID_WRITE = """
import os, signal, sys
import mnv2ref.weights as weights
from mnv2ref.cli import main

hash_file = weights.sha256_of

def hash_then_terminated(path, start=0):
    if start == weights.USER_BLOCK_SIZE:  # write_h5 hashing its temporary file: mid-write
        os.kill(os.getpid(), signal.SIGTERM)
    return hash_file(path, start)

weights.sha256_of = hash_then_terminated
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


def test_sigterm_during_convert_cleans_up_and_exits_143(small_prefix, tmp_path):
    out = tmp_path / "out" / "w.h5"
    result = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(small_prefix), str(out)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 143, result.stderr
    assert result.stderr == "mnv2ref: terminated\n"
    assert os.listdir(out.parent) == []


def test_repeated_sigterm_from_outside_leaves_nothing_behind(small_prefix, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "mnv2ref", "convert", str(small_prefix),
                                str(out_dir / "w.h5")], stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 60
    while not os.listdir(out_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)               # until the temporary file appears: convert is writing
    while process.poll() is None:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.returncode in (143, 0), stderr
    if process.returncode == 143:
        assert stderr == "mnv2ref: terminated\n" and os.listdir(out_dir) == []
    else:                               # it finished first: then the output is whole
        assert os.listdir(out_dir) == ["w.h5"] and mnv2ref.MobileNetV2.from_h5(out_dir / "w.h5")


def test_main_restores_the_sigterm_handler(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run(capsys, "summary", "-r", "32")[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------
# OS errors: FileError (an OSError), one line in the CLI
# ---------------------------------------------------------------------------

def test_unwritable_outputs_are_file_errors(small_prefix, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "folder.h5").mkdir()
    for out, reason in [(tmp_path / "file" / "w.h5", "file is not a folder"),
                        (tmp_path / "folder.h5", "it is a folder")]:
        with pytest.raises(FileError, match=reason) as info:
            mnv2ref.convert(small_prefix, out)
        assert isinstance(info.value, OSError) and str(out) in str(info.value)
        one_line_error(*run(capsys, "convert", small_prefix, out), reason)
    assert leftovers(tmp_path) == []


DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from mnv2ref.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(small_prefix, tmp_path):
    result = subprocess.run([sys.executable, "-c", DISK_FULL, "convert", str(small_prefix),
                             str(tmp_path / "w.h5")], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    one_line_error(result.returncode, result.stdout, result.stderr, "cannot write", "w.h5", "File too large")
    assert os.listdir(tmp_path) == []


def test_devices_and_fifos_are_written_in_place_not_replaced(tmp_path):
    """Through links in tmp_path: were the device replaced, only the link would be."""
    from mnv2ref.files import atomic_write

    (tmp_path / "full").symlink_to("/dev/full")
    with pytest.raises(FileError, match="cannot write .*full: No space left on device"):
        with atomic_write(tmp_path / "full") as target, open(target, "wb") as f:
            f.write(b"x" * 65536)
    assert (tmp_path / "full").is_symlink() and Path("/dev/full").is_char_device()
    (tmp_path / "null").symlink_to("/dev/null")
    with atomic_write(tmp_path / "null", suffix=".npy") as target, open(target, "wb") as f:
        np.save(f, np.zeros(3))
    assert (tmp_path / "null").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["full", "null"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_input_is_a_file_error(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"x" * 1024)
    path.chmod(0)
    with pytest.raises(FileError, match="Permission denied"):
        mnv2ref.MobileNetV2.from_h5(path)


def test_read_errors_are_file_errors_naming_the_path(small_prefix, tmp_path, monkeypatch):
    """As root, chmod 000 blocks nothing: the refusal of the OS is simulated."""
    import mnv2ref.checkpoint
    import mnv2ref.weights

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    h5 = mnv2ref.convert(small_prefix, tmp_path / "w.h5")
    checkpoint = read_checkpoint(small_prefix)
    monkeypatch.setattr(mnv2ref.weights, "open", denied, raising=False)
    monkeypatch.setattr(mnv2ref.checkpoint, "open", denied, raising=False)
    with pytest.raises(FileError, match=f"cannot read weights file {h5}: Permission denied"):
        mnv2ref.MobileNetV2.from_h5(h5)
    with pytest.raises(FileError, match="cannot read tensor 'MobilenetV2/Conv/weights' from .*Permission denied"):
        checkpoint["MobilenetV2/Conv/weights"]


def test_input_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(mnv2ref.ImageError, match="Not a directory"):
        mnv2ref.load_image(tmp_path / "file" / "x.png")


# ---------------------------------------------------------------------------
# Outputs that are inputs
# ---------------------------------------------------------------------------

def test_convert_refuses_to_overwrite_its_own_checkpoint(small_prefix, tmp_path, capsys):
    index = Path(f"{small_prefix}.index")
    before = index.read_bytes()
    (tmp_path / "alias.index").hardlink_to(index)
    for out in (index, Path(f"{small_prefix}{DATA_SUFFIX}"), tmp_path / "alias.index"):
        with pytest.raises(FileError, match="it is the input"):
            mnv2ref.convert(small_prefix, out)
        one_line_error(*run(capsys, "convert", small_prefix, out), "refusing to write")
    assert index.read_bytes() == before


def test_check_not_overwriting_allows_new_and_different_files(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    check_not_overwriting(tmp_path / "new", [tmp_path / "a"])
    check_not_overwriting(tmp_path / "b", [tmp_path / "a", tmp_path / "missing"])
    with pytest.raises(FileError):
        check_not_overwriting(tmp_path / "." / "a", [tmp_path / "a"])


# ---------------------------------------------------------------------------
# Absurd arguments: usage errors (exit 2, one line) or one-line errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,fragment", [
    (["summary", "-d", "inf"], "-d: must be a number in (0, 10]"),
    (["summary", "-d", "1e300"], "got '1e300'"),
    (["summary", "-d", "0"], "must be a number"),
    (["summary", "-d", "-1"], "must be a number"),
    (["summary", "-d", "nan"], "must be a number"),
    (["summary", "-d", "one"], "got 'one'"),
    (["summary", "-r", "0"], "positive integer"),
    (["summary", "-r", "100000"], "at most 4096"),
    (["classify", "x.png", "--top", "0"], "positive integer"),
    (["classify", "x.png", "--batch-size", str(10**9)], "at most 1024"),
    (["classify", "x.png", "--size", "60000"], "at most 4096"),
    (["embed", "x.png", "-o", "x.npy", "--size", "2.5"], "positive integer, got '2.5'"),
    (["bench", "--batch", str(10**9)], "at most 1024"),
    (["fetch", "-d", "inf"], "must be a number"),
])
def test_absurd_arguments_are_one_line_usage_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("threads", ["0", "-2", "two", "1.5", ""])
def test_bad_numba_num_threads_is_one_line(threads, capsys, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
    one_line_error(*run(capsys, "summary"), "NUMBA_NUM_THREADS must be a positive integer")


def test_plot_to_an_unknown_format_is_refused_before_plotting(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    one_line_error(*run(capsys, "plot-cost", tmp_path / "out.unknownext"), "cannot write a figure as .unknownext",
                   ".png")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Output hygiene: names escaped, one line per image, -o - is stdout
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    names = ["plain.png", "tab\there.png", "new\nline.png", "\x1b[31mred.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(folder / name)
    return folder, names


def test_classify_prints_one_line_per_image_whatever_the_names(synthetic_prefix, odd_images, capsys):
    folder, names = odd_images
    code, out, err = run(capsys, "classify", folder, "--weights", synthetic_prefix, "--backend", "numpy",
                         "--size", "32", "--top", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(names) and "\x1b" not in out
    shown = sorted(Path(line.split("\t")[0]).name for line in lines)
    assert shown == sorted(printable(name) for name in names)
    assert all(len(line.split("\t")) == 3 for line in lines)


def test_embed_to_stdout_writes_npy_bytes_and_lists_on_stderr(synthetic_prefix, odd_images, capsysbinary,
                                                              tmp_path, monkeypatch):
    folder, names = odd_images
    monkeypatch.chdir(tmp_path)
    code = main(["embed", str(folder), "-o", "-", "--weights", str(synthetic_prefix), "--backend", "numpy",
                 "--size", "32"])
    out, err = capsysbinary.readouterr()
    assert code == 0, err
    features = np.load(io.BytesIO(out))
    assert features.shape == (len(names), 1280) and np.isfinite(features).all()
    listing = err.decode().splitlines()
    assert len(listing) == len(names) + 1 and "standard output" in listing[-1]
    assert not (tmp_path / "-").exists()


def test_embed_refuses_to_overwrite_an_image(synthetic_prefix, odd_images, capsys):
    folder, _ = odd_images
    image = folder / "plain.png"
    before = image.read_bytes()
    one_line_error(*run(capsys, "embed", image, "-o", image, "--weights", synthetic_prefix), "it is the input")
    assert image.read_bytes() == before


def test_tensor_names_with_control_characters_are_escaped_in_info(tmp_path, capsys):
    prefix, _ = write_checkpoint(tmp_path, {"evil\x1b[2J\nname": np.zeros(2, dtype=np.float32)})
    code, out, err = run(capsys, "info", prefix)
    assert code == 0 and "\x1b" not in out and "evil\\x1b[2J\\nname\t(2,)\tfloat32" in out


# ---------------------------------------------------------------------------
# Weights lookup
# ---------------------------------------------------------------------------

def test_dangling_link_among_weights_is_skipped_with_a_warning(tmp_path, monkeypatch, small_prefix):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "broken.h5").symlink_to(tmp_path / "gone.h5")
    (weights / "folder.h5").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNV2REF_WEIGHTS", raising=False)
    monkeypatch.setenv("MNV2REF_SHARED", str(tmp_path / "no-fixtures"))
    monkeypatch.setattr("mnv2ref.resources.REPO_ROOT", tmp_path / "no-checkout")
    with pytest.warns(Mnv2refWarning) as record:
        with pytest.raises(WeightsError, match="no MobileNetV2 weights found"):
            find_weights()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].endswith("broken.h5: No such file or directory")
    assert messages[1].endswith("folder.h5: not a readable regular file")
    good = mnv2ref.convert(small_prefix, weights / "good.h5")
    with pytest.warns(Mnv2refWarning) as record:
        assert find_weights().samefile(good)
    assert len(record) == 2


@settings(max_examples=40, deadline=None)
@given(option=st.sampled_from(["-d", "-r", "--num-classes"]),
       value=st.one_of(st.text(max_size=12), st.integers(-10**20, 10**20).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr)))
def test_fuzzed_summary_numbers_never_end_in_an_internal_error(option, value):
    out, err = io.StringIO(), io.StringIO()
    argv = ["summary", option, value] if not value.startswith("-") else ["summary", f"{option}={value}"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    assert code in (0, 1, 2), err.getvalue()
    assert "internal error" not in err.getvalue() and "Traceback" not in err.getvalue()
    if code:
        assert err.getvalue().count("\n") == 1 and out.getvalue() == ""


def test_export_onnx_at_the_oldest_opsets_is_not_an_internal_error(synthetic, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from mnv2ref.onnx_export import MIN_OPSET, export_onnx

    x = np.zeros((1, 32, 32, 3), dtype=np.float32)
    expected = synthetic.predict(x)
    for opset in (MIN_OPSET, 8):
        path = export_onnx(synthetic, tmp_path / f"o{opset}.onnx", opset=opset, resolution=32)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {session.get_inputs()[0].name: x})))
        np.testing.assert_allclose(outputs["Predictions"], expected, atol=1e-5)
