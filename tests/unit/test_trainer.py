"""The in-process trainer: summary shape, determinism, checkpoints, schedules, divergence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from metadist.algorithms.spec import InnerSpec
from metadist.config import ConfigError
from metadist.evaluation import EXPLODED_FACTOR, print_eval, report_of, summarise
from metadist.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metadist.runtime.driver import Trainer, TrainingDiverged, evaluate_checkpoint, read_history

from ..conftest import sine_config


def _fit(cfg):
    trainer = Trainer(cfg)
    return trainer, trainer.fit(progress=False)


def test_summary_has_the_stable_shape(sine_debug):
    trainer, summary = _fit(sine_debug())
    assert set(summary) >= {"config", "metrics", "throughput", "eval", "checkpoint"}
    assert summary["config"]["inner"]["lr"] == 0.01
    assert summary["throughput"]["tasks_per_s"] > 0
    ev = summary["eval"]
    assert ev["split"] == "test" and ev["shots"] == 5 and ev["episodes"] == 40
    assert [r["steps"] for r in ev["rows"]] == [0, 1, 2, 3]
    assert all(r["ci95"] > 0 and math.isfinite(r["mean"]) for r in ev["rows"])
    json.dumps(summary)  # must be serialisable as is
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 10, 20, 30, 39]
    assert (trainer.run_dir / "config.yaml").is_file()


def test_meta_training_improves_one_step_adaptation_on_the_fixed_tasks(sine_debug):
    trainer = Trainer(sine_debug("train.steps=300", "outer.lr=0.003", "eval.episodes=100"))
    before = trainer.evaluate()["rows"]
    after = trainer.fit(progress=False)["eval"]["rows"]
    assert after[1]["mean"] < 0.6 * before[1]["mean"]
    assert after[1]["mean"] < after[0]["mean"]  # one test-time step helps after meta-training


def test_same_seed_gives_bit_identical_parameters(sine_debug):
    a, _ = _fit(sine_debug())
    b, _ = _fit(sine_debug())
    c, _ = _fit(sine_debug("seed=1"))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["head.weight"], c.params["head.weight"])


def test_checkpoint_holds_the_state_and_evaluates_identically(sine_debug):
    trainer, summary = _fit(sine_debug())
    state = load_checkpoint(summary["checkpoint"])
    assert state["step"] == 40 and state["optimizer"]["state"]
    assert set(state["params"]) == set(trainer.params)
    again = evaluate_checkpoint(summary["checkpoint"])
    assert again["eval"]["rows"] == summary["eval"]["rows"]


def test_resumed_run_matches_an_uninterrupted_one(sine_debug):
    full, _ = _fit(sine_debug())
    half = Trainer(sine_debug("train.checkpoint_every=20"))
    half.cfg.train.steps = 20  # stop half way, as a crash after the step-20 checkpoint would
    half.fit(progress=False)
    resumed = Trainer(sine_debug())
    resumed.load_state(load_checkpoint(half.run_dir / "checkpoint.pt"))
    resumed.fit(progress=False)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)


def test_cosine_schedule_reaches_min_lr(sine_debug):
    trainer, _ = _fit(sine_debug("outer.schedule=cosine", "outer.min_lr=0.0001"))
    assert trainer.history[0]["lr_outer"] == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_linear_schedule_is_reptiles_step_size(sine_debug):
    # The Reptile code's outer step size at iteration i of N: (1 - i/N) * lr + (i/N) * final.
    trainer, _ = _fit(sine_debug("outer.schedule=linear", "outer.min_lr=0.0002", "train.log_every=1"))
    steps = trainer.cfg.train.steps
    got = [row["lr_outer"] for row in trainer.history if "lr_outer" in row]
    assert len(got) == steps
    for i, lr in enumerate(got):
        assert lr == pytest.approx((1 - i / steps) * 1e-3 + i / steps * 2e-4, rel=1e-9)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="outer.min_lr.*allowed: 0 to 0.001"):
        sine_debug("outer.schedule=linear", "outer.min_lr=0.01")


def test_divergence_is_a_clear_error(sine_debug):
    with pytest.raises(TrainingDiverged, match=r"not finite at step \d+.*inner.lr=1000000.0"):
        _fit(sine_debug("inner.lr=1e6"))


def test_eval_counts_diverged_tasks_instead_of_averaging_nan():
    s = summarise(torch.tensor([1.0, 3.0, float("nan"), float("inf")]))
    assert s["diverged"] == 2 and s["mean"] == pytest.approx(2.0) and s["median"] in (1.0, 3.0)
    assert s["ci95"] == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(2))


def test_eval_counts_exploded_tasks_and_keeps_them_in_the_mean():
    # Four tasks: one improves, one grows 20x (exploded), one grows 7.5x (not), one diverges.
    loss = torch.tensor([[1.0, 0.5], [1.0, 20.0], [2.0, 15.0], [1.0, float("nan")]])
    spec = InnerSpec(steps=1, lr=0.01)
    report = report_of({"loss": loss}, spec, split="test", shots=5, episodes=4)
    before, after = report["rows"]
    assert report["exploded_factor"] == EXPLODED_FACTOR == 10.0
    assert before["exploded"] == 0 and after["exploded"] == 1 and after["diverged"] == 1
    assert after["mean"] == pytest.approx((0.5 + 20.0 + 15.0) / 3)  # the exploded task stays in the mean
    acc = torch.tensor([[0.2, 0.6], [0.2, 0.0], [0.4, 0.2], [0.2, 0.0]])
    rows = report_of({"loss": loss, "acc": acc}, spec, split="test", shots=1, episodes=4)["rows"]
    assert rows[1]["exploded"] == 1 and rows[1]["mean"] == pytest.approx(20.0)
    console = Console(record=True, width=120)
    print_eval(report, console=console)
    assert "exploded (>10x)" in console.export_text()


def test_adaptation_curve_draws_the_compared_runs_beside_this_one(sine_debug, tmp_path):
    # The MAML paper's Figure 2: MAML's MSE against test-time steps beside the pretrained network's.
    baseline, _ = _fit(sine_debug("algorithm.name=pretrain", "name=pretrain-debug", "tracking.enabled=false"))
    trainer, summary = _fit(sine_debug("tracking.enabled=false", f"tracking.compare=[{baseline.run_dir}]"))
    fig = trainer.figures(summary["eval"])["plots/adaptation_curve.png"]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["after meta-training", "pretrain-debug (seed 0)"]
    drawn = fig.axes[0].lines[1].get_ydata()
    assert list(drawn) == [r["mean"] for r in json.loads((baseline.run_dir / "eval.json").read_text())["rows"]]
    # A folder that holds no run, or a run scored on other tasks, is one error before training starts.
    with pytest.raises(ConfigError, match="tracking.compare: .* holds no finished run"):
        Trainer(sine_debug(f"tracking.compare=[{tmp_path}]"))
    with pytest.raises(ConfigError, match="tracking.compare: .* scored on 40 test tasks, 5-shot; this run on 20"):
        Trainer(sine_debug("eval.episodes=20", f"tracking.compare=[{baseline.run_dir}]"))


def test_checkpoint_write_is_atomic_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 3
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable metadist checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_validation_on_a_schedule_uses_the_val_split(sine_debug):
    trainer, summary = _fit(sine_debug("train.eval_every=20", "eval.val_episodes=30"))
    val = [r for r in trainer.history if "val_mse" in r]
    assert [r["step"] for r in val] == [19, 39]
    assert val[-1]["val_mse"] == val[-1]["val_mse_3"] and "val_mse_0" in val[-1]
    assert summary["metrics"]["val_mse"] == val[-1]["val_mse"] and "loss_after" in summary["metrics"]
    # The val tasks are not the test tasks the final evaluation uses.
    assert val[-1]["val_mse_3"] != summary["eval"]["rows"][3]["mean"]


def test_evaluating_a_checkpoint_leaves_its_run_as_it_was(sine_debug):
    # `metadist eval` on a mid-run checkpoint used to cut the run's metrics.jsonl back to that step.
    trainer, _ = _fit(sine_debug("train.checkpoint_every=20"))
    mid = trainer.run_dir / "mid.pt"
    half = Trainer(sine_debug("train.checkpoint_every=20"))
    half.cfg.train.steps = 20
    half.fit(progress=False)
    (half.run_dir / "checkpoint.pt").rename(mid)
    before = {p.name: p.read_bytes() for p in trainer.run_dir.iterdir() if p.is_file()}
    evaluate_checkpoint(mid, episodes=5, steps=1)
    after = {p.name: p.read_bytes() for p in trainer.run_dir.iterdir() if p.is_file()}
    assert after == before and len(before["metrics.jsonl"].splitlines()) == 5


def test_a_conv4_checkpoint_evaluates_with_other_test_time_steps(tmp_path):
    # Conv-4 keeps a row of BatchNorm statistics per step up to eval.steps: evaluating its checkpoint with
    # another eval.steps used to fail loading them (a size mismatch) instead of evaluating.
    cfg = sine_config(tmp_path, "task.family=noise", "task.ways=3", "task.shots=1", "task.query=2",
                      "model.name=conv4", "model.filters=4", "model.channels=1", "model.image_size=16",
                      "model.bn=per_step", "train.steps=4", "train.log_every=2", "eval.episodes=4",
                      "tracking.enabled=false")
    _, summary = _fit(cfg)
    for steps in (1, 6):
        report = evaluate_checkpoint(summary["checkpoint"], overrides=[f"eval.steps={steps}"])["eval"]
        assert [r["steps"] for r in report["rows"]] == list(range(steps + 1))
    assert evaluate_checkpoint(summary["checkpoint"])["eval"]["rows"] == summary["eval"]["rows"]


def test_auto_is_resolved_once_for_training_and_evaluation(sine_debug, monkeypatch):
    from metadist.algorithms import batching

    calls = []
    real = batching.choose_task_parallel

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(batching, "choose_task_parallel", counted)
    trainer, summary = _fit(sine_debug("algorithm.task_parallel=auto"))
    assert len(calls) == 1 and trainer.task_parallel in ("vmap", "loop")
    assert summary["throughput"]["task_parallel"] == trainer.task_parallel
    assert load_checkpoint(summary["checkpoint"])["task_parallel"] == trainer.task_parallel
    again = evaluate_checkpoint(summary["checkpoint"])  # the run's mode, not a new measurement
    assert len(calls) == 1 and again["eval"]["rows"] == summary["eval"]["rows"]


def test_callbacks_run_on_their_cadence(sine_debug):
    from metadist.runtime.driver import Callback, Every

    assert [s for s in range(1, 41) if Every(10, first=True, last=True)(s, 40)] == [1, 11, 21, 31, 40]
    assert [s for s in range(1, 41) if Every(15, last=True)(s, 40)] == [15, 30, 40]
    assert not any(Every(0, last=True)(s, 40) for s in range(1, 41))
    trainer = Trainer(sine_debug("train.eval_every=15"))
    seen = []
    trainer.callbacks.append(Callback(Every(15, last=True), lambda t: seen.append((t.step, t.last_validation["step"]))))
    trainer.fit(progress=False)
    assert seen == [(15, 14), (30, 29), (40, 39)]  # after the validation of the same step


def test_a_failing_plot_ends_the_mlflow_run_failed(sine_debug, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    from metadist import plots
    from metadist.tracking import Tracker

    def broken(*args, **kw):
        raise RuntimeError("no figure today")

    monkeypatch.setattr(plots, "adaptation_curve", broken)
    cfg = sine_debug("train.steps=5", "eval.episodes=5")
    trainer = Trainer(cfg, tracker=Tracker(cfg))
    with pytest.raises(RuntimeError, match="no figure today"):
        trainer.fit(progress=False)
    run = MlflowClient(mlflow_store).get_run(trainer.tracker.run_id)
    assert run.info.status == "FAILED" and "no figure today" in run.data.tags["error"]


def _nav(tmp_path, *overrides):
    from metadist.config import load_config

    from ..conftest import ROOT
    return load_config(ROOT / "jobs/rl/maml-navigation-debug.yaml", [
        f"train.out_dir={tmp_path / 'runs'}", "train.steps=4", "train.meta_batch=4", "train.log_every=1",
        "train.eval_every=2", "train.checkpoint_every=2", "task.shots=10", "task.query=10", "eval.episodes=4",
        "eval.val_episodes=3", "eval.shots=10", "tracking.plot_tasks=2", "runtime.threads=1", *overrides])


def test_navigation_trains_with_trpo_resumes_bit_identically_and_evaluates_its_checkpoint(tmp_path):
    full, summary = _fit(_nav(tmp_path))
    ev = summary["eval"]
    assert ev["metric"] == "return" and [r["steps"] for r in ev["rows"]] == [0, 1, 2, 3]
    assert (ev["lr"], ev["later_lr"]) == (0.1, 0.05)  # eval.later_lr_scale 0.5
    assert all(-100 <= r["mean"] < 0 for r in ev["rows"])  # minus a distance, at most 100 steps
    steps = [r for r in full.history if "trpo_kl" in r]
    assert len(steps) == 4 and all(r["trpo_kl"] <= 0.01 and r["return_after"] < 0 for r in steps)
    assert any(r["trpo_backtracks"] >= 0 for r in steps)  # the line search accepted a step
    # The products and the line search are the executor's work: the driver's share stays small.
    assert all(r["time_driver_s"] < r["time_compute_s"] for r in steps)
    assert any("val_return_3" in r for r in full.history)
    # A run stopped after its step-2 checkpoint and resumed gives the same bits.
    half = Trainer(_nav(tmp_path))
    half.cfg.train.steps = 2
    half.fit(progress=False)
    resumed = Trainer(_nav(tmp_path))
    resumed.load_state(load_checkpoint(half.run_dir / "checkpoint.pt"))
    resumed.fit(progress=False)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert evaluate_checkpoint(summary["checkpoint"])["eval"]["rows"] == ev["rows"]
    # The figures: the training curve in returns, the adaptation curve, the agent's paths.
    figures = full.figures(ev)
    assert set(figures) == {"plots/training_curve.png", "plots/adaptation_curve.png", "plots/navigation_paths.png"}


def test_a_replaced_worker_computes_the_same_trpo_products(tmp_path):
    # A worker that dies within a TRPO step is replaced by one that never saw the step: it samples the
    # step's trajectories again and gives the same products and surrogate.
    from metadist.algorithms import make_spec
    from metadist.runtime.local import TaskShard

    cfg = _nav(tmp_path, "outer.optimizer=trpo")
    trainer = Trainer(cfg)
    spec = make_spec(cfg, 3, task_parallel="vmap")
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for k, p in trainer.params.items()}
    old, new = TaskShard(cfg), TaskShard(cfg)
    old.compute(trainer.params, 3, spec, range(1, 3))
    fresh = new.fvp(trainer.params, 3, spec, range(1, 3), v)
    assert all(torch.equal(fresh[k], old.fvp(trainer.params, 3, spec, range(1, 3), v)[k]) for k in v)
    candidate = {k: p + 0.01 for k, p in trainer.params.items()}
    assert torch.equal(new.surrogate(trainer.params, 3, spec, range(1, 3), candidate),
                       old.surrogate(trainer.params, 3, spec, range(1, 3), candidate))


def _scripted_validations(monkeypatch, values):
    """Make each validation report the next of `values` as its last-step val MSE; the final evaluation on
    the test split stays real."""
    real, queue = Trainer.report, list(values)

    def report(self, episodes=None, steps=None, split=None):
        out = real(self, episodes=episodes, steps=steps, split=split)
        if split == "val":
            out["rows"][-1]["mean"] = queue.pop(0)
        return out

    monkeypatch.setattr(Trainer, "report", report)


@pytest.mark.parametrize("values, chosen", [
    ([0.5, 0.2, 0.3, 0.4], 20),  # the lowest MSE
    ([math.nan, 0.3, math.nan, 0.3], 40),  # a tie goes to the later one; NaN never wins
    ([math.nan, 0.4, 0.1, math.nan], 30),
])
def test_best_validation_is_the_evaluated_model_and_resumes_with_the_run(sine_debug, mlflow_store, monkeypatch,
                                                                          values, chosen):
    from metadist.runtime.driver import Callback, Every
    from metadist.tracking import Tracker

    _scripted_validations(monkeypatch, values)
    cfg = sine_debug("train.eval_every=10", "train.checkpoint_every=20", "train.select=best_val",
                     "eval.val_episodes=5", "eval.episodes=20")
    trainer = Trainer(cfg, tracker=Tracker(cfg))
    kept = {}
    trainer.callbacks.append(Callback(Every(10), lambda t: kept.__setitem__(
        t.step, {k: v.clone() for k, v in t.params.items()})))
    summary = trainer.fit(progress=False)
    assert summary["selected_step"] == chosen
    assert all(torch.equal(trainer.params[k], kept[chosen][k]) for k in kept[chosen])
    model = torch.load(trainer.run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(model["params"][k], kept[chosen][k]) for k in kept[chosen])
    # The checkpoint continues the run from its last state and carries the selection with it.
    state = load_checkpoint(summary["checkpoint"])
    assert all(torch.equal(state["params"][k], kept[40][k]) for k in kept[40])
    assert state["best"]["step"] == chosen
    again = evaluate_checkpoint(summary["checkpoint"])
    assert again["selected_step"] == chosen and again["eval"]["rows"] == summary["eval"]["rows"]
    assert read_history(trainer.run_dir)[-1] == {"step": 39, "selected_step": chosen}


def test_best_validation_of_a_resumed_run_is_that_of_an_uninterrupted_one(sine_debug, monkeypatch):
    values = [0.5, 0.2, 0.3, 0.4]
    overrides = ("train.eval_every=10", "train.checkpoint_every=20", "train.select=best_val", "eval.val_episodes=5")
    _scripted_validations(monkeypatch, values * 2)  # the full run's four, then the half's two and the rest's
    full, summary = _fit(sine_debug(*overrides))
    half = Trainer(sine_debug(*overrides))
    half.cfg.train.steps = 20  # a crash after the step-20 checkpoint, which holds the best so far
    half.fit(progress=False)
    resumed = Trainer(sine_debug(*overrides))
    resumed.load_state(load_checkpoint(half.run_dir / "checkpoint.pt"))
    assert resumed.best["step"] == 20
    again = resumed.fit(progress=False)
    assert again["selected_step"] == summary["selected_step"] == 20
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
