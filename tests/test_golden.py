"""Every endpoint against TensorFlow's goldens, and EMA vs raw loading."""

import numpy as np
import pytest

import mnv2ref

TOLERANCE = 5e-5  # max|ours - golden| / max|golden|, float32
BACKBONE = "checkpoints/mobilenet_v2_1.0_224_backbone/model.ckpt"
SYNTHETIC = "checkpoints/synthetic_mobilenet_v2_0.35_224/model.ckpt"


def relative_error(ours, golden):
    return float(np.abs(ours.astype(np.float64) - golden).max() / np.abs(golden).max())


@pytest.fixture(scope="module")
def backbone(shared_dir):
    return mnv2ref.MobileNetV2.from_checkpoint(shared_dir / BACKBONE)


@pytest.fixture(scope="module")
def synthetic(shared_dir):
    return mnv2ref.MobileNetV2.from_checkpoint(shared_dir / SYNTHETIC)


def golden(shared_dir, name):
    with np.load(shared_dir / "golden" / f"{name}.npz") as data:
        return dict(data)


def assert_endpoints_match(model, expected, dtype=np.float32, backend="numpy"):
    ours = model.endpoints(expected["input"].astype(dtype), backend=backend)
    names = [name for name in expected if name != "input"]
    errors = {name: relative_error(ours[name], expected[name]) for name in names}
    for name in names:
        assert ours[name].shape == expected[name].shape, name
        assert ours[name].dtype == dtype, name
    bad = {name: e for name, e in errors.items() if not e <= TOLERANCE}
    assert not bad, f"endpoints off the golden: {bad}"
    return errors


@pytest.mark.parametrize("image", ["chelsea", "coffee"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backbone_matches_tensorflow(shared_dir, backbone, image, dtype):
    expected = golden(shared_dir, f"backbone_1.0_224_{image}")
    assert backbone.depth_multiplier == 1.0 and backbone.num_classes == 0
    errors = assert_endpoints_match(backbone, expected, dtype)
    assert len(errors) == (25 if image == "chelsea" else 20)


def test_preprocessing_reproduces_tensorflow_input(shared_dir):
    for image in ("chelsea", "coffee"):
        x = mnv2ref.preprocess(mnv2ref.load_image(shared_dir / "images" / f"{image}.png"))
        np.testing.assert_allclose(x[None], golden(shared_dir, f"backbone_1.0_224_{image}")["input"],
                                   rtol=0, atol=1e-6)


def test_synthetic_ema_matches_golden(shared_dir, synthetic):
    assert synthetic.depth_multiplier == 0.35 and synthetic.num_classes == 1001
    assert synthetic.metadata["use_ema"] is True
    errors = assert_endpoints_match(synthetic, golden(shared_dir, "synthetic_0.35_224_chelsea_ema"))
    assert set(errors) == {"layer_1", "layer_2", "layer_18", "layer_19", "global_pool",
                           "Logits", "Predictions"}


def test_synthetic_predict_is_the_golden_softmax(shared_dir, synthetic):
    expected = golden(shared_dir, "synthetic_0.35_224_chelsea_ema")
    probs = synthetic.predict(expected["input"], backend="numpy")
    assert probs.shape == (1, 1001)
    assert relative_error(probs, expected["Predictions"]) <= TOLERANCE
    assert probs.argmax() == expected["Predictions"].argmax()


def test_raw_weights_do_not_match_the_ema_golden(shared_dir):
    """Proves which tensors were loaded: the raw values give other outputs."""
    raw = mnv2ref.MobileNetV2.from_checkpoint(shared_dir / SYNTHETIC, use_ema=False)
    assert raw.metadata["use_ema"] is False
    expected = golden(shared_dir, "synthetic_0.35_224_chelsea_ema")
    ours = raw.endpoints(expected["input"])
    for name in ("layer_1", "Logits"):
        assert relative_error(ours[name], expected[name]) > 1e-2, name


def test_backbone_has_no_classifier(backbone, shared_dir):
    x = golden(shared_dir, "backbone_1.0_224_coffee")["input"]
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
