"""A FID-like quality metric for the digits models (pure torch + scipy, no ComfyUI).

The paper measures FID with Inception features; 16x16 digits need a feature extractor of their own. Three image
sets are kept apart, as FID with Inception keeps ImageNet, the generator's data and the reference apart:

- the diffusion models train on scikit-learn's digits, ``"train"`` split (1438);
- the feature network (``DigitClassifier``) trains on 5000 MNIST digits brought to the same look
  (``data.feature_training_digits``), with shape, blur and noise augmentation, so that it reads the blurry early
  estimates and the noisy images of a sampler as it reads clean digits;
- the reference set is scikit-learn's ``"heldout"`` split (359 digits), seen by no network.

Its penultimate layer (``FEATURE_DIM`` SiLU features; none constant on real digits) plays the role of
Inception's pool features:

- ``fid(images, reference)``: Frechet distance between Gaussians fitted to the features of ``images`` and of
  ``reference`` (default: the held-out reference set);
- ``class_accuracy(images, labels)``: how often the classifier reads the digit a conditional sample was asked for.

Like FID, the value depends on the sample count (it is biased upwards for small sets): compare numbers measured
with the same count, beside the real-vs-real floor at that count (bench/digits_quality.py). Images are
``[N, 3 or 1, 16, 16]`` in [-1, 1] (values outside are clamped).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_SIZE, NUM_CLASSES, feature_training_digits, load_digits, to_gray

FEATURE_DIM = 64
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_PATH = WEIGHTS_DIR / "digits_classifier.safetensors"
CLASSIFIER_SEED = 0


class DigitClassifier(torch.nn.Module):
    """conv 16 - conv 32 - pool - conv 64 - pool - linear ``FEATURE_DIM`` (the features, SiLU) - linear 10.

    SiLU rather than ReLU on the features: a ReLU unit that is negative for every digit is a constant feature
    (dead), which the Frechet distance cannot see through; SiLU units stay informative below zero."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.feature = torch.nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, gray: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.feature(self.conv(gray).flatten(1)))

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(gray)))


def _prepare(images: torch.Tensor) -> torch.Tensor:
    gray = to_gray(images)
    if gray.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        gray = torch.nn.functional.interpolate(gray, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return gray


def _blur(gray: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image with its own ``sigma`` (pixels; 0 leaves it as it is), 5x5 kernel."""
    offsets = torch.arange(-2, 3, dtype=gray.dtype)
    weights = torch.exp(-offsets[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)  # [N, 5]
    padded = torch.nn.functional.pad(gray, (2, 2, 2, 2), mode="replicate")
    rows = sum(weights[:, i, None, None, None] * padded[:, :, i:i + gray.shape[-2], :] for i in range(5))
    return sum(weights[:, i, None, None, None] * rows[:, :, :, i:i + gray.shape[-1]] for i in range(5))


def _augment(gray: torch.Tensor, generator: torch.Generator, noise: float, blur: float) -> torch.Tensor:
    """Random scale (0.85-1.2 per axis) and shift (up to 2 pixels) with background fill, then, each on half of the
    batch, a Gaussian blur of sigma up to ``blur`` and Gaussian noise of std up to ``noise``: the feature network
    must read the blurry early estimates and the noisy ones of a sampler, not only clean digits."""
    count = gray.shape[0]
    scale = 0.85 + 0.35 * torch.rand(count, 2, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (4.0 / IMAGE_SIZE)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / scale[:, 0], 1 / scale[:, 1]
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(gray.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(gray + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0
    blurred = torch.rand(count, generator=generator) < 0.5
    sigma = torch.rand(count, generator=generator) * blur * blurred
    out = _blur(out, sigma)
    noisy = (torch.rand(count, 1, 1, 1, generator=generator) < 0.5).float()
    level = torch.rand(count, 1, 1, 1, generator=generator) * noise * noisy
    return (out + level * torch.randn(out.shape, generator=generator)).clamp(-1.0, 1.0)


def train_classifier(epochs: int = 30, batch_size: int = 64, seed: int = CLASSIFIER_SEED, noise: float = 0.6,
                     blur: float = 1.5, log=print) -> DigitClassifier:
    """Train ``DigitClassifier`` on the feature network's own set (``data.feature_training_digits``: MNIST digits,
    disjoint from the diffusion models' training split and from the reference set), with shape, blur and noise
    augmentation (seeded, deterministic; a few minutes on one CPU thread)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = feature_training_digits()
    gray = _prepare(images)
    classifier = DigitClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-3)
    steps_per_epoch = (gray.shape[0] + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    classifier.train()
    for epoch in range(epochs):
        order = torch.randperm(gray.shape[0], generator=generator)
        total = 0.0
        for start in range(0, gray.shape[0], batch_size):
            index = order[start:start + batch_size]
            logits = classifier(_augment(gray[index], generator, noise, blur))
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * index.numel()
        if log and (epoch + 1) % 5 == 0:
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / gray.shape[0]:.4f}")
    return classifier.eval()


def save_classifier(classifier: DigitClassifier, path: Path = CLASSIFIER_PATH) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in classifier.state_dict().items()}
    save_file(state, str(path), metadata={"kind": "digits_classifier", "config": json.dumps({"feature_dim": FEATURE_DIM})})


_CLASSIFIERS: dict[str, DigitClassifier] = {}
_REFERENCE_STATS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_classifier(path: Path | str = CLASSIFIER_PATH) -> DigitClassifier:
    """The shipped classifier (cached per path)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    key = str(Path(path).resolve())
    if key not in _CLASSIFIERS:
        with safe_open(key, framework="pt") as handle:
            config = json.loads((handle.metadata() or {}).get("config", "{}"))
        classifier = DigitClassifier(feature_dim=int(config.get("feature_dim", FEATURE_DIM)))
        classifier.load_state_dict(load_file(key))
        _CLASSIFIERS[key] = classifier.eval()
    return _CLASSIFIERS[key]


@torch.no_grad()
def _run(images: torch.Tensor, classifier: DigitClassifier | None, method: str, batch_size: int = 512) -> torch.Tensor:
    classifier = classifier if classifier is not None else load_classifier()
    gray = _prepare(images)
    outs = [getattr(classifier, method)(gray[start:start + batch_size]) for start in range(0, gray.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, NUM_CLASSES)


def features(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """The classifier's penultimate-layer features of ``images``: ``[N, FEATURE_DIM]`` float64."""
    return _run(images, classifier, "features").double()


def predict(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """The digit the classifier reads in each image: ``[N]`` long."""
    return _run(images, classifier, "forward").argmax(dim=1)


def class_accuracy(images: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``images`` the classifier reads as their ``labels`` (ints 0..9)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return float((predict(images, classifier) == labels).double().mean())


def statistics(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of features ``[N, D]``, N >= 2."""
    array = feats.detach().double().cpu().numpy()
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors [N, D], got shape {array.shape}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance of N(mu1, cov1) and N(mu2, cov2): |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    The trace of the square root is taken from the eigenvalues of the symmetric ``C1^(1/2) cov2 C1^(1/2)`` (same
    spectrum as ``cov1 cov2``), which stays real and finite for singular covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, dtype=np.float64)), np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    values, vectors = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


REFERENCE_SPLIT = "heldout"


def reference_images() -> torch.Tensor:
    """The default real reference set of ``fid``: the held-out split (359 digits no network trained on)."""
    return load_digits(REFERENCE_SPLIT)[0]


def fid(images: torch.Tensor, reference: torch.Tensor | None = None, classifier: DigitClassifier | None = None) -> float:
    """FID-like score of ``images`` against ``reference`` images (default ``reference_images()``): lower is better."""
    if reference is None:
        key = REFERENCE_SPLIT
        if classifier is None and key in _REFERENCE_STATS:
            ref_stats = _REFERENCE_STATS[key]
        else:
            ref_stats = statistics(features(reference_images(), classifier))
            if classifier is None:
                _REFERENCE_STATS[key] = ref_stats
    else:
        ref_stats = statistics(features(reference, classifier))
    mu, cov = statistics(features(images, classifier))
    return frechet_distance(mu, cov, *ref_stats)
