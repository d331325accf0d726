"""The readable NumPy layers of MobileNetV2: the definition of truth.

Every function is pure, takes NHWC arrays and computes in the dtype of its
input `x` (float32 or float64); weights are cast to that dtype. Kernel layouts
are TensorFlow's: a conv kernel is (kh, kw, in, out) and a depthwise kernel is
(kh, kw, channels, 1). The Numba kernels in `kernels.py` are checked against
these functions, and these functions against loops in the tests.
"""

from __future__ import annotations

import numpy as np

from .architecture import BATCH_NORM_EPSILON, same_padding
from .errors import InputError


def pad_same(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """Zero-pad (N, H, W, C) so that a `kernel` x `kernel` window with `stride`
    yields TF `SAME` output, ceil(H / stride) x ceil(W / stride)."""
    top, bottom, _ = same_padding(x.shape[1], kernel, stride)
    left, right, _ = same_padding(x.shape[2], kernel, stride)
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _padded(x: np.ndarray, kernel: int, stride: int, padding: str) -> tuple:
    """Pad for `padding` and return (padded x, output height, output width)."""
    if padding == "SAME":
        x = pad_same(x, kernel, stride)
    elif padding != "VALID":
        raise InputError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    out_h = (x.shape[1] - kernel) // stride + 1
    out_w = (x.shape[2] - kernel) // stride + 1
    if out_h < 1 or out_w < 1:
        raise InputError(f"input of spatial size {x.shape[1]}x{x.shape[2]} is too small "
                         f"for a {kernel}x{kernel} {padding} window")
    return x, out_h, out_w


def _tap(x: np.ndarray, i: int, j: int, stride: int, out_h: int, out_w: int) -> np.ndarray:
    """The input pixels that kernel tap (i, j) sees, one per output position:
    (N, out_h, out_w, C)."""
    return x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]


def _channel_matmul(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(..., Cin) @ (Cin, Cout) -> (..., Cout), the same bits at any BLAS thread count.

    Each output is the sum over Cin in index order, computed by einsum's own
    single-threaded loop. BLAS (`@`) would be about twice as fast, but OpenBLAS
    may split a product's sum between its threads, so its rounding depends on
    the thread count and on the kernel it picked for the CPU (with
    OPENBLAS_CORETYPE=Haswell almost every product of this network changes in
    its last bits between 1 and 2 threads). The reference must not."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.einsum("rc,ck->rk", rows, weights)
    return out.reshape(*x.shape[:-1], weights.shape[1])


def conv2d(x: np.ndarray, weights: np.ndarray, stride: int = 1, padding: str = "SAME") -> np.ndarray:
    """Full convolution (TF's cross-correlation).

    x: (N, H, W, Cin); weights: (k, k, Cin, Cout) -> (N, Ho, Wo, Cout).
    Written as a sum over the k*k kernel taps, each a matrix product over
    channels: the output at a pixel is sum_ij x[pixel*stride + (i, j)] @ w[i, j].
    """
    weights = weights.astype(x.dtype, copy=False)
    kernel = weights.shape[0]
    x, out_h, out_w = _padded(x, kernel, stride, padding)
    out = np.zeros((x.shape[0], out_h, out_w, weights.shape[3]), dtype=x.dtype)
    for i in range(kernel):
        for j in range(weights.shape[1]):
            out += _channel_matmul(_tap(x, i, j, stride, out_h, out_w), weights[i, j])
    return out


def depthwise_conv2d(x: np.ndarray, weights: np.ndarray, stride: int = 1,
                     padding: str = "SAME") -> np.ndarray:
    """Depthwise convolution: one k x k filter per channel, no mixing.

    x: (N, H, W, C); weights: (k, k, C, 1) -> (N, Ho, Wo, C).
    It costs k*k multiplies per output element where a full conv costs
    k*k*Cin: that is where MobileNet's savings come from.
    """
    weights = weights.astype(x.dtype, copy=False)
    kernel = weights.shape[0]
    x, out_h, out_w = _padded(x, kernel, stride, padding)
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), dtype=x.dtype)
    for i in range(kernel):
        for j in range(weights.shape[1]):
            out += _tap(x, i, j, stride, out_h, out_w) * weights[i, j, :, 0]
    return out


def pointwise_conv2d(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """1x1 convolution: a matrix product over channels at every pixel.

    x: (N, H, W, Cin); weights: (1, 1, Cin, Cout) or (Cin, Cout) -> (N, H, W, Cout).
    """
    weights = weights.reshape(weights.shape[-2], weights.shape[-1]).astype(x.dtype, copy=False)
    return _channel_matmul(x, weights)


def batch_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
               variance: np.ndarray, epsilon: float = BATCH_NORM_EPSILON) -> np.ndarray:
    """Inference BatchNorm with the moving statistics, per channel (last axis).

    x: (..., C); gamma, beta, mean, variance: (C,) -> (..., C).
    Computed in TF's order, x * scale + (beta - mean * scale) with
    scale = gamma / sqrt(variance + epsilon), so float32 rounding matches.
    """
    gamma, beta, mean, variance = (a.astype(x.dtype, copy=False) for a in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + x.dtype.type(epsilon))
    return x * scale + (beta - mean * scale)


def fold_batch_norm(weights: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                    variance: np.ndarray, epsilon: float = BATCH_NORM_EPSILON,
                    depthwise: bool = False) -> tuple:
    """Fold inference BatchNorm into the conv before it: returns (weights, bias)
    such that conv(x, weights) + bias == batch_norm(conv(x, original weights)).

    weights: (k, k, Cin, Cout), or with `depthwise` (k, k, C, 1), whose output
    channels are its input channels; gamma, ...: (Cout,) -> ((same as weights), (Cout,)).
    Folding is done in the dtype of `weights`.
    """
    dtype = weights.dtype
    gamma, beta, mean, variance = (a.astype(dtype, copy=False) for a in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + dtype.type(epsilon))
    folded = weights * (scale[:, None] if depthwise else scale)
    return folded, beta - mean * scale


def relu6(x: np.ndarray) -> np.ndarray:
    """min(max(x, 0), 6): a ReLU that saturates, robust in low precision."""
    return np.minimum(np.maximum(x, x.dtype.type(0)), x.dtype.type(6))


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """Mean over the spatial axes, keeping them: (N, H, W, C) -> (N, 1, 1, C).
    Any input size works, which is why the network takes any resolution."""
    return x.mean(axis=(1, 2), keepdims=True, dtype=x.dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis: (..., K) -> (..., K), summing to 1.
    The max is subtracted first so exp never overflows."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
