"""Which of the pack's files one NestedKSampler run passes through, in order: the run path a maintainer follows.

Runs one real NestedKSampler sample in-process (the exact exemplar model, eps, batch 2) under ``sys.setprofile``
and prints the run's *main line* as a sequence of file stays, with the number of stays and of returns:

    scripts/python.sh -m comfyui_nested_diffusion.tools.trace_run_path [--outer-steps 3] [--inner-steps 4] [--batch 2]
        [--calls]

What counts:

* **Pack frames** are Python frames whose code lives in the pack's files. Everything else is transparent: ComfyUI,
  torch, the standard library, code Python generates (a dataclass's ``__init__``: constructing a dataclass runs no
  pack code), and the pack's own ``demo_models/`` (the model under test, standing in for a checkpoint), ``tools/``
  and ``tests/`` (the harness). A pack frame's *caller* is the nearest pack frame below it on the stack, whatever
  transparent frames lie between (the inner solver between the core and its model, ComfyUI's sampling between
  ``sample_custom`` and the sampler).
* **The spine** is the node's ``execute`` frame and every pack frame on the stack while the diffusion model is
  evaluated (ComfyUI's ``BaseModel.apply_model``): the frames that carry the run down to the model.
* **Main-line frames** are the spine frames and the frames they call, directly or through other main-line frames,
  in the same file: a spine function's helpers in its own file are part of reading that file.
* **An entry** is a call from a main-line frame into a pack function of another file. Everything beneath that call
  belongs to the entry (a helper file used inside ``planning.py`` is part of that planning stay), unless it is a
  spine frame itself, which continues the main line.
* **A stay** is one or more consecutive entries into the same file (the first stay is the entry file). Returning
  from a call to the caller on the spine is not a stay: the reader just goes on reading the caller.
* **A return** is a stay in a file that an earlier stay already had: the run went back and forth.

``--calls`` prints, for every stay, the functions entered there. ``trace_run_path()`` gives the same as a value
(the in-process test of the run path asserts on it).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MODEL_EVALUATION = ("model_base.py", "apply_model")  # ComfyUI's BaseModel.apply_model: one diffusion model call
TRANSPARENT_FOLDERS = ("demo_models", "tools", "tests")  # the model under test and the harness


@dataclass
class Stay:
    """One stay of the main line: ``file`` (relative to the pack), the functions its entries called first."""

    file: str
    functions: list[str] = field(default_factory=list)


@dataclass
class RunPath:
    """The main line of one traced run."""

    stays: list[Stay]

    @property
    def files(self) -> list[str]:
        return [stay.file for stay in self.stays]

    @property
    def returns(self) -> list[str]:
        """The files of the stays that went back to a file an earlier stay had, in order."""
        seen: set[str] = set()
        again = []
        for name in self.files:
            if name in seen:
                again.append(name)
            seen.add(name)
        return again

    def report(self, calls: bool = False) -> str:
        earlier: set[str] = set()
        lines = []
        for number, stay in enumerate(self.stays, 1):
            mark = "  <- return" if stay.file in earlier else ""
            earlier.add(stay.file)
            lines.append(f"{number:3d}  {stay.file}{mark}")
            if calls:
                lines.append(f"       {', '.join(dict.fromkeys(stay.functions))}")
        returns = self.returns
        counted = ", ".join(f"{name} x{returns.count(name)}" for name in dict.fromkeys(returns))
        lines.append(f"{len(self.stays)} stays in {len(set(self.files))} files, {len(returns)} "
                     f"{'return' if len(returns) == 1 else 'returns'}"
                     + (f" ({counted})" if returns else ""))
        return "\n".join(lines)


@dataclass
class _Frame:
    index: int
    file: str
    function: str
    caller: Optional[int]  # the index of the nearest pack frame below it on the stack


class _Recorder:
    """Records every pack frame's call (in order, with its caller) and which were on the stack at a model call."""

    def __init__(self, pack_root: str):
        self.pack_root = os.path.realpath(pack_root)
        self.frames: list[_Frame] = []
        self.spine: set[int] = set()
        self.stack: list[Optional[int]] = []  # per Python frame: its pack frame's index, None for transparent ones
        self.pack_stack: list[int] = []
        self._files: dict[str, Optional[str]] = {}

    def pack_file(self, filename: str) -> Optional[str]:
        """The file relative to the pack, or None for a transparent one."""
        if filename not in self._files:
            path = os.path.realpath(filename)
            relative = os.path.relpath(path, self.pack_root) if path.startswith(self.pack_root + os.sep) else None
            top = relative.split(os.sep)[0] if relative is not None else ""
            # the harness, the model under test, environments inside the checkout (.nested_env/), generated code
            if top in TRANSPARENT_FOLDERS or top.startswith(".") or filename.startswith("<"):
                relative = None
            self._files[filename] = relative
        return self._files[filename]

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if code.co_name == MODEL_EVALUATION[1] and code.co_filename.endswith(MODEL_EVALUATION[0]):
                self.spine.update(self.pack_stack)
            name = self.pack_file(code.co_filename)
            if name is None:
                self.stack.append(None)
                return
            index = len(self.frames)
            self.frames.append(_Frame(index, name, code.co_qualname if hasattr(code, "co_qualname") else code.co_name,
                                      self.pack_stack[-1] if self.pack_stack else None))
            self.stack.append(index)
            self.pack_stack.append(index)
        elif event == "return" and self.stack:
            if self.stack.pop() is not None:
                self.pack_stack.pop()


def main_line(frames: list[_Frame], spine: set[int]) -> RunPath:
    """The stays of the main line (see the module docstring), from the recorded frames."""
    if not frames:
        return RunPath([])
    root = frames[0].index
    spine = spine | {root}
    on_main_line: set[int] = {root}
    stays = [Stay(frames[0].file, [frames[0].function])]
    for frame in frames[1:]:
        caller = frame.caller
        same_file = caller is not None and frame.file == frames[caller].file
        if frame.index in spine:
            on_main_line.add(frame.index)
        elif caller is None or caller not in on_main_line:
            continue
        elif same_file:
            on_main_line.add(frame.index)
        if same_file:
            continue
        if stays[-1].file == frame.file:
            stays[-1].functions.append(frame.function)
        else:
            stays.append(Stay(frame.file, [frame.function]))
    return RunPath(stays)


def trace(run: Callable[[], Any], pack_root: str) -> tuple[RunPath, Any]:
    """(the main line of ``run()``, its result), traced with ``sys.setprofile`` on this thread."""
    recorder = _Recorder(pack_root)
    previous = sys.getprofile()
    sys.setprofile(recorder)
    try:
        result = run()
    finally:
        sys.setprofile(previous)
    return main_line(recorder.frames, recorder.spine), result


def trace_run_path(outer_steps: int = 3, inner_steps: int = 4, batch: int = 2, seed: int = 1) -> RunPath:
    """The main line of one NestedKSampler run (euler, normal, outer_step auto, a batch: picks are asked for at
    every model call) on the exact eps exemplar model. ComfyUI and the pack must be importable (``tools.comfy_env``)."""
    from .comfy_env import import_comfy, import_pack

    import_comfy()
    pack = import_pack()
    import torch

    from ..nodes.nested_ksampler import NestedKSampler
    from .models import exemplar_model, node_with_hidden

    model, cond, _ = exemplar_model("eps", 0.05, 16)
    latent = {"samples": torch.zeros(batch, 3, 16, 16)}
    node = node_with_hidden(NestedKSampler, unique_id="trace")

    def run():
        return node.execute(model=model, seed=seed, outer_steps=outer_steps, inner_steps=inner_steps, cfg=1.0,
                            sampler_name="euler", scheduler="normal", positive=cond, negative=cond,
                            latent_image=latent, denoise=1.0)

    path, _ = trace(run, pack.__path__[0])
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", action="store_true", help="list the functions entered in every stay")
    args = parser.parse_args(argv)
    print(trace_run_path(args.outer_steps, args.inner_steps, args.batch).report(calls=args.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
