"""Builds the ComfyUI-Distributed example (nested candidates on every GPU, one collector on the master) in editor and
API format, with the same builder as the other examples (tools/workflows.py):

    scripts/python.sh -m comfyui_nested_diffusion.tools.distributed_workflow            # write the two files
    scripts/python.sh -m comfyui_nested_diffusion.tools.distributed_workflow --check    # exit 1 if a file differs

The files live in ``example_workflows/distributed/``, not beside the other examples: the Templates dialog and the
example tests take every file directly in ``example_workflows/``, and these need ComfyUI-Distributed's nodes, whose
schemas (``DistributedSeed``, ``DistributedCollector``) are saved in ``tools/object_info_distributed.json`` from a
server running ComfyUI-Distributed 1.4.4.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from comfyui_nested_diffusion.tools import workflows as wf
from comfyui_nested_diffusion.tools.workflow_checks import EXAMPLES_DIR

NAME = "digits_across_gpus_nested"
OUT_DIR = EXAMPLES_DIR / "distributed"
SCHEMAS = Path(__file__).resolve().with_name("object_info_distributed.json")
DISTRIBUTED_TYPES = ("DistributedSeed", "DistributedCollector")
SEED_NODE, SAMPLER_NODE = 5, 6


def object_info() -> dict:
    """The examples' schemas plus ComfyUI-Distributed's two nodes (its seed gets the frontend's seed control)."""
    distributed = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    seed = distributed["DistributedSeed"]["input"]["required"]["seed"]
    seed[1] = {**seed[1], "control_after_generate": True}
    for info in distributed.values():
        info["python_module"] = "ComfyUI-Distributed"  # not this pack's node (the builder reads custom_nodes.*)
    return {**wf.saved_object_info(), **distributed}


def build() -> wf.Workflow:
    w = wf.Workflow(NAME, "Nested candidates on every GPU (ComfyUI-Distributed, digits model)",
                    "NestedKSampler on the master and on each ComfyUI-Distributed worker, each with its own seed; "
                    "the master collects every server's finals and outer-step images.", runnable=False)
    model = w.add("NestedDigitsModel", (40, 110), {"variant": "eps"}, id=1, title="Digits Model (nested demo)")
    positive = w.add("NestedDigitsPrompt", (40, 230), {"digit": "3"}, id=2, title="Digit", color="positive")
    negative = w.add("NestedDigitsPrompt", (40, 350), {"digit": "any"}, id=3, title="Any digit (CFG negative)",
                     color="negative")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 470), {"width": 16, "height": 16, "batch_size": 2}, id=4,
                   title="Empty pixel latent")
    seed = w.add("DistributedSeed", (40, 640), {"seed": 7}, id=SEED_NODE, title="Distributed Seed", size=(300, 82))
    sampler = w.add("NestedKSampler", (420, 110),
                    {"seed": 7, "outer_steps": 4, "inner_steps": 10, "cfg": 2.0, "sampler_name": "euler_ancestral",
                     "scheduler": "normal", "denoise": 1.0, "outer_eta": 0.0, "outer_step": "auto"},
                    id=SAMPLER_NODE, title="Nested KSampler (every GPU)", color="nested", size=(320, 660), model=model.out(0),
                    positive=positive.out(0), negative=negative.out(0), latent_image=latent.out(0))
    vae = w.add("VAELoader", (40, 1060), {"vae_name": "pixel_space"}, id=7, title="Pixel-space VAE")
    decode = w.add("VAEDecode", (800, 110), id=8, samples=sampler.out(0), vae=vae.out(0))
    collect = w.add("DistributedCollector", (1000, 110), {"load_balance": False}, id=9,
                    title="Collect finals (master)", size=(300, 82), images=decode.out(0))
    save = w.add("SaveImage", (1340, 110), {"filename_prefix": "nested_gpus/final"}, id=10, title="Save finals",
                 size=(360, 330), images=collect.out(0))
    strip = w.add("OuterStepPreview", (800, 480), id=11, title="Outer Step Preview", size=(360, 300),
                  previews=sampler.out(1), vae=vae.out(0))
    collect_strip = w.add("DistributedCollector", (1000, 820), {"load_balance": False}, id=12,
                          title="Collect outer steps (master)", size=(300, 82), images=strip.out(0))
    save_strip = w.add("SaveImage", (1340, 480), {"filename_prefix": "nested_gpus/outer_step"}, id=13,
                       title="Save outer steps", size=(360, 420), images=collect_strip.out(0))
    # the sampler's seed comes from Distributed Seed: the master's seed, worker i's seed + i + 1
    sampler.links_in["seed"] = seed.out(0)
    w.note("**Across several GPUs.** Install this pack and ComfyUI-Distributed on the master and on every worker, "
           "add the workers in ComfyUI-Distributed's panel, then queue (its Queue button or "
           "`POST /distributed/queue`). Every server samples its own seed; the collectors bring every server's "
           "finals and outer-step images to the master. **Finish now** on this Nested KSampler finishes the run on "
           "every server of the job; **keep only this** on a candidate keeps it and finishes the other servers. "
           "See docs/several-gpus.md.", (40, 760), size=(340, 260))
    w.group("Digits model, no downloads", [model, positive, negative, latent, seed], "model")
    w.group("Every GPU", [sampler, decode, strip], "sample")
    w.group("Collected on the master", [collect, save, collect_strip, save_strip], "output")
    return w


def link_widget(editor: dict, source_id: int, slot: int, target_id: int, widget: str) -> None:
    """Link an output to a widget input in an editor-format workflow (the frontend's widget-to-input link)."""
    nodes = {node["id"]: node for node in editor["nodes"]}
    target, source = nodes[target_id], nodes[source_id]
    entry = next(item for item in target["inputs"] if item.get("widget", {}).get("name") == widget)
    link_id = editor["last_link_id"] + 1
    entry["link"] = link_id
    source["outputs"][slot]["links"] = (source["outputs"][slot]["links"] or []) + [link_id]
    editor["links"].append([link_id, source_id, slot, target_id, target["inputs"].index(entry), entry["type"]])
    editor["last_link_id"] = link_id


def expected_files() -> dict[Path, str]:
    wf._use_object_info(object_info())
    try:
        workflow = build()
        editor, api = workflow.editor(), workflow.api()
    finally:
        wf._use_object_info(None)
    for node in editor["nodes"]:
        if node["type"] in DISTRIBUTED_TYPES:  # its own pack, not this one's nor ComfyUI's
            node["properties"] = {"Node name for S&R": node["type"]}
    link_widget(editor, SEED_NODE, 0, SAMPLER_NODE, "seed")  # the builder links sockets only
    editor["extra"]["nested_diffusion"]["api_twin"] = f"{OUT_DIR.name}/{NAME}_api.json"
    return {OUT_DIR / f"{NAME}.json": wf.dumps(editor), OUT_DIR / f"{NAME}_api.json": wf.dumps(api)}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from what would be written")
    args = parser.parse_args(argv)
    differs = []
    for path, text in expected_files().items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        differs.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in differs:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(wf.REPO_ROOT)}")
    return 1 if args.check and differs else 0


if __name__ == "__main__":
    sys.exit(main())
