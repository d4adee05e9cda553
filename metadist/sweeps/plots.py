"""Figures of a sweep, drawn with matplotlib and saved as PNGs in the sweep folder (and on its parent run).

- `sweep_scatter`: the validation metric of every trial against the inner learning rate;
- `sweep_curves`: every trial's validation curve against the outer step.
"""

from __future__ import annotations

import math

import metadist.plots  # noqa: F401  (selects matplotlib's Agg backend before pyplot loads; has save_png)
import matplotlib.pyplot as plt


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
