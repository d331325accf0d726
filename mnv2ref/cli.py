"""The `mnv2ref` command line (also `python -m mnv2ref`).

Every command prints its result on stdout and nothing else there, so its
output can be piped; progress and warnings go to stderr. An error is one line
on stderr, `mnv2ref: error: ...`, and a non-zero exit status, no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, Mnv2refError, WeightsError
from .signals import Terminated, sigterm_raises
from .text import printable


def _load_model(args):
    """The model of --weights, or of the first weights found, or of the
    published weights, downloaded into the cache on first use."""
    from .model import MobileNetV2
    from .resources import weights_or_download

    path = weights_or_download(getattr(args, "weights", None))
    return MobileNetV2.load(path, use_ema=not getattr(args, "raw", False))


RANDOM_WEIGHTS_BANNER = """\
*** RANDOM WEIGHTS: no MobileNetV2 weights could be found or downloaded, so this run uses
*** seeded random weights. Shapes, FLOPs and timings below are real; activation values are
*** not, and there are no classes to show. Provide weights with --weights or $MNV2REF_WEIGHTS.
"""


def _demo_model(args):
    """`_load_model`, except that a failed download falls back to random
    weights (with a one-line notice) so that the demo never dead-ends."""
    from .errors import FetchError
    from .model import MobileNetV2

    try:
        return _load_model(args)
    except FetchError as error:
        if getattr(args, "weights", None):
            raise
        print(f"mnv2ref: {printable(error)}", file=sys.stderr)
        return MobileNetV2.random()


def _load_batch(paths, size):
    from .preprocessing import load_image, preprocess

    return np.stack([preprocess(load_image(p), size=size) for p in paths])


def _image_suffixes() -> set:
    """The file extensions of the formats load_image reads (.jpg, .png, ...)."""
    from PIL import Image

    from .preprocessing import ACCEPTED_FORMATS

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS}


def _expand_images(paths) -> list:
    """The image files named, with each directory replaced by the image files
    below it (by extension, sorted)."""
    suffixes = _image_suffixes()
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        else:
            files.append(path)
    if not files:
        raise InputError(f"no image files ({', '.join(sorted(suffixes))}) in "
                         f"{', '.join(printable(p) for p in paths)}")
    return files


def _image_batches(paths, size, batch_size, skipped):
    """Yield (paths, batch) of preprocessed images, `batch_size` at a time so
    memory stays bounded however many images there are. Unreadable images are
    reported on stderr, appended to `skipped` and left out."""
    from tqdm import tqdm

    from .evaluate.pipeline import chunks, load_batch

    with tqdm(total=len(paths), unit="img", disable=None if len(paths) > 1 else True,
              file=sys.stderr) as bar:
        for group in chunks(paths, batch_size):
            read, batch, failures = load_batch(group, size)
            for position, message in failures:
                tqdm.write(f"mnv2ref: warning: skipping {printable(message)}", file=sys.stderr)
                skipped.append(group[position])
            bar.update(len(group))
            if read:
                yield [group[i] for i in read], batch


def _report_skipped(skipped, total) -> int:
    if skipped:
        print(f"mnv2ref: error: {len(skipped)} of {total} images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args):
    from .files import check_regular_file
    from .keras import convert_keras, is_keras_h5
    from .weights import convert

    if Path(args.prefix).suffix.lower() not in (".h5", ".hdf5"):
        print(printable(convert(args.prefix, args.out, use_ema=not args.raw)))
        return
    check_regular_file(args.prefix, "weights file")
    if is_keras_h5(args.prefix):
        print(printable(convert_keras(args.prefix, args.out, use_ema=not args.raw)))
    else:
        raise InputError(f"{args.prefix} is not a Keras weights file (no root attribute layer_names): "
                         "convert takes a TF checkpoint prefix or a Keras Applications .h5")


def cmd_golden(args):
    from .files import check_not_overwriting
    from .golden import write_golden

    images = _expand_images(args.images)
    if args.output != "-":
        check_not_overwriting(args.output, images)
    model = _load_model(args)
    out = sys.stdout.buffer if args.output == "-" else args.output
    write_golden(model, images, out, layout=args.layout, dtype=args.dtype,
                 size=args.size)
    if args.output != "-":
        print(printable(args.output))


def cmd_info(args):
    from .model import MobileNetV2
    from .weights import read_h5

    from .keras import is_keras_h5, read_keras_h5

    path = Path(args.weights)
    if path.suffix.lower() in (".h5", ".hdf5"):
        variables, attributes = (read_keras_h5 if is_keras_h5(path) else read_h5)(path)
    else:
        from .checkpoint import read_checkpoint

        checkpoint = read_checkpoint(path)
        variables = {name: entry for name, entry in checkpoint.entries.items()}
        attributes = {"format": "TensorFlow V2 checkpoint", "index": str(checkpoint.index_file),
                      "data files": [str(p) for p in checkpoint.data_files]}
    if args.json:
        print(json.dumps({"attributes": attributes,
                          "variables": {n: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                        for n, v in variables.items()}}, indent=1, default=str))
        return
    for key, value in attributes.items():
        print(f"# {printable(key)}: {printable(value)}")
    total = 0
    for name, value in variables.items():
        total += int(np.prod(value.shape))
        print(f"{printable(name)}\t{tuple(value.shape)}\t{value.dtype}")
    print(f"# {len(variables)} tensors, {total:,} values")
    if path.suffix.lower() in (".h5", ".hdf5"):
        model = MobileNetV2(variables, attributes, str(path))
        print(f"# MobileNetV2 depth_multiplier={model.depth_multiplier} num_classes={model.num_classes}")


def cmd_classify(args):
    from .resources import label

    model = _load_model(args)
    if not model.num_classes:
        raise WeightsError(f"{model.source} has no classifier: classify needs a full checkpoint "
                           "(run `mnv2ref fetch`); `mnv2ref embed` works with a backbone")
    paths, skipped = _expand_images(args.images), []
    for names, batch in _image_batches(paths, args.size, args.batch_size, skipped):
        for path, probs in zip(names, model.predict(batch, backend=args.backend)):
            top = np.argsort(probs)[::-1][:args.top]
            print("\t".join([printable(path)] + [f"{i}:{label(i, model.num_classes)}:{probs[i]:.4f}"
                                                 for i in top]), flush=True)
    return _report_skipped(skipped, len(paths))


def cmd_embed(args):
    from .files import atomic_write, check_not_overwriting

    if args.shard_size:
        return _embed_shards(args)
    if args.workers is not None or args.dask:
        raise InputError("embed: --workers and --dask work with --shard-size (a folder of shards)")
    to_stdout = args.output == "-"
    paths, skipped, names, features = _expand_images(args.images), [], [], []
    if not to_stdout:
        check_not_overwriting(args.output, paths)
    model = _load_model(args)
    for batch_names, batch in _image_batches(paths, args.size, args.batch_size, skipped):
        features.append(model.embed(batch, backend=args.backend))
        names += batch_names
    if not features:
        raise InputError(f"none of the {len(paths)} images could be read; nothing written")
    features = np.concatenate(features)
    if to_stdout:  # the .npy bytes on stdout, so the listing goes to stderr
        np.save(sys.stdout.buffer, features)
        sys.stdout.buffer.flush()
    else:
        with atomic_write(args.output, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, features)
    listing = sys.stderr if to_stdout else sys.stdout
    for name in names:
        print(printable(name), file=listing)
    where = "standard output" if to_stdout else printable(args.output)
    print(f"mnv2ref: wrote {where}, shape {features.shape}: row i is line i "
          f"{'above' if not to_stdout else 'of this listing'}", file=sys.stderr)
    return _report_skipped(skipped, len(paths))


def cmd_evaluate(args):
    from .evaluate import Interrupted, evaluate, format_summary, write_summary

    try:
        summary = evaluate(args.dataset, weights=args.weights, raw=args.raw, model=args.model,
                           labels=args.labels, limit=args.limit, batch_size=args.batch_size,
                           workers=args.workers, output=args.output, resume=args.resume,
                           dask=args.dask, size=args.size, backend=args.backend, threads=args.threads,
                           progress=not args.quiet)
    except Interrupted as stop:
        print(f"mnv2ref: {stop}", file=sys.stderr)
        return 130
    if args.json:
        write_summary(summary, args.json)
    to_stdout = "-" not in (args.output, args.json)
    print(format_summary(summary), file=sys.stdout if to_stdout else sys.stderr)


def _embed_shards(args):
    from .evaluate.shards import embed_shards
    from .resources import weights_or_download

    index = embed_shards(_expand_images(args.images), args.output, weights_or_download(args.weights),
                         use_ema=not args.raw, shard_size=args.shard_size, batch_size=args.batch_size,
                         workers=args.workers, dask=args.dask, size=args.size, backend=args.backend)
    print(Path(args.output) / "index.json")
    skipped = sum(len(shard["skipped"]) for shard in index["shards"])
    print(f"mnv2ref: {index['images'] - skipped} embeddings in {len(index['shards'])} shards "
          f"in {args.output}", file=sys.stderr)
    return _report_skipped([None] * skipped, index["images"])


def cmd_fetch(args):
    from .fetch import fetch

    print(printable(fetch(args.depth_multiplier, args.resolution, out_dir=args.out, url=args.url)))


def cmd_demo(args):
    from .preprocessing import load_image, preprocess
    from .resources import EXAMPLE_IMAGE, label
    from .trace import format_trace, trace

    model = _demo_model(args)
    random_weights = "random_seed" in model.metadata
    image = args.image or EXAMPLE_IMAGE
    x = preprocess(load_image(image), size=args.size)[None]
    if random_weights:
        print(RANDOM_WEIGHTS_BANNER)
    print(f"MobileNetV2 {model.depth_multiplier}, {model.num_classes or 'no'} classes, "
          f"weights {printable(model.source)}")
    print(f"image {printable(Path(image).name)} -> input {x.shape} {x.dtype}, backend {args.backend}\n")
    rows = trace(model, x, backend=args.backend)
    print(format_trace(rows))
    print(f"\ntotal {sum(r.ms for r in rows):.1f} ms, {rows[-1].cumulative_flops / 1e9:.3f} GFLOPs")
    if random_weights:
        print("\n(random weights: no classes shown; see the notice at the top)")
    elif model.num_classes:
        probs = model.predict(x, backend=args.backend)[0]
        print("\ntop-5:")
        for i in np.argsort(probs)[::-1][:5]:
            print(f"  {probs[i]:7.2%}  {i:4d}  {label(i, model.num_classes)}")
    else:
        embedding = model.embed(x, backend=args.backend)[0]
        print(f"\nThese weights have no classifier (MobilenetV2/Logits is absent), so there are no "
              f"class scores; run `mnv2ref fetch` for the full published model.\n"
              f"embedding: {embedding.size}-d global pool, min {embedding.min():.4f} "
              f"mean {embedding.mean():.4f} max {embedding.max():.4f} "
              f"L2 norm {np.linalg.norm(embedding):.4f}, "
              f"{np.count_nonzero(embedding == 0)} zeros; largest at "
              + ", ".join(str(i) for i in np.argsort(embedding)[::-1][:5]))


def cmd_summary(args):
    from .accounting import cost

    c = cost(args.depth_multiplier, args.resolution, args.num_classes)
    print(json.dumps(c.to_dict(), indent=1) if args.json else c.format_table())


def cmd_trace(args):
    from .preprocessing import load_image, preprocess
    from .trace import format_trace, trace

    model = _load_model(args)
    x = preprocess(load_image(args.image), size=args.size)[None]
    if args.threads:
        from .fast import set_num_threads

        set_num_threads(args.threads)
    rows = trace(model, x, backend=args.backend, repeat=args.repeat)
    if args.json:
        print(json.dumps({"image": str(args.image), "weights": model.source, **rows.to_dict()}, indent=1))
    else:
        print(format_trace(rows))


def cmd_plot_cost(args):
    from .accounting import cost
    from .plots import plot_cost

    print(printable(plot_cost(cost(args.depth_multiplier, args.resolution, args.num_classes), args.out)))


def cmd_plot_activations(args):
    from .files import check_not_overwriting
    from .plots import figure_format, plot_feature_maps

    check_not_overwriting(args.out, [args.image])
    figure_format(args.out)  # before the network runs
    model = _load_model(args)
    x = _load_batch([args.image], args.size)
    activation = model.endpoints(x, backend=args.backend, until=args.layer.split("/")[0])
    if args.layer not in activation:
        raise InputError(f"no endpoint named {args.layer!r}; try one of {', '.join(activation)}")
    print(printable(plot_feature_maps(activation[args.layer], args.out, title=f"{args.layer} of "
                                      f"{printable(Path(args.image).name)}, {activation[args.layer].shape}")))


def cmd_bench(args):
    from .bench import format_bench, format_layers, run_bench, run_layers, write_json

    if args.evaluate:
        return _bench_evaluate(args)
    model = _load_model(args)
    peers = False if args.no_peers else (args.peers or True)
    if args.layers:
        result = run_layers(model, threads=args.threads, batch=args.batch[0], repeat=args.repeat,
                            warmup=args.warmup, peers=peers, progress=not args.quiet, resolution=args.size)
        print(format_layers(result))
    else:
        result = run_bench(model, batches=args.batch, repeat=args.repeat, warmup=args.warmup,
                           threads=args.threads, backends=args.backends, peers=peers,
                           progress=not args.quiet, resolution=args.size, rounds=args.rounds,
                           tflite=args.tflite, compile_time=False if args.no_compile_time else None,
                           contended=args.contended)
        print(format_bench(result))
    if args.json:
        write_json(result, args.json)
        print(f"mnv2ref: wrote {printable(args.json)}", file=sys.stderr)


def _bench_evaluate(args):
    from .evaluate.bench import default_weights, format_evaluate_bench, run_evaluate_bench
    from .resources import find_weights

    weights = find_weights(args.weights) if args.weights else default_weights()
    threads = args.threads[0] if args.threads else None
    result = run_evaluate_bench(weights, images=args.images, workers=args.workers, repeat=args.repeat,
                                threads=threads)
    print(format_evaluate_bench(result))
    if args.json:
        from .evaluate import write_summary

        write_summary(result, args.json)


def cmd_export_onnx(args):
    from .files import check_not_overwriting
    from .onnx_export import export_onnx
    from .resources import weights_or_download

    check_not_overwriting(args.out, [weights_or_download(args.weights)])
    model = _load_model(args)
    print(printable(export_onnx(model, args.out, opset=args.opset, resolution=args.size,
                                endpoints=args.endpoints)))


def cmd_verify(args):
    """Exit 0 = within tolerance, 1 = diverges, 2 = could not run."""
    try:
        from .verify import verify
        from .verify.interface import parse

        report = verify(args.model, images=args.image, weights=args.weights, tolerance=args.tolerance,
                        threads=args.threads, use_ema=not args.raw,
                        interface=parse(args.interface) if args.interface else None)
        # With --json - the JSON alone is stdout; the table goes to stderr.
        print(report.format(), file=sys.stderr if args.json == "-" else sys.stdout)
        if args.json:
            report.write_json(args.json)
    except BrokenPipeError:
        raise  # the reader went away: not an error (see run())
    except (Mnv2refError, OSError) as error:
        print(f"mnv2ref: error: {error}", file=sys.stderr)
        return 2
    return report.exit_code


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {printable(text)!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def at_most(limit: int):
    """An argparse type: a positive integer up to `limit`."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {text}")
        return value
    return parse


def depth_multiplier(text: str) -> float:
    """An argparse type: a finite depth multiplier in (0, MAX_DEPTH_MULTIPLIER]."""
    from .architecture import MAX_DEPTH_MULTIPLIER

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_DEPTH_MULTIPLIER:  # also refuses NaN and inf
        raise argparse.ArgumentTypeError(
            f"must be a number in (0, {MAX_DEPTH_MULTIPLIER:g}], got {printable(text)!r}")
    return value


MAX_BATCH_SIZE = 1024  # images held in memory at once


def resolution(text: str) -> int:
    """An argparse type: an input resolution in [1, preprocessing.MAX_SIZE]."""
    from .preprocessing import MAX_SIZE

    return at_most(MAX_SIZE)(text)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit status 2, as argparse's)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnv2ref", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mnv2ref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_weights(p):
        p.add_argument("--weights", "-w", help="an .h5 from `convert` or a TF checkpoint prefix "
                       "(default: $MNV2REF_WEIGHTS, weights/, ../shared/mnv2)")
        p.add_argument("--raw", action="store_true", help="from a checkpoint, use raw variables "
                       "instead of their ExponentialMovingAverage")
        p.add_argument("--backend", choices=("numba", "numpy"), default="numba")
        p.add_argument("--size", type=resolution, default=224, help="input resolution (default 224)")
        p.add_argument("--batch-size", type=at_most(MAX_BATCH_SIZE), default=16,
                       help=f"images per batch (default 16, at most {MAX_BATCH_SIZE})")
        return p

    p = command("demo", cmd_demo, "run an example image through the network, layer by layer")
    with_weights(p)
    p.add_argument("image", nargs="?", help="an image (default: a bundled photo of a cat)")

    p = command("convert", cmd_convert, "convert a TF-slim checkpoint or a Keras Applications "
                "weights file to HDF5")
    p.add_argument("prefix", help="checkpoint prefix (PREFIX.index + PREFIX.data-*) or a Keras .h5")
    p.add_argument("out", help="output .h5 file")
    p.add_argument("--raw", action="store_true", help="raw variables instead of their moving averages")

    p = command("golden", cmd_golden, "write the input and every endpoint of the reference on "
                "images to a golden .npz or .h5, for other implementations' tests")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    p.add_argument("-o", "--output", required=True, help="output .npz or .h5 (- for an .npz on stdout)")
    p.add_argument("--layout", choices=("NHWC", "NCHW"), default="NHWC", help="of 4-d arrays (default NHWC)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the computation and the arrays (default float32)")
    p.add_argument("--weights", "-w", help="an .h5 from `convert`, a Keras .h5 or a TF checkpoint prefix "
                   "(default: $MNV2REF_WEIGHTS, weights/, ../shared/mnv2)")
    p.add_argument("--raw", action="store_true", help="from a checkpoint, use raw variables "
                   "instead of their ExponentialMovingAverage")
    p.add_argument("--size", type=positive_int, default=224, help="input resolution (default 224)")

    p = command("info", cmd_info, "list the variables, shapes and metadata of weights")
    p.add_argument("weights", help="an .h5 file or a TF checkpoint prefix")
    p.add_argument("--json", action="store_true")

    p = with_weights(command("classify", cmd_classify, "print the top classes of images"))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    p.add_argument("--top", "-k", type=positive_int, default=5)

    p = with_weights(command("embed", cmd_embed, "write the global-pool embeddings of images to .npy"))
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True,
                   help="output .npy, shape (images, 1280); - for standard output")
    p.add_argument("--shard-size", type=positive_int, metavar="N", help="for large sets: -o is a folder "
                   "of shards of N images plus index.json, resumable (see mnv2ref.evaluate.shards)")
    p.add_argument("--workers", type=int, metavar="K", help="with --shard-size: decoding processes")
    p.add_argument("--dask", metavar="ADDRESS", help="with --shard-size: run on Dask, local:N or tcp://HOST:PORT")

    p = with_weights(command("evaluate", cmd_evaluate, "top-1 / top-5 accuracy on a labelled image set "
                             "(ImageNet validation), streamed and resumable"))
    p.add_argument("dataset", help="a folder of ILSVRC2012_val_*.JPEG, a folder of WordNet-id folders, "
                   "or a path<TAB>label list file")
    p.add_argument("--labels", help="ground truth for ILSVRC2012_val_* files, one WordNet id per line "
                   "(default: the copy among the shared fixtures, ../shared/mnv2)")
    p.add_argument("--model", metavar="FOREIGN", help="evaluate this ONNX / OpenVINO / TF Lite model "
                   "instead, and compare it with the reference image by image")
    p.add_argument("--limit", type=positive_int, metavar="N", help="the first N images only")
    p.add_argument("--workers", type=int, metavar="K", help="decoding processes (default: one per CPU; "
                   "0: decode in the main process)")
    p.add_argument("-o", "--output", metavar="RESULTS.jsonl", help="per-image results, one JSON object "
                   "a line, flushed per batch (- for stdout)")
    p.add_argument("--resume", action="store_true", help="keep the images already in --output, "
                   "evaluate the rest")
    p.add_argument("--json", metavar="SUMMARY", help="write the summary as JSON (- for stdout)")
    p.add_argument("--dask", metavar="ADDRESS", help="run on Dask: local:N (a local cluster of N "
                   "processes) or tcp://HOST:PORT (an existing scheduler)")
    p.add_argument("--threads", type=positive_int, metavar="T", help="Numba threads for the model "
                   "(default: all CPUs)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = command("fetch", cmd_fetch, "download a published checkpoint and convert it into weights/")
    p.add_argument("--depth-multiplier", "-d", type=depth_multiplier, default=1.0)
    p.add_argument("--resolution", "-r", type=resolution, default=224)
    p.add_argument("--out", default="weights", help="output folder (default weights/)")
    p.add_argument("--url", help="download from this URL instead of the model zoo")

    def with_config(p):
        p.add_argument("--depth-multiplier", "-d", type=depth_multiplier, default=1.0)
        p.add_argument("--resolution", "-r", type=resolution, default=224)
        p.add_argument("--num-classes", type=int, default=1001, help="0 for the backbone alone")
        return p

    p = with_config(command("summary", cmd_summary, "per-layer MACs, FLOPs and parameters, no weights needed"))
    p.add_argument("--json", action="store_true")

    p = with_weights(command("trace", cmd_trace, "per-layer activation statistics, time and FLOPs for an image"))
    p.add_argument("image")
    p.add_argument("--repeat", type=positive_int, help="timed passes (default: 20 numba, 3 numpy)")
    p.add_argument("--threads", type=positive_int, help="numba threads (default: NUMBA_NUM_THREADS)")
    p.add_argument("--json", action="store_true")

    p = with_config(command("plot-cost", cmd_plot_cost, "bar chart of FLOPs and parameters per layer"))
    p.add_argument("out", help="output image (.png, .svg, .pdf)")

    p = with_weights(command("plot-activations", cmd_plot_activations, "grid of one layer's feature maps"))
    p.add_argument("image")
    p.add_argument("layer", help="an endpoint, e.g. layer_3 or layer_3/expansion_output")
    p.add_argument("out", help="output image (.png, .svg, .pdf)")

    p = command("bench", cmd_bench, "time the backends against ONNX Runtime, OpenVINO and LiteRT "
                "(and TensorFlow / PyTorch if installed), each in its own process")
    p.add_argument("--weights", "-w", help="an .h5 from `convert` or a TF checkpoint prefix "
                   "(default: $MNV2REF_WEIGHTS, weights/, ../shared/mnv2)")
    p.add_argument("--raw", action="store_true", help="from a checkpoint, use raw variables "
                   "instead of their ExponentialMovingAverage")
    p.add_argument("--batch", type=at_most(MAX_BATCH_SIZE), nargs="+", default=[1, 8], metavar="N",
                   help="batch sizes (default: 1 8)")
    p.add_argument("--repeat", type=positive_int, default=20,
                   help="timed runs per measurement (default 20; the numpy backend at most 5)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--threads", type=positive_int, nargs="+", metavar="T",
                   help="thread counts to measure (default: 1 and all CPUs)")
    p.add_argument("--backends", nargs="+", choices=("numba", "numpy"), default=["numba", "numpy"])
    p.add_argument("--peers", nargs="+", choices=("onnxruntime", "openvino", "litert", "tensorflow", "torch"),
                   help="peers to run (default: every one installed)")
    p.add_argument("--tflite", metavar="FILE", help="a .tflite of the same weights for LiteRT "
                   "(default: beside the weights, same stem)")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="split the timed runs into this many rounds, alternating between the engines (default 5)")
    p.add_argument("--layers", action="store_true", help="per-layer times of numba beside OpenVINO's "
                   "counters, at the first --batch size, instead of the whole-network bench")
    p.add_argument("--contended", action="store_true", help="measure while another process keeps one "
                   "CPU busy, and report each engine's most-threads / 1-thread latency")
    p.add_argument("--no-peers", action="store_true", help="run no peer")
    p.add_argument("--size", type=resolution, default=224, help="input resolution (default 224)")
    p.add_argument("--no-compile-time", action="store_true",
                   help="skip timing the Numba start-up with a cold and a warm cache")
    p.add_argument("--json", metavar="FILE", help="also write the whole result as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--evaluate", action="store_true", help="instead: the `evaluate` pipeline against a "
                   "serial load_image -> preprocess -> predict loop (uses --repeat, --json)")
    p.add_argument("--images", type=positive_int, default=128, help="with --evaluate: JPEGs per round")
    p.add_argument("--workers", type=int, metavar="K", help="with --evaluate: decoding processes "
                   "(default: one per CPU)")

    p = command("export-onnx", cmd_export_onnx, "write the network as a standard ONNX graph")
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--weights", "-w", help="an .h5 from `convert` or a TF checkpoint prefix")
    p.add_argument("--raw", action="store_true", help="raw variables instead of their moving averages")
    p.add_argument("--size", type=resolution, default=224, help="input resolution (default 224)")
    p.add_argument("--opset", type=positive_int, default=13)
    p.add_argument("--endpoints", action="store_true", help="also output every layer_N endpoint (NHWC)")

    p = command("verify", cmd_verify, "compare another MobileNetV2 (ONNX, OpenVINO, TF Lite, Keras, an "
                "activation dump) with the reference, endpoint by endpoint; exit 0 = match, 1 = diverges, "
                "2 = could not run")
    p.add_argument("model", help="an .onnx, OpenVINO .xml, .tflite, Keras .h5/.keras file, or an .npz/.h5 "
                   "activation dump (`input` plus their tensors)")
    p.add_argument("--image", nargs="+", metavar="IMG", help="images to compare on (default: a bundled photo)")
    p.add_argument("--weights", "-w", help="an .h5 from `convert` or a TF checkpoint prefix "
                   "(default: $MNV2REF_WEIGHTS, weights/, ../shared/mnv2)")
    p.add_argument("--raw", action="store_true", help="from a checkpoint, use raw variables "
                   "instead of their ExponentialMovingAverage")
    p.add_argument("--tolerance", type=float, help="max error relative to each endpoint's range "
                   "(default 5e-5 for float32 models)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (- for stdout)")
    p.add_argument("--threads", type=positive_int, help="threads of the foreign runtime")
    p.add_argument("--interface", help="the input the model is meant to take: original, converted, or "
                   "LAYOUT,COLOR,SCALE (default: what it declares, else the model card's for its layout)")
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"mnv2ref: warning: {printable(message)}\n"


def _check_environment() -> None:
    """Refuse a NUMBA_NUM_THREADS that would make importing Numba fail (0) or be
    silently ignored (a non-integer)."""
    threads = os.environ.get("NUMBA_NUM_THREADS")
    if threads is not None and not (threads.strip().isdigit() and int(threads) > 0):
        raise InputError(f"NUMBA_NUM_THREADS must be a positive integer, got {printable(threads)!r}")


def main(argv=None) -> int:
    """Run one command; return its exit status: 0, 1 on an error, 2 on a
    usage error, 130 on Ctrl-C, 143 on SIGTERM (temporary files removed)."""
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        with sigterm_raises():
            _check_environment()
            return args.func(args) or 0
    except BrokenPipeError:
        raise  # not an error: the reader went away; see run()
    except (Mnv2refError, OSError) as error:
        print(f"mnv2ref: error: {printable(error)}", file=sys.stderr)
    except Terminated:
        print("mnv2ref: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mnv2ref: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("MNV2REF_DEBUG"):
            raise
        print(f"mnv2ref: internal error: {type(error).__name__}: {printable(error)} "
              "(set MNV2REF_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
    return 1


def run() -> None:
    """The console-script entry point: `main`, quiet when its output pipe closes early
    (`mnv2ref classify images/ | head`), as Unix tools are."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    raise SystemExit(code)
