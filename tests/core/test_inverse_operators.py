"""The inverse-problem operators of nested_core.measurements, in pure torch (no ComfyUI needed)."""
from __future__ import annotations

import pytest
import torch
from comfyui_nested_diffusion.nested_core import NestedDiffusionError
from comfyui_nested_diffusion.nested_core.measurements import (
    Measurement,
    check_sigma_y,
    check_sizes,
    degrade,
    match_batch,
    measurement_guided,
    measurement_weight,
)

SHAPE = (2, 3, 12, 12)


def random_known(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=generator) > 0.4).float()


def operators() -> list[Measurement]:
    return [Measurement("super_resolution", factor=2), Measurement("super_resolution", factor=3),
            Measurement("super_resolution", factor=1), Measurement("inpainting", known=random_known()),
            Measurement("colorization"), Measurement("denoising")]


def ids(op: Measurement) -> str:
    return f"{op.task}{op.factor if op.task == 'super_resolution' else ''}"


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("op", operators(), ids=ids)
def test_pseudo_inverse_identities(op):
    """H H+ H = H and H+ H H+ = H+ (Moore-Penrose), and H+ H is symmetric (an orthogonal projection)."""
    x = randn(SHAPE, 1)
    y = op.forward(randn(SHAPE, 2))
    assert torch.allclose(op.forward(op.pinv(op.forward(x))), op.forward(x), atol=1e-12)
    assert torch.allclose(op.pinv(op.forward(op.pinv(y))), op.pinv(y), atol=1e-12)
    z = randn(SHAPE, 3)
    left = (op.pinv(op.forward(x)) * z).sum()
    right = (x * op.pinv(op.forward(z))).sum()
    assert torch.allclose(left, right, atol=1e-10)


@pytest.mark.parametrize("op", operators(), ids=ids)
def test_adjoint(op):
    """<H x, y> = <x, H^T y> and H H^T = c I."""
    x = randn(SHAPE, 4)
    y = op.forward(randn(SHAPE, 5))
    assert torch.allclose((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum(), atol=1e-10)
    assert torch.allclose(op.forward(op.adjoint(y)), op.row_norm2 * y, atol=1e-12)


@pytest.mark.parametrize("op", operators(), ids=ids)
def test_projection_is_consistent_and_closest(op):
    """The weight-1 projection meets the measurement, moves only in the row space, and is idempotent."""
    truth, start = randn(SHAPE, 6), randn(SHAPE, 7)
    y = op.forward(truth)
    projected = op.project(start, y)
    assert op.relative_error(projected, y).max() < 1e-12
    assert torch.allclose(op.project(projected, y), projected, atol=1e-12)
    # the change lies in the row space: removing it from the null-space part changes nothing
    change = projected - start
    assert torch.allclose(op.pinv(op.forward(change)), change, atol=1e-12)
    # closest: any other consistent point (the truth) is at least as far from the start
    assert (projected - start).norm() <= (truth - start).norm() + 1e-12


def test_measured_shapes():
    assert Measurement("super_resolution", factor=4).measured_shape(SHAPE) == (2, 3, 3, 3)
    assert Measurement("colorization").measured_shape(SHAPE) == (2, 1, 12, 12)
    assert Measurement("super_resolution", factor=4).forward(randn(SHAPE, 0)).shape == (2, 3, 3, 3)


def test_operators_commute_with_the_image_to_pixel_map():
    """Rows sum to 1: H(2x - 1) = 2 H x - 1 (inpainting on the measured pixels), so [0, 1] images and [-1, 1]
    pixels give the same measurement."""
    x = torch.rand(SHAPE, dtype=torch.float64)
    for op in operators():
        left, right = op.forward(2 * x - 1), 2 * op.forward(x) - op.forward(torch.ones_like(x))
        assert torch.allclose(left, right, atol=1e-12), op.task


def test_noise_aware_weight():
    sigma = torch.tensor([10.0, 1.0, 0.1, 0.0])
    assert torch.equal(measurement_weight(sigma, 0.0, 1.0), torch.ones(4, dtype=torch.float64))
    weight = measurement_weight(sigma, 0.2, 0.25)  # sigma_y / sqrt(c) = 0.4
    assert torch.all(weight[:-1] > weight[1:])
    assert weight[0] > 0.99 and weight[-1] == 0
    assert torch.isclose(weight[2], torch.tensor(0.01 / (0.01 + 0.16), dtype=torch.float64))


def test_noisy_measurement_guided_step_moves_part_way():
    op = Measurement("denoising")
    x0, y = torch.zeros(SHAPE, dtype=torch.float64), torch.ones(SHAPE, dtype=torch.float64)
    guided = measurement_guided(x0, y, op, torch.tensor([1.0, 0.0]), sigma_y=1.0)
    assert torch.allclose(guided[0], torch.full(SHAPE[1:], 0.5, dtype=torch.float64))
    assert torch.equal(guided[1], x0[1])
    exact = measurement_guided(x0, y, op, torch.tensor([1.0, 0.0]), sigma_y=0.0)
    assert torch.equal(exact, y)


def test_degrade_noise_stays_on_the_measured_pixels():
    known = random_known()
    op = Measurement("inpainting", known=known)
    y = degrade(torch.zeros(SHAPE), op, 0.5, torch.Generator().manual_seed(0))
    assert torch.all(y[known.expand_as(y) == 0] == 0)
    assert y.abs().sum() > 0


def test_bad_inputs_name_the_input():
    with pytest.raises(NestedDiffusionError, match="task"):
        Measurement("deblur")
    with pytest.raises(NestedDiffusionError, match="factor"):
        Measurement("super_resolution", factor=0)
    with pytest.raises(NestedDiffusionError, match="mask"):
        Measurement("inpainting")
    with pytest.raises(NestedDiffusionError, match="sigma_y"):
        check_sigma_y(-0.1)
    with pytest.raises(NestedDiffusionError, match="sigma_y"):
        check_sigma_y(float("nan"))
    assert check_sigma_y(0) == 0.0
    with pytest.raises(NestedDiffusionError, match="factor 3 does not divide"):
        check_sizes(Measurement("super_resolution", factor=3), (4, 4), (16, 16))
    with pytest.raises(NestedDiffusionError, match="image is 16x16.*latent size = image size x factor"):
        check_sizes(Measurement("super_resolution", factor=2), (16, 16), (16, 16))
    check_sizes(Measurement("super_resolution", factor=2), (8, 8), (16, 16))
    with pytest.raises(NestedDiffusionError, match="image is 8x8, but the latent is 16x16"):
        check_sizes(Measurement("colorization"), (8, 8), (16, 16))
    with pytest.raises(NestedDiffusionError, match="mask is 12x12"):
        check_sizes(Measurement("inpainting", known=random_known()), (16, 16), (16, 16))
    with pytest.raises(NestedDiffusionError, match="image batch is 3, but the latent batch is 2"):
        match_batch(torch.zeros(3, 3, 4, 4), 2)
    assert match_batch(torch.zeros(1, 3, 4, 4), 5).shape[0] == 5


def test_sizes_through_a_vae_are_the_latent_times_its_downscale():
    """Through a VAE the solution is the latent's size times the VAE's downscale; errors say both sizes."""
    check_sizes(Measurement("super_resolution", factor=4), (16, 16), (8, 8), downscale=8)
    check_sizes(Measurement("colorization"), (64, 32), (8, 4), downscale=8)
    with pytest.raises(NestedDiffusionError, match=r"image is 8x8, but a 8x8 \(64x64 pixels through the VAE, x8\) "
                                                   r"latent at factor 4 needs a 16x16 image \(latent size x the VAE's "
                                                   r"downscale = image size x factor\)"):
        check_sizes(Measurement("super_resolution", factor=4), (8, 8), (8, 8), downscale=8)
    with pytest.raises(NestedDiffusionError, match=r"factor 3 does not divide the latent size 8x8 \(64x64 pixels"):
        check_sizes(Measurement("super_resolution", factor=3), (8, 8), (8, 8), downscale=8)
    with pytest.raises(NestedDiffusionError, match=r"image is 8x8, but the latent is 8x8 \(64x64 pixels through "
                                                   r"the VAE, x8\)"):
        check_sizes(Measurement("denoising"), (8, 8), (8, 8), downscale=8)
