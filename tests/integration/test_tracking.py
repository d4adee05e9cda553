"""A finished run read back from its MLflow store: params, metric histories, tags and artifacts."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from metadist.cli import app

from ..conftest import ROOT, crash_at


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_a_finished_run_is_readable_through_mlflow(tmp_path, mlflow_store):
    summary_path = tmp_path / "summary.json"
    res = CliRunner().invoke(app, [
        "train", str(ROOT / "jobs/sine/maml-debug.yaml"), "--no-progress", "--summary-json", str(summary_path),
        "--set", f"train.out_dir={tmp_path / 'runs'}", "--set", "train.steps=30", "--set", "train.log_every=10",
        "--set", "train.checkpoint_every=15", "--set", "eval.episodes=20", "--set", "eval.steps=10",
        "--set", "algorithm.task_parallel=vmap"])
    assert res.exit_code == 0, res.output
    summary = json.loads(summary_path.read_text())

    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("maml-debug")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["inner.lr"] == "0.01" and run.data.params["algorithm.name"] == "maml"
    assert run.data.tags["system.workers"] == "1" and run.data.tags["system.device_kinds"] == "cpu"
    assert run.data.tags["metadist.run_dir"] == summary["run_dir"]

    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    # The runs table opens with the headline metric as a column, from the link the command prints.
    assert "metrics.`test/metric`" in json.loads(exp.tags["mlflow.sharedViewState.metadist"])["selectedColumns"]
    assert f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey=metadist" in res.output.replace("\n", "")

    history = client.get_metric_history(run.info.run_id, "train/loss_after")
    assert [m.step for m in history] == [0, 10, 20, 29]
    for key in ("train/loss_before", "time/tasks_per_s", "time/compute_s", "time/comm_s", "time/driver_s",
                "time/step_s", "runtime/worker_restarts", "train/lr_outer"):
        assert client.get_metric_history(run.info.run_id, key), key
    final = run.data.metrics
    # Every metric sits in a section; the evaluation rows are a table, not 20 flat metrics.
    assert {k.split("/")[0] for k in final} <= {"train", "val", "time", "runtime", "test"}, sorted(final)
    assert not any(k.startswith("eval_") for k in final)
    # The headline: one name for every task family, the metric after eval.steps steps, its CI beside it.
    assert abs(final["test/metric"] - summary["eval"]["rows"][-1]["mean"]) < 1e-9
    assert abs(final["test/metric_ci95"] - summary["eval"]["rows"][-1]["ci95"]) < 1e-9
    assert run.data.tags["metadist.metric"].startswith("mse after 10 test-time steps on 20 test tasks")

    (train_input, test_input) = run.inputs.dataset_inputs
    assert [i.tags[0].value for i in (train_input, test_input)] == ["train", "test"]
    assert train_input.dataset.name == "sinusoid" and train_input.dataset.source_type == "procedural"
    assert json.loads(train_input.dataset.profile)["amplitude"] == [0.1, 5.0]
    assert train_input.dataset.digest and train_input.dataset.digest != test_input.dataset.digest  # other seeds

    files = set(_artifacts(client, run.info.run_id))
    assert {"config.yaml", "eval.json", "eval_table.json", "metrics.jsonl", "checkpoints/checkpoint.pt",
            "model/model.pt", "plots/training_curve.png", "plots/adaptation_curve.png",
            "plots/sine_fits.png"} <= files
    table = client.load_table(exp.experiment_id, "eval_table.json", run_ids=[run.info.run_id])
    assert list(table["steps"]) == list(range(11))
    assert abs(table["mean"].iloc[1] - summary["eval"]["rows"][1]["mean"]) < 1e-9
    png = client.download_artifacts(run.info.run_id, "plots/sine_fits.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_by_mlflow_run_id_continues_the_same_run(tmp_path, sine_debug, mlflow_store):
    import pytest
    import torch

    from metadist.runtime.driver import Trainer, resume_trainer
    from metadist.tracking import Tracker

    cfg = sine_debug("train.steps=30", "train.checkpoint_every=10", "eval.episodes=10")
    whole = Trainer(cfg)
    whole.fit(progress=False)

    crashed = Trainer(cfg, tracker=Tracker(cfg))
    crash_at(crashed, 15)  # the driver dies after this step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(progress=False)
    run_id = crashed.tracker.run_id
    client = MlflowClient(mlflow_store)
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = resume_trainer(run_id)
    assert resumed.step == 10 and resumed.tracker.run_id == run_id
    resumed.fit(progress=False)
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss_after")]
    assert steps[-1] == 29 and 10 in steps


def test_resume_of_something_unknown_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["train", "--resume", "not-a-run-or-path"])
    assert res.exit_code == 2
    assert "neither a checkpoint, a run folder nor a known MLflow run id" in " ".join(res.output.split())


def test_a_navigation_run_records_returns_trpo_steps_and_its_figures(tmp_path, mlflow_store):
    res = CliRunner().invoke(app, [
        "train", str(ROOT / "jobs/rl/maml-navigation-debug.yaml"), "--no-progress",
        "--set", f"train.out_dir={tmp_path / 'runs'}", "--set", "train.steps=2", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "train.select=last", "--set", "train.meta_batch=3",
        "--set", "task.shots=6", "--set", "task.query=6", "--set", "eval.episodes=3", "--set", "eval.shots=6"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("maml-navigation-debug").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/return_before", "train/return_after", "train/trpo_kl", "train/trpo_backtracks"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    assert run.data.tags["metadist.metric"].startswith("return after 3 test-time steps")
    assert "higher is better" in run.data.tags["metadist.metric"]
    assert {"plots/training_curve.png", "plots/adaptation_curve.png", "plots/navigation_paths.png"} <= \
        set(_artifacts(client, run.info.run_id))
