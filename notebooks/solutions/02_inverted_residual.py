"""Solutions to the exercises of 02_inverted_residual.ipynb (one function per exercise)."""

import numpy as np

from mnv2ref.architecture import Bottleneck


def residual_flags(v2_def):
    channels, flags = v2_def[0].channels, []
    for row in v2_def:
        if not isinstance(row, Bottleneck):
            continue
        for repeat in range(row.n):
            stride = row.s if repeat == 0 else 1
            flags.append(stride == 1 and channels == row.c)
            channels = row.c
    return flags


def readout_residual_mine(features, target):
    f = features.reshape(-1, features.shape[-1])
    y = target.reshape(-1, target.shape[-1])
    design = np.hstack([f, np.ones((len(f), 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return np.linalg.norm(y - design @ coef) / np.linalg.norm(y - y.mean(axis=0))


def fold_bn(w, gamma, beta, mean, variance, epsilon=1e-3):
    scale = gamma / np.sqrt(variance + epsilon)
    return w * scale, beta - mean * scale
