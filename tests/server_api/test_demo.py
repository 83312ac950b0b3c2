"""The README's main job, scripts/demo.py, run for real: a ComfyUI server, the demo workflow over the API.

A small configuration (3 outer x 4 inner steps) keeps it to the server's start-up plus a second or two of
sampling. The workflow-editing helpers are also checked alone, without a server.
"""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("requests")
pytest.importorskip("websocket")

from comfyui_nested_diffusion.scripts import demo  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT, child_env, module_command  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_server import comfyui_path, default_python, free_port  # noqa: E402

WORKFLOW = REPO_ROOT / "example_workflows" / "api" / "nested_vs_vanilla_exemplar_api.json"
OUTER, INNER, BATCH, SIZE = 3, 4, 4, 32


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The demo as scripts/demo.sh runs it (``python -P -m comfyui_nested_diffusion.scripts.demo``)."""
    command = module_command("scripts.demo", *args, python=default_python())
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=child_env())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo once for the module; returns (output folder, completed process)."""
    if not (comfyui_path() / "main.py").exists():
        pytest.fail(f"No ComfyUI at {comfyui_path()}: run scripts/setup_env.sh (or set COMFYUI_PATH)")
    out = tmp_path_factory.mktemp("demo") / "out"
    done = run_demo("--outer", str(OUTER), "--inner", str(INNER), "--port", str(free_port()), "--out", str(out),
                    "--workflow", str(WORKFLOW), timeout=240)
    assert done.returncode == 0, f"demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out, done


def open_image(path: Path):
    assert path.is_file(), f"missing {path}"
    image = Image.open(path)
    image.load()
    return image


def test_demo_writes_the_strip_previews_finals_and_summary(demo_run):
    out, done = demo_run
    assert str(out) in done.stdout  # it says where the files are

    strip = open_image(out / "strip.png")
    assert strip.format == "PNG"
    assert strip.width >= OUTER * 96 and strip.height >= 2 * 96  # two rows, one column per outer step
    batch_strip = open_image(out / "strip_batch.png")
    assert batch_strip.height >= BATCH * 96

    for k in range(1, OUTER + 1):
        open_image(out / "previews" / f"nested_outer{k}.png")
        open_image(out / "previews" / f"vanilla_nfe{k * INNER}.png")
        for item in range(BATCH):
            assert open_image(out / "outer_step_preview" / f"outer{k}_item{item}.png").width >= SIZE
    assert not (out / "previews" / f"nested_outer{OUTER + 1}.png").exists()
    for role in ("nested", "vanilla"):
        finals = sorted((out / "final").glob(f"{role}_*.png"))
        assert len(finals) == BATCH
        assert all(open_image(path).size == (SIZE, SIZE) for path in finals)


def test_demo_summary_counts_nfes_and_shows_nested_on_the_data_first(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_id"]
    assert summary["settings"]["outer_steps"] == OUTER and summary["settings"]["inner_steps"] == INNER
    assert summary["settings"]["vanilla"]["steps"] == OUTER * INNER
    assert summary["settings"]["vanilla"]["seed"] == summary["settings"]["seed"]
    assert summary["nfe"]["nested_total"] == OUTER * INNER
    assert summary["nfe"]["vanilla_steps"] == OUTER * INNER
    assert summary["nfe"]["nested_per_outer_step"] == [k * INNER for k in range(1, OUTER + 1)]
    assert summary["seconds"]["run"] > 0

    steps = summary["outer_steps"]
    assert [s["outer_step"] for s in steps] == list(range(1, OUTER + 1))
    assert [s["seconds"] for s in steps] == sorted(s["seconds"] for s in steps)
    sigmas = [s["sigma"] for s in steps]
    assert all(a > b > 0 for a, b in zip(sigmas, sigmas[1:]))
    for step in steps:
        for key in ("nested_preview", "vanilla_preview"):
            assert (out / step[key]).is_file()
        assert len(step["outer_step_preview"]) == BATCH
    shown = summary["outer_step_preview"]["nested"]  # OuterStepPreview's own metadata, not parsed from its labels
    assert [(s["outer_step"], s["batch_index"], s["nfe"]) for s in shown] == [
        (k, i, k * INNER) for k in range(1, OUTER + 1) for i in range(BATCH)]
    assert all((out / s["path"]).name == f"outer{s['outer_step']}_item{s['batch_index']}.png" for s in shown)

    # At the first boundary nested shows a sample (on the data), vanilla a blurry x0 estimate (off it).
    first = steps[0]["distance"]
    assert first["nested"]["rms"] < 0.05, first
    assert first["vanilla"]["rms"] > 2 * first["nested"]["rms"], first
    assert all(d["rms"] < 0.05 for d in summary["final_distance"]["nested"])
    for name, path in summary["files"].items():
        assert (out / path).is_file(), name


def test_overrides_keep_the_vanilla_sampler_in_step_and_find_nodes_by_class():
    original = json.loads(WORKFLOW.read_text())
    renamed = {f"n{node_id}": copy.deepcopy(node) for node_id, node in original.items()}
    for node in renamed.values():  # the same graph under other ids
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = [f"n{value[0]}", value[1]]
    pair = demo.find_pair(renamed)
    assert (pair.nested, pair.vanilla) == ("n3", "n4")
    demo.apply_overrides(renamed, pair, outer=6, inner=7, seed=123)
    assert renamed["n3"]["inputs"]["outer_steps"] == 6 and renamed["n3"]["inputs"]["inner_steps"] == 7
    assert renamed["n4"]["inputs"]["steps"] == 42
    assert renamed["n3"]["inputs"]["seed"] == renamed["n4"]["inputs"]["seed"] == 123
    assert demo.role_of(renamed, "n7", pair) == "nested" and demo.role_of(renamed, "n9", pair) == "vanilla"
    assert demo.source_size(renamed, pair) == (SIZE, SIZE)

    untouched = copy.deepcopy(original)
    demo.apply_overrides(untouched, demo.find_pair(untouched), None, None, None)
    assert untouched == original


def test_output_folder_is_only_cleaned_when_the_demo_wrote_it(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        demo.prepare_output_dir(foreign)
    assert (foreign / "keep.txt").exists()

    out = demo.prepare_output_dir(tmp_path / "out")
    (out / "strip.png").write_bytes(b"old")
    demo.prepare_output_dir(out)
    assert not (out / "strip.png").exists() and (out / "previews").is_dir()


def test_default_demo_runs_the_digits_and_the_exemplar_workflows(tmp_path):
    """The README's main job as a user runs it: both workflows on one server, each in a folder of its own."""
    out = tmp_path / "out"
    done = run_demo("--outer", "2", "--inner", "3", "--port", str(free_port()), "--out", str(out), timeout=300)
    assert done.returncode == 0, f"demo failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for folder in ("digits", "exemplar"):
        strip = open_image(out / folder / "strip.png")
        assert strip.width >= 2 * 96 and strip.height >= 2 * 96
        summary = json.loads((out / folder / "summary.json").read_text())
        assert summary["nfe"]["nested_per_outer_step"] == [3, 6] and summary["workflow"].endswith(f"{folder}_api.json")
    assert not (out / "previews").exists()  # nothing written outside the two folders
