"""Assertions for other projects' test suites.

    from mnv2ref.testing import assert_endpoints_close

    def test_my_port_matches_the_reference():
        golden = "tests/data/mnv2_golden.npz"          # from `mnv2ref golden`
        x = np.load(golden)["input"]
        assert_endpoints_close(my_model.endpoints(x), golden)

The failure message names the first endpoint (in network order) beyond the
tolerance, its error, and where the largest error sits, with both values:
the first failing endpoint is where a port goes wrong, the later ones only
inherit the error.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np

from .compare import relative_error
from .golden import TO_LAYOUT, TOLERANCE_MEASURE, TOLERANCES, endpoint_order, read_golden, transpose_layout

OTHER_LAYOUT = {"NHWC": "NCHW", "NCHW": "NHWC"}


def assert_endpoints_close(theirs: Mapping, golden: Union[Mapping, str, os.PathLike],
                           tolerance: Optional[float] = None) -> dict:
    """Assert that every endpoint in both `theirs` and `golden` is within
    `tolerance` of the golden, as max|theirs - golden| / max|golden|
    (`mnv2ref.compare.relative_error`); return {endpoint: error}.

    theirs: {endpoint name: array}, e.g. `input`, `layer_1`, ...,
      `layer_3/expansion_output`, `global_pool`, `Logits`.
    golden: a dict of the same form, or the path of a golden file
      (`mnv2ref golden`, or TensorFlow's .npz goldens); a file brings its
      recommended tolerance and its layout.
    tolerance: default the file's recommended one, else 5e-5 (float32).

    Each 4-d array of `theirs` may be in the other layout (NCHW vs NHWC)
    when its shape says so. Raises AssertionError when an endpoint is beyond
    the tolerance or has another shape, or when no endpoint is in common."""
    __tracebackhide__ = True  # pytest shows the message, not this frame
    if isinstance(golden, Mapping):
        expected, metadata = dict(golden), {}
    else:
        expected, metadata = read_golden(golden)
    if tolerance is None:
        tolerance = metadata.get("tolerance", TOLERANCES["float32"])
    common = sorted((name for name in expected if name in theirs), key=endpoint_order)
    if not common:
        raise AssertionError(f"no endpoint in common: theirs are {_names(theirs)}; "
                             f"the golden's are {_names(expected)}")
    golden_layout = metadata.get("layout") or _guess_layout(expected)
    layouts = _their_layouts(theirs, expected, common, golden_layout)

    errors, failures = {}, []
    for name in common:
        value = transpose_layout(theirs[name], layouts[name], golden_layout)
        if value.shape != np.shape(expected[name]):
            failures.append((name, f"shape {np.shape(theirs[name])}, golden {np.shape(expected[name])}"))
            continue
        errors[name] = relative_error(value, expected[name])
        if not errors[name] <= tolerance:  # NaN fails too
            failures.append((name, f"{errors[name]:.3g}"))
    if failures:
        raise AssertionError(_failure_message(theirs, expected, failures, errors, tolerance,
                                              layouts[failures[0][0]], golden_layout, len(common)))
    return errors


def _names(arrays: Mapping, limit: int = 8) -> str:
    names = sorted(arrays, key=endpoint_order)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _guess_layout(arrays: Mapping) -> str:
    """NCHW when the golden's `input` has its 3 colour channels on axis 1."""
    x = arrays.get("input")
    return "NCHW" if x is not None and np.ndim(x) == 4 and np.shape(x)[1] == 3 != np.shape(x)[3] else "NHWC"


def _their_layouts(theirs: Mapping, expected: Mapping, common: list, golden_layout: str) -> dict:
    """{endpoint: the layout of their array}. An endpoint whose shape fits
    only one way is in that layout; one that fits both ways (H = W = C, or
    not 4-d) is taken to be in the layout most of the others are in (the
    golden's on a tie), so a square tensor is not read the wrong way round."""
    other = OTHER_LAYOUT[golden_layout]
    told = {}
    for name in common:
        shape, their_shape = tuple(np.shape(expected[name])), tuple(np.shape(theirs[name]))
        as_is = their_shape == shape
        transposed = len(their_shape) == 4 and _permuted(their_shape, golden_layout) == shape
        if as_is != transposed:
            told[name] = golden_layout if as_is else other
    votes = list(told.values())
    usual = other if votes.count(other) > votes.count(golden_layout) else golden_layout
    return {name: told.get(name, usual) for name in common}


def _failure_message(theirs, expected, failures, errors, tolerance, their_layout, golden_layout,
                     compared: int) -> str:
    name, what = failures[0]
    if name not in errors:
        head = f"{name} has the wrong shape: theirs {what}"
    else:
        value = transpose_layout(theirs[name], their_layout, golden_layout)
        reference = np.asarray(expected[name])
        index, their_index = _worst_index(value, reference, their_layout, golden_layout)
        where = f"golden{list(index)}" + (f" ({golden_layout}) = theirs{list(their_index)} ({their_layout})"
                                          if their_layout != golden_layout else "")
        head = (f"{name} differs from the golden: error {errors[name]:.3g} "
                f"(max|golden| {np.abs(reference).max():.6g}) > tolerance {tolerance:g} "
                f"[{TOLERANCE_MEASURE}]; largest error at {where}: "
                f"theirs {value[index]:.8g} vs golden {reference[index]:.8g}")
    others = "; also failing: " + ", ".join(f"{n} ({w})" for n, w in failures[1:6]) if failures[1:] else ""
    more = f", ... ({len(failures) - 6} more)" if len(failures) > 6 else ""
    return f"{head}{others}{more} [{len(failures)} of {compared} endpoints fail]"


def _permuted(index: tuple, layout: str) -> tuple:
    """A 4-d shape or index in the other layout, taken into `layout`."""
    return tuple(index[axis] for axis in TO_LAYOUT[layout])


def _worst_index(value: np.ndarray, reference: np.ndarray, their_layout: str, golden_layout: str) -> tuple:
    """(index in the golden, the same element's index in their array) of the
    largest |difference|; a NaN counts as the largest."""
    difference = np.abs(np.asarray(value, np.float64) - np.asarray(reference, np.float64))
    nan = np.isnan(difference)
    flat = int(np.argmax(nan)) if nan.any() else int(np.argmax(difference))
    index = tuple(int(i) for i in np.unravel_index(flat, difference.shape))
    if their_layout == golden_layout or len(index) != 4:
        return index, index
    return index, _permuted(index, their_layout)
