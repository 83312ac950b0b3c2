"""The path a maintainer follows through one NestedKSampler run reads top to bottom: the node asks for its cache key
and outer_previews mark, plans, samples, and the core runs the plan with every report and every steering request
going through one observer. ``tools/trace_run_path.py`` traces a real run and says exactly what counts; a change
that makes the run go back and forth between the pack's files fails here."""
from __future__ import annotations

# The main line of a NestedKSampler run, one stay per file. planning.py is entered twice, for a reason: the
# schedules and costs are planned before ComfyUI loads the model (bad inputs fail fast), the outer step "auto"
# takes once ComfyUI's guider exists (the probe runs the inner solver against it).
MAIN_LINE = [
    "nodes/nested_ksampler.py",  # the node's execute
    "nodes/rerun.py",  # its cache key
    "nodes/previews_wanted.py",  # whether any node takes outer_previews
    "nodes/planning.py",  # settings checked, schedules and measured costs
    "nodes/nested_run.py",  # sample_latent, ComfyUI's sample_custom, the sampler
    "nested_core/errors.py",  # cfg checked
    "nodes/planning.py",  # plan_run: the outer step auto takes, the pacing, the outer step rule
    "nodes/prompt_server.py",  # the executing prompt and node (whether a client can steer the run)
    "nested_core/nested.py",  # run_nested
    "nodes/run_observer.py",  # every hook, ComfyUI's callback, the run's end and outer_previews
]


def test_a_nested_ksampler_run_enters_each_file_once_but_planning(pack):
    from comfyui_nested_diffusion.tools.trace_run_path import trace_run_path

    path = trace_run_path(outer_steps=3, inner_steps=4, batch=2)
    print(path.report(calls=True))
    assert path.files == MAIN_LINE
    assert path.returns == ["nodes/planning.py"]
    observer = path.stays[-1]
    # the core reached the observer for every kind of hook a batch run without a client has
    for hook in ("started", "take_pick", "model_called", "inner_result", "should_stop", "ended", "outer_previews"):
        assert f"RunObserver.{hook}" in observer.functions


def test_the_tracer_counts_a_file_entered_again_as_a_return():
    """Synthetic frames: a spine of two files calling helpers back and forth."""
    from comfyui_nested_diffusion.tools.trace_run_path import _Frame, main_line

    frames = [
        _Frame(0, "a.py", "entry", None),
        _Frame(1, "b.py", "plan", 0),
        _Frame(2, "c.py", "helper", 1),  # beneath an entry: part of b.py's stay
        _Frame(3, "a.py", "own_helper", 0),  # the entry file's own helper: no stay
        _Frame(4, "d.py", "run", 0),  # the spine goes on into d.py
        _Frame(5, "e.py", "hook", 4),
        _Frame(6, "d.py", "run_more", 4),  # d.py's own code between two hooks
        _Frame(7, "e.py", "hook", 6),  # consecutive with the first hook: one stay
        _Frame(8, "b.py", "replan", 4),  # back to b.py
    ]
    path = main_line(frames, spine={0, 4, 6})
    assert path.files == ["a.py", "b.py", "d.py", "e.py", "b.py"]
    assert path.returns == ["b.py"]
    assert path.stays[3].functions == ["hook", "hook"]
