"""Each NumPy layer against a slow, obviously correct loop on small random arrays."""

import numpy as np
import pytest

from mnv2ref import layers as L
from mnv2ref.architecture import same_padding
from mnv2ref.errors import InputError

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def loop_conv(x, w, stride, padding, depthwise=False):
    """Direct definition: out[n, oy, ox, o] = sum over taps and inputs of
    x[n, oy*s + i - top, ox*s + j - left, c] * w[i, j, c, o], zero outside."""
    n, h, wd, c = x.shape
    k = w.shape[0]
    if padding == "SAME":
        top, _, out_h = same_padding(h, k, stride)
        left, _, out_w = same_padding(wd, k, stride)
    else:
        top = left = 0
        out_h, out_w = (h - k) // stride + 1, (wd - k) // stride + 1
    cout = c if depthwise else w.shape[3]
    out = np.zeros((n, out_h, out_w, cout), dtype=np.float64)
    for b in range(n):
        for oy in range(out_h):
            for ox in range(out_w):
                for i in range(k):
                    for j in range(k):
                        y, xx = oy * stride + i - top, ox * stride + j - left
                        if 0 <= y < h and 0 <= xx < wd:
                            if depthwise:
                                out[b, oy, ox] += x[b, y, xx] * w[i, j, :, 0]
                            else:
                                out[b, oy, ox] += x[b, y, xx] @ w[i, j]
    return out


def rel_err(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,stride,padding", [((7, 5), 1, "SAME"), ((7, 5), 2, "SAME"),
                                                 ((8, 6), 2, "SAME"), ((9, 10), 2, "VALID"),
                                                 ((1, 1), 2, "SAME")])
def test_conv2d_and_depthwise_match_loops(dtype, size, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size, 3)).astype(dtype)
    if padding == "VALID" and min(size) < 3:
        pytest.skip("too small for VALID")
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    out = L.conv2d(x, w, stride, padding)
    assert out.dtype == dtype
    assert rel_err(out, loop_conv(x, w.astype(dtype), stride, padding)) < TOL[dtype]

    wd = rng.standard_normal((3, 3, 3, 1)).astype(np.float32)
    out = L.depthwise_conv2d(x, wd, stride, padding)
    assert out.dtype == dtype
    assert rel_err(out, loop_conv(x, wd.astype(dtype), stride, padding, depthwise=True)) < TOL[dtype]


def test_same_padding_is_asymmetric_like_tensorflow():
    assert same_padding(224, 3, 2) == (0, 1, 112)
    assert same_padding(225, 3, 2) == (1, 1, 113)
    assert same_padding(7, 3, 1) == (1, 1, 7)
    assert same_padding(1, 3, 2) == (1, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_conv2d(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 6)).astype(dtype)
    w = rng.standard_normal((1, 1, 6, 4)).astype(np.float32)
    out = L.pointwise_conv2d(x, w)
    assert out.dtype == dtype and out.shape == (2, 5, 3, 4)
    assert rel_err(out, loop_conv(x, w.astype(dtype), 1, "VALID")) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_and_folding_agree(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 5, 3)).astype(dtype)
    gamma, beta, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2, 4).astype(np.float32)
    y = L.batch_norm(x[..., :1].repeat(4, -1), gamma, beta, mean, var)
    want = (x[..., :1].astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + 1e-3) * gamma + beta
    assert y.dtype == dtype and rel_err(y, want) < TOL[dtype] * 10

    w = rng.standard_normal((3, 3, 3, 4)).astype(dtype)
    folded_w, bias = L.fold_batch_norm(w, gamma, beta, mean, var)
    unfolded = L.batch_norm(L.conv2d(x, w, 2), gamma, beta, mean, var)
    assert rel_err(L.conv2d(x, folded_w, 2) + bias, unfolded) < TOL[dtype] * 10

    wd = rng.standard_normal((3, 3, 4, 1)).astype(dtype)
    x4 = rng.standard_normal((1, 6, 5, 4)).astype(dtype)
    folded_w, bias = L.fold_batch_norm(wd, gamma, beta, mean, var, depthwise=True)
    unfolded = L.batch_norm(L.depthwise_conv2d(x4, wd), gamma, beta, mean, var)
    assert rel_err(L.depthwise_conv2d(x4, folded_w) + bias, unfolded) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu6_pool_softmax(dtype):
    x = np.array([[-3.0, 0.0, 2.5, 6.0, 9.0]], dtype=dtype)
    assert L.relu6(x).tolist() == [[0.0, 0.0, 2.5, 6.0, 6.0]] and L.relu6(x).dtype == dtype

    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 5, 7, 3)).astype(dtype)
    pooled = L.global_avg_pool(a)
    assert pooled.shape == (2, 1, 1, 3) and pooled.dtype == dtype
    loops = np.array([[sum(a[n, i, j, c] for i in range(5) for j in range(7)) / 35 for c in range(3)]
                      for n in range(2)])
    assert rel_err(pooled[:, 0, 0], loops) < TOL[dtype]

    logits = np.array([[1000.0, 1001.0, 999.0], [0.0, 0.0, 0.0]], dtype=dtype)
    p = L.softmax(logits)
    assert p.dtype == dtype and np.allclose(p.sum(-1), 1)
    e = np.exp(np.array([-1.0, 0.0, -2.0]))
    assert rel_err(p[0], e / e.sum()) < TOL[dtype]
    assert np.allclose(p[1], 1 / 3)


def test_bad_padding_and_too_small_input_are_refused():
    x = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(InputError, match="padding"):
        L.conv2d(x, np.zeros((3, 3, 3, 1), np.float32), 1, "same")
    with pytest.raises(InputError, match="too small"):
        L.conv2d(x, np.zeros((3, 3, 3, 1), np.float32), 1, "VALID")
