"""Solutions to the exercises of 05_golden_comparison.ipynb (one function per exercise)."""

import numpy as np


def scale_change(variance, wrong=1e-5, right=1e-3):
    return np.sqrt((variance + right) / (variance + wrong)) - 1


def first_divergence(errors, tolerance=5e-5):
    return next((name for name, error in errors.items() if error > tolerance), None)


def int8_per_channel(w):
    step = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / 127
    step = np.where(step == 0, 1, step)
    return np.clip(np.round(w / step), -127, 127) * step
