"""A finished (or interrupted) sweep as a table: one row per trial, the best trial, and its job YAML.

Input is plain data read back from Tune (status, sampled values, reports); nothing here imports Ray.
Outcomes:
- `finished`: ran all `train.steps` and was evaluated on the test tasks;
- `stopped`: stopped early by the scheduler (ASHA);
- `diverged`: the meta-loss became NaN/inf;
- `error`: the trial crashed (after its retries);
- `unfinished`: the sweep was interrupted before the trial ended (`metadist tune --resume` finishes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich import box
from rich.table import Table

from metadist.config import dump_config, from_dict, to_dict
from metadist.sweeps.plan import SweepPlan, short_names

ORDER = {"finished": 0, "stopped": 1, "unfinished": 2, "diverged": 3, "error": 4}


@dataclass
class TrialRecord:
    """One trial as Tune left it."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    params: dict[str, Any]
    last: dict[str, Any]  # the last report
    history: list[dict[str, Any]] = field(default_factory=list)  # every report, in order
    error: str | None = None


def outcome(trial: TrialRecord) -> str:
    if trial.status == "ERROR":
        return "error"
    reported = trial.last.get("outcome")
    if trial.status != "TERMINATED":
        return "unfinished"
    if reported in ("finished", "diverged"):
        return reported
    return "stopped"  # TERMINATED while still reporting validations: the scheduler stopped it


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def rows(trials: list[TrialRecord], plan: SweepPlan) -> list[dict]:
    """The results table: sampled values, outcome, progress, validation and test metrics."""
    metric, test_key = plan.metric, plan.test_metric
    out = []
    for t in trials:
        kind = outcome(t)
        finite = [v for v in (_number(h.get(metric)) for h in t.history) if math.isfinite(v)]
        best = min(finite, key=lambda v: _sort_key(v, plan.mode)) if finite else math.nan
        row = {"trial": t.trial_id, "outcome": kind}
        row.update({k: t.params.get(k) for k in plan.space})
        row.update({
            "steps": int(t.last.get("steps_done") or 0),
            metric: math.nan if kind == "diverged" else _number(t.last.get(metric)),
            f"best_{metric}": best,
            test_key: _number(t.last.get(test_key)),
            "meta_loss": _number(t.last.get("meta_loss")),
            "minutes": _number(t.last.get("time_total_s")) / 60,
            "mlflow_run_id": t.last.get("mlflow_run_id"),
            "error": t.error or (t.last.get("error") if kind == "diverged" else None),
        })
        out.append(row)
    return sorted(out, key=lambda r: (ORDER[r["outcome"]], _sort_key(r[metric], plan.mode)))


def _sort_key(value: float, mode: str) -> float:
    if not math.isfinite(value):
        return math.inf
    return value if mode == "min" else -value


def best(table: list[dict], plan: SweepPlan) -> dict | None:
    """The best row: among trials that ran to the end, else among any with a finite metric."""
    for pool in (("finished",), ("finished", "stopped", "unfinished")):
        scored = [r for r in table if r["outcome"] in pool and math.isfinite(r[plan.metric])]
        if scored:
            return min(scored, key=lambda r: _sort_key(r[plan.metric], plan.mode))
    return None


def write_parquet(table: list[dict], path: Path) -> None:
    """The table for pandas: `pd.read_parquet(path)`."""
    pq.write_table(pa.Table.from_pylist(table), path)


def best_job_yaml(plan: SweepPlan, row: dict, sweep_name: str) -> str:
    """The best trial's full config as a job file, ready for `metadist train` or `metadist submit`."""
    cfg = plan.trial_config({k: row[k] for k in plan.space})
    data = to_dict(cfg)
    data["name"] = f"{sweep_name}-best"
    data["tracking"]["uri"] = None  # the sweep's store path is local to where it ran
    text = dump_config(from_dict(data))
    head = (f"# Best trial of sweep {sweep_name}: {row['trial']}, {plan.metric} = {row[plan.metric]:.6g} "
            f"({plan.mode}) after {row['steps']} steps.\n"
            f"# Sampled: {', '.join(f'{k}={row[k]}' for k in plan.space)}.\n")
    return head + text


def print_table(table: list[dict], plan: SweepPlan, console: Console, title: str) -> None:
    """Best first, narrow enough for 80 columns: the trial column drops the sweep's common id prefix;
    the best-so-far value and run times are in the Parquet file."""
    metric, test_key = plan.metric, plan.test_metric
    names = short_names(list(plan.space))
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ["trial", "outcome", *names.values(), "at step", metric, test_key]:
        t.add_column(col, justify="left" if col in ("trial", "outcome") else "right")
    for r in table:
        t.add_row(r["trial"].rsplit("_", 1)[-1], r["outcome"], *(_fmt(r[k]) for k in plan.space), str(r["steps"]),
                  _fmt(r[metric]), _fmt(r[test_key]))
    console.print(t)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)
