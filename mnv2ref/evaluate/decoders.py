"""How much does the JPEG decoder change the answers? (`python3 -m mnv2ref.evaluate.decoders`)

TensorFlow's `decode_jpeg` defaults to ``dct_method=""``, which its kernel
maps to libjpeg's ``JDCT_IFAST`` ("the TensorFlow-chosen default is IFAST,
sacrificing decoding image quality for speed", decode_image_op.cc), with
fancy chroma upsampling. Pillow, and so `load_image`, decodes with
``JDCT_ISLOW``, the accurate integer DCT. TF-slim's evaluation therefore saw
slightly different pixels than we do for the same ImageNet JPEG.

This study decodes JPEGs made from the shared photos at several qualities
both ways -- Pillow, and libjpeg-turbo with ``JDCT_IFAST`` + fancy
upsampling through `simplejpeg` (``fastdct=True, fastupsample=False``, the
settings of TensorFlow's default; `pip install simplejpeg`) -- and reports
the pixel differences and what they do to the top-1, the top-5 and the
probabilities. For comparison, the same figures for uniform noise of +-1
and +-2 levels added to Pillow's pixels.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

from ..errors import MissingDependencyError
from ..preprocessing import load_image, preprocess
from .bench import IMAGENET_LIKE_SIZES, default_weights, make_jpegs
from .pipeline import _classifiers, top_k

QUALITIES = (75, 90, 95)


def decode_like_tensorflow(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB decoded with libjpeg-turbo's IFAST DCT and fancy upsampling."""
    try:
        import simplejpeg
    except ImportError:
        raise MissingDependencyError("the decoder study needs simplejpeg: pip install simplejpeg") from None
    with open(path, "rb") as f:
        return simplejpeg.decode_jpeg(f.read(), colorspace="RGB", fastdct=True, fastupsample=False)


def _outputs(model, images):
    """(probabilities, global-pool embeddings) of uint8 images."""
    x = np.stack([preprocess(i) for i in images])
    return model.predict(x), model.embed(x)


def _effect(model, reference, images) -> dict:
    """Top-1 / top-5 agreement, probability gaps and the relative change of the
    embedding of `images` against the (probabilities, embeddings) `reference`."""
    probs, embeddings = _outputs(model, images)
    change = np.linalg.norm(embeddings - reference[1], axis=1) / np.linalg.norm(reference[1], axis=1)
    reference = reference[0]
    ours, _ = top_k(reference)
    theirs, _ = top_k(probs)
    gap = np.abs(probs - reference).max(axis=1)
    return {"top1_agreement": float(np.mean(ours[:, 0] == theirs[:, 0])),
            "top5_same_set": float(np.mean([set(a) == set(b) for a, b in zip(ours, theirs)])),
            "max_gap": float(gap.max()), "median_gap": float(np.median(gap)),
            "embedding_change": float(np.median(change))}


def _row(name: str, model, reference, pillow, other) -> dict:
    """Pixel differences of the images `other` from Pillow's, and their effect."""
    difference = np.concatenate([np.abs(a.astype(int) - b).ravel() for a, b in zip(pillow, other)])
    return {"decoder": name, "max_level": int(difference.max()), "mean_level": float(difference.mean()),
            "pixels_differing": float(np.mean(difference > 0)), **_effect(model, reference, other)}


def study(weights=None, count: int = 64, qualities=QUALITIES, seed: int = 0) -> list:
    """One row per quality (and per noise level): pixel differences and their effect."""
    model = _classifiers(str(weights or default_weights()), True, None)[0]
    rng = np.random.default_rng(seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for quality in qualities:
            paths = make_jpegs(f"{folder}/{quality}", count, IMAGENET_LIKE_SIZES, quality, seed=seed)
            pillow = [load_image(p) for p in paths]
            reference = _outputs(model, pillow)
            rows.append(_row(f"IFAST, quality {quality}", model, reference, pillow,
                             [decode_like_tensorflow(p) for p in paths]))
        for level in (1, 2):  # on the last quality's images
            noisy = [np.clip(i.astype(int) + rng.integers(-level, level + 1, i.shape), 0, 255).astype(np.uint8)
                     for i in pillow]
            rows.append(_row(f"noise +-{level}, quality {quality}", model, reference, pillow, noisy))
    return rows


def format_study(rows: list) -> str:
    """The study as a Markdown table."""
    header = ("| decoded with | max diff | mean diff | pixels differing | top-1 agrees | top-5 set same "
              "| max prob gap | median gap | embedding change (median) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['max_level']} | {r['mean_level']:.3f} "
                     f"| {r['pixels_differing']:.1%} | {r['top1_agreement']:.1%} "
                     f"| {r['top5_same_set']:.1%} | {r['max_gap']:.2e} "
                     f"| {r['median_gap']:.2e} | {r['embedding_change']:.2%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_study(study(sys.argv[1] if len(sys.argv) > 1 else None)))
