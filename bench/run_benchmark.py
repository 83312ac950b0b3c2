"""Benchmark: NestedKSampler vs ComfyUI's own KSampler at equal NFEs, inside a real ComfyUI process.

    scripts/bench.sh            # full run (a few minutes on 2 CPU cores); builds .nested_env/ first if needed
    scripts/bench.sh --quick    # smoke run (about a minute): fewer budgets, splits, samplers and repeats

Parts (``--parts quality,cost,nfe,spread,fid,pick,update_seconds``):
1. quality: anytime quality on the exact-denoiser model (eps, v-prediction, flow), see ``bench/quality.py``;
2. cost: wall time, peak memory and preview emission of NestedKSampler / KSampler, see ``bench/cost.py``;
   where a CUDA GPU is present, a second process repeats it on the GPU at 512x512 and 1024x1024;
3. nfe: model calls counted by a wrapper on the model, for every sampler in SAMPLER_NAMES, see ``bench/nfe.py``.
4. spread: the final samples' spread on N(0, I) data for every sampler (nested auto / ddim, KSampler), see ``bench/spread.py``.
5. fid: FID-like score vs NFEs on the learned digits models (the paper's Figures 3/4), see ``bench/fid.py``.
6. pick: keep one candidate mid-run: batch items evaluated and the kept item's image, see ``bench/pick.py``.
7. update_seconds: intervals between images with update_seconds on a steadily slow model, see ``bench/update_seconds.py``.

Writes ``bench/results/{quality,cost,nfe}.json``, ``anytime_quality.png``, ``anytime_quality_all.png``,
``cost.png`` and ``summary.md``; prints a results table and one PASS/FAIL line per target, and exits 1 if any
target fails (the FAIL lines say which runs missed it and by how much).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT, child_env, import_comfy, import_pack, module_command

RESULTS = REPO_ROOT / "bench" / "results"
PARTS = ("quality", "cost", "nfe", "spread", "fid", "pick", "update_seconds")


def log(message: str) -> None:
    print(message, flush=True)


def environment(started: float) -> dict:
    import torch

    try:
        import comfyui_version

        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "comfyui": comfy_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "repository_commit": commit + ("+uncommitted changes" if dirty else ""),
    }


def write_json(path: Path, data: dict) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(data), indent=1) + "\n")


# ----------------------------------------------------------------------------------------------- tables

def quality_table(results: dict) -> list[str]:
    lines = [
        "Anytime quality (exact denoiser, euler, batch {batch}): mean RMS distance to the nearest exemplar".format(**results),
        f"{'model':12s} {'N':>3s} {'split':>6s} {'1st NFE':>7s} {'nested':>8s} {'KSampler':>8s} {'ratio':>7s} "
        f"{'final n/K':>15s} {'distinct':>8s} {'AUC n/K':>15s} {'AUC@spread n/K':>15s}",
    ]
    for prediction, family in results["models"].items():
        for budget, entry in family["budgets"].items():
            vanilla = entry["ksampler"]
            for run in entry["nested"]:
                c, nested = run["comparison"], run["nested"]
                tag = run["split"] + ("" if run["gated"] else "*")
                lines.append(
                    f"{prediction:12s} {budget:>3s} {tag:>6s} {c['boundary_nfe'][0]:7d} {c['nested_distance'][0]:8.4f} "
                    f"{c['ksampler_x0_distance'][0]:8.4f} {c['first_boundary_ratio']:7.4f} "
                    f"{nested['final_distance']:7.4f}/{vanilla['final_distance']:.4f} "
                    f"{nested['distinct_exemplars']:>4d}/{vanilla['distinct_exemplars']:<3d} "
                    f"{c['auc_mean_nested']:8.3f}/{c['auc_mean_ksampler']:<6.3f} "
                    f"{c['auc_mean_resolved_nested']:8.3f}/{c['auc_mean_resolved_ksampler']:.3f}")
    lines.append("(* extended split: reported, no targets. ratio: nested / KSampler at the first outer boundary. AUC: "
                 "mean log10 distance from the first boundary to N; AUC@spread: with distances floored at the spread)")
    return lines


def cost_table(results: dict, label: str) -> list[str]:
    lines = [f"Cost at equal NFEs on {label} ({results['device_name']}, {results['cpu_count']} cores, "
             f"torch threads {results['torch_threads']}): medians; wall ratio = median of per-pair ratios; "
             "plan ms: NestedKSampler's planning per run / on the first run with this model",
             f"{'workload':44s} {'NFE':>4s} {'pairs':>5s} {'wall s (n/K)':>15s} {'ratio':>6s} {'plan ms':>11s} "
             f"{'peak MiB (n/K)':>15s} {'ratio':>6s} {'previews':>8s}"]
    for w in results["workloads"]:
        walls, peaks = w["wall_s_median"], w["peak_bytes_median"]
        lines.append(
            f"{w['name']:44s} {w['nfe']:4d} {w['pairs']:5d} {walls['nested']:7.3f}/{walls['ksampler']:<7.3f} "
            f"{w['wall_ratio']:6.3f} {1000 * w['plan_s_median']:5.1f}/{1000 * w['plan_cold_s']:<5.1f} "
            f"{peaks['nested'] / 2**20:7.2f}/{peaks['ksampler'] / 2**20:<7.2f} {w['peak_memory_ratio']:6.3f} "
            f"{w['preview_share_median']:8.2%}")
    return lines


def nfe_table(results: dict) -> list[str]:
    lines = [f"NFE truth ({results['outer_steps']} outer x {results['inner_steps']} inner): counted = reported for "
             "every sampler; multi-call solvers, and KSampler's count for the same total steps:"]
    rows = results["runs"].get("eps") or next(iter(results["runs"].values()))
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"  {name:28s} ERROR {row['error']}")
        elif row["counted"] != results["outer_steps"] * results["inner_steps"] or not row["ok"]:
            lines.append(f"  {name:28s} nested counted {row['counted']:3d} (reported {row['reported_at_boundaries'][-1]}, "
                         f"planned {row['planned']}{'' if row['exact_plan'] else ', an estimate'}); "
                         f"KSampler {results['outer_steps'] * results['inner_steps']} steps: {row['ksampler_same_steps']}")
    return lines


def _span(values, fmt: str) -> str:
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def summary_markdown(env: dict, quality: dict | None, costs: list[tuple[str, dict]], nfe: dict | None,
                     checks: list[tuple[str, bool, str]], runtime: float, extra_tables: list[list[str]] = ()) -> str:
    out = ["# Benchmark results", "",
           f"`scripts/bench.sh` on {env['cpu_cores']} CPU cores ({env['platform']}), ComfyUI {env['comfyui']}, "
           f"torch {env['torch']}, {env['date']}; the whole run took {runtime / 60:.1f} minutes.", ""]
    if quality:
        out += ["![Anytime quality](anytime_quality.png)", "",
                "Distance of each image to the data manifold (RMS to the nearest exemplar of the exact-denoiser model, "
                "pixel units), NestedKSampler's preview after every outer step vs KSampler's x0 prediction after the "
                f"same NFEs (euler, batch {quality['batch']}); every split and budget in "
                "`bench/results/anytime_quality_all.png`.", "",
                "| model | NFEs | splits (outer x inner) | first image after | nested at its first image | KSampler x0 there | "
                "worst ratio | final nested / KSampler | distinct nested / KSampler | AUC@spread nested / KSampler |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for prediction, family in quality["models"].items():
            for budget, entry in family["budgets"].items():
                vanilla = entry["ksampler"]
                runs = [r for r in entry["nested"] if r["gated"]]
                if not runs:
                    continue
                cs = [r["comparison"] for r in runs]
                firsts = [c["boundary_nfe"][0] for c in cs]
                nested_first = [c["nested_distance"][0] for c in cs]
                vanilla_first = [c["ksampler_x0_distance"][0] for c in cs]
                finals = [r["nested"]["final_distance"] for r in runs]
                distinct = [r["nested"]["distinct_exemplars"] for r in runs]
                auc_n = sum(c["auc_mean_resolved_nested"] for c in cs) / len(cs)
                auc_v = sum(c["auc_mean_resolved_ksampler"] for c in cs) / len(cs)
                out.append(f"| {prediction} | {budget} | {', '.join(r['split'] for r in runs)} | "
                           f"{_span(firsts, '{}')} NFEs | {_span(nested_first, '{:.4f}')} | {_span(vanilla_first, '{:.2f}')} | "
                           f"{max(c['first_boundary_ratio'] for c in cs):.3f} | "
                           f"{max(finals):.4f} / {vanilla['final_distance']:.4f} | "
                           f"{_span(distinct, '{}')} / {vanilla['distinct_exemplars']} | {auc_n:.2f} / {auc_v:.2f} |")
        out += ["", "Distances: mean over the batch, RMS per pixel and channel (pixels in [-1, 1]); the data's own spread "
                "is 0.05 and the exemplars are 0.74 to 1.1 apart. Worst ratio: the largest nested / KSampler distance at a "
                "first outer boundary (target 1/20 = 0.05). AUC@spread: mean log10 distance of the latest image from the "
                "first outer boundary to the budget (the analogue of the paper's area under log-FID per NFE), distances "
                "floored at the spread (best possible -1.30), averaged over the splits; the raw AUC, every split and the "
                "splits without targets (2 outer steps, 4-step inner processes) are in `bench/results/quality.json`. "
                "eps and v-prediction agree to the last digit: the exact denoiser is the same, only the model's output "
                "parametrisation differs, and ComfyUI converts it back exactly."]
        out.append("")
    if costs:
        out += ["![Cost](cost.png)", "",
                "| device | workload | NFEs | wall s nested / KSampler | ratio | peak MiB nested / KSampler | ratio | previews, % of run |",
                "|---|---|---|---|---|---|---|---|"]
        for label, results in costs:
            for w in results["workloads"]:
                walls, peaks = w["wall_s_median"], w["peak_bytes_median"]
                out.append(f"| {label} | {w['name']} | {w['nfe']} | {walls['nested']:.3f} / {walls['ksampler']:.3f} | "
                           f"{w['wall_ratio']:.3f} | {peaks['nested'] / 2**20:.2f} / {peaks['ksampler'] / 2**20:.2f} | "
                           f"{w['peak_memory_ratio']:.3f} | {w['preview_share_median']:.2%} |")
        out.append("")
    if nfe:
        total = sum(len(rows) for rows in nfe["runs"].values())
        out += [f"NFE truth: {total} runs ({', '.join(nfe['runs'])} x {len(nfe['samplers'])} samplers), model calls "
                "counted by ComfyUI's unet wrapper equal the NFEs NestedKSampler reported at every outer step.", ""]
    for table in extra_tables:
        out += [*table, ""]
    out += ["| target | result | detail |", "|---|---|---|"]
    for name, ok, detail in checks:
        out.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- CUDA

def run_cuda_cost(out_dir: Path, quick: bool) -> tuple[dict | None, str | None]:
    """The cost part on the GPU, in a second process (ComfyUI picks its device once per process)."""
    target = out_dir / "cost_cuda.json"
    target.unlink(missing_ok=True)
    command = module_command("bench.run_benchmark", "--cuda-cost", "--out", str(out_dir), *(["--quick"] if quick else []))
    log("  cost    CUDA: " + " ".join(command[1:]))
    result = subprocess.run(command, cwd=REPO_ROOT, text=True, capture_output=True, env=child_env())
    for line in result.stdout.splitlines():
        log("  " + line)
    if result.returncode != 0 or not target.exists():
        return None, (result.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(target.read_text()), None


def cuda_cost_main(out_dir: Path, quick: bool) -> int:
    import_comfy(force_cpu=False)
    import_pack()
    import torch
    from comfyui_nested_diffusion.bench.cost import run_cost

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    results = run_cost(quick, log)
    write_json(out_dir / "cost_cuda.json", results)
    return 0


# ----------------------------------------------------------------------------------------------- main

def fid_settings(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The fid part's settings: its defaults (or --quick's) with the --fid-* options applied."""
    from dataclasses import replace

    from comfyui_nested_diffusion.bench.fid import BUDGETS, FidSettings

    def listed(text: str | None, kind=str) -> tuple | None:
        return None if text is None else tuple(kind(item.strip()) for item in text.split(",") if item.strip())

    settings = FidSettings.quick() if args.quick else FidSettings()
    changes = {"samples": args.fid_samples, "cfgs": listed(args.fid_cfg, float),
               "solvers": listed(args.fid_solvers), "variants": listed(args.fid_variants)}
    budgets = listed(args.fid_budgets, int)
    if budgets is not None:
        unknown = [n for n in budgets if n not in BUDGETS]
        if unknown:
            parser.error(f"--fid-budgets {unknown}: the fid part has splits for {sorted(BUDGETS)} NFEs")
        changes["budgets"] = {n: BUDGETS[n] for n in budgets}
    if args.fid_samples is not None and args.fid_samples < 10:
        parser.error("--fid-samples must be at least 10 (one of each digit)")
    return replace(settings, **{key: value for key, value in changes.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer budgets, splits, samplers and repeats")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU cost run even where CUDA is present")
    parser.add_argument("--cuda-cost", action="store_true", help=argparse.SUPPRESS)
    fid_options = parser.add_argument_group("fid part", "a subset of the fid part (default: all of it, or --quick's)")
    fid_options.add_argument("--fid-samples", type=int, help="samples per run (default 1000, --quick 100)")
    fid_options.add_argument("--fid-cfg", help="comma-separated CFG scales (default 1,2)")
    fid_options.add_argument("--fid-budgets", help="comma-separated total NFEs, each with its splits (default 40,100)")
    fid_options.add_argument("--fid-solvers", help="comma-separated inner solvers (default euler_ancestral,euler)")
    fid_options.add_argument("--fid-variants", help="comma-separated digits models (default eps,flow)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cuda_cost:
        return cuda_cost_main(out_dir, args.quick)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    fid_run = fid_settings(args, parser)

    started = time.time()
    log(f"Nested diffusion benchmark{' (quick)' if args.quick else ''}: parts {', '.join(parts)}; results in {out_dir}")
    import_comfy(force_cpu=True)  # the targets are checked on the CPU everywhere; CUDA gets a second process
    import_pack()
    import torch
    from comfyui_nested_diffusion.bench import plots

    env = environment(started)
    log(f"ComfyUI {env['comfyui']}, torch {env['torch']}, {env['cpu_cores']} cores, CUDA: {env['cuda_available']}")
    checks: list[tuple[str, bool, str]] = []
    quality = nfe = None
    costs: list[tuple[str, dict]] = []
    threads = torch.get_num_threads()
    timings = {}

    if "quality" in parts:
        from comfyui_nested_diffusion.bench.quality import quality_checks, run_quality

        t0 = time.time()
        torch.set_num_threads(1)  # the exact model's ops are tiny: one thread is fastest and steadiest
        quality = run_quality(args.quick, log)
        torch.set_num_threads(threads)
        checks += quality_checks(quality)
        quality["environment"] = env
        write_json(out_dir / "quality.json", quality)
        plots.plot_quality(quality, out_dir / "anytime_quality.png")
        plots.plot_quality_grid(quality, out_dir / "anytime_quality_all.png")
        timings["quality"] = time.time() - t0

    def run_part(name: str, run, part_checks, single_thread: bool = True) -> dict | None:
        """Run one part if asked for: its results (with the environment) in ``<name>.json``, its targets checked."""
        if name not in parts:
            return None
        t0 = time.time()
        if single_thread:  # the exact model's ops are tiny: one thread is fastest and steadiest
            torch.set_num_threads(1)
        results = run(args.quick, log)
        torch.set_num_threads(threads)
        checks.extend(part_checks(results))
        results["environment"] = env
        write_json(out_dir / f"{name}.json", results)
        timings[name] = time.time() - t0
        return results

    from comfyui_nested_diffusion.bench.fid import fid_checks, plot_fid, run_fid
    from comfyui_nested_diffusion.bench.nfe import nfe_checks, run_nfe
    from comfyui_nested_diffusion.bench.pick import pick_checks, run_pick
    from comfyui_nested_diffusion.bench.spread import run_spread, spread_checks
    from comfyui_nested_diffusion.bench.update_seconds import run_update_seconds, update_seconds_checks

    nfe = run_part("nfe", run_nfe, nfe_checks)
    spread = run_part("spread", run_spread, spread_checks)
    run_part("pick", run_pick, pick_checks)
    run_part("update_seconds", run_update_seconds, update_seconds_checks)
    fid_results = run_part("fid", lambda quick, log: run_fid(quick, log, fid_run), fid_checks, single_thread=False)
    if fid_results:
        plot_fid(fid_results, out_dir / "fid_vs_nfe.png")

    if "cost" in parts:
        from comfyui_nested_diffusion.bench.cost import cost_checks, run_cost

        t0 = time.time()
        cpu = run_cost(args.quick, log)
        cpu["environment"] = env
        costs.append(("CPU", cpu))
        checks += cost_checks(cpu, "CPU")
        if env["cuda_available"] and not args.no_cuda:
            cuda, error = run_cuda_cost(out_dir, args.quick)
            if cuda is None:
                checks.append(("cost [CUDA]: the GPU run completes", False, error))
            else:
                label = f"CUDA {cuda['device_name']}"
                costs.append((label, cuda))
                cpu["cuda"] = cuda
                checks += cost_checks(cuda, label)
        write_json(out_dir / "cost.json", cpu)
        plots.plot_cost(costs, out_dir / "cost.png")
        timings["cost"] = time.time() - t0

    runtime = time.time() - started
    log("")
    if quality:
        for line in quality_table(quality):
            log(line)
        log("")
    for label, results in costs:
        for line in cost_table(results, label):
            log(line)
        log("")
    if nfe:
        for line in nfe_table(nfe):
            log(line)
        log("")
    extra_tables = []
    if fid_results:
        from comfyui_nested_diffusion.bench.fid import fid_table

        extra_tables.append(["![FID vs NFEs](fid_vs_nfe.png)", "", *fid_table(fid_results)])
    if spread:
        from comfyui_nested_diffusion.bench.spread import spread_table

        extra_tables.append(["Final standard deviation on N(0, I) data (the data's: 1.000), 4 x 10, scheduler normal; "
                             "exempt rows are explained in docs/results.md (Keeping the distribution)", "",
                             *spread_table(spread)])
    for table in extra_tables:
        for line in table:
            log(line)
        log("")
    (out_dir / "summary.md").write_text(summary_markdown(env, quality, costs, nfe, checks, runtime, extra_tables))
    for name, ok, detail in checks:
        log(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = [name for name, ok, _ in checks if not ok]
    parts_time = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    log(f"\nRuntime {runtime / 60:.1f} min ({parts_time}). Results: {out_dir}")
    if failed:
        log(f"{len(failed)} of {len(checks)} targets FAILED: " + "; ".join(failed))
        return 1
    log(f"All {len(checks)} targets PASS.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
