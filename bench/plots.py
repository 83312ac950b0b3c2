"""Figures: anytime quality (log distance vs NFEs, as the paper's Figures 3 and 4) and cost ratios."""
from __future__ import annotations

from pathlib import Path

from .models import SPREAD

TITLES = {"eps": "eps-prediction", "v_prediction": "v-prediction", "flow": "flow (shift 3)"}
SPLIT_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
VANILLA_COLOUR = "#222222"
MARKERS = ["o", "s", "D", "^", "v", "P", "X"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _panel(ax, family: dict, budget: str, show_extended: bool, legend: bool, annotate: bool = False):
    from matplotlib.lines import Line2D

    entry = family["budgets"][budget]
    vanilla = {int(k): v for k, v in entry["ksampler"]["curve"].items()}
    n = sorted(vanilla)
    ax.axhspan(1e-5, SPREAD, color="#4daf4a", alpha=0.08, lw=0)
    ax.axhline(entry["ksampler"]["final_distance"], color="#888888", lw=0.9, ls=(0, (4, 3)))
    ax.plot(n, [vanilla[k] for k in n], color=VANILLA_COLOUR, lw=1.8)
    handles = [Line2D([], [], color=VANILLA_COLOUR, lw=1.8, label=f"KSampler x0 ({budget} steps)"),
               Line2D([], [], color="#888888", lw=0.9, ls=(0, (4, 3)), label="KSampler final image")]
    runs = [r for r in entry["nested"] if r["gated"] or show_extended]
    for index, run in enumerate(runs):
        c = run["comparison"]
        colour = SPLIT_COLOURS[index % len(SPLIT_COLOURS)]
        marker = MARKERS[index % len(MARKERS)]
        style = "-" if run["gated"] else ":"
        xs, ys = list(c["boundary_nfe"]), list(c["nested_distance"])
        ax.step(xs + [int(budget)], ys + [ys[-1]], where="post", color=colour, lw=1.5, alpha=0.9, linestyle=style)
        ax.plot(xs, ys, marker, color=colour, ms=6.5, mec="white", mew=0.8, linestyle="none")
        label = f"nested {run['split']}" + ("" if run["gated"] else " (extended)")
        handles.append(Line2D([], [], color=colour, lw=1.5, ls=style, marker=marker, ms=6.5, mec="white", label=label))
    low = min(n, key=lambda k: vanilla[k])
    if annotate and vanilla[low] < min(min(r["comparison"]["nested_distance"]) for r in runs):
        ax.annotate("late x0: a posterior mean, nearer\nthe exemplar than any sample", xy=(low, vanilla[low]),
                    xytext=(0.06 * int(budget), vanilla[low] * 1.4), fontsize=7.5, color="#555555",
                    arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8})
    ax.set_yscale("log")
    ax.set_ylim(2e-4, 1.5)
    ax.set_xlim(0, int(budget) + 1)
    if legend:
        ax.legend(handles=handles, loc="upper right", fontsize=7.5, frameon=True, framealpha=0.92, ncol=2 if len(handles) > 6 else 1)
    return handles


def plot_quality(results: dict, path: Path, budget: str | None = None) -> None:
    plt = _plt()
    models = list(results["models"])
    budgets = list(next(iter(results["models"].values()))["budgets"])
    budget = budget or budgets[-1]
    fig, axes = plt.subplots(1, len(models), figsize=(5.0 * len(models), 4.8), sharey=True)
    for ax, prediction in zip(axes, models):
        handles = _panel(ax, results["models"][prediction], budget, show_extended=False, legend=False,
                         annotate=prediction == models[0])
        ax.set_title(f"{TITLES.get(prediction, prediction)}: {budget} NFEs")
        ax.set_xlabel("NFEs (model evaluations)")
        ax.text(0.015 * int(budget), SPREAD * 0.85, f"within the data's own spread ({SPREAD})", ha="left", va="top",
                fontsize=8, color="#2f7d32")
    axes[0].set_ylabel("distance to the data manifold\n(RMS to nearest exemplar, log)")
    fig.suptitle("Anytime quality on the exact denoiser: NestedKSampler's image after each outer step (markers; the "
                 "line holds the latest) vs KSampler's x0 after the same NFEs", fontsize=11)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_quality_grid(results: dict, path: Path) -> None:
    """Every model family x every budget, gated and extended splits."""
    plt = _plt()
    models = list(results["models"])
    budgets = list(next(iter(results["models"].values()))["budgets"])
    fig, axes = plt.subplots(len(budgets), len(models), figsize=(5.0 * len(models), 3.6 * len(budgets)), sharey=True,
                             squeeze=False)
    for row, budget in enumerate(budgets):
        for col, prediction in enumerate(models):
            ax = axes[row][col]
            _panel(ax, results["models"][prediction], budget, show_extended=True, legend=True)
            ax.set_title(f"{TITLES.get(prediction, prediction)}: {budget} NFEs")
            if row == len(budgets) - 1:
                ax.set_xlabel("NFEs")
        axes[row][0].set_ylabel("RMS to nearest exemplar (log)")
    fig.suptitle("All budgets and splits (dotted: extended splits, no targets)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(cost_results: list[tuple[str, dict]], path: Path) -> None:
    """Bars of nested / KSampler ratios (wall time, peak memory) and the preview share, per workload."""
    plt = _plt()
    rows = []
    for label, results in cost_results:
        for w in results["workloads"]:
            name = w["name"] if not label else f"{w['name']} [{label}]"
            rows.append((name, w))
    names = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.55 * len(rows) + 1.8), sharey=True,
                             gridspec_kw={"width_ratios": [1.2, 1.2, 1.0]})
    y = list(range(len(rows)))[::-1]
    specs = (
        ("wall_ratio", "wall time, nested / KSampler\n(median of pairs; target <= 1.05)", 1.05, "{:.3f}"),
        ("peak_memory_ratio", "peak memory, nested / KSampler\n(target <= 1.05)", 1.05, "{:.3f}"),
        ("preview_share_median", "preview emission, share of nested's run\n(target < 2%)", 0.02, "{:.1%}"),
    )
    for ax, (key, title, limit, fmt) in zip(axes, specs):
        values = [w[key] for _, w in rows]
        gated = [key != "preview_share_median" or w["preview_target"] for _, w in rows]
        ok = [(v < limit if key == "preview_share_median" else v <= limit) for v in values]
        colours = [("#4daf4a" if good else "#e41a1c") if g else "#9e9e9e" for good, g in zip(ok, gated)]
        ax.barh(y, values, color=colours, height=0.62)
        ax.axvline(limit, color="#444444", lw=1, ls="--")
        if key != "preview_share_median":
            ax.axvline(1.0, color="#888888", lw=0.8)
        right = max(max(values) * 1.22, limit * 1.4)
        for yy, v in zip(y, values):
            inside = v > 0.35 * right
            ax.text(v - 0.01 * right if inside else v + 0.01 * right, yy, fmt.format(v), va="center",
                    ha="right" if inside else "left", fontsize=8.5, color="white" if inside else "#222222",
                    fontweight="bold" if inside else "normal")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, right)
        ax.grid(axis="y", visible=False)
        if key == "preview_share_median":
            from matplotlib.ticker import MultipleLocator, PercentFormatter

            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.xaxis.set_major_locator(MultipleLocator(0.02 if right <= 0.12 else 0.04))
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    fig.suptitle("Cost at equal NFEs (medians of alternating pairs; green: meets the target, red: misses it, "
                 "grey: no target)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
