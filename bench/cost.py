"""Part 2: cost of NestedKSampler vs KSampler at equal NFEs: wall time, peak memory, preview emission.

Both run as ComfyUI runs nodes, in one process: ``NestedKSampler.execute`` on a class clone carrying its hidden
``unique_id`` (as the executor calls V3 nodes) and ``nodes.KSampler().sample``. ComfyUI is set up as a server
with ``--preview-method auto`` runs: Latent2RGB previews (KSampler: every step; NestedKSampler: every outer
step), and a progress hook that encodes each preview as the server does (see ``measure.ServerLikeProgressHook``).
After a warm-up run of each, the pairs run alternately (nested first in even pairs, KSampler first in odd
ones). The wall-time ratio is the median over pairs of nested / KSampler (the two runs of a pair share the
machine's load of that moment, which on a shared machine swings run times far more than anything measured
here); the ratio of the medians, of the fastest runs and of CPU times are recorded too. Peak memory is exact
and repeatable (see ``measure.py``), its ratio is that of the medians.
"""
from __future__ import annotations

import torch
from comfyui_nested_diffusion.tools.models import counting_clone, node_with_hidden

from .measure import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    EmissionTimer,
    ServerLikeProgressHook,
    comfy_session,
    cpu_rss_method,
    measure,
    median,
    tensor_peak_bytes,
)
from .models import exact_model, exact_model_config, sd15_conditioning, sd15_config, sd15_unet

SEED = 3


def _workloads(device: torch.device, quick: bool) -> list[dict]:
    """What to time: the exact model (previews off and on), the SD1.5-architecture UNet at 512x512 (+1024 on CUDA).

    The exact model's step costs about a millisecond, so its runs measure what nested adds around the model
    calls (schedules, outer steps, progress); with previews off both do nothing else. Its ops are tiny, so it
    runs on one torch thread (on a busy 2-core machine, waking a second OpenMP thread for a 32x32 op costs
    more than the op). The UNet runs on the default threads, like a real model.
    """
    cuda = device.type == "cuda"
    items = []
    for previews in ("none", "auto"):
        for batch in (1, 4):
            items.append({"name": f"exact eps 32x32 b{batch} previews {previews}", "model": "exact", "size": 32,
                          "latent": 32, "batch": batch, "outer": 4, "inner": 12, "cfg": 1.0, "scheduler": "normal",
                          "previews": previews, "threads": None if cuda else 1, "preview_target": False,
                          "pairs": 5 if quick else 15})
    sizes = (512, 1024) if cuda else (512,)
    for size in sizes:
        for batch in ((1,) if quick else (1, 4)):
            if quick:
                pairs, outer, inner = 2, 2, 4
            elif cuda:
                pairs, outer, inner = 9, 4, 6
            else:
                pairs, outer, inner = (9, 3, 4) if batch == 1 else (5, 3, 4)
            items.append({"name": f"sd15-arch unet {size}x{size} b{batch} previews auto", "model": "sd15", "size": size,
                          "latent": size // 8, "batch": batch, "outer": outer, "inner": inner, "cfg": 7.5,
                          "scheduler": "normal", "previews": "auto", "threads": None, "preview_target": True,
                          "pairs": pairs})
    return items


def _nested_call(model, positive, negative, latent, item):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler
    from comfyui_nested_diffusion.nodes.previews_wanted import mark_outer_previews

    # The graph KSampler runs in: the sampler's samples go on, its outer_previews output is taken by no node, and the
    # server's prompt handler marks it so (the run then keeps no copies of its inner results for that output).
    graph = mark_outer_previews({"prompt": {
        "bench-nested": {"class_type": "NestedKSampler", "inputs": {}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["bench-nested", 0]}}}})["prompt"]
    node = node_with_hidden(NestedKSampler, unique_id="bench-nested", prompt=graph)

    def run():
        return node.execute(model=model, seed=SEED, outer_steps=item["outer"], inner_steps=item["inner"], cfg=item["cfg"],
                            sampler_name="euler", scheduler=item["scheduler"], positive=positive, negative=negative,
                            latent_image=latent, denoise=1.0)

    return run


def _ksampler_call(model, positive, negative, latent, item):
    import nodes

    node = nodes.KSampler()

    def run():
        return node.sample(model, SEED, item["outer"] * item["inner"], item["cfg"], "euler", item["scheduler"],
                           positive, negative, latent)

    return run


def _pairs(item, runs, device, hook, emission, calls, samples) -> None:
    for name in ("nested", "ksampler"):  # warm-up: loads the model, allocates first buffers
        runs[name]()
    for pair in range(item["pairs"]):
        order = ("nested", "ksampler") if pair % 2 == 0 else ("ksampler", "nested")
        for name in order:
            hook.reset()
            emission.reset()
            calls["n"] = 0
            _, result = measure(runs[name], device)
            entry = samples[name]
            entry["wall_s"].append(result.wall_s)
            entry["cpu_s"].append(result.cpu_s)
            entry["peak_bytes" if device.type == "cuda" else "rss_peak_bytes"].append(result.peak_bytes)
            entry["nfe"].append(calls["n"])
            entry["previews"].append(hook.previews)
            entry["preview_encode_s"].append(hook.encode_s)
            if name == "nested":
                entry["emission_s"].append(emission.seconds)
                entry["emission_calls"].append(emission.calls)
    if device.type != "cuda":  # tensor peaks from profiled runs: alternating pairs (they agree to the byte)
        for pair in range(min(item["pairs"], 2)):
            for name in (("nested", "ksampler") if pair % 2 == 0 else ("ksampler", "nested")):
                samples[name]["peak_bytes"].append(tensor_peak_bytes(runs[name]))


def _plan_seconds(model, item, repeats: int = 5) -> float:
    """Median time of NestedKSampler's planning (plan_nested_run: outer and inner schedules) for this workload."""
    import time

    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = solver_spec("euler", item["scheduler"], item["inner"])
    model_sampling = model.get_model_object("model_sampling")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan_nested_run(model_sampling, spec, item["outer"], item["scheduler"], 1.0)
        times.append(time.perf_counter() - start)
    return median(times)


def _time_workload(item: dict, device: torch.device, log) -> dict:
    from comfyui_nested_diffusion.nodes.reporting import NestedRunReporter

    if item["model"] == "exact":
        model, cond, _ = exact_model("eps")
        positive = negative = cond
        channels, config = 3, exact_model_config("eps")
    else:
        model = sd15_unet(seed=0)
        positive, negative = sd15_conditioning(1), sd15_conditioning(2)
        channels, config = 4, sd15_config(model)
    latent = {"samples": torch.zeros(item["batch"], channels, item["latent"], item["latent"])}
    plan_cold_s = _plan_seconds(model, item, repeats=1)  # before any run: the first prompt on this model
    model, calls = counting_clone(model)
    runs = {"nested": _nested_call(model, positive, negative, latent, item),
            "ksampler": _ksampler_call(model, positive, negative, latent, item)}
    hook = ServerLikeProgressHook()
    emission = EmissionTimer()
    samples = {name: {"wall_s": [], "cpu_s": [], "peak_bytes": [], "rss_peak_bytes": [], "nfe": [], "previews": [],
                      "preview_encode_s": []} for name in runs}
    samples["nested"]["emission_s"] = []
    samples["nested"]["emission_calls"] = []
    threads = torch.get_num_threads()
    if item["threads"]:
        torch.set_num_threads(item["threads"])
    try:
        with comfy_session(item["previews"], hook), emission.installed(NestedRunReporter):
            _pairs(item, runs, device, hook, emission, calls, samples)
            plan_s = _plan_seconds(model, item)
    finally:
        item["threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
    del model
    nested, vanilla = samples["nested"], samples["ksampler"]
    wall_n, wall_v = median(nested["wall_s"]), median(vanilla["wall_s"])
    peak_n, peak_v = median(nested["peak_bytes"]), median(vanilla["peak_bytes"])
    shares = [e / w for e, w in zip(nested["emission_s"], nested["wall_s"])]
    out = {
        **item,
        "nfe": item["outer"] * item["inner"],
        "model_config": config,
        "runs": samples,
        "wall_s_median": {"nested": wall_n, "ksampler": wall_v},
        "cpu_s_median": {"nested": median(nested["cpu_s"]), "ksampler": median(vanilla["cpu_s"])},
        "peak_bytes_median": {"nested": peak_n, "ksampler": peak_v},
        "rss_peak_bytes_median": {"nested": median(nested["rss_peak_bytes"]), "ksampler": median(vanilla["rss_peak_bytes"])},
        "wall_ratio": median([a / b for a, b in zip(nested["wall_s"], vanilla["wall_s"])]),
        "wall_ratio_of_medians": wall_n / wall_v,
        "wall_overhead_s": wall_n - wall_v,
        "plan_s_median": plan_s,
        "plan_cold_s": plan_cold_s,
        "wall_ratio_of_minimums": min(nested["wall_s"]) / min(vanilla["wall_s"]),
        "cpu_ratio": median(nested["cpu_s"]) / median(vanilla["cpu_s"]),
        "peak_memory_ratio": (peak_n / peak_v) if peak_v > 0 else (1.0 if peak_n == 0 else float("inf")),
        "preview_share_median": median(shares),
        "ksampler_preview_encode_share_median": median([e / w for e, w in zip(vanilla["preview_encode_s"], vanilla["wall_s"])]),
        "preview_share_max": max(shares),
        "nfe_equal": all(n == item["outer"] * item["inner"] for n in nested["nfe"] + vanilla["nfe"]),
        "emission_measured": all(calls == item["outer"] for calls in nested["emission_calls"]),
    }
    log(f"  cost    {item['name']:40s} NFE {out['nfe']:3d} x{item['pairs']:2d} pairs: wall {wall_n:.3f}/{wall_v:.3f} s "
        f"= {out['wall_ratio']:.3f} (plan {1000 * plan_s:.1f} ms, first {1000 * plan_cold_s:.1f} ms), peak {peak_n / 2**20:.2f}/{peak_v / 2**20:.2f} MiB "
        f"= {out['peak_memory_ratio']:.3f}, "
        f"previews {100 * out['preview_share_median']:.2f}% of the run")
    return out


def run_cost(quick: bool, log=print) -> dict:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    cuda = device.type == "cuda"
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": _cpu_count(),
        "memory_method": CUDA_MEMORY_METHOD if cuda else CPU_MEMORY_METHOD,
        "rss_method": None if cuda else cpu_rss_method(),
        "timing": "time.perf_counter around the node call (CUDA: synchronized); CPU time = time.process_time",
        "sampler": "euler (NestedKSampler: euler inside every inner diffusion)",
        "setup": "--preview-method none or auto (Latent2RGB, per workload), with a progress hook that encodes previews "
                 "as ComfyUI's server does; console progress bars off (set_progress_bar_enabled(False)); pairs "
                 "alternate; wall_ratio = median over pairs of nested / KSampler; medians of each side recorded. A "
                 "counting unet wrapper on the model checks the NFEs of every run",
        "preview_target_scope": "the 2% preview target applies to the SD1.5-architecture UNet (a real model's step "
                                "cost); the exact model's step (about 1 ms) costs less than encoding one 512 px "
                                "preview, so its share is reported only",
        "preview_emission": "time inside NestedRunReporter.on_outer_step (preview decode, progress hook with JPEG "
                            "encode, websocket event) / the run's wall time. ComfyUI's server encodes previews on its "
                            "event-loop thread; here the hook encodes inline, so the share is an upper bound",
        "workloads": [],
    }
    results["plan_ms_by_scheduler"] = _plan_table(quick)
    for item in _workloads(device, quick):
        results["workloads"].append(_time_workload(item, device, log))
        comfy.model_management.cleanup_models()
        comfy.model_management.soft_empty_cache()
    return results


def _plan_table(quick: bool) -> dict:
    """NestedKSampler's planning time (ms) for every scheduler on the eps exact model's sampling.

    ``cold``: the first plan on a model nothing was planned for yet (a fresh model each time); ``warm``: the
    median of three more plans on that model (the pack keeps schedules per model sampling).
    """
    import time

    import comfy.samplers
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, plan_nested_run

    splits = ((4, 12),) if quick else ((4, 12), (4, 25), (10, 10))
    table = {}
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        row = {}
        for outer, inner in splits:
            model, _, _ = exact_model("eps")
            model_sampling = model.get_model_object("model_sampling")
            spec = InnerSolverSpec(sampler_name="euler", scheduler=scheduler, steps=inner)
            times = []
            try:
                for _ in range(4):
                    start = time.perf_counter()
                    plan_nested_run(model_sampling, spec, outer, scheduler, 1.0)
                    times.append(time.perf_counter() - start)
            except Exception as error:  # e.g. more outer steps than the scheduler can space: the node refuses too
                row[f"{outer}x{inner}"] = f"{type(error).__name__}: {error}"
            else:
                row[f"{outer}x{inner}"] = {"cold": round(1000 * times[0], 2), "warm": round(1000 * median(times[1:]), 2)}
        table[scheduler] = row
    return table


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cost_checks(results: dict, label: str = "") -> list[tuple[str, bool, str]]:
    where = f" [{label}]" if label else ""
    workloads = results["workloads"]

    def worst(key, fmt):
        item = max(workloads, key=lambda w: w[key])
        return f"worst {fmt.format(item[key])} ({item['name']})"

    checks = []
    bad_nfe = [w["name"] for w in workloads if not w["nfe_equal"]]
    checks.append((f"cost{where}: NFEs identical (counted)", not bad_nfe,
                   f"{len(workloads)} workloads" if not bad_nfe else "differ: " + ", ".join(bad_nfe)))
    for key, limit, title, fmt in (
        ("wall_ratio", 1.05, "wall-time ratio nested / KSampler <= 1.05 (median of per-pair ratios)", "{:.3f}"),
        ("peak_memory_ratio", 1.05, "peak-memory ratio nested / KSampler <= 1.05", "{:.3f}"),
    ):
        failed = [f"{w['name']}: {fmt.format(w[key])}" for w in workloads if not w[key] <= limit]
        checks.append((f"cost{where}: {title}", not failed, worst(key, fmt) if not failed else "failed: " + "; ".join(failed)))
    gated = [w for w in workloads if w["preview_target"]]
    failed = [f"{w['name']}: {w['preview_share_median']:.2%}" for w in gated if not w["preview_share_median"] < 0.02]
    failed += [f"{w['name']}: NestedRunReporter.on_outer_step was not called once per outer step, so the emission "
               "time was not measured" for w in workloads if not w["emission_measured"]]
    item = max(gated, key=lambda w: w["preview_share_median"])
    checks.append((f"cost{where}: preview emission < 2% of the run (SD1.5-architecture UNet)", not failed,
                   f"worst {item['preview_share_median']:.2%} ({item['name']})" if not failed else "failed: " + "; ".join(failed)))
    return checks
