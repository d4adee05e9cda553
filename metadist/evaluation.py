"""Evaluation on a fixed list of test tasks: metrics after 0..S test-time steps, mean ± 95% CI.

The tasks are a pure function of (seed, split), so two runs or two algorithms with the same seed are
scored on the same tasks. Tasks whose loss is not finite are counted as diverged and left out of the
mean, rather than averaging a NaN into the table (docs/reference.md: extra test-time steps can overshoot).
A task whose loss stays finite but grows more than `EXPLODED_FACTOR` times over its loss before
adaptation stays in the mean, as the protocol has it, and is counted as exploded, so that one such task
is visible beside the mean it dominates.
"""

from __future__ import annotations

import math

import torch
from rich.console import Console
from rich.table import Table

from metadist.algorithms import adapt_curve, make_eval_spec, maml_rl
from metadist.algorithms.evaluate import adapted_outputs
from metadist.episode import Episode


EXPLODED_FACTOR = 10.0
"""A task counts as exploded after s test-time steps when its finite loss exceeds this many times its
loss before adaptation."""


def exploded(loss: torch.Tensor, before: torch.Tensor) -> int:
    """Tasks whose finite `loss` is above `EXPLODED_FACTOR` times their loss `before` adaptation (1-D,
    one entry per task). Not-finite losses are diverged, not exploded."""
    return int((torch.isfinite(loss) & (loss > EXPLODED_FACTOR * before)).sum())


def summarise(values: torch.Tensor) -> dict:
    """mean ± 1.96·std/√n and the median over the finite entries of a 1-D tensor, and the count of
    the others. The median shows when one task with a huge but finite loss dominates the mean."""
    values = values.double()
    finite = values[torch.isfinite(values)]
    n = finite.numel()
    mean = finite.mean().item() if n else math.nan
    std = finite.std(unbiased=True).item() if n > 1 else 0.0
    return {"mean": mean, "ci95": 1.96 * std / math.sqrt(n) if n else math.nan,
            "median": finite.median().item() if n else math.nan, "diverged": int(values.numel() - n)}


def episode_curves(model, params: dict, cfg, tasks, indices: range, *, task_parallel: str,
                   steps: int | None = None, split: str | None = None) -> dict[str, torch.Tensor]:
    """Per-episode query metrics of the fixed `split` episodes `indices` after 0..steps test-time steps:
    {"loss": (E, S+1)[, "acc": (E, S+1)]}. Shares computed apart and joined in index order
    (`join_curves`) give the curves of one process: on the CPU bit for bit, since an episode's curve does
    not depend on which other episodes share its batch."""
    spec = make_eval_spec(cfg, steps, task_parallel=task_parallel)
    batch = tasks.fixed(split or cfg.eval.split, indices, cfg.eval.shots or cfg.task.shots, cfg.eval.query)
    batch = batch.to(next(iter(params.values())).device)
    if cfg.task.rl:
        return maml_rl.curves(model, params, batch, spec)
    return adapt_curve(model, params, batch, spec)


def join_curves(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The curves of consecutive shares of the episodes as one set, in episode order (empty shares, {},
    are skipped)."""
    parts = [p for p in parts if p]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def evaluate(model, params: dict, cfg, tasks, *, task_parallel: str, episodes: int | None = None,
             steps: int | None = None, split: str | None = None, curves=None) -> dict:
    """Adapt to the fixed evaluation tasks and report rows for 0..steps test-time steps.

    `task_parallel` is the run's resolved mode (`vmap` or `loop`), the one training measured faster.
    `curves(split, episodes, steps)`, if given, computes the per-episode curves elsewhere (an executor's
    workers, each on its share); by default this process adapts every episode.

    Rows carry `mean` and `ci95` of the primary metric (MSE for regression, accuracy in % for
    classification, the mean undiscounted return per trajectory for navigation), plus
    `loss_mean`/`loss_ci95` for classification, a `diverged` count and (but for navigation) an
    `exploded` count (`EXPLODED_FACTOR`).
    """
    episodes = episodes or cfg.eval.episodes
    split = split or cfg.eval.split
    spec = make_eval_spec(cfg, steps, task_parallel=task_parallel)
    if curves is None:
        out = episode_curves(model, params, cfg, tasks, range(episodes), task_parallel=task_parallel,
                             steps=spec.steps, split=split)
    else:
        out = curves(split, episodes, spec.steps)
    return report_of(out, spec, split=split, shots=cfg.eval.shots or cfg.task.shots, episodes=episodes)


def lower_is_better(metric: str) -> bool:
    """Whether a report's primary metric improves downwards: MSE does; accuracy and return go up."""
    return metric == "mse"


def report_of(curves: dict[str, torch.Tensor], spec, *, split: str, shots: int, episodes: int) -> dict:
    """The evaluation report of per-episode curves: a row of statistics per number of test-time steps."""
    if "return" in curves:  # reinforcement learning: higher is better, no loss beside it
        rows = [{"steps": s, **summarise(curves["return"][:, s])} for s in range(spec.steps + 1)]
        return {"split": split, "shots": shots, "episodes": episodes, "metric": "return", "lr": spec.lr,
                "later_lr": spec.later_lr or spec.lr, "rows": rows}
    loss = curves["loss"]
    rows = []
    for s in range(spec.steps + 1):
        loss_row = summarise(loss[:, s])
        if "acc" in curves:
            acc = summarise(curves["acc"][:, s] * 100.0)
            row = {"steps": s, "mean": acc["mean"], "ci95": acc["ci95"], "median": acc["median"],
                   "diverged": loss_row["diverged"],
                   "loss_mean": loss_row["mean"], "loss_ci95": loss_row["ci95"]}
        else:
            row = {"steps": s, **loss_row}
        row["exploded"] = exploded(loss[:, s].double(), loss[:, 0].double())
        rows.append(row)
    return {"split": split, "shots": shots, "episodes": episodes,
            "metric": "accuracy" if "acc" in curves else "mse", "lr": spec.lr, "rows": rows,
            "exploded_factor": EXPLODED_FACTOR}


def sine_fits(model, params: dict, cfg, tasks, *, task_parallel: str, n_tasks: int = 3,
              steps: tuple[int, ...] = (0, 1, 10), points: int = 200) -> dict:
    """The data of the MAML paper's Figure 2 for the first `n_tasks` fixed test tasks: the true curves,
    the support points, and the model's predictions on a grid after each of `steps` test-time steps,
    adapted exactly as the evaluation adapts (`adapted_outputs`)."""
    shots = cfg.eval.shots or cfg.task.shots
    batch = tasks.fixed(cfg.eval.split, n_tasks, shots, cfg.eval.query)
    lo, hi = cfg.task.x_range
    grid = torch.linspace(lo, hi, points).unsqueeze(-1)
    amp, phase = batch.info["amplitude"], batch.info["phase"]
    true = amp.view(-1, 1, 1) * torch.sin(grid.unsqueeze(0) + phase.view(-1, 1, 1))
    on_grid = Episode(batch.xs, batch.ys, grid.expand(n_tasks, -1, -1).contiguous(), true)
    spec = make_eval_spec(cfg, steps=max(steps), task_parallel=task_parallel)
    preds = adapted_outputs(model, params, on_grid, spec)
    return {"grid": grid[:, 0], "true": true[..., 0], "amplitude": amp, "phase": phase,
            "support_x": batch.xs[..., 0], "support_y": batch.ys[..., 0], "shots": shots,
            "predictions": {s: preds[:, s, :, 0] for s in steps}}


METRIC_LABELS = {"accuracy": "accuracy %", "mse": "MSE", "return": "return"}
"""How each report metric is named in tables and figures."""


def navigation_paths(model, params: dict, cfg, tasks, n_tasks: int = 3, steps: tuple[int, ...] = (0, 1, 3)) -> dict:
    """The data of the MAML paper's Figure 4 for the first `n_tasks` fixed test goals: the agent's first
    trajectory after each of `steps` test-time steps, adapted exactly as the evaluation adapts."""
    steps = tuple(s for s in steps if s <= cfg.eval.steps)
    batch = tasks.fixed(cfg.eval.split, n_tasks, cfg.eval.shots or cfg.task.shots, cfg.eval.query)
    spec = make_eval_spec(cfg, steps=max(steps), task_parallel="vmap")
    batch = batch.to(next(iter(params.values())).device)
    paths = maml_rl.trajectories(model, params, batch, spec, steps)
    return {"goals": batch.goals.cpu(), "paths": {k: (p.cpu(), m.cpu()) for k, (p, m) in paths.items()}}


def print_eval(report: dict, title: str = "evaluation", console: Console | None = None) -> None:
    """The evaluation rows as a table on the terminal."""
    metric = METRIC_LABELS[report["metric"]]
    lr = f"{report['lr']:g}" + (f" then {report['later_lr']:g}" if report.get("later_lr", report["lr"]) != report["lr"] else "")
    shots = f"{report['shots']} trajectories per round" if report["metric"] == "return" else f"{report['shots']}-shot"
    table = Table(title=f"{title}: {report['split']} split, {report['episodes']} tasks, "
                        f"{shots}, test-time lr {lr}")
    table.add_column("steps", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("± 95% CI", justify="right")
    table.add_column("median", justify="right")
    table.add_column("diverged", justify="right")
    factor = report.get("exploded_factor")  # not for navigation, nor in reports written before it
    if factor:
        table.add_column(f"exploded (>{factor:g}x)", justify="right")
    for r in report["rows"]:
        cells = [str(r["steps"]), f"{r['mean']:.4f}", f"{r['ci95']:.4f}", f"{r['median']:.4f}", str(r["diverged"])]
        table.add_row(*cells, *([str(r.get("exploded", "-"))] if factor else []))
    (console or Console()).print(table)
