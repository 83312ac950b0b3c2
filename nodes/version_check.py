"""At load: which ComfyUI this pack runs in, and a warning outside the releases its tests run on."""
from __future__ import annotations

import logging
import re
from typing import Optional

# The releases the test suite runs on (scripts/setup_env.sh builds both; .ci/run tests both when it can).
TESTED_OLDEST = (0, 3, 75)
TESTED_NEWEST = (0, 33, 0)


def parse_version(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``"0.33.0"`` -> ``(0, 33, 0)``; anything else (``None``, ``"unknown"``) -> None. Suffixes are ignored."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def comfyui_version() -> Optional[str]:
    """ComfyUI's own version string (``comfyui_version.__version__``, written from its pyproject.toml)."""
    try:
        import comfyui_version as module
    except ImportError:
        return None
    return str(getattr(module, "__version__", "")) or None


def _shown(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


def version_message(found: Optional[str]) -> tuple[int, str]:
    """(logging level, message) for the ComfyUI version ``found``."""
    tested = f"tested on {_shown(TESTED_OLDEST)} and {_shown(TESTED_NEWEST)}"  # those two only, not the releases between
    version = parse_version(found)
    if version is None:
        return logging.WARNING, (f"nested diffusion: could not tell which ComfyUI this is (version {found!r}); {tested}. "
                                 f"If a node fails, please report it with your ComfyUI version")
    if version < TESTED_OLDEST:
        return logging.WARNING, (f"nested diffusion: ComfyUI {found} is older than the releases this pack is {tested}; "
                                 f"its V3 nodes need ComfyUI {_shown(TESTED_OLDEST)} or later: please update ComfyUI")
    if version[:2] > TESTED_NEWEST[:2]:
        return logging.WARNING, (f"nested diffusion: ComfyUI {found} is newer than the releases this pack is {tested}; "
                                 f"it should work, and if a node fails, please report it with your ComfyUI version")
    return logging.INFO, f"nested diffusion: ComfyUI {found} ({tested})"


def log_comfyui_version(found: Optional[str] = None) -> str:
    """Log the ComfyUI version found (or ``found``), warning outside the tested range; returns the message."""
    level, message = version_message(found if found is not None else comfyui_version())
    logging.log(level, message)
    return message
