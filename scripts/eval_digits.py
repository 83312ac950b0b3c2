#!/usr/bin/env python
"""Sample the digits demo models with ComfyUI's own KSampler and measure them (FID-like score, class accuracy).

    scripts/python.sh -m comfyui_nested_diffusion.scripts.eval_digits --variant both --per-class 100 --grid docs/digits_samples.png

For every digit 0..9, ``--per-class`` samples from the NestedDigitsPrompt conditioning of that digit, with the
"any" prompt as the negative and classifier-free guidance ``--cfg`` (``nodes.common_ksampler``, the KSampler
node's code path); then as many unconditional samples ("any", cfg 1). Reports the classifier's accuracy on the
conditional samples and the FID-like score (demo_models/digits/metrics.py) of both sets against the held-out
reference set (no network trained on it); optionally writes a grid (one row per digit, plus a row of "any") and a
JSON summary with the command that wrote it. One seed, no interval: a look at the models, not evidence for a
setting (bench/digits_quality.py is that).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def sample_digits(model, labels: list, per_class: int, steps: int, cfg: float, sampler: str, scheduler: str, seed: int):
    """KSampler samples ``[len(labels) * per_class, 3, 16, 16]`` in [-1, 1]: ``per_class`` per label ('any' or '0'..'9')."""
    from comfyui_nested_diffusion.demo_models.digits.data import IMAGE_SIZE
    from comfyui_nested_diffusion.demo_models.digits.nodes import NestedDigitsPrompt

    import nodes

    negative = NestedDigitsPrompt.execute(digit="any").args[0]
    out = []
    for offset, label in enumerate(labels):
        positive = NestedDigitsPrompt.execute(digit=str(label)).args[0]
        latent = {"samples": torch.zeros(per_class, 3, IMAGE_SIZE, IMAGE_SIZE)}
        samples = nodes.common_ksampler(model, seed + offset, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
        out.append(samples["samples"].float().clamp(-1.0, 1.0))
    return torch.cat(out)


def save_grid(rows: list[torch.Tensor], path: Path, zoom: int = 4, pad: int = 2) -> None:
    """Rows of images ``[K, 3, H, W]`` in [-1, 1] -> one PNG (nearest-neighbour zoom, grey padding)."""
    from PIL import Image

    columns = max(row.shape[0] for row in rows)
    height, width = rows[0].shape[-2:]
    cell_h, cell_w = height * zoom + pad, width * zoom + pad
    canvas = torch.full((3, len(rows) * cell_h + pad, columns * cell_w + pad), 0.5)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = torch.nn.functional.interpolate(image[None], scale_factor=zoom, mode="nearest")[0]
            y, x = pad + r * cell_h, pad + c * cell_w
            canvas[:, y:y + height * zoom, x:x + width * zoom] = (big + 1.0) / 2.0
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def evaluate(variant: str, args) -> dict:
    from comfyui_nested_diffusion.demo_models.digits import metrics
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model(variant, args.weights.get(variant))
    digits = list(range(10))
    start = time.time()
    conditional = sample_digits(model, digits, args.per_class, args.steps, args.cfg, args.sampler, args.scheduler, args.seed)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    result = {
        "variant": variant, "per_class": args.per_class, "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
        "scheduler": args.scheduler, "seed": args.seed,
        "class_accuracy": round(metrics.class_accuracy(conditional, labels), 4),
        "fid_conditional": round(metrics.fid(conditional), 2),
    }
    columns = min(args.grid_columns, args.per_class)
    rows = [conditional[d * args.per_class:d * args.per_class + columns] for d in digits]
    if not args.skip_unconditional:
        unconditional = sample_digits(model, ["any"], args.per_class * 10, args.steps, 1.0, args.sampler, args.scheduler,
                                      args.seed + 100)
        result["fid_unconditional"] = round(metrics.fid(unconditional), 2)
        result["unconditional_class_histogram"] = torch.bincount(metrics.predict(unconditional), minlength=10).tolist()
        rows.append(unconditional[:columns])
    result["sampling_seconds"] = round(time.time() - start, 1)
    print(json.dumps(result), flush=True)
    result["rows"] = rows
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["eps", "flow", "both"], default="both")
    parser.add_argument("--eps-weights", default=None, help="another eps weights file than the shipped one")
    parser.add_argument("--flow-weights", default=None, help="another flow weights file than the shipped one")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-unconditional", action="store_true", help="only the conditional samples")
    parser.add_argument("--grid", default=None, help="PNG: a row per digit and a row of 'any', the variants side by side")
    parser.add_argument("--grid-columns", type=int, default=12)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.weights = {"eps": args.eps_weights, "flow": args.flow_weights}
    torch.set_num_threads(args.threads)

    from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

    import_comfy(force_cpu=True)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    import_pack()
    variants = ["eps", "flow"] if args.variant == "both" else [args.variant]
    results = [evaluate(variant, args) for variant in variants]
    if args.grid:  # the variants side by side, a blank column between them
        gap = torch.zeros(1, 3, *results[0]["rows"][0].shape[-2:])
        rows = [torch.cat([part for result in results for part in (result["rows"][r], gap)][:-1])
                for r in range(len(results[0]["rows"]))]
        save_grid(rows, Path(args.grid))
        print(f"grid: {args.grid} ({' | '.join(variants)}: rows 0..9 with cfg {args.cfg}"
              f"{'' if args.skip_unconditional else ', then any with cfg 1'})")
    if args.json:
        import shlex
        import sys

        command = "scripts/python.sh -m comfyui_nested_diffusion.scripts.eval_digits " + shlex.join(sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "results": [
            {k: v for k, v in r.items() if k != "rows"} for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
