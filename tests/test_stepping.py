"""Stepping through model.layers, capturing intermediates, trace and plots."""

import json

import numpy as np
import pytest

import mnv2ref
from mnv2ref.cli import main



@pytest.fixture(scope="module")
def model(synthetic):
    return synthetic


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).uniform(-1, 1, (2, 97, 64, 3)).astype(np.float32)


def test_stepping_through_layers_equals_endpoints_bit_for_bit(model, x):
    endpoints = model.endpoints(x)
    assert [layer.name for layer in model.layers] == (
        [f"layer_{i}" for i in range(1, 20)] + ["global_pool", "Logits", "Predictions"])
    h = x
    for layer in model.layers:
        h = layer(h)
        np.testing.assert_array_equal(h, endpoints[layer.name], err_msg=layer.name)


def test_run_until_and_unknown_layer(model, x):
    np.testing.assert_array_equal(model.run(x, until="layer_7"), model.endpoints(x)["layer_7"])
    assert set(model.endpoints(x, until="layer_3")) == {
        "layer_1", "layer_2/depthwise_output", "layer_2",
        "layer_3/expansion_output", "layer_3/depthwise_output", "layer_3"}
    with pytest.raises(mnv2ref.InputError, match="no layer named 'layer_20'"):
        model.run(x, until="layer_20")


def test_capture_sees_every_intermediate_in_order(model, x):
    seen = []
    model.endpoints(x, capture=lambda name, value: seen.append((name, value.shape)))
    names = [name for name, _ in seen]
    assert names[:7] == ["layer_1", "layer_2/depthwise_output", "layer_2",
                         "layer_3/expansion_output", "layer_3/depthwise_output", "layer_3",
                         "layer_4/expansion_output"]
    # a residual block shows its projection before the add, then the sum
    i = names.index("layer_4/projection_output")
    assert names[i + 1] == "layer_4" and seen[i][1] == seen[i + 1][1]
    assert names[-3:] == ["global_pool", "Logits", "Predictions"]

    block = model.layers[3]
    parts = {}
    out = block(model.run(x, "layer_3"), lambda name, value: parts.__setitem__(name, value))
    np.testing.assert_array_equal(out, parts["layer_4/projection_output"] + model.run(x, "layer_3"))


def test_trace_json_flops_sum_to_cost_total(shared_dir, capsys, synthetic_prefix):
    image = shared_dir / "images" / "coffee.png"
    assert main(["trace", "--weights", str(synthetic_prefix), "--backend", "numpy",
                 "--json", str(image)]) == 0
    trace = json.loads(capsys.readouterr().out)
    layers = trace["layers"]
    assert [row["name"] for row in layers][-3:] == ["global_pool", "Logits", "Predictions"]
    total = mnv2ref.cost(0.35, 224, 1001).totals.flops
    assert sum(row["flops"] for row in layers) == total == layers[-1]["cumulative_flops"]
    for row in layers:
        assert row["min"] <= row["mean"] <= row["max"] and row["ms"] >= 0
    assert 0 <= layers[0]["clipped_at_0"] <= 1 and layers[-1]["clipped_at_0"] is None


def test_summary_cli(capsys):
    assert main(["summary", "--json", "-d", "0.5", "-r", "160"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"]["macs"] == mnv2ref.cost(0.5, 160).totals.macs
    assert main(["summary"]) == 0
    assert "614,620,118" in capsys.readouterr().out


def test_plots(shared_dir, tmp_path, capsys, synthetic_prefix):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cost.png"
    assert main(["plot-cost", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "maps.png"
    assert main(["plot-activations", "--weights", str(synthetic_prefix), "--backend", "numpy",
                 str(shared_dir / "images" / "chelsea.png"), "layer_3/expansion_output", str(out)]) == 0
    assert out.stat().st_size > 1000
    capsys.readouterr()
    assert main(["plot-activations", "--weights", str(synthetic_prefix), "--backend", "numpy",
                 str(shared_dir / "images" / "chelsea.png"), "layer_3/nothing", str(out)]) == 1
    assert "no endpoint named" in capsys.readouterr().err
