"""Step count -> sigmas exactly as KSampler builds them, cheap enough to plan any accepted input in about a second.

Planning a nested run searches over many schedule lengths (every inner diffusion is the tail of a longer schedule,
see ``nested_core.schedules.truncated_schedule``), so three things keep it bounded on a server that runs for days:

* **Length.** No schedule is longer than ``MAX_SCHEDULE_LENGTH`` (KSampler's own largest: 10000 steps at denoise
  0.01); a longer request is a ``NestedDiffusionError``.
* **Memory.** Schedules are cached per model sampling in an LRU bounded by bytes (``CACHE_BYTES``), not by count:
  one 10^6-sigma schedule weighs as much as a thousand short ones.
* **Time.** ComfyUI's ``normal``, ``sgm_uniform``, ``simple``, ``beta`` and ``linear_quadratic`` schedulers compute one sigma at a time in Python
  (``normal``: about 50-90 us per sigma on a 2-core CPU, 0.5-0.9 s for 10000 steps). For those the same arithmetic runs
  vectorised; the twin is used for a model sampling only after it gave bit-identical sigmas to ComfyUI's own
  scheduler at several lengths, otherwise ComfyUI's function is used. Between two schedules that are not cached,
  a Cancel (``POST /interrupt``) is honoured, so planning with a slow custom scheduler can always be cancelled.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

import comfy.model_management
import comfy.samplers
import torch

from ..nested_core import NestedDiffusionError
from ..nested_core.schedules import MAX_SCHEDULE_LENGTH

CACHE_BYTES = 8 * 2**20  # per model sampling; a schedule above a quarter of it is built but not kept
VERIFY_LENGTHS = (1, 2, 3, 5, 17, 64, 257)  # where a vectorised twin must match ComfyUI's scheduler bit for bit


def _fast_normal(model_sampling: Any, steps: int, sgm: bool = False) -> torch.Tensor:
    """``comfy.samplers.normal_scheduler`` with the per-sigma loop replaced by one ``model_sampling.sigma`` call."""
    s = model_sampling
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = s.sigma(timesteps).to(device="cpu", dtype=torch.float32).reshape(-1)
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def _fast_simple(model_sampling: Any, steps: int) -> torch.Tensor:
    """``comfy.samplers.simple_scheduler`` vectorised (``int(x * ss)`` is the same float64 product, floored)."""
    table = model_sampling.sigmas
    ss = len(table) / steps
    offsets = torch.floor(torch.arange(steps, dtype=torch.float64) * ss).long()
    sigmas = table.detach().to("cpu")[len(table) - 1 - offsets].to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _fast_beta(model_sampling: Any, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """``comfy.samplers.beta_scheduler`` with its de-duplicating loop vectorised (the timesteps are computed alike)."""
    import numpy
    import scipy.stats

    total_timesteps = len(model_sampling.sigmas) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(scipy.stats.beta.ppf(ts, alpha, beta) * total_timesteps)
    keep = numpy.concatenate([[ts[0] != -1], ts[1:] != ts[:-1]]) if len(ts) else numpy.zeros(0, dtype=bool)
    index = torch.from_numpy(ts[keep].astype(numpy.int64))
    sigmas = model_sampling.sigmas.detach().to("cpu")[index].to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _fast_linear_quadratic(model_sampling: Any, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """``comfy.samplers.linear_quadratic_schedule`` with its list comprehensions as float64 array arithmetic (the
    same operations in the same order)."""
    import numpy

    if steps == 1:
        schedule = numpy.array([1.0, 0.0])
    else:
        linear_steps = steps // 2
        linear = numpy.arange(linear_steps, dtype=numpy.float64) * threshold_noise / linear_steps
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        i = numpy.arange(linear_steps, steps, dtype=numpy.int64)
        quadratic = quadratic_coef * (i * i).astype(numpy.float64) + linear_coef * i.astype(numpy.float64) + const
        schedule = 1.0 - numpy.concatenate([linear, quadratic, [1.0]])
    return torch.from_numpy(schedule).to(torch.float32) * model_sampling.sigma_max.cpu()


FAST_TWINS: dict[str, Callable[[Any, int], torch.Tensor]] = {
    "linear_quadratic": _fast_linear_quadratic,
    "normal": _fast_normal,
    "sgm_uniform": lambda model_sampling, steps: _fast_normal(model_sampling, steps, sgm=True),
    "simple": _fast_simple,
    "beta": _fast_beta,
}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread for a while, then restore the setting. Planning runs thousands of small
    tensor operations; where the cores are busy with other work each multi-threaded one waits for the others
    (measured: 15 ms instead of 0.05 ms for an operation on 5000 sigmas)."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def planning(function: Callable) -> Callable:
    """Decorator: ``function`` plans a run single-threaded (see ``single_threaded``)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_threaded():
            return function(*args, **kwargs)

    return wrapper


class _ModelSchedules:
    """The cache of one model sampling: an LRU of schedules bounded by bytes, and which twins were verified."""

    def __init__(self) -> None:
        self.entries: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.bytes = 0
        self.twin_ok: dict[tuple, bool] = {}

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: tuple, sigmas: torch.Tensor) -> None:
        size = sigmas.numel() * sigmas.element_size()
        if size > CACHE_BYTES // 4:
            return
        self.entries[key] = sigmas
        self.bytes += size
        while self.bytes > CACHE_BYTES and self.entries:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()


_CACHES: "weakref.WeakKeyDictionary[Any, _ModelSchedules]" = weakref.WeakKeyDictionary()


def cached_bytes() -> int:
    """Bytes of sigmas held by all schedule caches now (for tests and the reliability report)."""
    return sum(cache.bytes for cache in list(_CACHES.values()))


def _cache_for(model_sampling: Any) -> _ModelSchedules:
    try:
        cache = _CACHES.get(model_sampling)
        if cache is None:
            cache = _CACHES[model_sampling] = _ModelSchedules()
        return cache
    except TypeError:  # not weak-referenceable: a cache for this call only
        return _ModelSchedules()


def sampling_fingerprint(model_sampling: Any) -> tuple:
    """What a schedule depends on besides the scheduler: a model sampling's range and flow shift."""
    values = (getattr(model_sampling, name, None) for name in ("sigma_min", "sigma_max", "shift", "multiplier"))
    return tuple(None if value is None else float(value) for value in values)


def planning_checkpoint() -> None:
    """Raise ComfyUI's interrupt exception when a Cancel is pending (a no-op outside a server)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _comfy_sigmas(model_sampling: Any, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).detach().to("cpu")


def _twin_matches(model_sampling: Any, scheduler: str, twin: Callable[[Any, int], torch.Tensor]) -> bool:
    try:
        for steps in VERIFY_LENGTHS:
            expected = _comfy_sigmas(model_sampling, scheduler, steps)
            got = twin(model_sampling, steps)
            if expected.shape != got.shape or not torch.equal(expected.to(got.dtype), got):
                logging.info("nested diffusion: scheduler %s: vectorised twin differs at %d steps, using ComfyUI's",
                             scheduler, steps)
                return False
    except Exception as error:  # a model sampling the twin cannot drive: ComfyUI's own function it is
        logging.info("nested diffusion: scheduler %s: vectorised twin unusable (%s), using ComfyUI's", scheduler, error)
        return False
    return True


def scheduler_sigmas(model_sampling: Any, scheduler: str, steps: int, cache: Optional[_ModelSchedules] = None) -> torch.Tensor:
    """``comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)`` on the CPU, via a verified twin where
    one exists. Not cached here."""
    cache = cache if cache is not None else _cache_for(model_sampling)
    twin = FAST_TWINS.get(scheduler)
    if twin is not None:
        key = (scheduler, sampling_fingerprint(model_sampling))
        if key not in cache.twin_ok:
            cache.twin_ok[key] = _twin_matches(model_sampling, scheduler, twin)
        if cache.twin_ok[key]:
            return twin(model_sampling, steps)
    return _comfy_sigmas(model_sampling, scheduler, steps)


def schedule_function(model_sampling: Any, scheduler: str, sampler_name: Optional[str] = None) -> Callable[[int], torch.Tensor]:
    """Step count -> sigmas, exactly as KSampler builds them for this scheduler (and sampler: some samplers drop
    the penultimate sigma). Results are cached per model sampling (see the module docstring); callers must not
    modify the tensors they get."""
    discard_penultimate = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    cache = _cache_for(model_sampling)
    prefix = (scheduler, discard_penultimate, sampling_fingerprint(model_sampling))

    def sigmas_for(steps: int) -> torch.Tensor:
        if not isinstance(steps, int) or not 1 <= steps <= MAX_SCHEDULE_LENGTH:
            raise NestedDiffusionError(
                f"a schedule of {steps} steps is beyond the longest one KSampler builds ({MAX_SCHEDULE_LENGTH}: "
                f"10000 steps at denoise 0.01)")
        key = (*prefix, steps)
        found = cache.get(key)
        if found is not None:
            return found
        planning_checkpoint()
        if discard_penultimate:
            sigmas = scheduler_sigmas(model_sampling, scheduler, steps + 1, cache)
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        else:
            sigmas = scheduler_sigmas(model_sampling, scheduler, steps, cache)
        cache.put(key, sigmas)
        return sigmas

    return sigmas_for
