"""Solutions to the exercises of 01_depthwise_separable.ipynb (one function per exercise)."""


def same_padding_1d(size, kernel, stride):
    out = -(-size // stride)                                  # ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def factorised_kernel(D, P):
    return D[:, :, :, 0, None] * P[0, 0][None, None]         # (k, k, M, 1) * (1, 1, M, N)


def separable_cost(H, W, M, N, k):
    return H * W * k * k * M * N, H * W * k * k * M + H * W * M * N


def inverted_residual_macs(H, W, C, t):
    return H * W * (C * t * C + 9 * t * C + t * C * C)
