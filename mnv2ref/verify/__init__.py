"""Verify another MobileNetV2 against the reference, endpoint by endpoint.

    report = mnv2ref.verify("their_model.onnx")     # or .xml, .tflite, .h5/.keras, .npz, a callable
    print(report.format())                          # table, hints, verdict
    report.exit_code                                # 0 within tolerance, 1 diverges

The foreign model and the reference run on the same images; its input
interface is detected (`interface.py`), its intermediate tensors are mapped
onto our endpoints (`mapping.py`) and compared with `compare.relative_error`
(max error relative to the endpoint's range) and the cosine similarity; the
first endpoint beyond tolerance is explained, where a classic porting bug
explains it (`hints.py`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..compare import relative_error
from .foreign import ForeignModel, TensorInfo
from .interface import describe, detect, identify, reference_input, spatial_size
from .mapping import align, to_ours
from .report import TOLERANCES, EndpointMatch, VerifyReport, cosine_similarity
from .runtimes import load_foreign

__all__ = ["verify", "load_foreign", "VerifyReport", "EndpointMatch", "ForeignModel", "TensorInfo",
           "TOLERANCES"]

# Beyond this error at their first endpoint no interface fits at all.
NOTHING_FITS = 0.05


def verify(model, images=None, weights=None, tolerance: Optional[float] = None,
           threads: Optional[int] = None, use_ema: bool = True) -> VerifyReport:
    """Compare a foreign MobileNetV2 with the reference and say where it
    first goes wrong and why.

    model: a path (.onnx, OpenVINO .xml, .tflite, Keras .h5/.keras, an
        activation dump .npz/.h5 with an `input` array) or a callable
        f(x) -> {name: array} taking our input (N, H, W, 3) RGB [-1, 1];
    images: image paths (default the bundled photo); weights: as
        `resources.find_weights` (or a `MobileNetV2`); use_ema: the
        checkpoint's moving averages (TF-slim evaluation) or its raw values;
    tolerance: max error relative to each endpoint's range (default by the
        model's precision: 5e-5 for float32); threads: the foreign runtime's.
    Raises an Mnv2refError when the model cannot be run."""
    from ..model import MobileNetV2
    from ..resources import find_weights
    from .runtimes.activations import DumpModel

    reference = weights if isinstance(weights, MobileNetV2) else MobileNetV2.load(
        find_weights(weights), use_ema=use_ema)
    foreign = model if isinstance(model, ForeignModel) else load_foreign(model, threads=threads)
    tolerance = TOLERANCES.get(foreign.precision, TOLERANCES["float32"]) if tolerance is None else float(tolerance)
    x = reference_input(images, spatial_size(foreign.input_shape))
    notes, hints, rows = [], [], []
    first = None

    if isinstance(foreign, DumpModel):
        interface, input_error = identify(foreign.input, x)
        if interface is None:
            from ..errors import InputError

            raise InputError(f"{foreign.source}: its `input` {foreign.input.shape} is no image batch of "
                             f"the size of ours {x.shape}")
        from ..interfaces import to_network_input

        theirs_input = to_network_input(foreign.input, **interface)
        rows.append(EndpointMatch("input", "input", input_error, cosine_similarity(theirs_input, x)))
        if input_error > tolerance:
            first = "input"
            hints += _input_hints(theirs_input, images, tolerance)
        x = theirs_input  # their tensors were computed from their input: so are ours
        ours = reference.endpoints(x)
        outputs = dict(foreign.arrays)
    else:
        ours = reference.endpoints(x)
        interface, tried = detect(foreign, reference, x, ours)
        foreign.interface = interface
        outputs = foreign.run(foreign.native_input(x))
        declared = {k: v for k, v in (foreign.declared or {}).items() if k in ("color", "scale")}
        mismatch = {k: v for k, v in declared.items() if interface[k] != v}
        best = min(tried.values())
        if mismatch:
            first = "input"
            hints += [_interface_hint(foreign, interface, mismatch)]
        elif len(tried) > 1:
            notes.append(f"input interface detected: {describe(interface)} (error of their first endpoint "
                         f"with it {best:.1e}; the next best candidate "
                         f"{sorted(tried.values())[1]:.1e})")
        if best > NOTHING_FITS:
            hints.append(f"no input interface fits: with the best one ({describe(interface)}) their first "
                         f"endpoint is still {best:.1e} off; check the colour order (RGB/BGR), the scale "
                         "([-1, 1] or 0-255) and the mean/std of their preprocessing")

    shapes = {k: v.shape for k, v in ours.items()}
    mapping = align(reference, shapes, foreign.tensors, {k: v.shape for k, v in outputs.items()},
                    interface["layout"])
    theirs = {}
    for name, ours_value in ours.items():
        if name not in mapping:
            rows.append(EndpointMatch(name, None, None, None))
            continue
        tensor, how = mapping[name]
        theirs[name] = to_ours(outputs[tensor], how, ours_value.shape)
        rows.append(EndpointMatch(name, tensor, relative_error(theirs[name], ours_value),
                                  cosine_similarity(theirs[name], ours_value)))
    if foreign.precision != "float32":
        notes.append(f"a {foreign.precision} model: its error grows layer by layer by design; judged "
                     f"with the {foreign.precision} tolerance {tolerance:g}")
    divergent = next((r.name for r in rows if r.foreign is not None and r.name != "input"
                      and r.max_rel_err > tolerance), None)
    if divergent is not None and first is None and foreign.precision == "float32":
        hints += _layer_hints(reference, divergent, x, ours, theirs, tolerance)
    first = first or divergent
    if not mapping:
        notes.append("none of their tensors could be matched to an endpoint")
    return VerifyReport(model=foreign.source, interface=interface, precision=foreign.precision,
                        endpoints=rows, first_divergence=first, hints=hints, tolerance=tolerance, notes=notes)


def _layer_hints(reference, first, x, ours, theirs, tolerance) -> list:
    from .hints import explain, raw_twin

    return explain(reference, first, x, ours, theirs, tolerance, raw_model=raw_twin(reference))


def _input_hints(theirs_input, images, tolerance) -> list:
    from ..resources import EXAMPLE_IMAGE
    from .hints import explain_input

    return explain_input(theirs_input, images or [EXAMPLE_IMAGE], tolerance)


def _interface_hint(foreign, interface, mismatch) -> str:
    what = {"color": "colour order", "scale": "input scale"}
    said = ", ".join(f"{what[k]} {foreign.declared[k]}" for k in mismatch)
    found = ", ".join(f"{interface[k]}" for k in mismatch)
    kind = "RGB/BGR swap" if "color" in mismatch else "[-1,1]/0-255 mix-up"
    if len(mismatch) == 2:
        kind = "RGB/BGR swap and [-1,1]/0-255 mix-up"
    return (f"{kind}: the model declares {said}, but only {found} input makes it agree with the "
            f"reference (detected interface {describe(interface)})")
