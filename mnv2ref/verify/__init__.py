"""Verify another MobileNetV2 against the reference, endpoint by endpoint.

    report = mnv2ref.verify("their_model.onnx")     # or .xml, .tflite, .h5/.keras, .npz, a callable
    print(report.format())                          # table, hints, verdict
    report.exit_code                                # 0 within tolerance, 1 diverges

The foreign model and the reference (in float64) run on the same images;
its input interface is detected (`interface.py`), its intermediate tensors
are mapped onto our endpoints (`mapping.py`) and compared with
`compare.relative_error` (max error relative to the endpoint's range) and
the cosine similarity; the
first endpoint beyond tolerance is explained, where a classic porting bug
explains it (`hints.py`).
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..compare import relative_error
from .foreign import ForeignModel, TensorInfo
from .interface import (describe, detect, expected, identify, mismatch_hint, reference_input, spatial_size,
                        to_network)
from .mapping import align, to_ours, without_background
from .report import COSINE_FLOORS, TOLERANCES, EndpointMatch, VerifyReport, beyond, cosine_similarity
from .runtimes import load_foreign

__all__ = ["verify", "load_foreign", "VerifyReport", "EndpointMatch", "ForeignModel", "TensorInfo",
           "TOLERANCES"]

# Beyond this error at their first endpoint no interface fits at all.
NOTHING_FITS = 0.05


def verify(model, images=None, weights=None, tolerance: Optional[float] = None,
           threads: Optional[int] = None, use_ema: bool = True,
           interface: Optional[dict] = None) -> VerifyReport:
    """Compare a foreign MobileNetV2 with the reference and say where it
    first goes wrong and why.

    model: a path (.onnx, OpenVINO .xml, .tflite, Keras .h5/.keras, an
        activation dump .npz/.h5 with an `input` array) or a callable
        f(x) -> {name: array} taking our input (N, H, W, 3) RGB [-1, 1];
    images: image paths (default the bundled photo); weights: as
        `resources.weights_or_download` (or a `MobileNetV2`); use_ema: the
        checkpoint's moving averages (TF-slim evaluation) or its raw values;
    tolerance: max error relative to each endpoint's range (default by the
        model's precision: 5e-5 for float32); threads: the foreign runtime's;
    interface: the input interface the model is meant to take
        ({"layout", "color", "scale"}); default: what it declares, else the
        model card's for its layout (`interface.expected`).
    Raises an Mnv2refError when the model cannot be run."""
    from ..errors import InputError
    from ..model import MobileNetV2
    from ..resources import weights_or_download
    from .runtimes.activations import DumpModel

    if tolerance is not None and not float(tolerance) > 0:
        raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
    foreign = model if isinstance(model, ForeignModel) else load_foreign(model, threads=threads)
    reference = weights if isinstance(weights, MobileNetV2) else MobileNetV2.load(
        weights_or_download(weights), use_ema=use_ema)
    tolerance = TOLERANCES.get(foreign.precision, TOLERANCES["float32"]) if tolerance is None else float(tolerance)
    images = [images] if isinstance(images, (str, os.PathLike)) else images
    x = reference_input(images, spatial_size(foreign.input_shape))
    if isinstance(foreign, DumpModel):
        run = _run_dump(foreign, reference, x, images, tolerance)
    else:
        run = _run_model(foreign, reference, x, interface)

    accepted = expected(interface or foreign.declared, run.interface["layout"])
    if run.interface not in accepted:
        run.first = "input"
        run.hints.insert(0, mismatch_hint(run.interface, accepted, "the model"))
    elif len(run.tried) > 1:
        run.notes.append(f"input interface detected: {describe(run.interface)} (error of their first endpoint "
                         f"with it {run.tried[describe(run.interface)]:.1e}; the best other candidate "
                         f"{min(e for k, e in run.tried.items() if k != describe(run.interface)):.1e})")

    rows, theirs = _compare(reference, foreign, run)
    if not theirs:
        names = list(run.outputs)
        raise InputError(f"{foreign.source}: none of its tensors ({', '.join(names[:4])}"
                         f"{', ...' if len(names) > 4 else ''}) has the shape of one of our endpoints for "
                         f"input {run.x.shape} (is it a MobileNetV2 of depth multiplier "
                         f"{reference.depth_multiplier:g}?)")
    if foreign.precision != "float32":
        run.notes.append(
            f"a {foreign.precision} model: its error grows layer by layer by design; an endpoint diverges "
            f"beyond {tolerance:g} only if its cosine similarity is also below "
            f"{COSINE_FLOORS[foreign.precision]:g}; error by layer: " + ", ".join(
                f"{r.name} {r.max_rel_err:.1e}" for r in rows
                if r.foreign is not None and "/" not in r.name and r.name != "input"))
    divergent = next((r.name for r in rows if r.name != "input" and beyond(r, tolerance, foreign.precision)),
                     None)
    if divergent is not None and run.first is None and foreign.precision == "float32":
        run.hints += _layer_hints(reference, divergent, run.x, run.ours, theirs, tolerance)
        if not run.hints and run.tried and divergent == next(iter(theirs)) \
                and min(run.tried.values()) > NOTHING_FITS:
            run.hints.append(f"no input interface fits: with the best one ({describe(run.interface)}) their "
                             f"first endpoint is still {min(run.tried.values()):.1e} off (tried RGB and BGR, "
                             "each in [-1, 1], 0-255, [0, 1] and ImageNet mean/std); check the colour order, "
                             "the scale and the mean/std of their preprocessing")
    return VerifyReport(model=foreign.source, interface=run.interface, precision=foreign.precision,
                        endpoints=rows, first_divergence=run.first or divergent, hints=run.hints,
                        tolerance=tolerance, notes=run.notes)


@dataclass
class _Run:
    """Both models run on the same input: ours (endpoints) and theirs (tensors)."""

    interface: dict
    x: np.ndarray             # our network input the endpoints were computed from
    ours: dict
    outputs: dict             # their tensors by their names
    tried: dict = field(default_factory=dict)   # candidate interface -> error (runnable models)
    rows: list = field(default_factory=list)    # rows before the endpoints (a dump's input)
    first: Optional[str] = None
    hints: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _exact(reference, x: np.ndarray) -> tuple:
    """(x, our endpoints) in float64: the network computed exactly, so what a
    float32 model is measured against is its own rounding only."""
    x = x.astype(np.float64)
    return x, reference.endpoints(x)


def _run_model(foreign, reference, x, declared) -> _Run:
    """A runnable model: detect its interface, run it on our input."""
    x64, ours = _exact(reference, x)
    interface, tried = detect(foreign, reference, x, ours, declared)
    foreign.interface = interface
    return _Run(interface, x64, ours, foreign.run(foreign.native_input(x)), tried)


def _run_dump(foreign, reference, x, images, tolerance) -> _Run:
    """A dump: compare its `input` with our preprocessing, then run ours on
    their input, from which their tensors were computed."""
    from ..errors import InputError

    interface, input_error = identify(foreign.input, x)
    if interface is None:
        raise InputError(f"{foreign.source}: its `input` {foreign.input.shape} is no image batch of "
                         f"the size of ours {x.shape}")
    theirs_input = to_network(foreign.input, **interface)
    run = _Run(interface, *_exact(reference, theirs_input), dict(foreign.arrays),
               rows=[EndpointMatch("input", "input", input_error, cosine_similarity(theirs_input, x))])
    if input_error > tolerance:
        run.first = "input"
        run.hints += _input_hints(theirs_input, x, images, tolerance)
    return run


def _compare(reference, foreign, run: _Run) -> tuple:
    """(rows, {endpoint: their tensor in our layout}) for every endpoint."""
    ours = run.ours
    mapping = align(reference, {k: v.shape for k, v in ours.items()}, foreign.tensors,
                    {k: v.shape for k, v in run.outputs.items()}, run.interface["layout"])
    rows, theirs = list(run.rows), {}
    for name, ours_value in ours.items():
        if name not in mapping:
            rows.append(EndpointMatch(name, None, None, None))
            continue
        tensor, how = mapping[name]
        if how == "classes":
            ours_value = without_background(ours)[name]
            run.notes.append(f"{name}: their {tensor} has 1000 classes (Keras's, without background): "
                             "compared with our classes 1..1000")
        theirs[name] = to_ours(run.outputs[tensor], how, ours_value.shape)
        rows.append(EndpointMatch(name, tensor, relative_error(theirs[name], ours_value),
                                  cosine_similarity(theirs[name], ours_value)))
    return rows, theirs


def _layer_hints(reference, first, x, ours, theirs, tolerance) -> list:
    from .hints import explain, raw_twin

    return explain(reference, first, x, ours, theirs, tolerance, raw_model=raw_twin(reference))


def _input_hints(theirs_input, ours_input, images, tolerance) -> list:
    from ..resources import EXAMPLE_IMAGE
    from .hints import explain_input

    return explain_input(theirs_input, ours_input, images or [EXAMPLE_IMAGE], tolerance)


class _CallablePackage(types.ModuleType):
    """`mnv2ref.verify` is this package and, called, the `verify` function:
    `mnv2ref.verify(model)` and `mnv2ref.verify.load_foreign(path)` both work
    (importing the subpackage would otherwise shadow the function)."""

    def __call__(self, *args, **kwargs) -> VerifyReport:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
