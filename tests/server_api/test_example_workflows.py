"""The example workflows in example_workflows/, checked on a real ComfyUI server with this pack installed.

* The files are what tools/workflows.py writes (editor format, API twin, thumbnail), from the node schemas saved
  in tools/object_info.json, which must be what the live server reports.
* Every editor-format workflow is checked against the server's /object_info: node types exist, links join
  matching types, widget values are valid (file names that this server lacks excepted), and it stands for
  exactly its API twin.
* Every API-format workflow is queued: the exemplar-model ones run and produce their outputs; the ones that
  need model weights pass ComfyUI's validation up to the missing files (and, with placeholder files in place,
  entirely: their first failure is then a loader reading the placeholder).
* ComfyUI's templates route lists the examples and serves their JSON and thumbnails.
"""
from __future__ import annotations

import io
from dataclasses import replace

import pytest

pytest.importorskip("requests")
pytest.importorskip("websocket")
Image = pytest.importorskip("PIL.Image")
import requests  # noqa: E402
from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT  # noqa: E402
from comfyui_nested_diffusion.tools import workflow_checks as wc  # noqa: E402
from comfyui_nested_diffusion.tools import workflows as builder  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, ExecutionError, PromptValidationError  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_server import PACK_DIR_NAME  # noqa: E402

WORKFLOWS = {w.name: w for w in builder.all_workflows()}
RUNNABLE = sorted(name for name, w in WORKFLOWS.items() if w.runnable)
NEEDS_WEIGHTS = sorted(name for name, w in WORKFLOWS.items() if not w.runnable)
PAIRS = {name: (editor, api) for name, editor, api in wc.example_pairs()}
LOADER_TYPES = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPLoader"}


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's real ComfyUI server (tests/conftest.py); ``client`` is a websocket client of it."""
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return requests.get(f"{server.url}/object_info", timeout=30).json()


def api_prompt(name: str) -> dict:
    return wc.load(PAIRS[name][1])


def images_of(client: ComfyAPIClient, output: dict) -> list:
    return [Image.open(io.BytesIO(client.fetch_output(item))).convert("RGB")
            for item in output["images"]]


def mean_abs(a, b) -> float:
    return sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())) / len(a.tobytes())


def node_id(name: str, title: str) -> str:
    return str(next(n.id for n in WORKFLOWS[name].nodes if n.title == title))


# -- the files --------------------------------------------------------------------------------------------------
def test_files_are_what_the_build_script_writes():
    assert builder.check_files() == [], "run: scripts/python.sh -m comfyui_nested_diffusion.tools.workflows"


def test_saved_node_schemas_are_the_live_servers(server, object_info):
    """tools/object_info.json (what the builder reads) says what the server says and holds every node of this pack;
    ComfyUI's own nodes are compared on the release the files target (builder.CORE_VERSION), this pack's on any (their
    combo options too, on that release: sampler_name and scheduler list what the running ComfyUI has)."""
    saved = builder.saved_object_info()
    version = requests.get(f"{server.url}/system_stats", timeout=30).json()["system"]["comfyui_version"]

    def schema(info: dict):
        found = builder.node_def(info)
        return found if version == builder.CORE_VERSION else replace(found, choices=())

    compared = [name for name in saved if version == builder.CORE_VERSION or builder.node_def(saved[name]).pack]
    stale = [name for name in compared if name not in object_info or schema(saved[name]) != schema(object_info[name])]
    missing = [name for name, info in object_info.items() if builder.node_def(info).pack and name not in saved]
    assert (stale, missing) == ([], []), "run: scripts/python.sh -m comfyui_nested_diffusion.tools.workflows --object-info"


def test_every_example_has_editor_file_api_twin_and_thumbnail():
    assert sorted(PAIRS) == sorted(WORKFLOWS), "editor-format files and tools/workflows.py disagree"
    for name in WORKFLOWS:
        editor, api = PAIRS[name]
        assert wc.is_editor_format(wc.load(editor)), editor
        assert wc.is_api_format(wc.load(api)), api
        thumbnail = Image.open(wc.EXAMPLES_DIR / f"{name}.jpg")
        assert thumbnail.format == "JPEG" and thumbnail.size == (builder.THUMBNAIL_SIZE, builder.THUMBNAIL_SIZE)
    assert {"sd15_txt2img_nested", "sdxl_txt2img_nested", "sd15_img2img_nested", "sd15_inpaint_nested",
            "flux_custom_advanced_nested", "nested_vs_vanilla_exemplar", "exemplar_img2img_inpaint_nested",
            "exemplar_custom_advanced_nested"} <= set(WORKFLOWS)


# -- editor format against /object_info -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_editor_workflow_matches_object_info(name, object_info):
    workflow = wc.load(PAIRS[name][0])
    assert wc.editor_problems(workflow, object_info) == []
    types = {node["type"] for node in workflow["nodes"]}
    assert types & {"NestedKSampler", "NestedKSamplerAdvanced", "NestedSampler"}, "an example without a nested sampler"
    # Only file names may be missing here, and only in the workflows that need downloads.
    missing = wc.missing_files(workflow, object_info)
    if WORKFLOWS[name].runnable:
        assert missing == []
    else:
        assert missing and {input_name for _, input_name, _ in missing} <= wc.FILE_INPUTS


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_editor_and_api_twins_agree(name, object_info):
    editor, api = PAIRS[name]
    from_editor = wc.editor_to_api(wc.load(editor), object_info)
    assert wc.api_differences(wc.load(api), from_editor, object_info) == []


def test_seed_widgets_are_fixed_so_examples_reproduce(object_info):
    for name in WORKFLOWS:
        for node in wc.load(PAIRS[name][0])["nodes"]:
            if node["type"] in wc.VIRTUAL_NODE_TYPES:
                continue
            layout = wc.widget_inputs(object_info[node["type"]])
            for (widget, _, _), value in zip(layout, node["widgets_values"]):
                if widget == "control_after_generate":
                    assert value == "fixed", f"{name}: node {node['id']} {node['type']}"


# -- API format on the real server ------------------------------------------------------------------------------
def test_nested_vs_vanilla_exemplar_runs(client):
    prompt = api_prompt("nested_vs_vanilla_exemplar")
    prompt_id, events = client.run(prompt, timeout=120)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    batch = prompt["2"]["inputs"]["batch_size"]
    outer = prompt["3"]["inputs"]["outer_steps"]
    nested, vanilla = images_of(client, outputs["7"]), images_of(client, outputs["9"])
    assert len(nested) == len(vanilla) == batch
    assert {image.size for image in nested + vanilla} == {(32, 32)}
    assert len(outputs["10"]["images"]) == outer * batch
    assert outputs["10"]["nested_labels"][-1].startswith(f"outer {outer}/{outer}")
    steps = [e for e in events if e["type"] == OUTER_STEP_EVENT and e["data"]["node"] == "3"]
    assert [e["data"]["outer_step"] for e in steps] == list(range(1, outer + 1))
    previews = [e for e in events if e["type"] == "preview_image" and e["data"]["node"] == "3"]
    assert len(previews) >= outer


def test_nested_vs_vanilla_digits_runs_and_draws_the_digit(client):
    """The demo's learned-model workflow: both samplers' images are the digit asked for (the pack's classifier)."""
    import numpy
    import torch
    from comfyui_nested_diffusion.demo_models.digits.metrics import predict  # pure torch: no ComfyUI in this process

    name = "nested_vs_vanilla_digits"
    prompt = api_prompt(name)
    prompt_id, events = client.run(prompt, timeout=900)  # a real UNet: about a minute on 2 idle cores, more when busy
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    digit = int(prompt[node_id(name, "Digit")]["inputs"]["digit"])
    for title in ("Save nested", "Save vanilla"):
        images = images_of(client, outputs[node_id(name, title)])
        assert len(images) == prompt[node_id(name, "Empty pixel latent")]["inputs"]["batch_size"]
        pixels = torch.from_numpy(numpy.stack([numpy.asarray(i.convert("RGB"), dtype=numpy.float32) for i in images]))
        read = predict(pixels.permute(0, 3, 1, 2) / 127.5 - 1.0)
        assert float((read == digit).float().mean()) >= 0.75, (title, read.tolist())
    nested = node_id(name, "Nested KSampler (anytime)")
    steps = [e for e in events if e["type"] == OUTER_STEP_EVENT and e["data"]["node"] == nested]
    assert [e["data"]["outer_step"] for e in steps] == [1, 2, 3, 4]
    assert {e["data"]["outer_step_mode"] for e in steps} == {"renoise"}  # euler_ancestral: a partial posterior sampler


def test_exemplar_img2img_inpaint_runs_and_keeps_the_unmasked_half(client):
    name = "exemplar_img2img_inpaint_nested"
    prompt_id, _ = client.run(api_prompt(name), timeout=120)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    source = images_of(client, outputs[node_id(name, "Save source")])
    img2img = images_of(client, outputs[node_id(name, "Save img2img")])
    inpaint = images_of(client, outputs[node_id(name, "Save inpaint")])
    assert len(source) == len(img2img) == len(inpaint) == 2
    for before, redrawn, filled in zip(source, img2img, inpaint):
        # img2img at denoise 0.4 resamples the picture but stays on it (~100 of 255 to another exemplar; at 0.4 none
        # of 60 images moved, at 0.6 one in six did, with KSampler as with NestedKSampler); inpainting keeps the
        # unmasked left half exactly.
        assert 0.2 < mean_abs(before, redrawn) < 12
        left = (0, 0, 16, 32)
        assert mean_abs(before.crop(left), filled.crop(left)) < 0.5
    for title in ("Outer steps: img2img", "Outer steps: inpaint"):
        assert len(outputs[node_id(name, title)]["images"]) == 4 * 2


def test_exemplar_custom_advanced_runs(client):
    name = "exemplar_custom_advanced_nested"
    prompt = api_prompt(name)
    prompt_id, events = client.run(prompt, timeout=120)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    save = str(next(n.id for n in WORKFLOWS[name].nodes if n.type == "SaveImage"))
    sampler = str(next(n.id for n in WORKFLOWS[name].nodes if n.type == "SamplerCustomAdvanced"))
    images = images_of(client, entry["outputs"][save])
    assert len(images) == 4 and {image.size for image in images} == {(32, 32)}
    outer = next(n for n in WORKFLOWS[name].nodes if n.type == "BasicScheduler").widgets["steps"] - 1
    previews = [e for e in events if e["type"] == "preview_image" and e["data"]["node"] == sampler]
    assert len(previews) >= outer, "SamplerCustomAdvanced should preview every outer step's inner result"


def unlabelled(image):
    """An Outer Step Preview / Pick Candidate tile back at 32x32: the square above the label bar, enlarged 8x
    with nearest, sampled at the block centres."""
    return image.crop((0, 0, image.width, image.width)).resize((32, 32), Image.NEAREST)


def test_exemplar_pick_candidate_runs_and_stage_2_varies_the_pick(client):
    name = "exemplar_pick_candidate_nested"
    prompt = api_prompt(name)
    prompt_id, events = client.run(prompt, timeout=120)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    pick_id = node_id(name, "Pick Candidate: set index, re-queue")
    index = prompt[pick_id]["inputs"]["index"]
    shown = images_of(client, outputs[pick_id])  # the candidates, the pick framed in green
    candidates = [unlabelled(image) for image in images_of(client, outputs[node_id(name, "Stage 1 candidates")])]
    finals = images_of(client, outputs[node_id(name, "Variations of the pick")])
    assert len(shown) == len(candidates) == len(finals) == 4
    assert outputs[node_id(name, "Stage 1 candidates")]["nested_labels"][0].startswith("outer 1/4")
    stage_2 = outputs[node_id(name, "Stage 2 outer steps")]
    assert len(stage_2["images"]) == 3 * 4 and stage_2["nested_labels"][0].startswith("outer 2/4")
    picked = candidates[index]
    # Every variation lies on the picked candidate's exemplar (measured ~2.7 of 255; another exemplar: > 40).
    assert all(mean_abs(final, picked) < 12 for final in finals)
    stage_1 = node_id(name, "Stage 1: outer step 1 of 4")
    stage_2_id = node_id(name, "Stage 2: outer steps 2-4")
    steps = {node: [e["data"]["outer_step"] for e in events
                    if e["type"] == OUTER_STEP_EVENT and e["data"]["node"] == node] for node in (stage_1, stage_2_id)}
    assert steps == {stage_1: [1], stage_2_id: [2, 3, 4]}

    # Picking another candidate and queueing again re-runs only the pick and stage 2 (ComfyUI's cache).
    other = next(i for i, image in enumerate(candidates) if mean_abs(image, picked) > 25)
    prompt[pick_id]["inputs"]["index"] = other
    prompt_id, events = client.run(prompt, timeout=120)
    ran = {e["data"]["node"] for e in events if e["type"] == "executing" and e["data"].get("node")}
    assert stage_1 not in ran and {pick_id, stage_2_id} <= ran
    refinished = images_of(client, client.history(prompt_id)["outputs"][node_id(name, "Variations of the pick")])
    assert all(mean_abs(final, candidates[other]) < 12 for final in refinished)


def test_exemplar_prompt_refine_runs_and_every_final_image_follows_the_added_detail(client):
    name = "exemplar_prompt_refine_nested"
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import EXEMPLAR_NAMES, default_exemplars

    exemplars = [Image.fromarray(((e.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8"))
                 for e in default_exemplars(32)]

    def nearest(image):
        return EXEMPLAR_NAMES[min(range(len(exemplars)), key=lambda k: mean_abs(image, exemplars[k]))]

    prompt = api_prompt(name)
    prompt_id, _ = client.run(prompt, timeout=120)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    broad = {part.strip() for part in prompt[node_id(name, "Stage 1 prompt (broad)")]["inputs"]["text"].split(",")}
    narrow = prompt[node_id(name, "Stage 2 prompt (the added detail)")]["inputs"]["text"]
    first = [unlabelled(image) for image in images_of(client, outputs[node_id(name, "Stage 1 (broad prompt)")])]
    finals = images_of(client, outputs[node_id(name, "Final images")])
    assert len(first) == len(finals) == 4
    assert {nearest(image) for image in first} <= broad
    assert [nearest(image) for image in finals] == [narrow] * 4
    assert len(outputs[node_id(name, "Stage 2 outer steps (smiley)")]["images"]) == 3 * 4

    # A changed stage 2 prompt changes only stage 2: stage 1 comes from ComfyUI's cache.
    stage_1 = node_id(name, "Stage 1: outer step 1 of 4")
    prompt[node_id(name, "Stage 2 prompt (the added detail)")]["inputs"]["text"] = "red disc"
    prompt_id, events = client.run(prompt, timeout=120)
    ran = {e["data"]["node"] for e in events if e["type"] == "executing" and e["data"].get("node")}
    assert stage_1 not in ran and node_id(name, "Stage 2: outer steps 2-4") in ran
    refined = images_of(client, client.history(prompt_id)["outputs"][node_id(name, "Final images")])
    assert [nearest(image) for image in refined] == ["red disc"] * 4


def test_every_runnable_example_is_tested_here():
    # the exemplar_inverse_* examples run in tests/server_api/test_inverse_api.py, which checks their images
    assert RUNNABLE == ["exemplar_custom_advanced_nested", "exemplar_img2img_inpaint_nested",
                        "exemplar_inverse_colorization_nested", "exemplar_inverse_denoising_nested",
                        "exemplar_inverse_inpainting_nested", "exemplar_inverse_super_resolution_nested",
                        "exemplar_pick_candidate_nested", "exemplar_prompt_refine_nested",
                        "nested_vs_vanilla_digits", "nested_vs_vanilla_exemplar"]


@pytest.mark.parametrize("name", NEEDS_WEIGHTS)
def test_example_validates_up_to_missing_weights(name, client):
    prompt = api_prompt(name)
    with pytest.raises(PromptValidationError) as rejected:
        client.queue_prompt(prompt)
    error = rejected.value
    assert error.status_code == 400
    loaders = wc.file_loaders(prompt)
    assert set(error.node_errors) == set(loaders), str(error)
    for failing_id, failure in error.node_errors.items():
        expected = dict(loaders[failing_id])
        for item in failure["errors"]:
            input_name = (item.get("extra_info") or {}).get("input_name")
            assert input_name in expected, str(error)
            if item["type"] == "value_not_in_list":
                assert item["extra_info"]["received_value"] == expected[input_name]
            else:  # LoadImage checks its file itself
                assert item["type"] == "custom_validation_failed" and input_name == "image", str(error)
                assert f"Invalid image file: {expected['image']}" in item["details"]


@pytest.mark.parametrize("name", NEEDS_WEIGHTS)
def test_example_passes_validation_with_placeholder_files(name, server, client):
    """With empty files under the expected names the prompt is accepted whole; it then fails in a loader."""
    prompt = api_prompt(name)
    created = []
    folders = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name1": "text_encoders",
               "clip_name2": "text_encoders", "vae_name": "vae", "image": None}
    try:
        for values in wc.file_loaders(prompt).values():
            for input_name, file_name in values:
                if folders[input_name] is None:
                    path = server.base_dir / "input" / file_name
                    picture = Image.new("RGBA", (64, 64), (90, 120, 200, 255))
                    picture.paste((0, 0, 0, 0), (16, 16, 48, 48))  # a transparent hole: the inpainting mask
                    picture.save(path)
                else:
                    path = server.base_dir / "models" / folders[input_name] / file_name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"")
                created.append(path)
        prompt_id = client.queue_prompt(prompt)
        with pytest.raises(ExecutionError) as failed:
            list(client.stream(prompt_id, timeout=120))
        assert failed.value.node_type in LOADER_TYPES, failed.value
    finally:
        for path in created:
            path.unlink(missing_ok=True)


# -- the templates browser --------------------------------------------------------------------------------------
def test_templates_route_lists_and_serves_the_examples(server):
    listed = requests.get(f"{server.url}/api/workflow_templates", timeout=30).json()
    assert PACK_DIR_NAME in listed, listed
    names = set(listed[PACK_DIR_NAME])
    # API twins live in example_workflows/api/ so that the Templates dialog, which loads what it lists with
    # app.loadGraphData, offers editor-format files only: exactly the examples are listed.
    assert names == set(WORKFLOWS)
    for name in WORKFLOWS:
        base = f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}"
        served = requests.get(f"{base}.json", timeout=30)
        assert served.status_code == 200 and served.json() == wc.load(PAIRS[name][0])
        thumbnail = requests.get(f"{base}.jpg", timeout=30)  # the frontend asks for <name>.jpg
        assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"


def test_api_twins_are_not_offered_as_templates(server):
    listed = set(requests.get(f"{server.url}/api/workflow_templates", timeout=30).json()[PACK_DIR_NAME])
    twins = {path.stem for _, path in PAIRS.values() if path.parent.name == "api"}
    assert twins and not twins & listed
