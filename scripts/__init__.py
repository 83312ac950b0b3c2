"""Developer scripts (demo, load test, digits training and evaluation): run them as modules of the package,
e.g. ``scripts/python.sh -m comfyui_nested_diffusion.scripts.load_test``; ``scripts/demo.sh`` runs the demo."""
