"""Comparing endpoints with golden outputs of another framework.

The measure used throughout mnv2ref is the error relative to the endpoint's
range, max|ours - reference| / max|reference|: it is scale-free, so one
tolerance (5e-5 in float32) serves every layer, and it is not blown up by
the many activations that are exactly 0 after a ReLU6.
"""

from __future__ import annotations


import numpy as np

from .errors import InputError


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max|ours - reference| / max|reference|, computed in float64."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise InputError(f"cannot compare shape {ours.shape} with reference shape {reference.shape}")
    scale = np.abs(reference).max() if reference.size else 0.0
    return float(np.abs(ours - reference).max() / scale) if scale else float(np.abs(ours).max())


def load_golden(path) -> dict:
    """A golden file (TensorFlow's .npz, or one of `mnv2ref golden`) as
    {endpoint name: array} (`input` is the network input)."""
    from .golden import read_golden

    return read_golden(path)[0]


def compare_endpoints(endpoints: dict, golden: dict) -> dict:
    """{name: relative error} for every endpoint of `golden` except `input`."""
    return {name: relative_error(endpoints[name], value)
            for name, value in golden.items() if name != "input"}
