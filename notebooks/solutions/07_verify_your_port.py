"""Solutions to the exercises of 07_verify_your_port.ipynb (one function per exercise)."""

import numpy as np

from mnv2ref import layers as L


def above_six(outputs):
    relu6 = [n for n in outputs if n in ("layer_1", "layer_19")
             or n.endswith(("/expansion_output", "/depthwise_output"))]
    return [n for n in relu6 if outputs[n].max() > 6]


def shift_image(x, dy, dx):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return padded[:, 1 - dy:1 - dy + x.shape[1], 1 - dx:1 - dx + x.shape[2]]


def port_conv_bn_fixed(x, cb):
    if cb.spec.kind == "depthwise":
        y = L.depthwise_conv2d(x, cb.weights, cb.spec.stride, "SAME")
    else:
        y = L.conv2d(x, cb.weights, cb.spec.stride, "SAME")
    y = L.batch_norm(y, cb.gamma, cb.beta, cb.moving_mean, cb.moving_variance, epsilon=1e-3)
    return L.relu6(y) if cb.spec.relu6 else y
