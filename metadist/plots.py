"""Figures for a run, drawn with matplotlib (which MLflow already installs) and logged as PNGs.

- `training_curve`: query loss (and accuracy) before and after adaptation against the outer step.
- `adaptation_curve`: the evaluation metric against test-time steps, before and after meta-training,
  with 95% CI bands.
- `navigation_paths`: a few navigation test goals and the agent's path before and after adaptation, before
  and after meta-training (MAML paper, Figure 4).
- `sine_fits`: a few sinusoid test tasks, the true curve, the K support points and the model's fit
  after 0, 1 and 10 test-time steps, before and after meta-training (MAML paper, Figure 2).

Every function here draws data it is given; the driver computes that data (evaluations, adapted fits).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in workers

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def training_curve(history: list[dict], name: str):
    """The logged records of a run as curves against the outer step."""
    steps = [r["step"] for r in history]
    if any("return_after" in r for r in history):
        return _return_curve(history, steps, name)
    has_acc = any("acc_after" in r for r in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    ax = axes[0, 0]
    _before_after(ax, history, steps, "loss")
    ax.set(xlabel="outer step", ylabel="query loss (mean over the meta-batch)", title=f"{name}: meta-training")
    if all(r.get("loss_after", 1) > 0 for r in history):
        ax.set_yscale("log")
    ax.legend()
    if has_acc:
        ax = axes[0, 1]
        _before_after(ax, history, steps, "acc", scale=100)
        ax.set(xlabel="outer step", ylabel="query accuracy %", title="accuracy")
        ax.legend()
    fig.tight_layout()
    return fig


def _before_after(ax, history: list[dict], steps: list[int], metric: str, scale: float = 1.0) -> None:
    # `<metric>_before` and `<metric>_after` of the records that have them, against the outer step.
    for key, label in ((f"{metric}_before", "before adaptation"), (f"{metric}_after", "after adaptation")):
        pts = [(s, scale * r[key]) for s, r in zip(steps, history) if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label)


def _return_curve(history: list[dict], steps: list[int], name: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    _before_after(ax, history, steps, "return")
    ax.set(xlabel="outer step", ylabel="mean return per trajectory (meta-batch)", title=f"{name}: meta-training")
    ax.legend()
    fig.tight_layout()
    return fig


def adaptation_curve(reports: dict[str, dict], name: str):
    """Evaluation rows (metric after 0..S test-time steps, mean ± 95% CI) of several reports."""
    from metadist.evaluation import METRIC_LABELS

    fig, ax = plt.subplots(figsize=(6, 4))
    metric = METRIC_LABELS[next(iter(reports.values()))["metric"]]
    for label, report in reports.items():
        rows = report["rows"]
        s = [r["steps"] for r in rows]
        m = torch.tensor([r["mean"] for r in rows])
        c = torch.tensor([r["ci95"] for r in rows])
        ax.plot(s, m, marker="o", label=label)
        ax.fill_between(s, m - c, m + c, alpha=0.25)
    first = next(iter(reports.values()))
    ax.set(xlabel="test-time steps", ylabel=f"query {metric}",
           title=f"{name}: {first['episodes']} {first['split']} tasks, {first['shots']}-shot")
    ax.legend()
    fig.tight_layout()
    return fig


def navigation_paths(paths_by_label: dict[str, dict]):
    """Rows: parameter sets (before / after meta-training); columns: test goals. Each value is
    {"goals": (T, 2), "paths": {k: (positions (T, H, 2), mask (T, H))}} after k test-time steps, as
    `algorithms.maml_rl.trajectories` gives it; this only draws it."""
    first = next(iter(paths_by_label.values()))
    n_goals = first["goals"].shape[0]
    fig, axes = plt.subplots(len(paths_by_label), n_goals, figsize=(3.2 * n_goals, 3.2 * len(paths_by_label)),
                             squeeze=False)
    for row, (label, data) in enumerate(paths_by_label.items()):
        for t in range(n_goals):
            ax = axes[row, t]
            for k, (pos, mask) in data["paths"].items():
                taken = pos[t][mask[t] > 0]
                ax.plot(taken[:, 0], taken[:, 1], "--" if k == 0 else "-", label=f"after {k} step(s)")
            ax.plot(0, 0, "ko", ms=4)
            ax.plot(*data["goals"][t].tolist(), "r*", ms=12, label="goal")
            ax.set(xlim=(-0.6, 0.6), ylim=(-0.6, 0.6), aspect="equal")
            ax.set_title(f"{label}", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def sine_fits(fits_by_label: dict[str, dict]):
    """Rows: parameter sets (before / after meta-training); columns: test tasks. Each value is the data
    `metadist.evaluation.sine_fits` computes; this only draws it."""
    first = next(iter(fits_by_label.values()))
    n_tasks = first["true"].shape[0]
    fig, axes = plt.subplots(len(fits_by_label), n_tasks, figsize=(4 * n_tasks, 3.2 * len(fits_by_label)),
                             squeeze=False, sharex=True)
    for row, (label, fits) in enumerate(fits_by_label.items()):
        for t in range(n_tasks):
            ax = axes[row, t]
            ax.plot(fits["grid"], fits["true"][t], "k-", lw=2, label="true")
            for s, preds in fits["predictions"].items():
                ax.plot(fits["grid"], preds[t], "--" if s == 0 else "-", label=f"after {s} step(s)")
            ax.plot(fits["support_x"][t], fits["support_y"][t], "^", color="purple", ms=8,
                    label=f"{fits['shots']} support points")
            ax.set_title(f"{label}: A={fits['amplitude'][t]:.2f}, φ={fits['phase'][t]:.2f}", fontsize=9)
            ax.set_ylim(-6, 6)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def save_png(fig, path: Path) -> Path:
    """Write a figure to a PNG file and free it."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
