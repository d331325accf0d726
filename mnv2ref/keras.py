"""Keras Applications' MobileNetV2 weights files, read without Keras.

Keras made `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}[_no_top].h5`
from the TF-slim checkpoints, so they hold the same network under other names.
A file written by Keras's `save_weights` lists its layers in the root
attribute `layer_names`; each layer is a group whose attribute `weight_names`
names the layer's datasets inside it (`Conv1/kernel:0`, BatchNorm's `gamma:0`,
`beta:0`, `moving_mean:0`, `moving_variance:0`). The file is read through
those two attributes, never by guessed paths.

    Keras layer                                TF-slim scope
    Conv1, bn_Conv1                            MobilenetV2/Conv(/BatchNorm)
    expanded_conv_{depthwise,project}(_BN)     MobilenetV2/expanded_conv/{depthwise,project}(/BatchNorm)
    block_N_{expand,depthwise,project}(_BN)    MobilenetV2/expanded_conv_N/{expand,depthwise,project}(/BatchNorm)
    Conv_1, Conv_1_bn                          MobilenetV2/Conv_1(/BatchNorm)
    predictions (Dense: kernel, bias)          MobilenetV2/Logits/Conv2d_1c_1x1 (weights, biases)

Both use BatchNorm epsilon 1e-3 (Keras's `mobilenet_v2.py` builds every
BatchNormalization with `epsilon=1e-3, momentum=0.999`; TF-slim's is
`architecture.BATCH_NORM_EPSILON`) and TF `SAME` padding (Keras pads stride-2
convs with `correct_pad`: 0 before, 1 after on an even size), so only names
and the classifier differ. Keras dropped TF-slim's class 0 (background): its
`predictions` has **1000 classes**, Keras class k is TF-slim class k + 1, and
its softmax runs over those 1000 only. A model read from it says so:
`num_classes` is 1000 and `metadata["classes"]` is `KERAS_CLASSES`.
The depth multiplier (Keras's `alpha`) is inferred from the shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .architecture import LOGITS_SCOPE, SCOPE, ConvSpec, layer_specs
from .errors import InputError, Mnv2refError, WeightsError
from .files import check_not_overwriting
from .weights import (check_self_contained, check_variables, infer_config, refuse_links_out, sha256_of,
                      weights_file, write_h5)

KERAS_CLASSES = "imagenet-1000 (Keras: class k is TF-slim class k+1; background dropped)"
CLASSES = {1001: "imagenet-1001 (TF-slim: class 0 is background)", 1000: KERAS_CLASSES,
           0: "none (backbone: no classifier)"}
KERAS_LOGITS_LAYER = "predictions"
KERNEL_LEAVES = {"conv": ("kernel",), "expand": ("kernel",), "project": ("kernel",),
                 "depthwise": ("depthwise_kernel", "kernel")}  # Keras 2 / Keras 3 naming
BATCH_NORM_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")


def keras_layers(spec: ConvSpec) -> tuple:
    """The Keras (conv layer, BatchNorm layer) names of one TF-slim conv, e.g.
    MobilenetV2/expanded_conv_3/expand -> ("block_3_expand", "block_3_expand_BN")."""
    block, _, kind = spec.scope[len(SCOPE) + 1:].partition("/")
    if block == "Conv":
        return "Conv1", "bn_Conv1"
    if block == "Conv_1":
        return "Conv_1", "Conv_1_bn"
    number = block[len("expanded_conv"):].lstrip("_")
    name = f"block_{number}_{kind}" if number else f"expanded_conv_{kind}"
    return name, f"{name}_BN"


def tf_slim_sources(num_classes: int) -> list:
    """[(TF-slim variable name, Keras layer, accepted Keras weight leaves)] for
    every variable of the network (the names do not depend on the depth
    multiplier); with a classifier, the Dense `predictions` layer last."""
    sources = []
    for layer in layer_specs(1.0):
        for conv in layer.convs:
            conv_layer, bn_layer = keras_layers(conv)
            sources.append((conv.weights_name, conv_layer, KERNEL_LEAVES[conv.kind]))
            sources += [(conv.batch_norm_name(leaf), bn_layer, (leaf,)) for leaf in BATCH_NORM_LEAVES]
    if num_classes:
        sources.append((f"{LOGITS_SCOPE}/weights", KERAS_LOGITS_LAYER, ("kernel",)))
        sources.append((f"{LOGITS_SCOPE}/biases", KERAS_LOGITS_LAYER, ("bias",)))
    return sources


def _weights_root(f):
    """The group holding `layer_names`: the file root (`save_weights`) or
    `model_weights` (a whole model saved by Keras 2's `model.save`)."""
    if "layer_names" in f.attrs:
        return f
    group = f.get("model_weights")
    if group is not None and "layer_names" in group.attrs:
        return group
    return None


def is_keras_h5(path) -> bool:
    """True for an HDF5 file in Keras's weights layout (root attribute `layer_names`)."""
    import h5py

    if not Path(path).is_file():  # a FIFO would block libhdf5's open
        return False
    try:
        with h5py.File(path, "r") as f:
            return _weights_root(f) is not None
    except (OSError, ValueError):
        return False


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _leaf(weight_name: str) -> str:
    """`block_1_expand/kernel:0` -> `kernel`."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _layer_weights(root, path) -> dict:
    """{layer: {leaf: (dataset path inside the layer's group, h5py.Dataset)}}
    for every layer of `layer_names` that has weights."""
    import h5py

    layers = {}
    for layer in map(_text, root.attrs["layer_names"]):
        group = root.get(layer)
        if not isinstance(group, h5py.Group):
            raise WeightsError(f"{path}: layer {layer} is listed in layer_names but has no group")
        names = [_text(n) for n in group.attrs.get("weight_names", ())]
        if not names:
            continue
        weights = {}
        for name in names:
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset):
                raise WeightsError(f"{path}: layer {layer} lists weight {name} but has no dataset "
                                   f"{layer}/{name}")
            weights[_leaf(name)] = (name, dataset)
        layers[layer] = weights
    return layers


def read_keras_h5(path) -> tuple:
    """Read a Keras Applications MobileNetV2 weights file:
    ({TF-slim variable name: float32 array}, attributes).

    The Dense classifier's kernel (C, classes) becomes the 1x1 conv
    (1, 1, C, classes) of TF-slim. A missing layer or weight, a wrongly shaped
    dataset, or a layer with weights that MobileNetV2 does not have is a
    WeightsError naming the Keras layer and dataset."""
    import h5py

    path = weights_file(path)
    try:
        with h5py.File(path, "r") as f:
            refuse_links_out(f, path)
            root = _weights_root(f)
            if root is None:
                raise WeightsError(f"{path}: not a Keras weights file (no attribute layer_names)")
            layers = _layer_weights(root, path)
            num_classes = _keras_num_classes(layers, path)
            variables, origin = {}, {}
            for tf_name, layer, leaves in tf_slim_sources(num_classes):
                name, dataset = _find_weight(layers, layer, leaves, tf_name, path)
                if dataset.dtype.kind != "f":
                    raise WeightsError(f"{path}: dataset {layer}/{name} has dtype {dataset.dtype}, "
                                       "expected float32")
                check_self_contained(dataset, path)
                value = np.asarray(dataset[()], dtype=np.float32)
                variables[tf_name] = value[None, None] if value.ndim == 2 else value  # Dense -> 1x1 conv
                origin[tf_name] = f"{layer}/{name}"
            attributes = {key: _text(f.attrs[key]) for key in ("keras_version", "backend") if key in f.attrs}
    except Mnv2refError:
        raise
    except Exception as error:  # h5py turns HDF5 failures into many exception types
        raise WeightsError(f"{path}: cannot read as a Keras weights file ({type(error).__name__}: {error})") from None

    used = {layer for _, layer, _ in tf_slim_sources(num_classes)}
    extra = [layer for layer in layers if layer not in used]
    if extra:
        raise WeightsError(f"{path}: Keras layer {extra[0]} has weights ({', '.join(layers[extra[0]])}) "
                           "but MobileNetV2 has no such layer")
    def located(tf_name):
        return f"{tf_name} (Keras dataset {origin[tf_name]})" if tf_name in origin else tf_name

    depth_multiplier, num_classes = infer_config(variables, str(path), label=located)
    attributes.update(source_format="keras", depth_multiplier=depth_multiplier, num_classes=num_classes)
    attributes["classes"] = describe_classes(num_classes)
    return variables, attributes


def describe_classes(num_classes: int) -> str:
    """What the class indices of a classifier with `num_classes` outputs mean
    (the same rule as `resources.label`)."""
    return CLASSES.get(num_classes, f"{num_classes} classes (not ImageNet)")


def _keras_num_classes(layers: dict, path) -> int:
    """0 for a `_no_top` file, else the length of the `predictions` bias."""
    if KERAS_LOGITS_LAYER not in layers:
        return 0
    name, bias = layers[KERAS_LOGITS_LAYER].get("bias", (None, None))
    if bias is None or bias.ndim != 1:
        raise WeightsError(f"{path}: Keras layer {KERAS_LOGITS_LAYER} has no 1-d weight bias "
                           f"(found {', '.join(layers[KERAS_LOGITS_LAYER])})")
    return int(bias.shape[0])


def _find_weight(layers: dict, layer: str, leaves: tuple, tf_name: str, path) -> tuple:
    if layer not in layers:
        raise WeightsError(f"{path}: Keras layer {layer} is missing or has no weights "
                           f"(expected dataset {layer}/{layer}/{leaves[0]}:0 for TF-slim {tf_name})")
    found = next((layers[layer][leaf] for leaf in leaves if leaf in layers[layer]), None)
    if found is None:
        raise WeightsError(f"{path}: Keras layer {layer} has no weight {leaves[0]} (expected dataset "
                           f"{layer}/{layer}/{leaves[0]}:0 for TF-slim {tf_name}; "
                           f"found {', '.join(layers[layer])})")
    return found


def convert_keras(keras_h5, out_h5, use_ema: bool = True) -> Path:
    """Convert a Keras Applications weights file to mnv2ref's HDF5 layout
    (`weights.write_h5`), keeping its 1000 classes and saying so in the
    `classes` attribute. A Keras file holds one set of values, so there is no
    raw/EMA choice: `use_ema=False` is refused."""
    from . import __version__

    if not use_ema:
        raise InputError(f"{keras_h5}: a Keras weights file holds one set of values; "
                         "--raw applies to TF checkpoints only")
    check_not_overwriting(out_h5, [keras_h5])
    variables, attributes = read_keras_h5(keras_h5)
    check_variables(variables, str(keras_h5))
    name = Path(keras_h5).name
    return write_h5(out_h5, variables, {**attributes, "source_files": [name],
                                        "source_sha256": {name: sha256_of(keras_h5)},
                                        "mnv2ref_version": __version__})
