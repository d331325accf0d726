"""MACs, FLOPs and parameter counts against the published numbers.

Sources pinned here:
  * TF-slim model zoo, tensorflow/models research/slim/nets/mobilenet/README.md,
    "Mobilenet V2 Imagenet Checkpoints": "MACs (M)" and "Parameters (M)" of the
    22 released checkpoints. The zoo truncates MACs to whole millions
    (300,775,552 -> 300) and prints parameters to 2 decimals.
  * OpenVINO Open Model Zoo cards (models/public/mobilenet-v2-1.0-224 and
    mobilenet-v2-1.4-224): "GFlops" and "MParams" (BN folded), 3 decimals.
"""

import json
import math
import sys

import pytest

import mnv2ref
from mnv2ref.architecture import (BATCH_NORM_LEAVES, PUBLISHED_DEPTH_MULTIPLIERS,
                                  PUBLISHED_RESOLUTIONS, layer_specs, logits_spec, same_padding,
                                  variable_shapes)
from mnv2ref.accounting import KINDS, Cost, cost, format_cost_table
from mnv2ref.errors import MissingDependencyError
from mnv2ref.errors import InputError, Mnv2refError

# (depth multiplier, resolution): (MACs (M), Parameters (M)) as printed in the zoo.
ZOO = {
    (1.4, 224): (582, 6.06),
    (1.3, 224): (509, 5.34),
    (1.0, 224): (300, 3.47),
    (1.0, 192): (221, 3.47),
    (1.0, 160): (154, 3.47),
    (1.0, 128): (99, 3.47),
    (1.0, 96): (56, 3.47),
    (0.75, 224): (209, 2.61),
    (0.75, 192): (153, 2.61),
    (0.75, 160): (107, 2.61),
    (0.75, 128): (69, 2.61),
    (0.75, 96): (39, 2.61),
    (0.5, 224): (97, 1.95),
    (0.5, 192): (71, 1.95),
    (0.5, 160): (50, 1.95),
    (0.5, 128): (32, 1.95),
    (0.5, 96): (18, 1.95),
    (0.35, 224): (59, 1.66),
    (0.35, 192): (43, 1.66),
    (0.35, 160): (30, 1.66),
    (0.35, 128): (20, 1.66),
    (0.35, 96): (11, 1.66),
}

CONV_KINDS = {"stem", "expand", "depthwise", "project"}


def conv_rows(c):
    """Rows that are a conv op (with BatchNorm): everything but adds, pool,
    logits and softmax."""
    return [r for r in c.layers if r.kind in CONV_KINDS or (r.kind == "head"
                                                             and r.name.startswith("layer_"))]


def checkpoint_elements(c):
    """Elements of the model variables a checkpoint holds: kernels, the four
    BatchNorm vectors of every conv, logits weights and biases."""
    bn_channels = c.params_folded - c.params
    assert c.params_trainable - c.params == 2 * bn_channels
    return c.params + 4 * bn_channels


# ---------------------------------------------------------------------------
# The published numbers


def test_1_0_224_matches_the_model_card_and_the_zoo():
    c = cost(1.0, 224)
    assert 0.6145 <= c.flops / 1e9 < 0.6155  # card: 0.615 GFLOPs
    assert round(c.params_folded / 1e6, 3) == 3.489  # card: 3.489 M params
    assert c.macs // 10**6 == 300  # zoo: 300 M MACs
    assert round(c.params / 1e6, 2) == 3.47  # zoo: 3.47 M parameters


def test_1_0_224_exact_totals():
    c = cost()
    assert (c.macs, c.flops, c.params, c.params_folded, c.params_trainable) == (
        300_775_552, 614_620_118, 3_472_041, 3_489_097, 3_506_153)


def test_1_4_224_matches_its_model_card():
    c = cost(1.4, 224)
    assert 1.1825 <= c.flops / 1e9 < 1.1835  # card: 1.183 GFLOPs
    assert round(c.params_folded / 1e6, 3) == 6.087  # card: 6.087 M params


def test_zoo_table_covers_every_published_model():
    expected = {(d, r) for d in PUBLISHED_DEPTH_MULTIPLIERS for r in PUBLISHED_RESOLUTIONS
                if d <= 1.0} | {(1.3, 224), (1.4, 224)}
    assert set(ZOO) == expected and len(ZOO) == 22


@pytest.mark.parametrize("depth_multiplier,resolution", sorted(ZOO))
def test_zoo_row(depth_multiplier, resolution):
    zoo_macs, zoo_params = ZOO[depth_multiplier, resolution]
    c = cost(depth_multiplier, resolution)
    assert c.macs // 10**6 == zoo_macs  # the zoo truncates MACs ...
    assert zoo_macs <= c.macs / 1e6 < zoo_macs + 1
    assert round(c.params / 1e6, 2) == zoo_params  # ... and rounds parameters
    assert c.params // 10**4 == round(zoo_params * 100)  # (truncating agrees)


# ---------------------------------------------------------------------------
# The conventions, row by row


def test_flops_convention_row_by_row():
    c = cost(1.0, 224)
    for r in conv_rows(c):
        out = math.prod(r.output_shape)
        relu = 0 if r.kind == "project" else out
        assert r.flops == 2 * r.macs + out + relu, r.name
    for r in c.layers:
        if r.kind == "residual":
            assert r.macs == 0 and r.flops == math.prod(r.output_shape)
    pool, logits, softmax = c.layers[-3:]
    assert [pool.name, logits.name, softmax.name] == ["global_pool", "Logits", "Predictions"]
    assert pool.flops == math.prod(pool.input_shape) == 7 * 7 * 1280
    assert logits.macs == 1280 * 1001 and logits.flops == 2 * logits.macs + 1001
    assert softmax.flops == 5 * 1001
    assert c.macs == sum(r.macs for r in conv_rows(c)) + logits.macs


def test_rows_follow_the_architecture_table():
    for d in PUBLISHED_DEPTH_MULTIPLIERS:
        specs = layer_specs(d)
        c = cost(d, 224)
        convs = [conv for layer in specs for conv in layer.convs]
        rows = conv_rows(c)
        assert [r.scope for r in rows] == [conv.scope for conv in convs]
        assert [r.output_shape[-1] for r in rows] == [conv.out_channels for conv in convs]
        assert [r.name for r in c.layers if r.kind == "residual"] == [
            f"{layer.endpoint}/add" for layer in specs if layer.residual]
        assert len(c.layers) == len(convs) + sum(l.residual for l in specs) + 3
        assert {r.kind for r in c.layers} == set(KINDS)
        assert len({r.name for r in c.layers}) == len(c.layers)
    c = cost()
    assert c.layer("layer_1").kind == "stem" and c.layer("layer_19").kind == "head"
    assert c.layer("layer_3/expand").scope == "MobilenetV2/expanded_conv_1/expand"
    assert c.layer("layer_2/depthwise").scope == "MobilenetV2/expanded_conv/depthwise"
    assert c.layer("layer_4/add").scope == "MobilenetV2/expanded_conv_2/add"
    assert c.layer("Logits").scope == "MobilenetV2/Logits/Conv2d_1c_1x1"


def test_activation_bytes_are_float32_outputs():
    c = cost(0.5, 160)
    for r in c.layers:
        assert r.activation_bytes == 4 * math.prod(r.output_shape)
    assert c.activation_bytes == sum(r.activation_bytes for r in c.layers)


@pytest.mark.parametrize("depth_multiplier", PUBLISHED_DEPTH_MULTIPLIERS)
@pytest.mark.parametrize("num_classes", [1001, 0, 10])
def test_parameters_equal_variable_shapes(depth_multiplier, num_classes):
    shapes = variable_shapes(depth_multiplier, num_classes)
    c = cost(depth_multiplier, 224, num_classes)
    size = {name: math.prod(shape) for name, shape in shapes.items()}
    logits = logits_spec(depth_multiplier, num_classes)
    logits_names = {logits.weights_name, logits.biases_name} if num_classes else set()
    kernels = sum(n for name, n in size.items()
                  if name.endswith("weights") and name not in logits_names)
    bn = {leaf: sum(n for name, n in size.items() if name.endswith(f"/BatchNorm/{leaf}"))
          for leaf in BATCH_NORM_LEAVES}
    head = sum(size[name] for name in logits_names)
    assert kernels + sum(bn.values()) + head == sum(size.values())  # the mapping is complete
    assert c.params == kernels + head
    assert c.params_folded == kernels + bn["beta"] + head  # one bias per output channel
    assert c.params_trainable == kernels + bn["gamma"] + bn["beta"] + head
    assert checkpoint_elements(c) == sum(size.values())
    # Row by row: every conv row's kernel is the variable of its scope.
    for r in conv_rows(c):
        leaf = "depthwise_weights" if r.kind == "depthwise" else "weights"
        assert r.params == size[f"{r.scope}/{leaf}"], r.name
        assert r.params_folded - r.params == size[f"{r.scope}/BatchNorm/beta"]
    if num_classes:
        assert c.layer("Logits").params == head
    else:
        assert "Logits" not in {r.name for r in c.layers}
        assert c.params == cost(depth_multiplier, 224).params - (logits.in_channels + 1) * 1001


# ---------------------------------------------------------------------------
# Against the real checkpoints


def model_variables(ckpt):
    skip = ("/ExponentialMovingAverage", "/RMSProp", "/RMSProp_1")
    return {name: tuple(ckpt.entries[name].shape) for name in ckpt.entries
            if name != "global_step" and not name.endswith(skip)}


def test_parameters_equal_the_real_backbone_checkpoint(shared_dir):
    checkpoint = pytest.importorskip("mnv2ref.checkpoint")
    prefix = shared_dir / "checkpoints" / "mobilenet_v2_1.0_224_backbone" / "model.ckpt"
    ckpt = checkpoint.read_checkpoint(prefix)
    stored = model_variables(ckpt)
    assert len(stored) == 260
    c = cost(1.0, 224, num_classes=0)
    assert sum(math.prod(s) for s in stored.values()) == checkpoint_elements(c)
    assert sum(math.prod(s) for n, s in stored.items() if n.endswith("weights")) == c.params
    assert sum(math.prod(s) for n, s in stored.items() if n.endswith("/beta")) == (
        c.params_folded - c.params)


def test_parameters_equal_the_synthetic_0_35_checkpoint(shared_dir):
    checkpoint = pytest.importorskip("mnv2ref.checkpoint")
    prefix = shared_dir / "checkpoints" / "synthetic_mobilenet_v2_0.35_224" / "model.ckpt"
    ckpt = checkpoint.read_checkpoint(prefix)
    stored = model_variables(ckpt)
    logits = logits_spec(0.35)
    num_classes = stored[logits.biases_name][0] if logits.biases_name in stored else 0
    c = cost(0.35, 224, num_classes=num_classes)
    assert sum(math.prod(s) for s in stored.values()) == checkpoint_elements(c)
    kernels_and_logits = sum(math.prod(s) for n, s in stored.items()
                             if n.endswith("weights") or n.endswith("biases"))
    assert kernels_and_logits == c.params
    assert set(stored) == set(variable_shapes(0.35, num_classes))


# ---------------------------------------------------------------------------
# Shapes


def test_odd_resolution_shapes_follow_same_padding():
    c = cost(1.0, (225, 193))
    assert c.resolution == (225, 193) and c.input_shape == (1, 225, 193, 3)
    specs = layer_specs(1.0)
    h, w = 225, 193
    rows = iter(c.layers)
    for layer in specs:
        block_input = (h, w)
        for conv in layer.convs:
            row = next(rows)
            assert row.input_shape == (1, h, w, conv.in_channels), row.name
            h = same_padding(h, conv.kernel, conv.stride)[2]
            w = same_padding(w, conv.kernel, conv.stride)[2]
            assert row.output_shape == (1, h, w, conv.out_channels), row.name
        if layer.residual:
            row = next(rows)
            assert row.kind == "residual" and block_input == (h, w)
            assert row.input_shape == row.output_shape == (1, h, w, layer.out_channels)
    # ceil division at every stride 2: 225 -> 113 -> 57 -> 29 -> 15 -> 8,
    # 193 -> 97 -> 49 -> 25 -> 13 -> 7
    assert c.layer("layer_19").output_shape == (1, 8, 7, 1280)
    assert c.layer("global_pool").input_shape == (1, 8, 7, 1280)
    assert c.layer("global_pool").output_shape == (1, 1, 1, 1280)
    assert c.layer("Logits").output_shape == (1, 1001)
    assert cost(1.0, (224, 224)).to_dict() == cost(1.0, 224).to_dict()


def test_resolution_scales_only_macs_and_flops():
    a, b = cost(0.75, 96), cost(0.75, 224)
    assert a.params == b.params and a.params_folded == b.params_folded
    assert a.macs < b.macs and a.flops < b.flops


@pytest.mark.parametrize("kwargs", [
    {"resolution": 0}, {"resolution": -5}, {"resolution": 224.0}, {"resolution": (224,)},
    {"resolution": (224, 0)}, {"resolution": "224"}, {"num_classes": -1},
    {"num_classes": 1.5}, {"depth_multiplier": 0}, {"depth_multiplier": -1.0},
])
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        cost(**kwargs)


# ---------------------------------------------------------------------------
# Output


def test_to_dict_is_json_and_totals_match():
    c = cost(0.35, (160, 128), num_classes=0)
    d = json.loads(json.dumps(c.to_dict()))
    for field in ("macs", "flops", "params", "params_folded", "params_trainable",
                  "activation_bytes"):
        value = getattr(c.totals, field)
        assert type(value) is int
        assert d["totals"][field] == value == getattr(c, field)
        assert sum(row[field] for row in d["layers"]) == value
    assert d["depth_multiplier"] == 0.35 and d["resolution"] == [160, 128]
    assert d["num_classes"] == 0
    assert [row["name"] for row in d["layers"]] == [r.name for r in c.layers]
    assert d["layers"][0]["input_shape"] == [1, 160, 128, 3]


def test_format_table():
    c = cost()
    text = c.format_table()
    assert text == format_cost_table(c)
    for r in c.layers:
        assert f"{r.name} ({r.kind})" in text
    for value in (c.macs, c.flops, c.params, c.params_folded, c.params_trainable):
        assert f"{value:,}" in text
    assert "backbone only" in cost(num_classes=0).format_table()


def test_package_level_cost_is_the_function():
    import mnv2ref.accounting as module

    assert isinstance(mnv2ref.cost(0.5, 128), Cost)
    assert mnv2ref.cost(0.5, 128).to_dict() == module.cost(0.5, 128).to_dict()


def test_plot_cost(tmp_path):
    pytest.importorskip("matplotlib")
    from mnv2ref.plots import plot_cost

    out = tmp_path / "cost.png"
    plot_cost(cost(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cost_without_matplotlib(tmp_path, monkeypatch):
    from mnv2ref.plots import plot_cost

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib") as info:
        plot_cost(cost(), tmp_path / "cost.png")
    assert isinstance(info.value, Mnv2refError)
    assert not (tmp_path / "cost.png").exists()


def test_by_layer_is_keyed_by_endpoint():
    c = cost()
    flops = c.flops_by_layer()
    assert list(flops) == [f"layer_{i}" for i in range(1, 20)] + [
        "global_pool", "Logits", "Predictions"]
    assert sum(flops.values()) == c.flops
    assert flops["layer_4"] == sum(c.layer(f"layer_4/{p}").flops
                                   for p in ("expand", "depthwise", "project", "add"))
    assert sum(c.macs_by_layer().values()) == c.macs
    assert c.by_layer("params")["Logits"] == 1280 * 1001 + 1001
    assert sum(t.flops for t in c.by_kind().values()) == c.flops
    with pytest.raises(InputError):
        c.by_layer("bogus")
