"""Every endpoint against TensorFlow's goldens, and EMA vs raw loading."""

import numpy as np
import pytest

import mnv2ref
from mnv2ref.compare import compare_endpoints, relative_error

TOLERANCE = 5e-5  # max|ours - golden| / max|golden|, float32


def assert_endpoints_match(model, expected, dtype=np.float32, backend="numpy"):
    ours = model.endpoints(expected["input"].astype(dtype), backend=backend)
    errors = compare_endpoints(ours, expected)
    for name in errors:
        assert ours[name].dtype == dtype, name
    bad = {name: e for name, e in errors.items() if not e <= TOLERANCE}
    assert not bad, f"endpoints off the golden: {bad}"
    return errors


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("image", ["chelsea", "coffee"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backbone_matches_tensorflow(backbone, golden, image, dtype, backend):
    expected = golden(f"backbone_1.0_224_{image}")
    assert backbone.depth_multiplier == 1.0 and backbone.num_classes == 0
    errors = assert_endpoints_match(backbone, expected, dtype, backend)
    assert len(errors) == (25 if image == "chelsea" else 20)


def test_preprocessing_reproduces_tensorflow_input(shared_dir, golden):
    for image in ("chelsea", "coffee"):
        x = mnv2ref.preprocess(mnv2ref.load_image(shared_dir / "images" / f"{image}.png"))
        np.testing.assert_allclose(x[None], golden(f"backbone_1.0_224_{image}")["input"],
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_synthetic_ema_matches_golden(synthetic, golden, backend):
    assert synthetic.depth_multiplier == 0.35 and synthetic.num_classes == 1001
    assert synthetic.metadata["use_ema"] is True
    errors = assert_endpoints_match(synthetic, golden("synthetic_0.35_224_chelsea_ema"), backend=backend)
    assert set(errors) == {"layer_1", "layer_2", "layer_18", "layer_19", "global_pool",
                           "Logits", "Predictions"}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_synthetic_predict_is_the_golden_softmax(synthetic, golden, backend):
    expected = golden("synthetic_0.35_224_chelsea_ema")
    probs = synthetic.predict(expected["input"], backend=backend)
    assert probs.shape == (1, 1001)
    assert relative_error(probs, expected["Predictions"]) <= TOLERANCE
    assert probs.argmax() == expected["Predictions"].argmax()


def test_raw_weights_do_not_match_the_ema_golden(synthetic_prefix, golden):
    """Proves which tensors were loaded: the raw values give other outputs."""
    raw = mnv2ref.MobileNetV2.from_checkpoint(synthetic_prefix, use_ema=False)
    assert raw.metadata["use_ema"] is False
    expected = golden("synthetic_0.35_224_chelsea_ema")
    ours = raw.endpoints(expected["input"])
    for name in ("layer_1", "Logits"):
        assert relative_error(ours[name], expected[name]) > 1e-2, name


def test_backbone_has_no_classifier(backbone, golden):
    x = golden("backbone_1.0_224_coffee")["input"]
    with pytest.raises(mnv2ref.Mnv2refError, match="no classifier"):
        backbone.predict(x)
    assert "Logits" not in backbone.endpoints(x)
    embedding = backbone.embed(x, backend="numpy")
    assert embedding.shape == (1, 1280)


def test_odd_sizes_and_batches_run(backbone):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 225, 193, 3)).astype(np.float32)
    eps = backbone.endpoints(x)
    assert eps["layer_1"].shape == (3, 113, 97, 32)
    assert eps["layer_19"].shape == (3, 8, 7, 1280)
    assert eps["global_pool"].shape == (3, 1, 1, 1280)
    # each image of the batch is computed independently
    single = backbone.endpoints(x[1:2])["global_pool"]
    np.testing.assert_allclose(eps["global_pool"][1:2], single, rtol=1e-5, atol=1e-6)
