"""The inverse-problem example workflows (super-resolution, inpainting, colorization, denoising), built with
tools/workflows.py's ``Workflow``: one per task, on the exact exemplar model, runnable with no downloads.

Each makes its own ground truth (KSampler on the exemplar model), degrades it (Degrade Image), and solves the
inverse problem twice at the same 40 model calls: NestedKSampler (4 outer x 10 inner, an image consistent with the
measurement after every outer step) and KSampler (40 steps). With a real photo, replace the truth and Degrade Image
by LoadImage of the measured image, and the exemplar model by a pixel-space model.
"""
from __future__ import annotations

TASK_SETTINGS = {
    # task: (title word, factor, sigma_y, what the note says about the measurement)
    "super_resolution": ("Super-resolution x4", 4, 0.0,
                         "an 8x8 average-pooled image; the solution is 32x32 and pools back to it exactly"),
    "inpainting": ("Inpainting", 1, 0.0, "the right half masked out; the left half is kept exactly"),
    "colorization": ("Colorization", 1, 0.0, "the channel mean (gray); the solution's gray equals it exactly"),
    "denoising": ("Denoising", 1, 0.05,
                  "the image plus Gaussian noise of std 0.05 (sigma_y); the solution is pulled towards the "
                  "measurement less and less as the sampler's own noise level falls below sigma_y"),
}
SAMPLING = {"cfg": 1.0, "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}
BATCH = 4


def workflow_name(task: str) -> str:
    return f"exemplar_inverse_{task}_nested"


def inverse_workflow(task: str, Workflow, EXEMPLAR: dict):  # noqa: N803
    """``Workflow`` and ``EXEMPLAR`` come from tools/workflows.py, passed in: run as ``-m``, that module is
    ``__main__``, and importing it again here would read another copy of its node schemas."""
    label, factor, sigma_y, about = TASK_SETTINGS[task]
    w = Workflow(workflow_name(task), f"{label}, anytime (exemplar model, inverse problem)",
                 f"{label} with the Inverse Problem node: NestedKSampler (4 outer x 10 inner) gives a "
                 "measurement-consistent image after every outer step; KSampler with the same 40 steps beside it. "
                 "The ground truth is a sample of the built-in exact exemplar model. No downloads.", runnable=True)
    model = w.add("NestedExemplarModel", (40, 110), EXEMPLAR, id=1, title="Exemplar Mixture Model (testing)")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 360), {"width": 32, "height": 32, "batch_size": BATCH},
                   id=2, title="Empty pixel latent (ground truth)")
    vae = w.add("VAELoader", (40, 530), {"vae_name": "pixel_space"}, id=3, title="Pixel-space VAE")
    truth = w.add("KSampler", (420, 110), {"seed": 100, "steps": 30, "cfg": 1.0, "sampler_name": "euler",
                                           "scheduler": "normal", "denoise": 1.0},
                  id=4, title="Ground truth (a sample of the model)", size=(320, 470), model=model.out(0),
                  positive=model.out(1), negative=model.out(1), latent_image=latent.out(0))
    truth_image = w.add("VAEDecode", (420, 640), id=5, title="Decode truth", samples=truth.out(0), vae=vae.out(0))
    w.add("SaveImage", (420, 740), {"filename_prefix": f"nested_inverse/{task}_truth"}, id=6, title="Save truth",
          size=(320, 300), images=truth_image.out(0))
    mask_links, mask_nodes = {}, []
    if task == "inpainting":
        keep = w.add("SolidMask", (40, 1100), {"value": 0.0, "width": 32, "height": 32}, id=20, title="Keep (0)")
        fill = w.add("SolidMask", (40, 1260), {"value": 1.0, "width": 16, "height": 32}, id=21, title="Fill in (1)")
        mask = w.add("MaskComposite", (340, 1100), {"x": 16, "y": 0, "operation": "add"}, id=22,
                     title="Mask: right half", destination=keep.out(0), source=fill.out(0))
        mask_links, mask_nodes = {"mask": mask.out(0)}, [keep, fill, mask]
    degrade = w.add("NestedDegradeImage", (800, 110), {"task": task, "factor": factor, "sigma_y": sigma_y, "seed": 0},
                    id=7, title="Degrade Image (the measurement)", size=(320, 180), image=truth_image.out(0),
                    **mask_links)
    w.add("SaveImage", (800, 360), {"filename_prefix": f"nested_inverse/{task}_measurement"}, id=8,
          title="Save measurement", size=(320, 300), images=degrade.out(0))
    inverse = w.add("NestedInverseProblem", (800, 740), {"task": task, "factor": factor, "sigma_y": sigma_y}, id=9,
                    title="Inverse Problem", color="nested", size=(340, 180), model=model.out(0),
                    image=degrade.out(0), **mask_links)
    nested = w.add("NestedKSampler", (1200, 110), {"seed": 7, "outer_steps": 4, "inner_steps": 10, **SAMPLING,
                                                   "outer_eta": 0.0, "outer_step": "auto"},
                   id=10, title="Nested KSampler (anytime solver)", color="nested", size=(320, 660),
                   model=inverse.out(0), positive=model.out(1), negative=model.out(1), latent_image=inverse.out(1))
    vanilla = w.add("KSampler", (1560, 110), {"seed": 7, "steps": 40, **SAMPLING}, id=11,
                    title="KSampler (same 40 NFEs)", size=(320, 600), model=inverse.out(0), positive=model.out(1),
                    negative=model.out(1), latent_image=inverse.out(1))
    decode_nested = w.add("VAEDecode", (1920, 110), id=12, title="Decode nested", samples=nested.out(0),
                          vae=vae.out(0))
    w.add("SaveImage", (2120, 110), {"filename_prefix": f"nested_inverse/{task}_nested"}, id=13,
          title="Save nested", size=(320, 300), images=decode_nested.out(0))
    decode_vanilla = w.add("VAEDecode", (1920, 480), id=14, title="Decode vanilla", samples=vanilla.out(0),
                           vae=vae.out(0))
    w.add("SaveImage", (2120, 480), {"filename_prefix": f"nested_inverse/{task}_vanilla"}, id=15,
          title="Save vanilla", size=(320, 300), images=decode_vanilla.out(0))
    w.add("OuterStepPreview", (2480, 110), id=16, title="Outer Step Preview (nested)", size=(560, 660),
          previews=nested.out(1), vae=vae.out(0))
    w.note(f"**{label} as an inverse problem.** The measurement is {about}. *Inverse Problem* patches the model "
           "so that every denoised estimate agrees with it (a null-space projection), so any sampler solves the "
           "problem: KSampler is the plain solver, NestedKSampler the anytime one, with a finished, consistent "
           "image after every 10-call outer step (*Outer Step Preview*). For your own picture: LoadImage of the "
           "measured image into *Inverse Problem*, and a pixel-space model (latent models such as SD1.5 or Flux are "
           "refused).", (40, 700), size=(340, 330))
    w.group("Exact model and a ground truth", [model, latent, vae, truth, truth_image], "model")
    if mask_nodes:
        w.group("Mask", mask_nodes, "mask")
    w.group("Same seed, 40 NFEs each", [nested, vanilla], "sample")
    return w


def inverse_workflows(workflow_cls, exemplar: dict) -> list:
    """One builder per task, in the form tools/workflows.py's WORKFLOWS list holds them."""
    return [lambda task=task: inverse_workflow(task, workflow_cls, exemplar) for task in TASK_SETTINGS]


def render_inverse_thumbnail(workflow, images: dict, card, draw, tile_of, label, crop) -> None:
    """Rows for two batch items: truth, measurement, nested after outer steps 1 and 4, KSampler's final."""
    ids = {node.title: str(node.id) for node in workflow.nodes}
    previews = [crop(image) for image in images[ids["Outer Step Preview (nested)"]]]
    columns = [("truth", images[ids["Save truth"]]), ("measured", images[ids["Save measurement"]]),
               ("outer 1", previews[:BATCH]), ("outer 4", previews[-BATCH:]), ("KSampler", images[ids["Save vanilla"]])]
    label(draw, (12, 8), workflow.title.split(",")[0] + ": nested, anytime", 15)
    tile, gap, x0, y0 = 70, 8, 12, 56
    for column, (name, shown) in enumerate(columns):
        label(draw, (x0 + column * (tile + gap), 34), name, 13, (200, 200, 210))
        for row in range(min(4, len(shown))):
            card.paste(tile_of(shown[row], tile), (x0 + column * (tile + gap), y0 + row * (tile + gap)))
