"""Sweep files: a base job, a search space over its config keys, and how to search it.

A sweep file (`jobs/sweeps/*.yaml`) is validated like a job: typed dataclasses with a docstring per field,
unknown keys and bad values rejected with one error naming the key. `plan_sweep` resolves it against
its base job: every value the space can produce is checked against the job config before any trial
starts, the metric and its direction are settled, and the trials' shared job config is built.
This module knows nothing of Ray; `metadist.sweeps.driver` turns a plan into a Tune experiment.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass as plain_dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field
from pydantic.dataclasses import dataclass

from metadist.config import (STRICT, Config, ConfigError, NonNegInt, PositiveFloat, PositiveInt, field_docs,
                             from_dict, parse_override, read_yaml, set_path, to_dict, to_plain, validate)
from metadist.evaluation import lower_is_better

KINDS = ("loguniform", "uniform", "choice", "grid")


@dataclass(config=STRICT)
class Dimension:
    loguniform: Optional[tuple[PositiveFloat, PositiveFloat]] = None
    """Sample log-uniformly in [lo, hi] (both positive): learning rates."""
    uniform: Optional[tuple[float, float]] = None
    """Sample uniformly in [lo, hi]."""
    choice: Optional[list[Any]] = None
    """Sample one of these values at random (with `search: grid`, try each)."""
    grid: Optional[list[Any]] = None
    """Try every one of these values: each combination of the grid keys runs `samples` times."""

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


@dataclass(config=STRICT)
class SchedulerConfig:
    name: Literal["asha", "none"] = "asha"
    """`asha` stops trials whose validation metric trails the others at each rung; `none` runs every trial
    to the end."""
    grace_period: Optional[PositiveInt] = None
    """Outer steps every trial runs before ASHA may stop it; defaults to `report_every`."""
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0
    """ASHA keeps about 1 in this many trials at each rung."""


@dataclass(config=STRICT)
class SweepConfig:
    base: str
    """The job every trial starts from: a path relative to the sweep file (`../sine/maml.yaml`), else to
    the working directory (`jobs/sine/maml.yaml` from the repository), or absolute."""
    space: dict[str, Dimension]
    """Config keys to search, each with one of `loguniform: [lo, hi]`, `uniform: [lo, hi]`,
    `choice: [...]` or `grid: [...]`, e.g. `inner.lr: {loguniform: [0.001, 1.0]}`."""
    name: str = "sweep"
    """Sweep name (folder, MLflow parent run); defaults to the sweep file's stem."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides applied to the base job for every trial, e.g. `train.steps=2000`."""
    metric: str = "auto"
    """Validation metric to optimise: `val_mse` / `val_accuracy` (after `eval.steps` test-time steps) or
    `val_<metric>_<k>` after k steps; `auto` picks `val_mse` for sinusoids, `val_accuracy` for images,
    `val_return` for navigation and locomotion."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher `metric` is better; `auto`: min for MSE, max for accuracy and return."""
    search: Literal["random", "grid", "optuna"] = "random"
    """`random` samples the space (grid keys are still crossed), `grid` tries every combination of
    `grid`/`choice` values, `optuna` uses Optuna's TPE sampler (`pip install 'metadist[optuna]'`)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping of trials."""
    samples: PositiveInt = 8
    """Trials to run (with grid keys: repetitions of the whole grid)."""
    concurrent: NonNegInt = 0
    """Trials running at once; 0 runs as many as the cluster's resources allow."""
    report_every: Optional[PositiveInt] = None
    """Outer steps between a trial's validations (reported to Tune, checkpointed); defaults to the base
    job's `train.eval_every`, else a tenth of `train.steps`."""
    trial_cpus: PositiveFloat = 1.0
    """CPUs reserved for each trial's driver (its worker actors reserve `runtime.cpus_per_worker` each)."""
    max_failures: NonNegInt = 1
    """Times a failed trial (a crash, a lost node) is retried from its last checkpoint."""
    out_dir: Optional[str] = None
    """Directory under which each sweep gets its folder (Tune state, trial runs, results); empty takes
    $METADIST_OUT_DIR/sweeps, else `runs/sweeps` (a Ray job needs one of them)."""
    experiment: Optional[str] = None
    """MLflow experiment of the parent and child runs; defaults to the base job's, else the sweep name."""
    address: Optional[str] = None
    """Ray cluster to join (`auto`, `host:port`); empty uses $RAY_ADDRESS (inside a submitted job) or
    starts a local Ray with this machine's CPUs."""

    def __post_init__(self) -> None:
        if not self.space:
            raise ConfigError("space: give at least one key to search, e.g. inner.lr: {loguniform: [0.001, 1.0]}")


SWEEP_KEYS = set(SweepConfig.__pydantic_fields__)


def _check_dimension(key: str, dim: Any) -> None:
    if not isinstance(dim, dict) or len(dim) != 1 or next(iter(dim)) not in KINDS:
        raise ConfigError(f"space.{key}: give exactly one of {', '.join(KINDS)}, e.g. "
                          f"{{loguniform: [0.001, 1.0]}} or {{choice: [1, 3, 5]}}; got {dim!r}")
    kind, values = next(iter(dim.items()))
    if kind in ("loguniform", "uniform"):
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                and values[0] < values[1]):
            raise ConfigError(f"space.{key}.{kind}: expected [lo, hi] numbers with lo < hi; got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"space.{key}.loguniform: lo must be positive; got {values!r}")
    elif not (isinstance(values, list) and values):
        raise ConfigError(f"space.{key}.{kind}: expected a non-empty list of values; got {values!r}")


def sweep_from_dict(data: Any, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Validate a sweep mapping plus `--set` overrides. Keys that are not sweep fields (`train.steps=`)
    are base-job overrides; `space.<config key>={...}` replaces one dimension."""
    if not isinstance(data, dict):
        raise ConfigError(f"a sweep file is a mapping of keys; got {type(data).__name__}")
    data = copy.deepcopy(data)  # the overrides below must not change the caller's dict
    if isinstance(data.get("space"), dict):
        # Sorted keys: the order of Tune's sampling, trial labels and table columns, as it has always been.
        data["space"] = dict(sorted(data["space"].items()))
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".", 1)[0]
        if head == "space" and "." in key:
            data.setdefault("space", {})[key.split(".", 1)[1]] = value
        elif head in SWEEP_KEYS:
            set_path(data, key, value)
        else:
            data.setdefault("overrides", []).append(text)
    for key in ("base", "space"):
        if key not in data:
            raise ConfigError(f"the sweep has no '{key}'; a sweep names a base job and a space to search")
    if not isinstance(data["space"], dict):
        raise ConfigError("space: expected a mapping of config keys to dimensions")
    for key, dim in data["space"].items():
        _check_dimension(key, dim)
    return validate(SweepConfig, data)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep file; its name defaults to the file's stem."""
    return sweep_from_dict(read_yaml(path, "sweep file"), overrides)


STATE = "sweep.json"  # the sweep's own state beside Tune's: plan, MLflow parent run, store


def read_state(sweep_dir: Path) -> dict:
    """The saved state of a sweep folder, or one ConfigError when the folder is not one."""
    path = Path(sweep_dir) / STATE
    if not path.is_file():
        raise ConfigError(f"--resume {sweep_dir}: not a sweep folder (no {STATE}); give the folder "
                          f"`metadist tune` printed")
    return json.loads(path.read_text())


def is_sweep_file(path: str | Path) -> bool:
    """True for a sweep file (it names a base job and a space), False for a job."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "base" in data and "space" in data


@plain_dataclass
class SweepPlan:
    """A sweep resolved against its base job: everything a Tune experiment needs, as plain data."""

    sweep: dict
    job: dict  # the trials' shared job config; each trial sets its sampled keys on top
    space: dict[str, tuple[str, Any]]  # config key -> (kind, values)
    metric: str
    mode: str
    report_every: int
    grace_period: int

    @property
    def test_metric(self) -> str:
        """The final evaluation's key in a trial's last report: `eval_mse` or `eval_accuracy`."""
        return "eval_" + self.metric.split("_")[1]

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The validated config of one trial with sampled values `params` (config key -> value)."""
        return config_with(self.job, params)


def config_with(job: dict, params: dict[str, Any]) -> Config:
    """The validated config of job dict `job` with the dotted keys of `params` set."""
    data = copy.deepcopy(job)  # `job` is shared by every trial and probe
    for key, value in params.items():
        set_path(data, key, value)
    return from_dict(data)


def base_path(base: str, sweep_file: Path | None = None) -> Path:
    """The base job file: beside the sweep file first (as compose files resolve theirs), else from the
    working directory (the repository-relative form, `base: jobs/sine/maml.yaml` run from the repository)."""
    path = Path(base)
    if path.is_absolute():
        if path.is_file():
            return path
        raise ConfigError(f"base: job file {base!r} not found")
    places = {"beside the sweep file": Path(sweep_file).parent / path} if sweep_file is not None else {}
    places["in the working directory"] = Path.cwd() / path
    for candidate in places.values():
        if candidate.is_file():
            return candidate
    looked = " nor ".join(f"{where} ({candidate})" for where, candidate in places.items())
    raise ConfigError(f"base: job file {base!r} not found {looked}")


def plan_sweep(sweep: SweepConfig, sweep_file: Path | None = None) -> SweepPlan:
    """Resolve the base job, check every value the space can produce, settle metric and mode."""
    from metadist.config import load_config

    cfg = load_config(base_path(sweep.base, sweep_file), sweep.overrides)
    job = to_dict(cfg)
    known = field_docs()
    for key, dim in sweep.space.items():
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            raise ConfigError(f"space: '{key}' is not a config key" +
                              (f"; did you mean {', '.join(close)}?" if close else "; `metadist config --keys` lists them"))
        probes = dim.values if dim.kind in ("choice", "grid") else list(dim.values)
        for value in probes:
            try:
                config_with(job, {key: value})
            except ConfigError as err:
                raise ConfigError(f"space.{key}: value {value!r} is not a valid {key}: {err}") from None
        if sweep.search == "grid" and dim.kind not in ("grid", "choice"):
            raise ConfigError(f"space.{key}: search: grid needs grid or choice values; got {dim.kind} "
                              f"(use search: random or optuna to sample it)")
        if sweep.search == "optuna" and dim.kind == "grid":
            raise ConfigError(f"space.{key}: search: optuna samples; use choice instead of grid")

    report_every = sweep.report_every or cfg.train.eval_every or max(1, cfg.train.steps // 10)
    job["train"]["eval_every"] = report_every
    job["tracking"]["enabled"] = True  # a sweep's parent and child runs are its record
    job["tracking"]["experiment"] = sweep.experiment or cfg.tracking.experiment or sweep.name
    data_path = job["data"]["path"]
    if data_path and "://" not in data_path:
        job["data"]["path"] = str(Path(data_path).resolve())  # Tune runs trials in other directories

    metric_name = "return" if cfg.task.rl else {"sinusoid": "mse"}.get(cfg.task.family, "accuracy")
    allowed = [f"val_{metric_name}"] + [f"val_{metric_name}_{k}" for k in range(cfg.eval.steps + 1)]
    metric = allowed[0] if sweep.metric == "auto" else sweep.metric
    if metric not in allowed:
        raise ConfigError(f"metric: {sweep.metric!r} is not reported by this job; allowed: auto, "
                          f"{', '.join(allowed)}")
    mode = sweep.mode if sweep.mode != "auto" else ("min" if lower_is_better(metric_name) else "max")
    grace = sweep.scheduler.grace_period or report_every
    if sweep.scheduler.name == "asha" and grace >= cfg.train.steps:
        raise ConfigError(f"scheduler.grace_period: {grace} steps is not below train.steps={cfg.train.steps}; "
                          f"ASHA could never stop a trial (lower it, or use scheduler.name: none)")
    plain = to_plain(sweep)
    # Each dimension as a sweep file writes it: only the one kind it has.
    plain["space"] = {k: {kind: v for kind, v in dim.items() if v is not None} for k, dim in plain["space"].items()}
    return SweepPlan(sweep=plain, job=job,
                     space={k: (d.kind, d.values) for k, d in sweep.space.items()},
                     metric=metric, mode=mode, report_every=report_every, grace_period=grace)


def short_names(keys: list[str]) -> dict[str, str]:
    """Column names for config keys: the last part (`lr`), or more of the key where that is ambiguous
    or says little (`algorithm.name` -> `algorithm`)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        name = parts[-1] if parts[-1] != "name" else parts[-2]
        if sum(k.split(".")[-1] == parts[-1] for k in keys) > 1:
            name = key
        out[key] = name
    return out
