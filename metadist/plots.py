"""Figures for a run, drawn with matplotlib (which MLflow already installs) and logged as PNGs.

- `training_curve`: query loss (and accuracy) before and after adaptation against the outer step.
- `adaptation_curve`: the evaluation metric against test-time steps, before and after meta-training,
  with 95% CI bands.
- `sine_fits`: a few sinusoid test tasks, the true curve, the K support points and the model's fit
  after 0, 1 and 10 test-time steps, before and after meta-training (MAML paper, Figure 2).

Every function here draws data it is given; the driver computes that data (evaluations, adapted fits).
- `sweep_scatter`, `sweep_curves`: a sweep's validation metric against the inner learning rate, and
  every trial's validation curve.
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
    has_acc = any("acc_after" in r for r in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for key, label in (("loss_before", "before adaptation"), ("loss_after", "after adaptation")):
        pts = [(s, r[key]) for s, r in zip(steps, history) if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label)
    ax.set(xlabel="outer step", ylabel="query loss (mean over the meta-batch)", title=f"{name}: meta-training")
    if all(r.get("loss_after", 1) > 0 for r in history):
        ax.set_yscale("log")
    ax.legend()
    if has_acc:
        ax = axes[0, 1]
        for key, label in (("acc_before", "before adaptation"), ("acc_after", "after adaptation")):
            pts = [(s, 100 * r[key]) for s, r in zip(steps, history) if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set(xlabel="outer step", ylabel="query accuracy %", title="accuracy")
        ax.legend()
    fig.tight_layout()
    return fig


def adaptation_curve(reports: dict[str, dict], name: str):
    """Evaluation rows (metric after 0..S test-time steps, mean ± 95% CI) of several reports."""
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "accuracy %" if next(iter(reports.values()))["metric"] == "accuracy" else "MSE"
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


def _sweep_top(values: list[float], mode: str) -> float | None:
    """Upper y-limit for a sweep's MSE plots: 100x the best value, so a few blown-up trials (MSE 1e30)
    do not flatten everyone else into one line; None when no cap is needed."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if mode != "min" or not finite or min(finite) <= 0:
        return None
    cap = 100 * min(finite)
    return cap if max(finite) > cap else None


def sweep_scatter(table: list[dict], metric: str, mode: str, name: str, x: str = "inner.lr",
                  colour: str = "inner.steps", shape: str = "algorithm.name"):
    """A sweep's validation metric against `x` (the inner learning rate), coloured by `colour` (the inner
    steps), one marker per `shape` (the algorithm). Diverged trials: red crosses at the worst edge;
    values beyond 100x the best: triangles on the top edge."""
    import math

    fig, ax = plt.subplots(figsize=(7, 4.5))
    levels = sorted({r.get(colour) for r in table if r.get(colour) is not None},
                    key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
    cmap = plt.get_cmap("viridis", max(len(levels), 1))
    markers = {a: m for a, m in zip(sorted({str(r.get(shape)) for r in table}), "osDv<>")}
    ok = [r for r in table if math.isfinite(r[metric]) and r.get(x) is not None]
    values = [r[metric] for r in ok]
    top = _sweep_top(values, mode)
    for r in ok:
        c = cmap(levels.index(r[colour])) if r.get(colour) in levels else "tab:blue"
        y, marker = (top, "^") if top is not None and r[metric] > top else (r[metric], markers[str(r.get(shape))])
        ax.scatter(r[x], y, color=c, marker=marker, edgecolors="black" if r["outcome"] == "finished" else "none",
                   s=45, zorder=3)
    edge = top or ((max(values) if mode == "min" else min(values)) if values else 1.0)
    bad = [r for r in table if r["outcome"] == "diverged" and r.get(x) is not None]
    if bad:
        ax.scatter([r[x] for r in bad], [edge] * len(bad), color="red", marker="x", s=60, label="diverged", zorder=4)
    if top is not None and any(v > top for v in values):
        ax.scatter([], [], color="grey", marker="^", label=f"above {top:.3g}")
    for i, level in enumerate(levels):
        ax.scatter([], [], color=cmap(i), label=f"{colour.split('.')[-1]} {level}")
    if len(markers) > 1:
        for a, m in markers.items():
            ax.scatter([], [], color="grey", marker=m, label=a)
    if all(isinstance(r.get(x), (int, float)) and r[x] > 0 for r in ok + bad) and (ok or bad):
        ax.set_xscale("log")
    if values and all(v > 0 for v in values) and mode == "min":
        ax.set_yscale("log")
    ax.set(xlabel=x, ylabel=f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)",
           title=f"{name}: {len(table)} trials (black edge: ran to the end)")
    if levels or bad or len(markers) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_curves(curves: dict[str, list[tuple[int, float]]], outcomes: dict[str, str], metric: str, name: str,
                 mode: str = "min"):
    """The validation metric of every trial against the outer step (solid: ran to the end)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"finished": "-", "stopped": ":", "unfinished": "--"}
    colours = [c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3]]  # red: diverged
    drawn = [(label, [(s, v) for s, v in pts if v == v]) for label, pts in curves.items()]
    drawn = [(label, pts) for label, pts in drawn if pts]
    every = [v for _, pts in drawn for _, v in pts]
    top = _sweep_top(every, mode)
    for i, (label, pts) in enumerate(drawn):
        ax.plot(*zip(*pts), styles.get(outcomes.get(label, "finished"), "-"), color=colours[i % len(colours)],
                alpha=0.85, marker=".", label=label if len(drawn) <= 12 else None)
    if every and all(v > 0 for v in every) and mode == "min":
        ax.set_yscale("log")
    if top is not None:  # blown-up trials run off the top; the rest keep the scale
        ax.set_ylim(bottom=min(every) / 1.5, top=top)
    ax.set(xlabel="outer step", ylabel=metric, title=f"{name}: validation curves (dotted: stopped early)")
    if drawn and len(drawn) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
