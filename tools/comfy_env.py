"""Import a real ComfyUI engine and this pack in-process (tests, benchmark): one place for the bootstrap.

ComfyUI comes from ``$COMFYUI_PATH`` or the one ``scripts/setup_env.sh`` built (``.nested_env/`` for 0.3.75,
``.nested_env_033/`` for 0.33.0: the one whose venv runs this interpreter); the
device is the CPU when no CUDA GPU is present (or when asked).

One import identity: the repository is the package ``comfyui_nested_diffusion``, importable from the folder
``scripts/env.sh`` puts on PYTHONPATH (``.nested_import/``, holding one link to the checkout); the checkout itself is
never on ``sys.path``, so ComfyUI's top-level ``nodes``, ``utils`` and ``protocol`` are the only ones of those names.
A child process gets the same identity from ``module_command`` and ``child_env``.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE_NAME = "comfyui_nested_diffusion"


class ComfyNotFound(RuntimeError):
    """No ComfyUI checkout where one was expected."""


def env_dir() -> Path:
    """The environment scripts/setup_env.sh built: $NESTED_ENV_DIR, else the one whose venv runs this interpreter
    (``.nested_env_033/venv/bin/python`` -> ``.nested_env_033``: ComfyUI 0.33.0), else ``.nested_env``."""
    if os.environ.get("NESTED_ENV_DIR"):
        return Path(os.environ["NESTED_ENV_DIR"]).resolve()
    running = Path(sys.prefix).resolve()
    if running.name == "venv" and (running.parent / "comfyui_path").exists():
        return running.parent
    return REPO_ROOT / ".nested_env"


def comfyui_path() -> Path:
    """The ComfyUI checkout: $COMFYUI_PATH, else the environment's comfyui_path, else its ComfyUI/ folder."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    recorded = env_dir() / "comfyui_path"
    if recorded.exists():
        return Path(recorded.read_text().strip())
    return env_dir() / "ComfyUI"


def frontend_root() -> Optional[Path]:
    """The frontend $NESTED_FRONTEND names (e.g. ``1.58.1``, fetched by scripts/setup_env.sh into the environment),
    for ComfyUI's ``--front-end-root``; None: the frontend package the engine installed."""
    version = os.environ.get("NESTED_FRONTEND")
    if not version:
        return None
    static = env_dir() / f"frontend-{version}" / "comfyui_frontend_package" / "static"
    if not (static / "index.html").exists():
        raise ComfyNotFound(f"No frontend {version} at {static}: run NESTED_ENGINE=0.33.0 scripts/setup_env.sh")
    return static


def import_comfy(force_cpu: bool = False) -> Path:
    """Make ComfyUI importable and initialise its device: CPU when ``force_cpu`` or when no CUDA GPU is present."""
    path = comfyui_path()
    if not (path / "main.py").exists():
        raise ComfyNotFound(f"No ComfyUI at {path}: run scripts/setup_env.sh (or set COMFYUI_PATH)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    # As ComfyUI's main.py: its own ``utils`` package is imported before ``nodes`` puts ``comfy/`` (with its
    # ``utils.py``) first on sys.path, so that ``server`` (which the pack's event sender imports) imports too.
    import comfy.cli_args
    import torch
    import utils.install_util  # noqa: F401

    if force_cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` does, before the device is chosen
    import comfy.model_management  # noqa: F401  (initialises the device state)
    import server  # noqa: F401  (imported, never started: PromptServer.instance stays unset, as in a script)
    return path


def import_pack() -> ModuleType:
    """Import this pack with its nodes (what ComfyUI's loader imports before it awaits ``comfy_entrypoint``)."""
    importlib.import_module(f"{PACK_MODULE_NAME}.nodes")
    return sys.modules[PACK_MODULE_NAME]


def import_root() -> Path:
    """The folder this package was imported from (``.nested_import/``), for child processes' PYTHONPATH."""
    return Path(sys.modules[PACK_MODULE_NAME].__path__[0]).parent


def module_command(module: str, *args: str, python: Optional[str] = None) -> list[str]:
    """The command line that runs ``comfyui_nested_diffusion.<module>`` (``-P``: the working directory stays off
    ``sys.path``); run it with ``child_env()``."""
    return [python or sys.executable, "-P", "-m", f"{PACK_MODULE_NAME}.{module}", *args]


def child_env(extra: Optional[dict] = None) -> dict:
    """os.environ with ``import_root()`` first on PYTHONPATH: a child process imports this same checkout."""
    paths = [str(import_root()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **(extra or {})}
