"""Inverse problems, anytime: nested vs KSampler with the Inverse Problem node's patch, at equal model calls.

For each model, task and split (outer x inner), and each sampling seed:

* NestedKSampler's code path (euler_ancestral inside, scheduler ``normal``, outer_step ``auto``) on the patched
  model; its anytime image after every outer step (the inner result);
* KSampler's code path with outer x inner steps of the same solver on the same patched model; its x0 prediction
  (the patched denoised estimate) after the same number of model calls, and its final image.

Per image: PSNR to the ground truth (images clipped to [0, 1], peak 1) and consistency ``||H x - y|| / ||y||``
(unclipped pixels in [-1, 1]); averaged over the images of a seed, then mean and a 95% t-interval over the seeds.

Models and ground truth (no network trained on the truth):
* ``digits``: the learned digits UNet (eps), truth = the held-out split of scikit-learn's digits (the diffusion
  model trained on the other split). Colorization is left out: the digits are gray, so the gray measurement
  holds all of the image.
* ``exemplar``: the exact exemplar-mixture denoiser (eps, latent scale 0.125), truth = exact samples of the
  mixture (an exemplar plus its spread), drawn with a fixed seed.

The evidence protocol's FID at every boundary is bench/inverse_fid.py's (see docs/inverse_problems.md).

    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse --out bench/results/inverse_anytime.json
    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse --quick   # 1 seed, 4 x 10 only, few images
    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse --strip docs/inverse_strip.png   # the demo strip
    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse --overhead bench/results/inverse_overhead.json
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

SAMPLER, SCHEDULER = "euler_ancestral", "normal"
SPLITS = ((4, 10), (10, 10))
SEEDS = (0, 1, 2)
TRUTH_SEED = 20241207
CONSISTENT = 1e-3
FIRST_MARGIN_DB = 1.0
FINAL_TOLERANCE_DB = 0.5
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
# model: {task: (factor, sigma_y in image units)}
TASKS = {
    "digits": {"super_resolution": (4, 0.0), "inpainting": (1, 0.0), "denoising": (1, 0.1)},
    "exemplar": {"super_resolution": (4, 0.0), "inpainting": (1, 0.0), "colorization": (1, 0.0),
                 "denoising": (1, 0.1)},
}


def load_model(name: str, count: int) -> tuple:
    """(MODEL, conditioning, truth [N, 3, H, W] in [-1, 1])."""
    if name == "digits":
        from comfyui_nested_diffusion.demo_models.digits.data import ANY, digit_context, load_digits
        from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

        truth = load_digits("heldout")[0][:count]
        return load_digits_model("eps"), [[digit_context([ANY]), {}]], truth
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import sample_mixture
    from comfyui_nested_diffusion.tools.models import exemplar_model

    model, cond, exemplars = exemplar_model("eps", 0.05, 32)
    truth = sample_mixture(exemplars, 0.05, count, torch.Generator().manual_seed(TRUTH_SEED)).clamp(-1, 1)
    return model, cond, truth


def right_half_mask(size: int) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, :, size // 2:] = 1.0
    return mask


def setup_task(model, truth: torch.Tensor, task: str, factor: int, sigma_y: float) -> tuple:
    """(patched MODEL, LATENT, operator, y in [-1, 1] pixels) through the nodes themselves."""
    from comfyui_nested_diffusion.nodes.measurement import (
        NestedDegradeImage,
        NestedInverseProblem,
        image_to_pixels,
        measurement_from_image,
        measurement_operator,
    )
    from comfyui_nested_diffusion.tools.models import node_with_hidden

    image = ((truth + 1) / 2).movedim(1, -1)
    mask = right_half_mask(truth.shape[-1]) if task == "inpainting" else None
    measured = node_with_hidden(NestedDegradeImage).execute(image=image, task=task, factor=factor, sigma_y=sigma_y,
                                                            seed=TRUTH_SEED, mask=mask).args[0]
    patched, latent, _ = node_with_hidden(NestedInverseProblem).execute(model=model, image=measured, task=task,
                                                                        factor=factor, sigma_y=sigma_y, mask=mask).args
    operator = measurement_operator(task, factor, mask, measured)
    return patched, latent, operator, measurement_from_image(operator, image_to_pixels(measured))


def ksampler_run(model, cond, latent: dict, seed: int, steps: int, record_at: list[int]) -> tuple:
    """KSampler's path; (final pixels, {model calls: x0 pixels})."""
    import comfy.sample

    recorded = {}

    def callback(step, x0, x, total):
        if step + 1 in record_at:
            recorded[step + 1] = model.model.process_latent_out(x0.cpu().clone())

    latent_image = comfy.sample.fix_empty_latent_channels(model=model, latent_image=latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    out = comfy.sample.sample(model, noise, steps, 1.0, SAMPLER, SCHEDULER, cond, cond, latent_image, denoise=1.0,
                              callback=callback, disable_pbar=True, seed=seed)
    return out, recorded


def nested_run(model, cond, latent: dict, seed: int, outer: int, inner: int) -> tuple:
    """NestedKSampler's path; (final pixels, previews [outer, B, 3, H, W], outer step mode)."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings, sample_latent
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = solver_spec(SAMPLER, SCHEDULER, inner)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer, SCHEDULER, 1.0)
    recorded = []

    class RecordingSampler(NestedDiffusionSampler):
        """Every outer step's image as it arrives (outer_previews keeps at most 64 images)."""

        def report_outer_step(self, step, x0, x, total_steps):
            recorded.append(model.model.process_latent_out(x0.detach().float().cpu()))
            super().report_outer_step(step, x0, x, total_steps)

    sampler = RecordingSampler(NestedSettings(spec, 0.0, "auto"), plan, own_progress=True)
    samples, previews = sample_latent(model, sampler, seed, 1.0, cond, cond, latent)
    return samples["samples"], torch.stack(recorded), previews.get("nested_outer_step_mode")


def psnr(pixels: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over images of PSNR in dB, images in [0, 1] (clipped), peak 1."""
    image = ((pixels.double() + 1) / 2).clamp(0, 1)
    target = (truth.double() + 1) / 2
    mse = (image - target).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def consistency(operator, pixels: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of ||H x - y|| / ||y|| over the images."""
    error = operator.relative_error(pixels.double(), y.expand(pixels.shape[0], *y.shape[1:]).double())
    return float(error.mean()), float(error.max())


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "values": values}


def run_case(model, cond, truth, task: str, factor: int, sigma_y: float, seeds, splits) -> dict:
    patched, latent, operator, y = setup_task(model, truth, task, factor, sigma_y)
    case = {"factor": factor, "sigma_y": sigma_y, "splits": {}}
    for outer, inner in splits:
        boundaries = [inner * (k + 1) for k in range(outer)]
        per_seed = []
        for seed in seeds:
            started = time.perf_counter()
            final_n, previews, mode = nested_run(patched, cond, latent, seed, outer, inner)
            nested_seconds = time.perf_counter() - started
            started = time.perf_counter()
            final_k, x0 = ksampler_run(patched, cond, latent, seed, outer * inner, boundaries)
            ksampler_seconds = time.perf_counter() - started
            per_seed.append({
                "seed": seed, "outer_step_mode": mode, "nested_seconds": nested_seconds,
                "ksampler_seconds": ksampler_seconds,
                "nested_psnr": [psnr(p, truth) for p in previews],
                "ksampler_x0_psnr": [psnr(x0[n], truth) for n in boundaries],
                "nested_consistency": [consistency(operator, p, y) for p in previews],
                "ksampler_x0_consistency": [consistency(operator, x0[n], y) for n in boundaries],
                "nested_final_psnr": psnr(final_n, truth), "ksampler_final_psnr": psnr(final_k, truth),
                "ksampler_final_consistency": consistency(operator, final_k, y),
                "measurement_psnr": psnr(operator.pinv(y), truth),
            })
        summary = {
            "nfe_at_boundaries": boundaries,
            "nested_psnr": [interval([s["nested_psnr"][k] for s in per_seed]) for k in range(outer)],
            "ksampler_x0_psnr": [interval([s["ksampler_x0_psnr"][k] for s in per_seed]) for k in range(outer)],
            "ksampler_final_psnr": interval([s["ksampler_final_psnr"] for s in per_seed]),
            "nested_consistency_max": max(c[1] for s in per_seed for c in s["nested_consistency"]),
            "ksampler_x0_consistency_max": max(c[1] for s in per_seed for c in s["ksampler_x0_consistency"]),
            "nested_consistency_mean": [interval([s["nested_consistency"][k][0] for s in per_seed])
                                        for k in range(outer)],
            "ksampler_x0_consistency_mean": [interval([s["ksampler_x0_consistency"][k][0] for s in per_seed])
                                             for k in range(outer)],
            "least_squares_psnr": per_seed[0]["measurement_psnr"],
            "seconds": {"nested": sum(s["nested_seconds"] for s in per_seed),
                        "ksampler": sum(s["ksampler_seconds"] for s in per_seed)},
        }
        case["splits"][f"{outer}x{inner}"] = {"summary": summary, "per_seed": per_seed}
    case["outer_steps_1_equals_ksampler"] = outer_one_equals_ksampler(patched, cond, latent)
    return case


def outer_one_equals_ksampler(model, cond, latent: dict, steps: int = 10) -> bool:
    nested_final, _, _ = nested_run(model, cond, latent, 3, 1, steps)
    ksampler_final, _ = ksampler_run(model, cond, latent, 3, steps, [])
    return bool(torch.equal(nested_final, ksampler_final))


def verdicts(results: dict) -> list[str]:
    """PASS/FAIL lines for the targets (the FID targets: bench/inverse_fid.py)."""
    lines = []
    for model_name, tasks in results["models"].items():
        for task, case in tasks.items():
            for split, data in case["splits"].items():
                summary = data["summary"]
                where = f"{model_name} {task} {split}"
                if case["sigma_y"] == 0:
                    worst = summary["nested_consistency_max"]
                    lines.append(f"{'PASS' if worst <= CONSISTENT else 'FAIL'} consistency of every anytime image "
                                 f"<= {CONSISTENT:g}: {where}: max {worst:.2e}")
                first_n, first_k = summary["nested_psnr"][0], summary["ksampler_x0_psnr"][0]
                ok = first_n["mean"] >= first_k["mean"] + FIRST_MARGIN_DB
                lines.append(f"{'PASS' if ok else 'FAIL'} first boundary PSNR >= KSampler x0 + {FIRST_MARGIN_DB:g} dB: "
                             f"{where}: nested {first_n['mean']:.2f} [{first_n['low']:.2f}, {first_n['high']:.2f}] vs "
                             f"KSampler x0 {first_k['mean']:.2f} [{first_k['low']:.2f}, {first_k['high']:.2f}] "
                             f"at NFE {summary['nfe_at_boundaries'][0]}")
                last_n, final_k = summary["nested_psnr"][-1], summary["ksampler_final_psnr"]
                ok = last_n["mean"] >= final_k["mean"] - FINAL_TOLERANCE_DB
                lines.append(f"{'PASS' if ok else 'FAIL'} final PSNR within {FINAL_TOLERANCE_DB:g} dB of KSampler's: "
                             f"{where}: nested {last_n['mean']:.2f} [{last_n['low']:.2f}, {last_n['high']:.2f}] vs "
                             f"KSampler {final_k['mean']:.2f} [{final_k['low']:.2f}, {final_k['high']:.2f}]")
            lines.append(f"{'PASS' if case['outer_steps_1_equals_ksampler'] else 'FAIL'} outer_steps 1 equals "
                         f"KSampler exactly: {model_name} {task}")
    lines.append("ELSEWHERE FID targets (first boundary FID <= KSampler x0's; final FID <= 1.10x): measured by "
                 "bench/inverse_fid.py with the evidence protocol (bench/results/inverse_fid.json)")
    return lines


def render_strip(path: Path, seed: int = 1) -> Path:
    """The demo strip: one row per model and task: truth, the measurement (H+ y), nested after each of 4 outer
    steps, KSampler's x0 after the same model calls (its last column: its final image)."""
    from PIL import Image, ImageDraw

    tile, gap, label_w, head = 72, 4, 200, 22
    outer, inner = SPLITS[0]
    rows = []
    for model_name in ("exemplar", "digits"):
        model, cond, truth = load_model(model_name, 4)
        truth = truth[1:2]
        for task, (factor, sigma_y) in TASKS[model_name].items():
            patched, latent, operator, y = setup_task(model, truth, task, factor, sigma_y)
            _, previews, _ = nested_run(patched, cond, latent, seed, outer, inner)
            boundaries = [inner * (k + 1) for k in range(outer)]
            final_k, x0 = ksampler_run(patched, cond, latent, seed, outer * inner, boundaries)
            shown = [truth, operator.pinv(y)] + [p for p in previews] + [x0[n] for n in boundaries[:-1]] + [final_k]
            rows.append((f"{model_name}: {task.replace('_', ' ')}" + (f" x{factor}" if factor > 1 else "")
                         + (f", sigma_y {sigma_y:g}" if sigma_y else ""), shown))
    titles = ["truth", "measured"] + [f"nested @{inner * (k + 1)}" for k in range(outer)] + \
             [f"KS x0 @{inner * (k + 1)}" for k in range(outer - 1)] + [f"KSampler {outer * inner}"]
    width = label_w + len(titles) * (tile + gap)
    strip = Image.new("RGB", (width, head + len(rows) * (tile + gap)), (24, 27, 33))
    draw = ImageDraw.Draw(strip)
    for column, title in enumerate(titles):
        draw.text((label_w + column * (tile + gap), 5), title, fill=(220, 220, 225))
    for row, (name, images) in enumerate(rows):
        top = head + row * (tile + gap)
        draw.text((6, top + tile // 2 - 6), name, fill=(220, 220, 225))
        for column, pixels in enumerate(images):
            array = ((pixels[0].double().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            image = Image.fromarray(array).resize((tile, tile), Image.NEAREST)
            strip.paste(image, (label_w + column * (tile + gap), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def patch_overhead(repeats: int = 3, steps: int = 20, count: int = 32) -> dict:
    """Seconds of KSampler (``steps`` euler_ancestral steps, digits UNet, ``count`` images) with and without the
    patch, interleaved runs; the median ratio is the patch's cost per model call relative to the model's."""
    model, cond, truth = load_model("digits", count)
    result = {"steps": steps, "images": count, "repeats": repeats, "tasks": {}}
    for task, (factor, sigma_y) in TASKS["digits"].items():
        patched, latent, _, _ = setup_task(model, truth, task, factor, sigma_y)
        plain, guided = [], []
        for repeat in range(repeats):
            for target, times in ((model, plain), (patched, guided)):
                started = time.perf_counter()
                ksampler_run(target, cond, latent, repeat, steps, [])
                times.append(time.perf_counter() - started)
        ratios = sorted(g / p for g, p in zip(guided, plain))
        result["tasks"][task] = {"plain_seconds": plain, "patched_seconds": guided,
                                 "median_ratio": ratios[len(ratios) // 2]}
    return result


def markdown_table(results: dict) -> str:
    """The docs' table: PSNR (dB, mean [95% interval] over seeds) at the first and last outer boundary."""

    def cell(value: dict) -> str:
        return f"{value['mean']:.2f} [{value['low']:.2f}, {value['high']:.2f}]"

    lines = ["| model | task | split | nested @first | KSampler x0 @first | nested final | KSampler final | "
             "nested max consistency |", "|---|---|---|---|---|---|---|---|"]
    for model_name, tasks in results["models"].items():
        for task, case in tasks.items():
            name = task.replace("_", " ") + (f" x{case['factor']}" if case["factor"] > 1 else "") + \
                (f", sigma_y {case['sigma_y']:g}" if case["sigma_y"] else "")
            for split, data in case["splits"].items():
                summary = data["summary"]
                consistency = f"{summary['nested_consistency_max']:.1e}" if case["sigma_y"] == 0 else "(noisy y)"
                lines.append(f"| {model_name} | {name} | {split} (@{summary['nfe_at_boundaries'][0]}) | "
                             f"{cell(summary['nested_psnr'][0])} | {cell(summary['ksampler_x0_psnr'][0])} | "
                             f"{cell(summary['nested_psnr'][-1])} | {cell(summary['ksampler_final_psnr'])} | "
                             f"{consistency} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/inverse_anytime.json")
    parser.add_argument("--images", type=int, default=32, help="ground-truth images per model")
    parser.add_argument("--models", default="digits,exemplar")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 x 10 only, 8 images")
    parser.add_argument("--strip", help="only render the demo strip to this PNG (docs/inverse_strip.png)")
    parser.add_argument("--overhead", help="only time KSampler with and without the patch, json to this path")
    parser.add_argument("--table", help="only print the markdown table of a results json")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text(encoding="utf-8"))))
        return 0
    from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

    import_comfy(force_cpu=True)
    import_pack()
    torch.set_num_threads(1)
    if args.strip:
        print(f"wrote {render_strip(Path(args.strip))}")
        return 0
    if args.overhead:
        result = {"command": "scripts/python.sh -m comfyui_nested_diffusion.bench.inverse " + shlex.join(sys.argv[1:]),
                  "threads": 1, **patch_overhead()}
        out = Path(args.overhead)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        for task, data in result["tasks"].items():
            print(f"{task}: patched / plain KSampler time, median of {result['repeats']}: {data['median_ratio']:.3f}")
        print(f"wrote {out}")
        return 0
    seeds, splits, count = (SEEDS[:1], SPLITS[:1], 8) if args.quick else (SEEDS, SPLITS, args.images)
    started = time.perf_counter()
    results = {
        "command": "scripts/python.sh -m comfyui_nested_diffusion.bench.inverse " + shlex.join(sys.argv[1:]),
        "sampler": SAMPLER, "scheduler": SCHEDULER, "outer_step": "auto", "seeds": list(seeds),
        "truth_seed": TRUTH_SEED, "images": count, "splits": [f"{o}x{i}" for o, i in splits],
        "interval": "95% t-interval over the seeds of the per-seed mean over images",
        "psnr": "dB, images clipped to [0, 1], peak 1, mean over images",
        "consistency": "||H x - y|| / ||y||, unclipped pixels in [-1, 1]",
        "sigma_y_units": "image units (0..1)", "threads": 1, "models": {},
    }
    for model_name in args.models.split(","):
        model, cond, truth = load_model(model_name, count)
        results["models"][model_name] = {}
        for task, (factor, sigma_y) in TASKS[model_name].items():
            print(f"{model_name} {task} (factor {factor}, sigma_y {sigma_y})", flush=True)
            results["models"][model_name][task] = run_case(model, cond, truth, task, factor, sigma_y, seeds, splits)
    results["seconds"] = time.perf_counter() - started
    results["verdicts"] = verdicts(results)
    for line in results["verdicts"]:
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
