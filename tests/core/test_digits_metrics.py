"""The digits data and the FID-like metric (demo_models/digits): pure torch + scipy, no ComfyUI."""
import json

import numpy as np
import pytest
import torch
from comfyui_nested_diffusion.demo_models.digits import data, metrics
from comfyui_nested_diffusion.demo_models.digits.metrics import frechet_distance


def test_split_is_fixed_disjoint_and_complete():
    train, heldout = data.split_indices()
    assert len(train) == 1438 and len(heldout) == 359
    assert set(train.tolist()).isdisjoint(heldout.tolist())
    assert sorted(train.tolist() + heldout.tolist()) == list(range(1797))
    again, _ = data.split_indices()
    assert torch.equal(train, again)


def test_images_are_16x16_rgb_in_range_with_equal_channels():
    images, labels = data.load_digits("heldout")
    assert images.shape == (359, 3, 16, 16) and labels.shape == (359,)
    assert float(images.min()) == -1.0 and float(images.max()) <= 1.0 and float(images.max()) > 0.9
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert sorted(set(labels.tolist())) == list(range(10))
    # background is black (-1) at the left and right borders, ink down the middle
    assert float(images[:, :, :, 0].mean()) < -0.95 and float(images[:, :, :, -1].mean()) < -0.95
    assert float(images[:, :, :, 6:10].mean()) > 0.0


def test_digit_context_one_hot_and_any_is_zero():
    context = data.digit_context([3, data.ANY, 0])
    assert context.shape == (3, 1, data.CONTEXT_DIM)
    assert context[0, 0].argmax() == 3 and float(context[0].sum()) == 1.0
    assert float(context[1].abs().sum()) == 0.0
    assert data.choice_to_label("any") == data.ANY and data.choice_to_label("7") == 7
    with pytest.raises(ValueError):
        data.digit_context([10])
    with pytest.raises(ValueError):
        data.choice_to_label("eleven")


def test_frechet_distance_of_identical_statistics_is_zero():
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 8, generator=generator, dtype=torch.float64)
    mu, cov = metrics.statistics(feats)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, abs=1e-9)
    # covariances sharing an eigenbasis: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 4.0, 6), rng.uniform(0.1, 4.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_general_covariances_symmetric_and_matches_the_symmetric_form():
    from scipy import linalg

    rng = np.random.default_rng(2)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov1, cov2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    root1 = np.real(linalg.sqrtm(cov1))
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2) - 2 * np.trace(np.real(linalg.sqrtm(root1 @ cov2 @ root1))))
    forward = frechet_distance(mu1, cov1, mu2, cov2)
    assert forward == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(forward, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(mu1, cov1, mu2[:4], cov2[:4, :4])


def test_classifier_reads_real_digits_it_never_saw():
    """The shipped classifier trained on MNIST digits only: both scikit-learn splits are new to it (measured: 91.9%
    on the training split, 95.0% on the held-out one)."""
    images, labels = data.load_digits("train")
    assert metrics.class_accuracy(images, labels) >= 0.89
    heldout, heldout_labels = data.load_digits("heldout")
    assert metrics.class_accuracy(heldout, heldout_labels) >= 0.92
    # a wrong label set is caught by the accuracy
    assert metrics.class_accuracy(images, (labels + 1) % 10) <= 0.05


def test_every_feature_is_alive_on_real_digits():
    feats = metrics.features(metrics.reference_images())
    assert int((feats.std(dim=0) < 1e-3).sum()) == 0


def test_reference_is_the_held_out_split_no_network_trained_on():
    train, heldout = data.split_indices()
    reference = metrics.reference_images()
    assert reference.shape[0] == len(heldout) == 359
    assert torch.equal(reference, data.load_digits("heldout")[0])
    assert metrics.fid(reference) == pytest.approx(0.0, abs=1e-6)  # the reference against itself


def test_features_shape_and_grey_equals_rgb():
    images, _ = data.load_digits("heldout")
    feats = metrics.features(images[:20])
    assert feats.shape == (20, metrics.FEATURE_DIM) and feats.dtype == torch.float64
    assert torch.allclose(metrics.features(images[:20, :1]), feats)
    assert float(feats.std(dim=0).max()) > 0.0


def test_fid_real_digits_small_blur_and_wrong_classes_large():
    """Against the held-out reference (measured: 700 real training digits 7.6, 5x5-blurred 113, one class 317,
    uniform noise 380, blank 541)."""
    images, labels = data.load_digits("train")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    sample = images[order[:700]]
    generator = torch.Generator().manual_seed(1)
    real = metrics.fid(sample)
    blurred = metrics.fid(torch.nn.functional.avg_pool2d(sample, 5, stride=1, padding=2, count_include_pad=False))
    ones = metrics.fid(images[labels == 1])  # real digits, but all of one class
    noise = metrics.fid(torch.rand(700, 3, 16, 16, generator=generator) * 2 - 1)
    blank = metrics.fid(torch.full((700, 3, 16, 16), -1.0) + 0.01 * torch.randn(700, 3, 16, 16, generator=generator))
    assert 5 * real < blurred
    assert 20 * real < ones and 20 * real < noise and 20 * real < blank


def test_shipped_weight_files_are_small_and_self_describing():
    from safetensors import safe_open

    weights = sorted(metrics.WEIGHTS_DIR.glob("*.safetensors"))
    assert {path.name for path in weights} >= {"digits_eps.safetensors", "digits_flow.safetensors", "digits_classifier.safetensors"}
    for path in weights:
        assert path.stat().st_size < 5_000_000, path
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        assert "config" in metadata
        json.loads(metadata["config"])
