"""The architecture table expanded for every published depth multiplier."""

import pytest

from mnv2ref.architecture import (PUBLISHED_DEPTH_MULTIPLIERS, layer_specs, make_divisible,
                                  variable_shapes)
from mnv2ref.errors import InputError


def test_make_divisible_is_tf_slim_rounding():
    assert make_divisible(32 * 0.35) == 16     # 11.2 -> 8 would lose more than 10%
    assert make_divisible(16 * 0.35) == 8      # 5.6 -> at least 8
    assert make_divisible(32 * 1.4) == 48      # 44.8 -> nearest multiple of 8
    assert make_divisible(32 * 1.3) == 40      # 41.6 -> 40, within 10%
    assert make_divisible(320 * 0.35) == 112


def test_the_1_0_network():
    specs = layer_specs(1.0)
    assert [s.endpoint for s in specs] == [f"layer_{i}" for i in range(1, 20)]
    blocks = [s for s in specs if s.is_block]
    assert len(blocks) == 17 and sum(s.residual for s in blocks) == 10
    assert [s.out_channels for s in specs] == [32, 16, 24, 24, 32, 32, 32, 64, 64, 64, 64,
                                               96, 96, 96, 160, 160, 160, 320, 1280]
    stride = 1
    for s in specs:
        stride *= s.stride
    assert stride == 32
    assert specs[1].conv("expand") is None                    # t = 1: no expand conv
    assert specs[2].conv("expand").out_channels == 96         # 6 x 16
    assert all(not c.relu6 for s in blocks for c in s.convs if c.kind == "project")


@pytest.mark.parametrize("depth,stem,last_block,last", [
    (0.35, 16, 112, 1280), (0.5, 16, 160, 1280), (0.75, 24, 240, 1280), (1.0, 32, 320, 1280),
    (1.3, 40, 416, 1664), (1.4, 48, 448, 1792)])
def test_published_depth_multipliers(depth, stem, last_block, last):
    assert depth in PUBLISHED_DEPTH_MULTIPLIERS
    specs = layer_specs(depth)
    assert (specs[0].out_channels, specs[17].out_channels, specs[18].out_channels) == (stem, last_block, last)
    for a, b in zip(specs, specs[1:]):
        assert a.out_channels == b.in_channels
    shapes = variable_shapes(depth, 1001)
    assert len(shapes) == 262 and shapes["MobilenetV2/Logits/Conv2d_1c_1x1/weights"] == (1, 1, last, 1001)
    assert len(variable_shapes(depth, 0)) == 260


def test_bad_depth_multiplier():
    with pytest.raises(InputError, match="depth_multiplier"):
        layer_specs(0)
