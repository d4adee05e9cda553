"""Sweep files, their plan against the base job, Tune's search space, and the results table."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from metadist.config import ConfigError, load_config
from metadist.sweeps.plan import is_sweep_file, load_sweep, plan_sweep, short_names, sweep_from_dict
from metadist.sweeps.results import TrialRecord, best, best_job_yaml, outcome, rows, write_parquet

from ..conftest import ROOT

DEBUG = ROOT / "jobs/sweeps/sine-debug.yaml"
SWEEPS = sorted((ROOT / "jobs/sweeps").glob("*.yaml"))


def _sweep(**extra):
    return {"base": "jobs/sine/maml-debug.yaml", "space": {"inner.lr": {"loguniform": [0.001, 1.0]}}, **extra}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_plans(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(path), path)
    assert (plan.metric, plan.mode) in (("val_mse", "min"), ("val_accuracy", "max"), ("val_return", "max"))
    assert plan.job["train"]["eval_every"] == plan.report_every
    assert "inner.lr" in plan.space and "inner.steps" in plan.space


def test_the_sweeps_the_issue_names_exist():
    names = {p.stem for p in SWEEPS}
    assert {"sine", "miniimagenet-5w1s", "sine-debug"} <= names
    sine = load_sweep(ROOT / "jobs/sweeps/sine.yaml")
    assert sine.space["inner.lr"].loguniform == (0.001, 1.0)
    assert sorted(sine.space["inner.steps"].values) == [1, 3, 5, 10]
    assert sorted(sine.space["algorithm.name"].values) == ["fomaml", "maml"]


def test_plan_settles_metric_mode_and_absolute_paths(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(DEBUG), DEBUG)
    assert (plan.metric, plan.mode) == ("val_mse", "min")
    fewshot = plan_sweep(sweep_from_dict(_sweep(base="jobs/miniimagenet/maml-debug.yaml")))
    assert (fewshot.metric, fewshot.mode) == ("val_accuracy", "max")
    assert Path(fewshot.job["data"]["path"]).is_absolute()  # trials run in Tune's own directories
    assert plan_sweep(sweep_from_dict(_sweep(metric="val_mse_1"))).mode == "min"
    assert plan.trial_config({"inner.lr": 0.5, "inner.steps": 3}).inner.steps == 3


@pytest.mark.parametrize("data, message", [
    (_sweep(sampels=3), "unknown key 'sampels'"),
    ({"space": {"inner.lr": {"choice": [0.1]}}}, "no 'base'"),
    (_sweep(space={}), "at least one key"),
    (_sweep(space={"inner.lr": {"logunifrom": [0.1, 1]}}), "exactly one of loguniform, uniform, choice, grid"),
    (_sweep(space={"inner.lr": {"loguniform": [1.0, 0.1]}}), "lo < hi"),
    (_sweep(space={"inner.lr": {"loguniform": [0.0, 0.1]}}), "lo must be positive"),
    (_sweep(space={"inner.step": {"choice": [1, 2]}}), "'inner.step' is not a config key"),
    (_sweep(space={"inner.steps": {"choice": [1, 0]}}), "space.inner.steps: value 0 is not a valid inner.steps"),
    (_sweep(space={"algorithm.name": {"choice": ["maml", "mamal"]}}), "allowed values"),
    (_sweep(search="grid"), "search: grid needs grid or choice values"),
    (_sweep(search="optuna", space={"inner.steps": {"grid": [1, 2]}}), "use choice instead of grid"),
    (_sweep(metric="val_accuracy"), "allowed: auto, val_mse, val_mse_0"),
    (_sweep(search="bayes"), "search: got 'bayes'; allowed values: 'random', 'grid' or 'optuna'"),
    (_sweep(scheduler={"name": "asha", "grace_period": 5000}), "not below train.steps"),
    (_sweep(base="jobs/nope.yaml"), "job file 'jobs/nope.yaml' not found"),
    (_sweep(overrides=["train.stepz=3"]), "unknown key 'train.stepz'"),
])
def test_bad_sweeps_are_one_clear_error(data, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=None) as err:
        plan_sweep(sweep_from_dict(data))
    assert message in str(err.value)


def test_set_routes_sweep_keys_job_keys_and_dimensions(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(DEBUG, ["samples=3", "scheduler.name=none", "train.steps=120",
                               "space.inner.lr={grid: [0.01, 1000.0]}"])
    assert sweep.samples == 3 and sweep.scheduler.name == "none"
    assert sweep.overrides[-1] == "train.steps=120"
    assert sweep.space["inner.lr"].grid == [0.01, 1000.0]
    plan = plan_sweep(sweep, DEBUG)
    assert plan.job["train"]["steps"] == 120 and plan.space["inner.lr"] == ("grid", [0.01, 1000.0])


def test_sweep_files_are_told_from_jobs():
    assert is_sweep_file(DEBUG)
    assert not is_sweep_file(ROOT / "jobs/sine/maml-debug.yaml")


def test_tune_space_resources_and_schedulers(monkeypatch):
    from ray import tune

    from metadist.sweeps.driver import scheduler, search_space, trial_bundles

    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(DEBUG), DEBUG)
    space = search_space(plan)["params"]
    assert isinstance(space["inner.lr"], tune.search.sample.Float)
    assert isinstance(space["inner.steps"], tune.search.sample.Categorical)
    # Bundle 0 for the trial's driver, then one per worker actor of the run.
    assert trial_bundles(plan) == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert scheduler(plan)._max_t == plan.job["train"]["steps"]
    grid = plan_sweep(load_sweep(DEBUG, ["search=grid", "space.inner.lr={grid: [0.1, 0.2]}", "scheduler.name=none"]), DEBUG)
    assert all(set(v) == {"grid_search"} for v in search_space(grid)["params"].values())
    assert scheduler(grid) is None
    local = plan_sweep(load_sweep(DEBUG, ["runtime.executor=local", "trial_cpus=2"]), DEBUG)
    assert trial_bundles(local) == [{"CPU": 2.0}]


def test_collective_trials_are_sized_so_that_a_sweep_on_two_cpus_never_waits_for_ever(monkeypatch):
    from metadist.runtime.errors import ClusterError
    from metadist.sweeps.driver import trial_bundles, trials_at_once

    monkeypatch.chdir(ROOT)
    path = ROOT / "jobs/sweeps/sine-collective-debug.yaml"
    plan = plan_sweep(load_sweep(path), path)
    assert plan.job["runtime"]["executor"] == "collective"
    # The trial's own bundle only: Ray Train places the ranks (0.9 CPU each) in a group of its own.
    assert trial_bundles(plan) == [{"CPU": 0.1}]
    two_cpus = {"CPU": 2.0}
    assert trials_at_once(plan, two_cpus) == 1  # 0.1 + 2 x 0.9: one trial and its ranks at a time
    one_rank = plan_sweep(load_sweep(path, ["runtime.workers=1"]), path)
    assert trials_at_once(one_rank, two_cpus) == 2  # 0.1 + 0.9, twice
    assert trials_at_once(plan_sweep(load_sweep(path, ["concurrent=3"]), path), two_cpus) == 3  # asked for
    gpu = plan_sweep(load_sweep(path, ["runtime.gpus_per_worker=1", "runtime.device=cuda"]), path)
    assert trials_at_once(gpu, {"CPU": 64.0, "GPU": 5.0}) == 2  # the GPUs bound it: 2 ranks of 1 GPU each
    assert trials_at_once(plan_sweep(load_sweep(DEBUG), DEBUG), two_cpus) is None  # actors: Tune sees them
    # 1 + 2 x 1 CPU on 2 CPUs could never start: one error before any trial does.
    big = plan_sweep(load_sweep(path, ["trial_cpus=1", "runtime.cpus_per_worker=1"]), path)
    with pytest.raises(ClusterError, match="a collective trial asks for 3 CPU .* the Ray cluster has 2 CPU"):
        trials_at_once(big, two_cpus)


def test_a_diverged_collective_trial_reports_the_steps_its_ranks_ran(tmp_path):
    # Its driver ran none: rank 0's progress file has the count (the table's "at step").
    from metadist.runtime.collective import PROGRESS
    from metadist.sweeps.trial import _steps_by_rank0

    assert _steps_by_rank0(tmp_path) == 0
    (tmp_path / PROGRESS).write_text('{"step": 150, "loss": NaN}')
    assert _steps_by_rank0(tmp_path) == 150


def test_the_limit_on_running_trials_reaches_the_searcher(monkeypatch):
    # Tune ignores max_concurrent_trials for its variant generator (it only warns): the limit is given
    # to the searcher itself.
    from metadist.sweeps.driver import search_algorithm

    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(DEBUG), DEBUG)
    assert search_algorithm(plan, 2).max_concurrent == 2
    assert search_algorithm(plan).max_concurrent == 0  # no limit


def test_optuna_search_is_built_when_installed(monkeypatch):
    pytest.importorskip("optuna")
    from metadist.sweeps.driver import search_algorithm

    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(DEBUG, ["search=optuna"]), DEBUG)
    assert type(search_algorithm(plan)).__name__ == "OptunaSearch"
    limited = search_algorithm(plan, 2)
    assert type(limited.searcher).__name__ == "OptunaSearch" and limited.max_concurrent == 2


def _trial(i, status, outcome_, value=None, steps=300, **params):
    last = {"steps_done": steps, "outcome": outcome_, "time_total_s": 30.0, "mlflow_run_id": f"run{i}"}
    history = [{"steps_done": 100, "val_mse": 2.0}]
    if value is not None:
        last["val_mse"] = value
        history.append({"steps_done": steps, "val_mse": value})
    if outcome_ == "finished":
        last["eval_mse"] = (value or 1) * 1.1
    return TrialRecord(f"abc_0000{i}", status, {"inner.lr": 0.01 * (i + 1), "inner.steps": 1, "algorithm.name": "maml", **params}, last, history)


def test_outcomes_table_best_and_parquet(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(DEBUG, ["space.algorithm.name={choice: [maml]}"]), DEBUG)
    trials = [_trial(0, "TERMINATED", "finished", 0.9), _trial(1, "TERMINATED", "running", 0.5, steps=100),
              _trial(2, "TERMINATED", "diverged", steps=0), _trial(3, "ERROR", "running", 1.5, steps=100),
              _trial(4, "RUNNING", "running", 0.4, steps=200), _trial(5, "TERMINATED", "finished", 0.7)]
    assert [outcome(t) for t in trials] == ["finished", "stopped", "diverged", "error", "unfinished", "finished"]
    table = rows(trials, plan)
    assert [r["trial"][-1] for r in table] == ["5", "0", "1", "4", "2", "3"]  # finished first, best first
    assert math.isnan(next(r for r in table if r["outcome"] == "diverged")["val_mse"])
    assert table[0]["best_val_mse"] == 0.7 and table[0]["eval_mse"] == pytest.approx(0.77)
    # The best is chosen among trials that ran to the end, even if a stopped one reported lower.
    assert best(table, plan)["trial"] == "abc_00005"
    write_parquet(table, tmp_path / "results.parquet")
    frame = pq.read_table(tmp_path / "results.parquet").to_pandas()
    assert len(frame) == 6 and {"trial", "outcome", "inner.lr", "inner.steps", "val_mse", "eval_mse"} <= set(frame)

    job = tmp_path / "best.yaml"
    job.write_text(best_job_yaml(plan, best(table, plan), "sine-debug"))
    cfg = load_config(job)
    assert cfg.name == "sine-debug-best" and cfg.inner.lr == pytest.approx(0.06) and cfg.tracking.uri is None
    assert "val_mse = 0.7" in job.read_text().splitlines()[0]


def test_short_names():
    assert short_names(["inner.lr", "inner.steps", "algorithm.name"]) == {
        "inner.lr": "lr", "inner.steps": "steps", "algorithm.name": "algorithm"}
    assert short_names(["inner.lr", "outer.lr"]) == {"inner.lr": "inner.lr", "outer.lr": "outer.lr"}


def test_sweep_files_parse_as_yaml_mappings():
    for path in SWEEPS:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and "base" in data, path


def test_a_node_local_sweep_folder_on_a_cluster_is_named_as_such(tmp_path):
    # The error Ray raises when a trial on another node cannot see out_dir, made by Ray itself: its
    # storage check after the marker a node-local folder lacks is gone.
    import traceback
    from types import SimpleNamespace

    from ray.train._internal.storage import _VALIDATE_STORAGE_MARKER_FILENAME, StorageContext

    from metadist.sweeps.driver import SHARED_STORAGE_HINT, _error_line

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep")
    (tmp_path / "sweep" / _VALIDATE_STORAGE_MARKER_FILENAME).unlink()
    with pytest.raises(RuntimeError) as err:
        storage._check_validation_file()
    error_file = tmp_path / "error.txt"
    error_file.write_text("".join(traceback.format_exception(err.value)))
    assert _error_line(SimpleNamespace(error_file=str(error_file))) == SHARED_STORAGE_HINT
    error_file.write_text("Traceback (most recent call last):\n  ...\nValueError: something else\n")
    assert _error_line(SimpleNamespace(error_file=str(error_file))) == "ValueError: something else"


def _job(path: Path, name: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((ROOT / "jobs/sine/maml-debug.yaml").read_text() + f"\nname: {name}\n")
    return path


def test_base_is_looked_up_beside_the_sweep_file_first_then_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another folder than the repository
    assert plan_sweep(load_sweep(DEBUG), DEBUG).job["name"] == "maml-debug"  # the shipped, file-relative form
    sweep_file = tmp_path / "sweeps/s.yaml"
    sweep_file.parent.mkdir()
    sweep_file.write_text(yaml.safe_dump(_sweep(base="jobs/job.yaml")))
    _job(tmp_path / "jobs/job.yaml", "from-cwd")
    assert plan_sweep(load_sweep(sweep_file), sweep_file).job["name"] == "from-cwd"  # the repository-relative form
    _job(tmp_path / "sweeps/jobs/job.yaml", "beside-the-sweep")
    assert plan_sweep(load_sweep(sweep_file), sweep_file).job["name"] == "beside-the-sweep"  # first when both exist

    sweep_file.write_text(yaml.safe_dump(_sweep(base="jobs/nope.yaml")))
    with pytest.raises(ConfigError) as err:
        plan_sweep(load_sweep(sweep_file), sweep_file)
    assert str(err.value) == (f"base: job file 'jobs/nope.yaml' not found beside the sweep file "
                              f"({tmp_path / 'sweeps/jobs/nope.yaml'}) nor in the working directory "
                              f"({tmp_path / 'jobs/nope.yaml'})")


def test_tune_plans_a_sweep_file_given_from_another_folder(tmp_path, monkeypatch, mlflow_store):
    from typer.testing import CliRunner

    from metadist.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")  # one error line, unwrapped
    # Planning goes past the base job to the space check, which fails before Ray starts.
    res = CliRunner().invoke(app, ["tune", str(DEBUG), "--set", "space.inner.steps={choice: [0, 1]}"])
    assert res.exit_code == 2 and "space.inner.steps: value 0 is not a valid inner.steps" in res.output
    assert not list(tmp_path.iterdir())  # no sweep folder, no store here: nothing started
    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(mlflow_store).search_experiments()] == ["Default"]  # no parent run


def test_the_plans_sweep_is_plain_data_as_the_file_writes_it():
    plan = plan_sweep(load_sweep(DEBUG), DEBUG)
    assert yaml.safe_load(yaml.safe_dump(plan.sweep)) == plan.sweep  # YAML- and JSON-safe: the state file
    assert plan.sweep["space"] == {"algorithm.name": {"choice": ["maml", "fomaml"]}, "inner.lr": {"loguniform": [0.001, 1.0]},
                                   "inner.steps": {"choice": [1, 3]}}
    assert list(plan.sweep) == sorted(plan.sweep) and list(plan.space) == sorted(plan.space)
