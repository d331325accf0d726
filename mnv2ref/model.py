"""MobileNetV2 as a list of small named layers, built from `V2_DEF`.

    model = MobileNetV2.from_checkpoint("model.ckpt")
    for layer in model.layers:          # layer_1 ... layer_19, global_pool, Logits, Predictions
        x = layer(x)

Each layer is a callable object holding its (unfolded) BatchNorm parameters
and calling the readable functions of `layers.py`; this is the path a student
steps through. `backend="numba"` runs the same network with BatchNorm folded
into JIT-compiled kernels (`fast.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np

from . import layers as L
from .architecture import ConvSpec, LayerSpec, layer_specs, logits_spec, variable_shapes
from .errors import InputError, WeightsError
from .interfaces import check_input, to_network_input
from .weights import check_variables, read_h5, select_variables

Capture = Optional[Callable[[str, np.ndarray], None]]
BACKENDS = ("numpy", "numba")


@dataclass(repr=False)
class ConvBN:
    """A conv (full, 1x1 or depthwise) followed by BatchNorm and, unless it is
    a linear projection, ReLU6. (N, H, W, Cin) -> (N, H/stride, W/stride, Cout)."""

    spec: ConvSpec
    weights: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.spec.kind == "depthwise":
            y = L.depthwise_conv2d(x, self.weights, self.spec.stride)
        elif self.spec.kernel == 1 and self.spec.stride == 1:
            y = L.pointwise_conv2d(x, self.weights)
        else:
            y = L.conv2d(x, self.weights, self.spec.stride)
        y = L.batch_norm(y, self.gamma, self.beta, self.moving_mean, self.moving_variance)
        return L.relu6(y) if self.spec.relu6 else y

    def folded(self, dtype=None) -> tuple:
        """(weights, bias) with this BatchNorm folded in, computed in `dtype`
        (default: the stored weights' dtype). Folding in float64 and rounding
        once to float32 afterwards halves the fold's own rounding error."""
        weights = self.weights if dtype is None else self.weights.astype(dtype)
        return L.fold_batch_norm(weights, self.gamma, self.beta, self.moving_mean,
                                 self.moving_variance, depthwise=self.spec.kind == "depthwise")

    def __repr__(self):
        return f"ConvBN({self.spec.scope}, {self.spec.kind}, {self.weights.shape})"


@dataclass(repr=False)
class ConvLayer:
    """A numbered layer that is one conv: the stem `layer_1` and `layer_19`."""

    name: str
    spec: LayerSpec
    conv: ConvBN

    def __call__(self, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        return self.conv(x)

    def __repr__(self):
        c = self.spec.convs[0]
        return f"ConvLayer({self.name}: {c.in_channels}->{c.out_channels}, {c.kernel}x{c.kernel}/{c.stride})"


@dataclass(repr=False)
class InvertedResidual:
    """Expand (1x1, ReLU6) -> depthwise (3x3, ReLU6) -> project (1x1, linear),
    plus the input when the shapes allow: (N, H, W, Cin) -> (N, H/s, W/s, Cout).

    The block is thin at its ends and wide in the middle (the opposite of a
    ResNet bottleneck), and the projection has no ReLU6 because a ReLU on a
    few channels destroys information the next block needs."""

    name: str
    spec: LayerSpec
    expand: Optional[ConvBN]
    depthwise: ConvBN
    project: ConvBN

    def __call__(self, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        capture = capture or _ignore
        h = x
        if self.expand is not None:
            h = self.expand(h)
            capture(f"{self.name}/expansion_output", h)
        h = self.depthwise(h)
        capture(f"{self.name}/depthwise_output", h)
        h = self.project(h)
        if self.spec.residual:
            capture(f"{self.name}/projection_output", h)
            h = h + x
        return h

    def __repr__(self):
        return (f"InvertedResidual({self.name}: {self.spec.in_channels}->{self.spec.out_channels}, "
                f"stride {self.spec.stride}{', residual' if self.spec.residual else ''})")


@dataclass(repr=False)
class GlobalPool:
    """(N, H, W, C) -> (N, 1, 1, C): the embedding."""

    name: str = "global_pool"

    def __call__(self, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        return L.global_avg_pool(x)

    def __repr__(self):
        return "GlobalPool()"


@dataclass(repr=False)
class Logits:
    """The classifier, a 1x1 conv with bias: (N, 1, 1, C) -> (N, classes)."""

    weights: np.ndarray
    biases: np.ndarray
    name: str = "Logits"

    def __call__(self, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        y = L.pointwise_conv2d(x, self.weights) + self.biases.astype(x.dtype, copy=False)
        return y.reshape(y.shape[0], y.shape[-1])

    def __repr__(self):
        return f"Logits({self.weights.shape[2]}->{self.weights.shape[3]})"


@dataclass(repr=False)
class Predictions:
    """Softmax over the classes: (N, classes) -> (N, classes)."""

    name: str = "Predictions"

    def __call__(self, x: np.ndarray, capture: Capture = None) -> np.ndarray:
        return L.softmax(x)

    def __repr__(self):
        return "Predictions()"


def _ignore(name: str, value: np.ndarray) -> None:
    pass


@dataclass(repr=False)
class MobileNetV2:
    """A MobileNetV2 with its weights. Build it with `from_checkpoint` or
    `from_h5`; `num_classes` is 0 for a backbone without classifier."""

    variables: Mapping
    metadata: dict = field(default_factory=dict)
    source: str = "weights"

    def __post_init__(self):
        # Every loader (checkpoint, HDF5, Keras, a dict of arrays) ends here.
        self.depth_multiplier, self.num_classes = check_variables(self.variables, self.source)
        self.specs = layer_specs(self.depth_multiplier)
        self.layers = self._build_layers()
        self._fast = None

    @classmethod
    def from_checkpoint(cls, prefix, use_ema: bool = True) -> "MobileNetV2":
        """Load from a TF checkpoint (`PREFIX.index` + data shards). With
        `use_ema` the ExponentialMovingAverage shadows are used where the
        checkpoint has them, as TF-slim evaluation does."""
        from .checkpoint import read_checkpoint

        checkpoint = read_checkpoint(prefix)
        source = str(checkpoint.index_file)
        variables, used_ema = select_variables(checkpoint, use_ema, source=source)
        return cls(variables, {"use_ema": used_ema, "source": source}, source)

    @classmethod
    def pretrained(cls, depth_multiplier: float = 1.0, resolution: int = 224) -> "MobileNetV2":
        """The published TF-slim checkpoint for (depth multiplier, resolution),
        downloaded with a progress bar, checked (size and SHA-256 where pinned),
        converted and cached on first use (`$MNV2REF_HOME`, else
        `$XDG_CACHE_HOME/mnv2ref`, else `~/.cache/mnv2ref`); later calls read
        the cache and make no request. EMA weights, 1001 classes."""
        from .resources import pretrained_weights

        return cls.from_h5(pretrained_weights(depth_multiplier, resolution))

    @classmethod
    def random(cls, depth_multiplier: float = 1.0, num_classes: int = 1001, seed: int = 0) -> "MobileNetV2":
        """A model with seeded random weights: every shape, FLOP and timing is
        the real network's, no value or class is. Conv kernels are drawn with
        He scaling (std sqrt(2 / fan-in)) and BatchNorm is the identity, so
        activations keep a sensible range through all the layers."""
        rng = np.random.default_rng(seed)
        variables = {}
        for name, shape in variable_shapes(depth_multiplier, num_classes).items():
            leaf = name.rsplit("/", 1)[-1]
            if leaf in ("gamma", "moving_variance"):
                value = np.ones(shape)
            elif leaf in ("beta", "moving_mean", "biases"):
                value = np.zeros(shape)
            else:  # conv kernels (k, k, in, out) and depthwise kernels (k, k, C, 1)
                fan_in = shape[0] * shape[1] * (1 if "depthwise" in name else shape[2])
                value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            variables[name] = value.astype(np.float32)
        return cls(variables, {"random_seed": seed}, f"random weights (seed {seed})")

    @classmethod
    def from_h5(cls, path) -> "MobileNetV2":
        """Load from an HDF5 file written by `mnv2ref.convert`."""
        variables, attributes = read_h5(path)
        return cls(variables, attributes, str(path))

    @classmethod
    def from_keras_h5(cls, path) -> "MobileNetV2":
        """Load a Keras Applications weights file
        (`mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}[_no_top].h5`).
        Keras dropped the background class: a model with a top has
        `num_classes` 1000, Keras class k being TF-slim class k + 1 (see `keras.py`)."""
        from .keras import read_keras_h5

        variables, attributes = read_keras_h5(path)
        return cls(variables, attributes, str(path))

    @classmethod
    def load(cls, path, use_ema: bool = True) -> "MobileNetV2":
        """`from_h5` (or `from_keras_h5` for a file in Keras's layout) for an
        .h5/.hdf5 file, else `from_checkpoint`."""
        if str(path).lower().endswith((".h5", ".hdf5")):
            from .keras import is_keras_h5

            return cls.from_keras_h5(path) if is_keras_h5(path) else cls.from_h5(path)
        return cls.from_checkpoint(path, use_ema)

    def _build_layers(self) -> list:
        v = self.variables  # every shape was checked by check_variables (infer_config)

        def conv_bn(spec: ConvSpec) -> ConvBN:
            return ConvBN(spec, v[spec.weights_name], *(v[spec.batch_norm_name(leaf)] for leaf in
                                                         ("gamma", "beta", "moving_mean", "moving_variance")))

        built = []
        for spec in self.specs:
            if spec.is_block:
                expand = spec.conv("expand")
                built.append(InvertedResidual(spec.endpoint, spec, expand and conv_bn(expand),
                                              conv_bn(spec.conv("depthwise")), conv_bn(spec.conv("project"))))
            else:
                built.append(ConvLayer(spec.endpoint, spec, conv_bn(spec.convs[0])))
        built.append(GlobalPool())
        if self.num_classes:
            logits = logits_spec(self.depth_multiplier, self.num_classes)
            built.append(Logits(v[logits.weights_name], v[logits.biases_name]))
            built.append(Predictions())
        return built

    @property
    def layer_names(self) -> list:
        return [layer.name for layer in self.layers]

    @property
    def embedding_size(self) -> int:
        return self.specs[-1].out_channels

    def endpoints(self, x: np.ndarray, backend: str = "numpy", until: Optional[str] = None,
                  capture: Capture = None) -> dict:
        """Run the network and return every endpoint by its TF-slim name:
        `layer_1` ... `layer_19`, `layer_N/expansion_output`,
        `layer_N/depthwise_output`, `layer_N/projection_output` (before the
        residual add), `global_pool` (N, 1, 1, C), and with a classifier
        `Logits` (N, classes) and `Predictions`.

        x: (N, H, W, 3) NHWC, float32 or float64, preprocessed to [-1, 1]; the
        computation runs in x's dtype. `until` stops after the named layer;
        `capture(name, array)` is called for every endpoint as it is made."""
        self._check_until(until)
        if backend == "numba":  # the fast path checks x itself
            return self.fast.endpoints(x, until=until, capture=capture)
        check_backend(backend)
        x = check_input(x)
        outputs = {}

        def record(name, value):
            outputs[name] = value
            if capture is not None:
                capture(name, value)

        for layer in self.layers:
            x = layer(x, record)
            record(layer.name, x)
            if layer.name == until:
                break
        return outputs

    def run(self, x: np.ndarray, until: str, backend: str = "numpy") -> np.ndarray:
        """The output of layer `until` (e.g. "layer_7" or "global_pool")."""
        return self.endpoints(x, backend=backend, until=until)[until]

    def embed(self, x: np.ndarray, backend: str = "numba", **interface) -> np.ndarray:
        """The global-pool embedding: (N, H, W, 3) -> (N, C), C = 1280 for d <= 1.
        `layout`, `color`, `scale` as for `predict`."""
        pooled = self._forward(to_network_input(x, **interface), "global_pool", backend)
        return pooled.reshape(pooled.shape[0], -1)

    def predict(self, x: np.ndarray, backend: str = "numba", layout: str = "NHWC",
                color: str = "RGB", scale: str = "[-1,1]") -> np.ndarray:
        """Class probabilities: (N, H, W, 3) -> (N, num_classes). With TF-slim's
        1001 classes class 0 is background; a Keras model's 1000 classes are
        TF-slim's 1..1000 (softmax over those only).

        By default x is the network's own input (the model card's original
        interface: NHWC, RGB, [-1, 1]); the card's converted interface is
        `layout="NCHW", color="BGR", scale="0-255"` (see `interfaces.py`)."""
        if not self.num_classes:
            raise WeightsError(f"{self.source} has no classifier (MobilenetV2/Logits/Conv2d_1c_1x1 "
                               "is absent): predict() needs a full checkpoint; use embed() for "
                               "the 1280-d features")
        x = to_network_input(x, layout, color, scale)
        return self._forward(x, "Predictions", backend)

    def _forward(self, x: np.ndarray, until: str, backend: str) -> np.ndarray:
        if backend == "numba":  # the fast path checks x itself
            return self.fast.run(x, until)
        check_backend(backend)
        x = check_input(x)
        for layer in self.layers:
            x = layer(x)
            if layer.name == until:
                return x
        raise AssertionError(until)

    @property
    def fast(self):
        """The Numba fast path: BatchNorm folded and weights packed once, on first use."""
        if self._fast is None:
            from .fast import FastMobileNetV2

            self._fast = FastMobileNetV2(self)
        return self._fast

    def _check_until(self, until: Optional[str]) -> None:
        if until is not None and until not in self.layer_names:
            raise InputError(f"no layer named {until!r}; layers are {', '.join(self.layer_names)}")

    def __repr__(self):
        return (f"MobileNetV2(depth_multiplier={self.depth_multiplier}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


__all__ = ["MobileNetV2", "ConvBN", "ConvLayer", "InvertedResidual", "GlobalPool", "Logits",
           "Predictions", "check_input"]
