"""The `metadist` command as a user meets it: outputs, summary JSON and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from metadist.cli import app

from ..conftest import ROOT, free_port

runner = CliRunner()
JOB = str(ROOT / "jobs/sine/maml-debug.yaml")


def _small(tmp_path):
    return ["--set", f"train.out_dir={tmp_path}", "--set", "train.steps=20", "--set", "eval.episodes=20",
            "--set", "eval.steps=2", "--set", "algorithm.task_parallel=vmap"]


def test_train_then_eval_write_summaries(tmp_path):
    out = tmp_path / "train.json"
    res = runner.invoke(app, ["train", JOB, *_small(tmp_path), "--summary-json", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    # 20 steps, all of them warm-up: no rate to print, and none made up.
    assert "steady-state rate not measured" in " ".join(res.output.split()) and "nan" not in res.output
    summary = json.loads(out.read_text())
    assert summary["eval"]["rows"][0]["steps"] == 0 and "tasks_per_s" in summary["throughput"]
    ev = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", summary["checkpoint"], "--episodes", "10", "--steps", "1",
                              "--summary-json", str(ev)])
    assert res.exit_code == 0, res.output
    report = json.loads(ev.read_text())["eval"]
    assert report["episodes"] == 10 and len(report["rows"]) == 2
    # eval.* keys can change for an evaluation (a baseline's tuned test-time rate, the val split); no other.
    res = runner.invoke(app, ["eval", summary["checkpoint"], "--episodes", "10", "--steps", "1", "--set",
                              "eval.lr=0.002", "--set", "eval.split=val", "--summary-json", str(ev)])
    assert res.exit_code == 0, res.output
    report = json.loads(ev.read_text())["eval"]
    assert report["lr"] == 0.002 and report["split"] == "val"
    res = runner.invoke(app, ["eval", summary["checkpoint"], "--set", "inner.lr=0.5"])
    assert res.exit_code == 2 and "inner.lr: only eval.* keys can change" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cases = [
        (["train", JOB, "--set", "inner.lrr=0.1"], "unknown key 'inner.lrr'; allowed keys under 'inner': batch, checkpoint, lr, steps"),
        (["train", JOB, "--set", "inner.lr=-1"], "inner.lr: Input should be greater than 0"),
        (["train", JOB, "--set", "algorithm.name=mamll"], "allowed values: 'maml', 'fomaml'"),
        (["train", JOB, "--set", "inner.steps=abc"], "inner.steps"),
        (["train", str(tmp_path / "nope.yaml")], "does not exist"),
        (["eval", str(tmp_path / "nope.pt")], "does not exist"),
        (["train", JOB, "--set", "task.family=fewshot", "--set", "model.name=conv4"],
         "data.path: task.family=fewshot needs a dataset directory"),
        (["train", JOB, "--set", "inner.lr=1e6", *_small(tmp_path)], "meta-gradient is not finite"),
        (["config", JOB, "--set", "task.ways=1"], "task.ways: Input should be greater than or equal to 2"),
        # MLflow 3.17 refuses a file: store unless told otherwise.
        (["train", JOB, "--set", f"tracking.uri=file:{tmp_path / 'mlruns'}", *_small(tmp_path)],
         "cannot use the MLflow store file:"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", JOB, "--set", "runtime.device=cuda"], "runtime.device: 'cuda' was asked for"))
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
        assert "Traceback" not in res.output


def test_config_prints_resolved_yaml_and_keys():
    res = runner.invoke(app, ["config", JOB, "--set", "inner.lr=0.05"])
    assert res.exit_code == 0 and "lr: 0.05" in res.output
    res = runner.invoke(app, ["config", JOB, "--keys"])
    assert "inner.lr: Inner-loop (adaptation) learning rate" in res.output


def test_console_script_runs_as_installed(tmp_path):
    exe = [sys.executable, "-m", "metadist.cli"]
    res = subprocess.run([*exe, "train", JOB, "--set", "algorithm.nme=x"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown key 'algorithm.nme'" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_shard_size_default_is_the_librarys():
    from metadist import cli
    from metadist.data.format import SHARD_BYTES

    assert cli.ShardMbOpt.default * 1e6 == SHARD_BYTES


def test_option_ranges_and_choices_are_usage_errors_naming_option_and_allowed_values(tmp_path):
    src, out, ck = str(tmp_path), str(tmp_path / "out"), str(tmp_path / "checkpoint.pt")
    cases = [
        (["data", "convert", src, out, "--format", "zip"],
         "'--format': Value error, 'zip' is not one of 'ravi-csv', 'pickle-cache', 'folders', 'torchmeta-hdf5'"),
        (["data", "convert", src, out, "--format", "folders", "--filter", "cubic"],
         "'--filter': Value error, 'cubic' is not one of 'nearest', 'bilinear', 'bicubic', 'lanczos', 'box'"),
        (["data", "convert", src, out, "--format", "folders", "--on-wrong-size", "skip"],
         "'--on-wrong-size': Value error, 'skip' is not one of 'resize', 'error'"),
        (["data", "convert", src, out, "--format", "folders", "--size", "7"], "'--size': Input should be greater than or equal to 8"),
        (["data", "convert", src, out, "--format", "folders", "--workers", "0"], "'--workers': Input should be greater than or equal to 1"),
        (["data", "convert", src, out, "--format", "folders", "--shard-mb", "0"], "'--shard-mb': Input should be greater than or equal to 0.001"),
        (["data", "synth", out, "--per-class", "0"], "'--per-class': Input should be greater than or equal to 1"),
        (["data", "synth", out, "--size", "7"], "'--size': Input should be greater than or equal to 8"),
        (["data", "synth", out, "--workers", "0"], "'--workers': Input should be greater than or equal to 1"),
        (["data", "synth", out, "--shard-mb", "-1"], "'--shard-mb': Input should be greater than or equal to 0.001"),
        (["eval", ck, "--episodes", "0"], "'--episodes': Input should be greater than or equal to 1"),
        (["eval", ck, "--steps", "-1"], "'--steps': Input should be greater than or equal to 0"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        text = " ".join(res.output.replace("│", " ").split())
        assert res.exit_code == 2 and message in text, (args, res.output)
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_cli_convert_choices_are_the_librarys():
    from metadist import cli
    from metadist.data import convert, omniglot

    assert [c.value for c in cli.ConvertFormat] == list(convert.FORMATS)
    assert [c.value for c in cli.OmniglotSplit] == list(omniglot.SPLIT_POLICIES)
    assert [c.value for c in cli.ResizeFilter] == list(convert.FILTERS)


def test_every_command_turns_every_user_error_into_one_line(tmp_path):
    """Each command, with a bad input of each error class it can meet: one `error:` line, exit 2."""
    dead = f"127.0.0.1:{free_port()}"
    img = str(ROOT / "jobs/miniimagenet/maml-debug.yaml")
    not_a_dataset = tmp_path / "empty"
    not_a_dataset.mkdir()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cases = {
        "ConfigError": (["train", JOB, "--set", "inner.lrr=0.1"], "unknown key 'inner.lrr'"),
        "DataError": (["train", img, "--set", "data.path=/nonexistent"], "no manifest.parquet"),
        "CheckpointError": (["train", "--resume", str(tmp_path / "bad.pt")], "not a readable metadist checkpoint"),
        "ClusterError": (["train", JOB, "--set", "runtime.executor=ray", "--set", f"runtime.address={dead}",
                          "--set", "tracking.enabled=false", "--set", f"train.out_dir={tmp_path / 'cluster-runs'}"],
                         f"nothing answers at {dead}"),
        "TrainingDiverged": (["train", JOB, "--set", "inner.lr=1e6", "--set", "tracking.enabled=false",
                              *_small(tmp_path)], "meta-gradient is not finite"),
        "TrackingError": (["train", JOB, "--set", f"tracking.uri=http://{dead}"], "nothing answers at the MLflow"),
        "eval CheckpointError": (["eval", str(tmp_path / "bad.pt")], "not a readable metadist checkpoint"),
        "config ConfigError": (["config", JOB, "--set", "task.ways=1"], "task.ways"),
        "tune ConfigError": (["tune", str(ROOT / "jobs/sweeps/sine-debug.yaml"), "--set", "samplez=3"], "samplez"),
        "submit ConfigError": (["submit", JOB, "--set", "inner.lrr=1"], "unknown key 'inner.lrr'"),
        "submit SubmitError": (["submit", JOB, "--address", f"http://{dead}"], f"nothing answers at {dead}"),
        "data verify DataError": (["data", "verify", str(not_a_dataset)], "no manifest.parquet"),
        "data convert DataError": (["data", "convert", str(not_a_dataset), str(tmp_path / "out"),
                                    "--format", "folders"], str(not_a_dataset)),
        "data synth into a dataset": (["data", "synth", str(ROOT / "data/synth-debug")], "already holds a dataset"),
    }
    for what, (args, message) in cases.items():
        if what == "data synth into a dataset" and not (ROOT / "data/synth-debug/manifest.parquet").exists():
            args = ["data", "synth", str(not_a_dataset), "--per-class", "0"]  # typer's own range check
            message = "--per-class"
        res = runner.invoke(app, args)
        text = " ".join(res.output.split())
        assert res.exit_code == 2, (what, res.output, res.exception)
        assert message in text, (what, res.output)
        # One message (rich may wrap it at the terminal's width), never a traceback.
        assert "Traceback" not in res.output and text.count("error:") <= 1, (what, res.output)
    assert not (tmp_path / "cluster-runs").exists()  # the cluster was asked before a run folder was made
