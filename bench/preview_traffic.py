"""Websocket traffic of a large batch, per model call, against KSampler's per step, through a real ComfyUI server.

Batch 64, 128 px, the exact exemplar model, a client watching (its own client id, preview metadata announced as the
editor does). For each seed: KSampler with N steps, then NestedKSampler N x 1 (one model call per outer step,
``outer_step`` renoise), both euler + normal, cfg 1; once with the model's empty conditioning (any exemplar: the
first batch item, which ComfyUI's previews show, may land on a different exemplar in the two runs) and once with
an Exemplar Prompt naming one exemplar (both runs show the same image; the seeds cycle through the eight). Every
websocket message is counted by type; every progress preview (the JPEG ComfyUI's server encodes) is kept with its
size, pixel size and how much fine detail it holds (the mean absolute difference between neighbouring pixels,
0-255), and the exemplar the first item's saved image is nearest to is named, so that a larger JPEG can be told
apart from a larger or more frequent image.

Printed and written to the json: per run and sampler, bytes per model call by message type, the ratio nested /
KSampler of the whole stream and of ComfyUI's previews, the pack's own share (everything but ComfyUI's previews and
progress messages) per model call and against the filmstrip's budget, the number and pixel size of the previews,
their mean JPEG size and detail, and item 0's exemplar. Intervals: the runs' min, median and max.

    OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.preview_traffic [--seeds 8] [--steps 120]
        [--out bench/results/preview_traffic.json]
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

BATCH, SIZE = 64, 128
FIRST_SEED = 31_000_001
PROMPT_NODE = "20"
PREVIEW_TYPES = (1, 4)  # ComfyUI's binary preview frames: plain, and with metadata
COMFY_PROGRESS = ("progress", "progress_state")


def command_line() -> str:
    return "OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.preview_traffic " + shlex.join(sys.argv[1:])


def comfyui_version() -> str:
    from comfyui_nested_diffusion.tools.comfy_env import comfyui_path

    text = (Path(comfyui_path()) / "comfyui_version.py").read_text()
    return text.split('"')[1] if '"' in text else text.strip()


def graph(exemplar_defaults: dict, sampler_type: str, seed: int, inputs: dict, exemplar: str = "") -> dict:
    """The tests' exemplar graph; with ``exemplar`` an Exemplar Prompt naming it conditions the sampler."""
    from comfyui_nested_diffusion.tools.api_graphs import EXEMPLAR, SAMPLER, exemplar_graph

    prompt = exemplar_graph(sampler_type, {"seed": seed, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                                           "denoise": 1.0, **inputs}, size=SIZE, batch=BATCH,
                            exemplar_defaults=exemplar_defaults, prefix="bench_preview_traffic")
    if exemplar:
        prompt[PROMPT_NODE] = {"class_type": "NestedExemplarPrompt", "inputs": {"model": [EXEMPLAR, 0], "text": exemplar}}
        prompt[SAMPLER]["inputs"].update(positive=[PROMPT_NODE, 0], negative=[PROMPT_NODE, 0])
    return prompt


def first_item_exemplar(client, prompt_id: str) -> str:
    """The exemplar the first saved image (batch item 0) is nearest to."""
    import numpy
    import torch
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import EXEMPLAR_NAMES, default_exemplars, manifold_distance
    from comfyui_nested_diffusion.tools.api_graphs import SAVE
    from PIL import Image

    item = client.history(prompt_id)["outputs"][SAVE]["images"][0]
    pixels = numpy.asarray(Image.open(io.BytesIO(client.fetch_output(item))).convert("RGB"), dtype=numpy.float32)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1.0
    return EXEMPLAR_NAMES[int(manifold_distance(image, default_exemplars(SIZE))[1][0])]


def preview_image(message: bytes) -> bytes:
    """The JPEG of a binary preview frame (type 1: image type, image; type 4: metadata length, metadata, image)."""
    kind = int.from_bytes(message[:4], "big")
    if kind == 4:
        length = int.from_bytes(message[4:8], "big")
        return message[8 + length:]
    return message[8:]


def detail(jpeg: bytes) -> tuple[list[int], float]:
    """(width and height, mean absolute difference between horizontally neighbouring pixels, 0-255)."""
    import numpy
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    pixels = numpy.asarray(image, dtype=numpy.float32)
    return list(image.size), float(numpy.abs(numpy.diff(pixels, axis=1)).mean())


class CountingClient:
    """A ComfyAPIClient whose every websocket message is counted by type (and whose previews are kept)."""

    def __init__(self, url: str):
        from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient

        self.client = ComfyAPIClient(url).connect()
        self.bytes = collections.Counter()
        self.messages = collections.Counter()
        self.largest = collections.Counter()
        self.previews: list[bytes] = []
        receive = self.client.ws.recv_data

        def counted(*args, **kwargs):
            opcode, message = receive(*args, **kwargs)
            message = message or b""
            if opcode == 1:
                kind = json.loads(message)["type"]
            else:
                kind = f"binary {int.from_bytes(message[:4], 'big')}"
                if int.from_bytes(message[:4], "big") in PREVIEW_TYPES:
                    self.previews.append(preview_image(message))
            self.bytes[kind] += len(message)
            self.messages[kind] += 1
            self.largest[kind] = max(self.largest[kind], len(message))
            return opcode, message

        self.client.ws.recv_data = counted

    def run(self, prompt: dict) -> dict:
        self.bytes.clear()
        self.messages.clear()
        self.largest.clear()
        self.previews = []
        started = time.monotonic()
        prompt_id, _ = self.client.run(prompt, timeout=1800)
        seconds = time.monotonic() - started
        shapes_and_detail = [detail(jpeg) for jpeg in self.previews]
        return {
            "seconds": round(seconds, 2),
            "item_0_exemplar": first_item_exemplar(self.client, prompt_id),
            "largest_candidates_event": self.largest.get("nested_diffusion.candidates", 0),
            "bytes_by_type": dict(self.bytes),
            "messages_by_type": dict(self.messages),
            "total_bytes": sum(self.bytes.values()),
            "preview_bytes": sum(size for kind, size in self.bytes.items()
                                 if kind in {f"binary {t}" for t in PREVIEW_TYPES}),
            "comfy_progress_bytes": sum(self.bytes.get(kind, 0) for kind in COMFY_PROGRESS),
            "previews": len(self.previews),
            "preview_sizes": sorted({f"{w}x{h}" for (w, h), _ in shapes_and_detail}),
            "preview_jpeg_bytes": [len(jpeg) for jpeg in self.previews],
            "preview_detail": [round(d, 2) for _, d in shapes_and_detail],
        }

    def close(self) -> None:
        self.client.close()


def per_call(run: dict, calls: int) -> dict:
    own = run["total_bytes"] - run["preview_bytes"] - run["comfy_progress_bytes"]
    return {"total": run["total_bytes"] / calls, "previews": run["preview_bytes"] / calls,
            "comfy_progress": run["comfy_progress_bytes"] / calls, "pack_own": own / calls}


def filmstrip_rule() -> tuple[float, int]:
    """nodes/filmstrip.py's SHARE and ALLOWANCE (the module needs no ComfyUI; the nodes package it is in does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("filmstrip", Path(__file__).resolve().parent.parent / "nodes" / "filmstrip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHARE, module.ALLOWANCE


def preview_pixels(run: dict) -> int:
    width, height = (int(side) for side in run["preview_sizes"][0].split("x"))
    return width * height


def measure_pair(client: CountingClient, exemplar_defaults: dict, seed: int, steps: int, exemplar: str) -> dict:
    """KSampler and NestedKSampler on the same seed (and ``exemplar``, if any): their streams compared per model
    call, and the pack's own share against the filmstrip's budget."""
    share, allowance = filmstrip_rule()
    ksampler = client.run(graph(exemplar_defaults, "KSampler", seed, {"steps": steps}, exemplar))
    nested = client.run(graph(exemplar_defaults, "NestedKSampler", seed, {
        "outer_steps": steps, "inner_steps": 1, "outer_step": "renoise"}, exemplar))
    k, n = per_call(ksampler, steps), per_call(nested, steps)
    filmstrip = nested["bytes_by_type"].get("nested_diffusion.candidates", 0)
    budget = share * preview_pixels(nested) * steps + allowance
    return {
        "seed": seed, "conditioned_on": exemplar or None, "model_calls": steps, "ksampler": ksampler, "nested": nested,
        "per_model_call": {"ksampler": k, "nested": n},
        "ratio_total": n["total"] / k["total"],
        "ratio_previews": n["previews"] / k["previews"],
        "pack_own_per_ksampler_total": n["pack_own"] / k["total"],
        "filmstrip_bytes": filmstrip,
        "filmstrip_budget": budget,
        "filmstrip_within_budget_plus_one_event": filmstrip <= budget + nested["largest_candidates_event"],
        "mean_preview_jpeg": {"ksampler": statistics.mean(ksampler["preview_jpeg_bytes"]),
                              "nested": statistics.mean(nested["preview_jpeg_bytes"])},
        "mean_preview_detail": {"ksampler": statistics.mean(ksampler["preview_detail"]),
                                "nested": statistics.mean(nested["preview_detail"])},
    }


def report(row: dict) -> str:
    k, n = row["per_model_call"]["ksampler"], row["per_model_call"]["nested"]
    ks, ns = row["ksampler"], row["nested"]
    return (f"seed {row['seed']} ({row['conditioned_on'] or 'any exemplar'}): bytes per model call KSampler "
            f"{k['total']:.0f} (previews {k['previews']:.0f}), nested {n['total']:.0f} (previews {n['previews']:.0f}, "
            f"ComfyUI progress {n['comfy_progress']:.0f}, pack's own {n['pack_own']:.0f}): {row['ratio_total']:.2f}x; "
            f"previews {row['ratio_previews']:.2f}x ({ks['previews']} vs {ns['previews']} at {ks['preview_sizes']} / "
            f"{ns['preview_sizes']}); item 0: {ks['item_0_exemplar']} / {ns['item_0_exemplar']}, detail "
            f"{row['mean_preview_detail']['ksampler']:.2f} / {row['mean_preview_detail']['nested']:.2f}; filmstrip "
            f"{row['filmstrip_bytes']} B of a {row['filmstrip_budget']:.0f} B budget")


def interval(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="bench/results/preview_traffic.json")
    args = parser.parse_args()

    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import EXEMPLAR_NAMES
    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, widget_defaults
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer

    rows = []
    with ComfyServer(env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}) as server:
        with ComfyAPIClient(server.url) as api:
            defaults = widget_defaults(api.object_info("NestedExemplarModel")["NestedExemplarModel"])
        client = CountingClient(server.url)
        try:
            for number, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
                for exemplar in ("", EXEMPLAR_NAMES[number % len(EXEMPLAR_NAMES)]):
                    rows.append(measure_pair(client, defaults, seed, args.steps, exemplar))
                    print(report(rows[-1]), flush=True)
        finally:
            client.close()
    summary = {}
    for name, runs in (("any_exemplar", [r for r in rows if not r["conditioned_on"]]),
                       ("same_exemplar", [r for r in rows if r["conditioned_on"]])):
        summary[name] = {key: interval([row[key] for row in runs])
                         for key in ("ratio_total", "ratio_previews", "pack_own_per_ksampler_total")}
        summary[name]["pack_own_bytes_per_call"] = interval([r["per_model_call"]["nested"]["pack_own"] for r in runs])
        summary[name]["ksampler_bytes_per_call"] = interval([r["per_model_call"]["ksampler"]["total"] for r in runs])
        summary[name]["filmstrip_within_budget"] = all(r["filmstrip_within_budget_plus_one_event"] for r in runs)
    jpeg_by_exemplar = collections.defaultdict(list)
    for row in rows:
        for sampler in ("ksampler", "nested"):
            jpeg_by_exemplar[row[sampler]["item_0_exemplar"]].append(row[sampler]["preview_jpeg_bytes"][-1])
    summary["last_preview_jpeg_by_item_0_exemplar"] = {name: interval(sizes) for name, sizes in jpeg_by_exemplar.items()}
    print(f"over {args.seeds} seeds (min, median, max): {json.dumps(summary, indent=1)}")
    result = {"command": command_line(), "comfyui": comfyui_version(), "batch": BATCH, "size": SIZE, "steps": args.steps,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "summary": summary, "seeds": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
