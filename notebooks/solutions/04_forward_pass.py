"""Solutions to the exercises of 04_forward_pass.ipynb (one function per exercise)."""

import numpy as np


def predicted_macs(macs_1_224, alpha, size):
    return macs_1_224 * alpha ** 2 * (size / 224) ** 2


def streaming_peak(activations, x):
    names = [f"layer_{i}" for i in range(1, 20)]
    inputs = [x] + [activations[n] for n in names[:-1]]
    return max(4 * (a.size + activations[n].size) for n, a in zip(names, inputs) if n != "layer_1")


def receptive_field(convs):
    r, jump = 1, 1
    for kernel, stride in convs:
        r, jump = r + (kernel - 1) * jump, jump * stride
    return r


def top_k(probabilities, k=5):
    order = np.argsort(probabilities)[::-1][:k]
    return [(int(i), float(probabilities[i])) for i in order]
