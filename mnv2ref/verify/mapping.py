"""Which foreign tensor is which of our endpoints.

Three passes:

1. Names, where they survive: TF-slim (`MobilenetV2/expanded_conv_3/expand/Relu6`),
   Keras (`block_3_expand_relu`, `block_3_project_BN`, `block_3_add`,
   `Conv1_relu`, `out_relu`, ...), torchvision (`features.4`,
   `features.4.conv.0`), and our own (`layer_4/expansion_output`). An
   activation's name beats its BatchNorm's, which beats its conv's (BatchNorm
   is usually folded and ReLU6 fused, so the later op may be missing).
2. Structure, when the graph says what made each tensor: its convolutions,
   in order, are ours, one for one; a conv's endpoint is the last tensor of
   the chain of same-shaped ops it starts (bias, BatchNorm, Clip/ReLU6,
   quantize/dequantize), and a block's output is the residual add that
   follows, if there is one. Where it applies it overrides the names (only
   our own endpoint names beat it).
3. Order and shape, for the endpoints still open: the first tensor of the endpoint's shape
   after the tensor of the endpoint before it, and before the one of the
   endpoint after it (in a graph, the end of the chain of element-wise ops
   it starts: the ReLU6, not the conv before it).

Numbers are never consulted: a tensor that happens to match better must not
be picked over the one that is the endpoint's output, or a wrong tensor
could hide a divergence.
"""

from __future__ import annotations

import re
from typing import Optional

# Our endpoint names, TF-slim's scope of each layer and Keras's block names.
OURS = re.compile(r"^(layer_\d+(/(expansion|depthwise|projection)_output)?|global_pool|Logits|Predictions)$")


def layer_roles(model) -> dict:
    """{layer name: {role: endpoint}} for a MobileNetV2: roles "expand",
    "depthwise", "project" (the projection's endpoint), "output"."""
    roles = {}
    for spec in model.specs:
        if not spec.is_block:
            roles[spec.endpoint] = {"output": spec.endpoint}
            continue
        r = {"depthwise": f"{spec.endpoint}/depthwise_output", "output": spec.endpoint}
        if spec.conv("expand") is not None:
            r["expand"] = f"{spec.endpoint}/expansion_output"
        r["project"] = f"{spec.endpoint}/projection_output" if spec.residual else spec.endpoint
        roles[spec.endpoint] = r
    return roles


def name_rules(model) -> list:
    """[(regex, endpoint, priority)] for the naming schemes we know; a lower
    priority wins."""
    roles = layer_roles(model)
    last = len(model.specs)  # layer_19
    rules = [(r"(^|/)Conv/Relu6", "layer_1", 1), (r"(^|/)Conv/(BatchNorm|Conv2D)", "layer_1", 2),
             (r"(^|/)Conv_1/Relu6", f"layer_{last}", 1), (r"(^|/)Conv_1/(BatchNorm|Conv2D)", f"layer_{last}", 2),
             (r"Logits/AvgPool", "global_pool", 1), (r"Logits/(Squeeze|flatten)", "Logits", 1),
             (r"Logits/Conv2d_1c_1x1/(BiasAdd|Conv2D)", "Logits", 2),
             (r"Predictions/(Softmax|Reshape_1)", "Predictions", 1),
             # Keras
             (r"(^|/)Conv1_relu", "layer_1", 1), (r"(^|/)bn_Conv1", "layer_1", 2),
             (r"(^|/)out_relu", f"layer_{last}", 1), (r"(^|/)Conv_1_bn", f"layer_{last}", 2),
             (r"global_average_pooling2d", "global_pool", 1),
             (r"predictions[^/]*/BiasAdd", "Logits", 1), (r"predictions[^/]*/MatMul", "Logits", 2),
             (r"predictions[^/]*/Softmax|^predictions$", "Predictions", 1),
             # torchvision
             (r"(^|\.)features\.0$", "layer_1", 1), (rf"(^|\.)features\.{last - 1}$", f"layer_{last}", 1),
             (r"(^|\.)classifier(\.1)?$", "Logits", 1)]
    for index in range(2, last):
        r = roles[f"layer_{index}"]
        slim = "expanded_conv" + (f"_{index - 2}" if index > 2 else "")
        keras = f"block_{index - 2}" if index > 2 else "expanded_conv"
        torch = rf"(^|\.)features\.{index - 1}"
        for role, endpoint in r.items():
            if role == "output":
                rules += [(rf"(^|/){slim}/add", endpoint, 1), (rf"(^|/){keras}_add", endpoint, 1),
                          (rf"{torch}$", endpoint, 1)]
                continue
            rules += [(rf"(^|/){slim}/{role}/Relu6?\b", endpoint, 1),
                      (rf"(^|/){slim}/{role}/BatchNorm", endpoint, 1 if role == "project" else 2),
                      (rf"(^|/){slim}/{role}/(Conv2D|depthwise)", endpoint, 2 if role == "project" else 3),
                      (rf"(^|/){keras}_{role}_relu", endpoint, 1),
                      (rf"(^|/){keras}_{role}_BN", endpoint, 1 if role == "project" else 2),
                      (rf"(^|/){keras}_{role}(_\d+)?/", endpoint, 2 if role == "project" else 3)]
        # torchvision: conv.0, conv.1 are ConvBNReLU (expand, depthwise), then the
        # project conv and its BatchNorm; the first block has no expand.
        modules = [m for m in ("expand", "depthwise") if m in r]
        for position, role in enumerate(modules):
            rules.append((rf"{torch}\.conv\.{position}$", r[role], 1))
        rules += [(rf"{torch}\.conv\.{len(modules) + 1}$", r["project"], 1),
                  (rf"{torch}\.conv\.{len(modules)}$", r["project"], 2)]
    return [(re.compile(pattern), endpoint, priority) for pattern, endpoint, priority in rules]


def fit(foreign_shape: tuple, our_shape: tuple, layout: Optional[str]) -> Optional[str]:
    """How a foreign tensor's shape becomes our endpoint's: "same", "nchw"
    (transpose (0, 2, 3, 1)), "reshape" ((N, C) <-> (N, 1, 1, C)),
    "classes" (1000 classes for our 1001: compare with ours less class 0),
    or None when it cannot. `layout` (the graph's inner layout) decides when both
    would do, e.g. for (N, 48, 48, 48)."""
    foreign_shape, our_shape = tuple(foreign_shape), tuple(our_shape)
    transposed = (foreign_shape[0], *foreign_shape[2:], foreign_shape[1]) if len(foreign_shape) == 4 else None
    if transposed == our_shape and (layout == "NCHW" or foreign_shape != our_shape):
        return "nchw"
    if foreign_shape == our_shape:
        return "same"
    if len(our_shape) == 2 == len(foreign_shape) and foreign_shape == (our_shape[0], our_shape[1] - 1) \
            and our_shape[1] == 1001:
        return "classes"  # Keras's 1000 ImageNet classes: TF-slim's without background
    if (len(our_shape) == 4 and our_shape[1:3] == (1, 1) and len(foreign_shape) in (2, 4)
            and foreign_shape[0] == our_shape[0] and int(_size(foreign_shape)) == int(_size(our_shape))):
        return "reshape"
    return None


def inner_layout(ours: dict, shapes: dict) -> Optional[str]:
    """The layout of a model's intermediate tensors, which need not be its
    input's (an NHWC graph may compute in NCHW): the one that most tensors
    with an unambiguous fit to one of our endpoints use."""
    votes = {"same": 0, "nchw": 0}
    for shape in shapes.values():
        if len(shape) != 4:
            continue
        ways = {fit(shape, our, layout) for our in ours.values() if len(our) == 4
                for layout in ("NHWC", "NCHW")} & set(votes)
        if len(ways) == 1:
            votes[ways.pop()] += 1
    if votes["same"] == votes["nchw"]:
        return None
    return "NCHW" if votes["nchw"] > votes["same"] else "NHWC"


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def without_background(ours: dict) -> dict:
    """Our Logits and Predictions over classes 1..1000, as Keras has them
    (its softmax runs over those 1000 only)."""
    from ..layers import softmax

    logits = ours["Logits"][:, 1:]
    return {"Logits": logits, "Predictions": softmax(logits)}


def to_ours(value, how: str, our_shape: tuple):
    """A foreign array in our endpoint's layout and shape (see `fit`;
    "classes" arrays stay as they are)."""
    if how == "nchw":
        return value.transpose(0, 2, 3, 1)
    if how == "reshape":
        return value.reshape(our_shape)
    return value


def align(model, ours: dict, tensors: list, shapes: dict, layout: Optional[str]) -> dict:
    """{our endpoint: (foreign tensor name, how)} for the endpoints found.

    ours: {endpoint: shape} in our order; tensors: [TensorInfo] in their
    execution order; shapes: {tensor name: shape}."""
    names = [t.name for t in tensors]
    position = {name: i for i, name in enumerate(names)}
    layout = inner_layout(ours, shapes) or layout
    found = {}

    def claim(endpoint, name, priority):
        how = fit(shapes[name], ours[endpoint], layout)
        if how is None:
            return
        old = found.get(endpoint)
        if old is None or priority < old[2] or (priority == old[2] and position[name] < position[old[0]]):
            found[endpoint] = (name, how, priority)

    rules = name_rules(model)
    for name in names:
        short = name.split(":")[0]
        for pattern, endpoint, priority in rules:
            if endpoint in ours and pattern.search(short):
                claim(endpoint, name, priority)
    # Our own names are exact: they override everything.
    for name in names:
        if OURS.match(name) and name in ours:
            claim(name, name, 0)

    # The graph's own structure beats names: a quantizer may fuse a ReLU6 into
    # its conv and leave the conv's (unclipped) output with the ReLU6's name.
    for endpoint, name in _structure(model, ours, tensors, shapes, layout).items():
        if endpoint not in found or found[endpoint][2] > 0:
            found[endpoint] = (name, fit(shapes[name], ours[endpoint], layout), 0.5)

    order = list(ours)
    for i, endpoint in enumerate(order):
        if endpoint in found:
            continue
        before = [position[found[e][0]] for e in order[:i] if e in found]
        after = [position[found[e][0]] for e in order[i + 1:] if e in found]
        low, high = (max(before) if before else -1), (min(after) if after else len(names))
        for j in range(low + 1, high):
            if endpoint == "Predictions" and tensors[j].kind not in (None, "softmax"):
                continue  # in a graph, only a softmax makes probabilities
            if fit(shapes[names[j]], ours[endpoint], layout):
                j = _chain_end(tensors, shapes, j, high, ours[endpoint], layout)
                found[endpoint] = (names[j], fit(shapes[names[j]], ours[endpoint], layout), 3)
                break
    return {e: found[e][:2] for e in order if e in found}


def _chain_end(tensors: list, shapes: dict, j: int, high: int, our_shape: tuple, layout) -> int:
    """In a graph, the last of the same-shaped element-wise ops (bias,
    BatchNorm, activation) that follow tensor j: the op output an endpoint
    is, rather than the conv output before its ReLU6."""
    if tensors[j].kind is None:
        return j
    while j + 1 < high and tensors[j + 1].kind == "other" and fit(shapes[tensors[j + 1].name], our_shape, layout):
        j += 1
    return j


def _structure(model, ours: dict, tensors: list, shapes: dict, layout) -> dict:
    """Pass 2: {endpoint: tensor name} from the graph's convolutions, or {}
    when the graph does not say what made its tensors or has not exactly
    our convolutions."""
    if not tensors or any(t.kind is None for t in tensors):
        return {}
    roles = layer_roles(model)
    convs = []  # (endpoint of the conv's chain, endpoint of a residual add after it)
    for spec in model.specs:
        r = roles[spec.endpoint]
        if not spec.is_block:
            convs.append((r["output"], None))
            continue
        if "expand" in r:
            convs.append((r["expand"], None))
        convs.append((r["depthwise"], None))
        convs.append((r["project"], spec.endpoint if spec.residual else None))
    conv_at = [i for i, t in enumerate(tensors) if t.kind == "conv"]
    if "Logits" in ours and len(conv_at) == len(convs) + 1:
        convs.append(("Logits", None))
    if len(conv_at) != len(convs):
        return {}
    found = {}
    for (endpoint, add_endpoint), start, end in zip(convs, conv_at, conv_at[1:] + [len(tensors)]):
        chain_end = None
        for j in range(start, end):
            t = tensors[j]
            if j > start and t.kind == "softmax":
                break
            if j > start and t.kind == "add":
                if add_endpoint and fit(shapes[t.name], ours[add_endpoint], layout):
                    found[add_endpoint] = t.name
                break
            if not fit(shapes[t.name], ours[endpoint], layout):
                break
            chain_end = t.name
        if chain_end is not None:
            found[endpoint] = chain_end
        if add_endpoint and add_endpoint not in found and chain_end is not None:
            found[add_endpoint] = chain_end  # no residual add: their block ends at the projection
    last_layer = f"layer_{len(model.specs)}"
    if last_layer in found:
        after = tensors[[t.name for t in tensors].index(found[last_layer]) + 1:]
        pool = next((t.name for t in after if fit(shapes[t.name], ours["global_pool"], layout)), None)
        if pool:
            found["global_pool"] = pool
        # Only a softmax is Predictions: a graph that ends at its logits has none.
        probs = next((t.name for t in after if t.kind == "softmax" and "Predictions" in ours
                      and fit(shapes[t.name], ours["Predictions"], layout)), None)
        if probs:
            found["Predictions"] = probs
    return found
