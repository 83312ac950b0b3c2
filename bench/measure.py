"""Measuring tools: wall and CPU time, peak memory of one run, a server-like progress hook, preview timing.

Peak memory is the peak of live torch tensor bytes during the run, above what was live when it started (the
model's weights, loaded by a warm-up run, stay resident and are not counted):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.
- CPU: torch has no CPU peak counter (and ``tracemalloc`` does not see torch's allocations), so a separate run
  is recorded by ``torch.profiler`` with ``profile_memory=True``: every op's own allocations and frees, in
  order of time, summed into the live-bytes curve whose maximum is the peak. It is the same quantity CUDA's
  counter gives, exact at op granularity and repeatable to the byte. The process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) is recorded as well, for
  information only: allocator and page effects make it vary by +-10% between identical runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    value = _status_kib("VmRSS")
    if value is not None:
        return value * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def release_freed_memory() -> None:
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


CPU_MEMORY_METHOD = (
    "peak live torch tensor bytes: a separate run recorded by torch.profiler(profile_memory=True); every op's "
    "self_cpu_memory_usage (allocations minus frees) in order of start time, cumulated; peak of that curve"
)
CPU_RSS_METHOD = (
    "information only: resident set high-water mark, gc.collect() + malloc_trim(0) before the run, VmHWM reset "
    "through /proc/self/clear_refs, VmHWM after the run - VmRSS before it"
)
CPU_RSS_METHOD_FALLBACK = "information only: resident set sampled every 1 ms by a background thread, peak minus RSS before"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the run"


class _RssSampler:
    def __init__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class RunMeasure:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_bytes: int = 0


def cpu_rss_method() -> str:
    return CPU_RSS_METHOD if _reset_high_water_mark() else CPU_RSS_METHOD_FALLBACK


def tensor_peak_bytes(run: Callable[[], Any]) -> int:
    """Peak live torch tensor bytes (CPU) during ``run()``, above the start, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    release_freed_memory()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.events() if e.self_cpu_memory_usage != 0]
    events.sort(key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def measure(run: Callable[[], Any], device: torch.device) -> tuple[Any, RunMeasure]:
    """Run ``run()`` once: wall time, process CPU time, and peak memory (CUDA: tensors; CPU: resident set, info)."""
    cuda = device.type == "cuda"
    release_freed_memory()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        sampler = contextlib.nullcontext()
    else:
        before = rss_bytes()
        sampler = contextlib.nullcontext() if _reset_high_water_mark() else _RssSampler()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with sampler:
        result = run()
        if cuda:
            torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - before
    elif isinstance(sampler, _RssSampler):
        peak = sampler.peak - before
    else:
        peak = _status_kib("VmHWM") * 1024 - before
    return result, RunMeasure(wall_s=wall, cpu_s=cpu, peak_bytes=max(int(peak), 0))


class ServerLikeProgressHook:
    """A ``comfy.utils`` progress-bar hook doing what ComfyUI's server does with each update, in-process.

    ``main.py``'s hook checks for Cancel and sends a progress message; with a preview it sends the image,
    which the server shrinks to ``--preview-size`` and encodes as JPEG (quality 95). This hook does the
    same work (minus the socket) and times the preview encoding, so the measured runs include it.
    """

    def __init__(self):
        import comfy.cli_args

        self.max_size = comfy.cli_args.args.preview_size
        self.updates = 0
        self.previews = 0
        self.encode_s = 0.0
        self.preview_bytes = 0
        self.on_preview: Optional[Callable[[], None]] = None

    def __call__(self, value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        self.updates += 1
        _ = {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}
        if preview_image is None:
            return
        start = time.perf_counter()
        from PIL import Image, ImageOps

        image_type, image, max_size = preview_image
        if max_size is not None:
            image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        buffer.write(b"\x00\x00\x00\x01")
        image.save(buffer, format=image_type, quality=95, compress_level=1)
        self.preview_bytes += len(buffer.getvalue())
        self.previews += 1
        self.encode_s += time.perf_counter() - start
        if self.on_preview is not None:
            self.on_preview()

    def reset(self):
        self.updates = self.previews = self.preview_bytes = 0
        self.encode_s = 0.0


@contextlib.contextmanager
def comfy_session(preview_method: str = "auto", hook: Optional[ServerLikeProgressHook] = None):
    """ComfyUI as a server runs it: ``--preview-method`` set, a progress hook installed, console bars off.

    Console progress bars (tqdm, which only KSampler draws) are switched off with ComfyUI's own
    ``set_progress_bar_enabled`` so that the console does not cost vanilla time nested does not pay.
    Everything is restored afterwards.
    """
    import comfy.cli_args
    import comfy.utils

    args = comfy.cli_args.args
    old_method, old_hook, old_enabled = args.preview_method, comfy.utils.PROGRESS_BAR_HOOK, comfy.utils.PROGRESS_BAR_ENABLED
    args.preview_method = comfy.cli_args.LatentPreviewMethod(preview_method)
    comfy.utils.set_progress_bar_global_hook(hook)
    comfy.utils.set_progress_bar_enabled(False)
    try:
        yield hook
    finally:
        args.preview_method = old_method
        comfy.utils.set_progress_bar_global_hook(old_hook)
        comfy.utils.set_progress_bar_enabled(old_enabled)


@dataclass
class EmissionTimer:
    """Total time spent in ``NestedRunReporter.on_outer_step`` (preview decode, hook + JPEG encode, event)."""

    seconds: float = 0.0
    calls: int = 0
    _original: Any = field(default=None, repr=False)

    @contextlib.contextmanager
    def installed(self, reporter_class):
        original = reporter_class.__dict__["on_outer_step"]
        timer = self

        def on_outer_step(reporter, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(reporter, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        reporter_class.on_outer_step = on_outer_step
        try:
            yield self
        finally:
            reporter_class.on_outer_step = original

    def reset(self):
        self.seconds = 0.0
        self.calls = 0


def median(values):
    return statistics.median(values) if values else float("nan")
