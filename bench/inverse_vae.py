"""The Inverse Problem node on a latent model through a VAE: how consistent, and what it costs.

A tiny SD1.5-family UNet (random weights, ``tools.models.tiny_sd15_unet``) diffuses 4-channel SD latents; the VAE is
ComfyUI's TAESD architecture (``comfy.sd.VAE`` from a state dict, as VAELoader builds a ``taesd`` VAE) with weights
set so that it is a known, imperfect autoencoder (``block_mean_vae``): it encodes the mean of every 8x8 block
and decodes each block flat. So ``decode(encode(x))`` is the projection onto block-flat images (clipped to [0, 1]):
exact for images the VAE can represent, lossy for others, as a real VAE is lossy off its training images.

For each task, two kinds of ground truth, 64x64: block-flat images (the VAE represents them) and smooth images
that are not block-flat (it cannot). KSampler (40 steps) and NestedKSampler (4 x 10) with the patched model, and
KSampler without the patch: ``||H x - y|| / ||y||`` of the decoded images (every nested outer step, KSampler's
final), mean over images, max over seeds. Cost: KSampler with the VAE-patched model against KSampler with the
unpatched model at the same steps, interleaved repeats; the extra seconds per model call beside the UNet's own.

    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_vae --out bench/results/inverse_vae.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

SIZE, DOWNSCALE = 64, 8
ENCODE_SCALE = 0.02  # latents of the block-mean VAE: 0.02 x the block mean in [0, 1], far inside TAESD's tanh clamp
TASKS = {"super_resolution": 8, "inpainting": 1, "colorization": 1, "denoising": 1}
OUTER, INNER = 4, 10
SEEDS = (0, 1, 2)


def block_mean_state_dict(latent_channels: int = 4) -> dict:
    """TAESD weights (``comfy.taesd.taesd.TAESD``) for an 8x8 block-mean autoencoder, everything else zero.

    Encoder (input in [0, 1]): the first conv copies RGB into channels 0-2, every Block is ``relu(x + 0)`` (identity
    on non-negative values), each stride-2 conv averages 2x2, the last conv scales by ``ENCODE_SCALE`` (channel 3
    stays 0). Decoder: TAESD's clamp ``3 tanh(z / 3)`` (nearly the identity at these values), a conv undoing the
    scale, identity Blocks and convs between nearest 2x upsamplings, the last conv copying channels 0-2 to RGB."""
    import comfy.taesd.taesd

    module = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    state = {key: torch.zeros_like(value) for key, value in module.state_dict().items()}
    state["vae_scale"], state["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)

    def copy(key: str, gain: float, tap: tuple = (1, 1), channels: int = 3) -> None:
        for c in range(channels):
            state[key][c, c, tap[0], tap[1]] = gain

    encoder = module.taesd_encoder
    for index, layer in enumerate(encoder):
        if isinstance(layer, torch.nn.Conv2d):
            key = f"taesd_encoder.{index}.weight"
            if layer.stride == (2, 2):
                for tap in ((1, 1), (1, 2), (2, 1), (2, 2)):  # padding 1: taps 1, 2 read pixels 2i, 2i + 1
                    copy(key, 0.25, tap)
            else:
                copy(key, 1.0 if index == 0 else ENCODE_SCALE)
    decoder = module.taesd_decoder
    for index, layer in enumerate(decoder):
        if isinstance(layer, torch.nn.Conv2d):
            copy(f"taesd_decoder.{index}.weight", 1.0 / ENCODE_SCALE if index == 1 else 1.0)
    return state


def block_mean_vae(latent_channels: int = 4):
    """A ComfyUI VAE (``comfy.sd.VAE``, TAESD architecture, downscale 8) that encodes 8x8 block means."""
    import comfy.sd

    return comfy.sd.VAE(sd=block_mean_state_dict(latent_channels))


def truth_images(kind: str, count: int, seed: int = 0) -> torch.Tensor:
    """ComfyUI IMAGEs ``[count, 64, 64, 3]`` in [0.1, 0.9]: ``block_flat`` (nearest-upsampled 8x8 colours: the VAE
    represents them) or ``smooth`` (bilinear-upsampled 8x8 colours: it does not)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = 0.1 + 0.8 * torch.rand(count, 3, SIZE // DOWNSCALE, SIZE // DOWNSCALE, generator=generator)
    mode = {"block_flat": "nearest", "smooth": "bilinear"}[kind]
    extra = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode=mode, **extra).movedim(1, -1)


def right_half_mask(size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, :, size // 2:] = 1.0
    return mask


def setup(model, vae, truth: torch.Tensor, task: str, sigma_y: float = 0.0) -> tuple:
    """(patched MODEL, LATENT, operator, y in [-1, 1] pixels), through the nodes."""
    from comfyui_nested_diffusion.nodes.measurement import (
        NestedDegradeImage,
        NestedInverseProblem,
        image_to_pixels,
        measurement_from_image,
        measurement_operator,
    )
    from comfyui_nested_diffusion.tools.models import node_with_hidden

    factor = TASKS[task]
    mask = right_half_mask(truth.shape[1]) if task == "inpainting" else None
    measured = node_with_hidden(NestedDegradeImage).execute(image=truth, task=task, factor=factor, sigma_y=sigma_y,
                                                            seed=0, mask=mask).args[0]
    patched, latent, _ = node_with_hidden(NestedInverseProblem).execute(
        model=model, image=measured, task=task, factor=factor, sigma_y=sigma_y, mask=mask, vae=vae).args
    operator = measurement_operator(task, factor, mask, measured)
    return patched, latent, operator, measurement_from_image(operator, image_to_pixels(measured))


def decoded(vae, model, latents: torch.Tensor) -> torch.Tensor:
    """Sampler output (model latents, already ``process_latent_out``-ed) -> [-1, 1] pixels, as VAEDecode does."""
    from comfyui_nested_diffusion.nodes.measurement import image_to_pixels

    return image_to_pixels(vae.decode(latents))


def ksampler_final(model, cond, latent: dict, seed: int, steps: int) -> torch.Tensor:
    import nodes

    return nodes.common_ksampler(model, seed, steps, 1.0, "euler_ancestral", "normal", cond, cond, latent,
                                 denoise=1.0)[0]["samples"]


def nested_previews(model, cond, latent: dict, seed: int, outer: int, inner: int) -> tuple:
    """NestedKSampler's code path: (final LATENT samples, outer-step previews [outer, B, C, h, w])."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings, sample_latent
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = solver_spec("euler_ancestral", "normal", inner)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer, "normal", 1.0)
    sampler = NestedDiffusionSampler(NestedSettings(spec, 0.0, "auto"), plan, own_progress=True)
    samples, previews = sample_latent(model, sampler, seed, 1.0, cond, cond, latent)
    batch = latent["samples"].shape[0]
    return samples["samples"], previews["samples"].reshape(outer, batch, *previews["samples"].shape[1:])


def consistency_case(model, cond, vae, kind: str, task: str, count: int, seeds) -> dict:
    truth = truth_images(kind, count)
    patched, latent, operator, y = setup(model, vae, truth, task)

    def error(latents):
        pixels = decoded(vae, model, latents)
        return float(operator.relative_error(pixels, y.expand(pixels.shape[0], *y.shape[1:])).mean())

    per_seed = []
    for seed in seeds:
        final, previews = nested_previews(patched, cond, latent, seed, OUTER, INNER)
        per_seed.append({
            "seed": seed,
            "nested_outer_steps": [error(p) for p in previews],
            "nested_final": error(final),
            "ksampler_patched_final": error(ksampler_final(patched, cond, latent, seed, OUTER * INNER)),
            "ksampler_unpatched_final": error(ksampler_final(model, cond, latent, seed, OUTER * INNER)),
        })
    # what the VAE alone loses: the measurement's own least-squares image, encoded and decoded
    from comfyui_nested_diffusion.nodes.measurement import pixels_to_image

    through_vae = decoded(vae, model, vae.encode(pixels_to_image(operator.pinv(y).expand(count, -1, -1, -1))))
    return {
        "per_seed": per_seed,
        "nested_worst_outer_step": max(max(s["nested_outer_steps"]) for s in per_seed),
        "ksampler_patched_worst": max(s["ksampler_patched_final"] for s in per_seed),
        "ksampler_unpatched_best": min(s["ksampler_unpatched_final"] for s in per_seed),
        "least_squares_through_vae": float(operator.relative_error(through_vae, y.expand(count, *y.shape[1:])).mean()),
    }


def cost(model, cond, vae, count: int, steps: int, repeats: int) -> dict:
    """Seconds of KSampler with and without the VAE patch (super-resolution x8), interleaved repeats."""
    truth = truth_images("smooth", count)
    patched, latent, _, _ = setup(model, vae, truth, "super_resolution")
    plain, guided = [], []
    for repeat in range(repeats):
        for target, times in ((model, plain), (patched, guided)):
            started = time.perf_counter()
            ksampler_final(target, cond, latent, repeat, steps)
            times.append(time.perf_counter() - started)
    ratios = sorted(g / p for g, p in zip(guided, plain))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    return {"images": count, "steps": steps, "repeats": repeats, "plain_seconds": plain, "patched_seconds": guided,
            "median_ratio": ratios[len(ratios) // 2],
            "unet_seconds_per_call": median(plain) / steps,
            "extra_seconds_per_call": (median(guided) - median(plain)) / steps}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/inverse_vae.json")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args(argv)
    from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

    import_comfy(force_cpu=True)
    import_pack()
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(1)
    from comfyui_nested_diffusion.tools.models import conditioning, parameter_count, tiny_sd15_unet

    model, cond, vae = tiny_sd15_unet("eps", seed=1), conditioning(seed=2), block_mean_vae()
    started = time.perf_counter()
    result = {
        "command": "scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_vae " + shlex.join(sys.argv[1:]),
        "model": f"tiny SD1.5-family UNet, random weights ({parameter_count(model)} parameters), eps, SD15 latents",
        "vae": "ComfyUI TAESD architecture, 8x8 block-mean weights (bench/inverse_vae.py: block_mean_vae)",
        "sampler": "euler_ancestral", "scheduler": "normal", "split": f"{OUTER}x{INNER}", "cfg": 1.0,
        "images": args.images, "image_size": SIZE, "seeds": list(SEEDS), "threads": 1,
        "consistency": "||H x - y|| / ||y|| of the VAE-decoded images ([-1, 1] pixels), mean over images",
        "tasks": {task: {"factor": factor} for task, factor in TASKS.items()},
    }
    for task in TASKS:
        for kind in ("block_flat", "smooth"):
            print(f"{task} {kind}", flush=True)
            result["tasks"][task][kind] = consistency_case(model, cond, vae, kind, task, args.images, SEEDS)
    result["cost"] = cost(model, cond, vae, args.images, OUTER * INNER, 3)
    result["seconds"] = time.perf_counter() - started
    lines = []
    for task, data in result["tasks"].items():
        for kind in ("block_flat", "smooth"):
            case = data[kind]
            lines.append(f"{task} {kind}: nested worst outer step {case['nested_worst_outer_step']:.2e}, KSampler "
                         f"patched {case['ksampler_patched_worst']:.2e}, unpatched {case['ksampler_unpatched_best']:.2e},"
                         f" H+ y through the VAE {case['least_squares_through_vae']:.2e}")
    c = result["cost"]
    lines.append(f"cost: KSampler with the VAE patch / without, median of {c['repeats']}: {c['median_ratio']:.2f} "
                 f"(+{1000 * c['extra_seconds_per_call']:.1f} ms per call beside the UNet's "
                 f"{1000 * c['unet_seconds_per_call']:.1f} ms, {c['images']} latents of 8x8)")
    result["summary"] = lines
    print("\n".join(lines))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
