"""The collective executor on a real local Ray (2 CPUs): Ray Train ranks all-reduce their meta-gradients.

They agree with the local executor, every rank ends with bitwise the same parameters, rank 0 records
the run in MLflow, and the checkpoint is the one every executor reads and writes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from metadist.runtime.driver import Callback, Every, Trainer, read_history, resume_trainer
from metadist.runtime.errors import ClusterError

from ..conftest import crash_at, new_store, rel_err, sine_config

# Fractional CPUs so that three ranks fit on the 2-CPU test cluster; one torch thread each. 25 tasks:
# uneven shares for 2 (13 + 12) and 3 (9 + 8 + 8) ranks.
RANKS = ["runtime.executor=collective", "runtime.cpus_per_worker=0.5", "runtime.threads=1"]
STEPS = ["train.steps=30", "train.checkpoint_every=10", "eval.episodes=10"]
# A checkpoint reported to Ray Train waits for its controller's next poll (every 2 s): the group runs
# that are not about checkpoints report only their final one.
FINAL_ONLY = "train.checkpoint_every=0"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    trainer = Trainer(sine_config(tmp_path_factory.mktemp("local"), *STEPS, "tracking.enabled=false"))
    return trainer, trainer.fit(progress=False)


@pytest.fixture(scope="module")
def two_ranks(local_ray, tmp_path_factory, empty_store):
    """An uninterrupted 2-rank run, recorded in an MLflow store of its own: (trainer, summary, store)."""
    from metadist.tracking import Tracker

    store = new_store(tmp_path_factory, empty_store, "two-ranks-store")
    cfg = sine_config(tmp_path_factory.mktemp("two-ranks"), *STEPS, FINAL_ONLY, *RANKS, "runtime.workers=2",
                      f"tracking.uri={store}")
    trainer = Trainer(cfg, tracker=Tracker(cfg))
    return trainer, trainer.fit(progress=False), store


@pytest.mark.slow
def test_two_ranks_match_the_local_executor_and_record_the_run(two_ranks, local_run):
    trainer, summary, mlflow_store = two_ranks
    ref, ref_summary = local_run
    assert rel_err(trainer.params, ref.params) < 1e-5
    rt = summary["runtime"]
    assert rt["executor"] == "collective" and rt["workers"] == 2 and rt["worker_restarts"] == 0
    digests = rt["param_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # the ranks' parameters are bitwise identical
    # Rank 0's last step, as the driver's progress bar last read it.
    assert json.loads((trainer.run_dir / "progress.json").read_text())["step"] == 30

    # Rank 0 recorded the run; the driver knows where it is.
    run = MlflowClient(mlflow_store).get_run(trainer.tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["executor"] == "collective"
    assert "test/metric" in run.data.metrics and "train/loss_after" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(mlflow_store).list_artifacts(run.info.run_id)}
    assert {"checkpoints", "model", "plots", "eval.json", "metrics.jsonl"} <= artifacts

    # The checkpoint is the common format: the driver's copy evaluates to the ranks' own report.
    again = resume_trainer(summary["checkpoint"], executor="local")
    assert again.step == 30 and all(torch.equal(again.params[k], trainer.params[k]) for k in trainer.params)
    assert again.report()["rows"] == summary["eval"]["rows"]


@pytest.mark.slow
def test_three_ranks_match_the_local_executor(local_ray, local_run, tmp_path):
    trainer = Trainer(sine_config(tmp_path, *STEPS, FINAL_ONLY, *RANKS, "runtime.workers=3",
                                  "tracking.enabled=false"))
    summary = trainer.fit(progress=False)
    assert rel_err(trainer.params, local_run[0].params) < 1e-5
    assert len(set(summary["runtime"]["param_digests"])) == 1 and summary["runtime"]["workers"] == 3


@pytest.mark.slow
def test_a_local_run_resumes_on_one_rank_bit_identically(local_ray, local_run, tmp_path):
    crashed = Trainer(sine_config(tmp_path, *STEPS, "tracking.enabled=false"))
    crash_at(crashed, 25)  # the driver dies after this step; its last checkpoint is step 20
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(progress=False)
    resumed = resume_trainer(crashed.run_dir, executor="collective")
    assert resumed.step == 20 and resumed.cfg.runtime.executor == "collective"
    summary = resumed.fit(progress=False)
    # One rank does what the local executor does, in the same order: the same bits.
    whole, whole_summary = local_run
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)
    assert summary["eval"]["rows"] == whole_summary["eval"]["rows"]
    assert [r["step"] for r in resumed.history] == [20, 29]  # logging resumed where the checkpoint left off


def _wait_for(path, fit, timeout: float = 180.0) -> int:
    """The pid a held rank wrote to `path`, once it has (the group runs in the thread `fit`)."""
    deadline = time.time() + timeout
    while not path.exists() and fit.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"no rank reached {path.name}"
    return int(path.read_text())


def _registered_steps(run_dir) -> list[int]:
    """The steps of the checkpoints Ray Train's controller has registered for the group in `run_dir`."""
    steps = []
    for snapshot in (run_dir / "ray_train").glob("*/checkpoint_manager_snapshot.json"):
        steps += [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    return steps


@pytest.mark.slow
def test_a_hung_rank_and_a_killed_rank_restart_the_group_and_change_nothing(two_ranks, tmp_path, mlflow_store):
    """Two faults in one run, each from outside the group, as an operator or the kernel would deal them:
    1. rank 1 hangs (SIGSTOP) after step 15, its last checkpoint step 10: the collective timeout and the
       bounded process-group shutdown detect it, and the group restarts from step 10;
    2. in the restarted group, rank 1 dies (SIGKILL) right after the step-20 checkpoint was reported. Ray
       Train's controller polls every 2 s, so it may never register that checkpoint: the group then
       restarts from step 10 again, and loses nothing but steps.
    The run ends with a clean run's parameters, bit for bit, in one MLflow run that counts 2 restarts."""
    from metadist.tracking import Tracker

    # 30 s: short enough to see the hang quickly, long enough for what rank 0 does alone while the other
    # rank waits in the next collective (recording the baseline in MLflow took over 15 s once in CI).
    cfg = sine_config(tmp_path, *STEPS, *RANKS, "runtime.workers=2", "runtime.collective_timeout_s=30")
    trainer = Trainer(cfg, tracker=Tracker(cfg))

    def hold_rank_1(t):
        # Rank 1 writes its pid where the test looks, once per fault, and waits there for the signal.
        for step, name in ((15, "hang"), (20, "kill")):
            mark = t.run_dir / f"rank-1-{name}"
            if t.executor.rank == 1 and t.step == step and not mark.exists():
                mark.write_text(str(os.getpid()))
                time.sleep(300)

    trainer.rank_callbacks.append(Callback(Every(1), hold_rank_1))  # after the step's checkpoint report
    result: dict = {}
    fit = threading.Thread(target=lambda: result.update(summary=trainer.fit(progress=False)))
    fit.start()
    try:
        pid = _wait_for(trainer.run_dir / "rank-1-hang", fit)
        assert pid in [r["pid"] for r in json.loads((trainer.run_dir / "ranks.json").read_text())]
        # Live: while the group is mid-run, rank 0 has already recorded its first records in MLflow.
        client = MlflowClient(mlflow_store)
        live = client.get_run((trainer.run_dir / "mlflow_run_id").read_text().strip())
        assert live.info.status == "RUNNING"
        assert [m.step for m in client.get_metric_history(live.info.run_id, "train/loss_after")] == [0, 10]
        # The step-10 checkpoint was reported before the hold; wait until Ray Train's controller (polling
        # every 2 s) has registered it, so that the hang's restart is the one from a checkpoint.
        deadline = time.time() + 30
        while 10 not in _registered_steps(trainer.run_dir) and time.time() < deadline:
            time.sleep(0.2)
        assert 10 in _registered_steps(trainer.run_dir)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        os.kill(_wait_for(trainer.run_dir / "rank-1-kill", fit), signal.SIGKILL)
        fit.join(timeout=240)
    finally:
        for mark in ("hang", "kill"):  # a stopped or held rank that the group did not take down
            path = trainer.run_dir / f"rank-1-{mark}"
            if path.exists() and fit.is_alive():
                os.kill(int(path.read_text()), signal.SIGKILL)
    assert not fit.is_alive() and "summary" in result
    starts = [line.split() for line in (trainer.run_dir / "group_starts").read_text().splitlines()]
    assert [int(s[1]) for s in starts[:2]] == [0, 10]
    assert float(starts[1][0]) - stopped < 120  # the hang cost minutes, not the 30-minute default
    assert int(starts[2][1]) in (10, 20)  # 10 when Ray Train dropped the checkpoint reported at the kill
    summary = result["summary"]
    assert summary["runtime"]["worker_restarts"] == 2
    # Resumed twice: the same parameters as a run nobody disturbed, bit for bit.
    clean = two_ranks[0]
    assert all(torch.equal(trainer.params[k], clean.params[k]) for k in clean.params)
    assert len(set(summary["runtime"]["param_digests"])) == 1
    # Every step's record once, though steps 10 to 20 ran up to three times.
    assert [r["step"] for r in read_history(trainer.run_dir)] == [0, 10, 20, 29]
    # One MLflow run across the restarts, which it counts.
    (run,) = client.search_runs([client.get_experiment_by_name("maml-debug").experiment_id])
    assert run.info.run_id == trainer.tracker.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["runtime/worker_restarts"] == 2


def test_a_rank_asks_this_rays_own_state_api(local_ray):
    # Ray Train's placement-group cleaner asks the state API whether a run's controller lives. It found it
    # by the default dashboard port, 8265, where another Ray on this machine (a sweep's) answered "no such
    # actor", and it removed a healthy group's placement group; or, with several Rays here, it found none,
    # and a stopped trial's group held its CPUs for ever. A process of the Ray metadist starts (this one:
    # the sweeps' Ray runs beside it in `make test`) resolves the state API to its own Ray's address.
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    @local_ray.remote(num_cpus=0)
    def state_api() -> str:
        from ray.dashboard.utils import get_address_for_submission_client

        return get_address_for_submission_client(None)

    own = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    assert local_ray.get(state_api.remote()) == f"http://{own.decode()}" != "http://127.0.0.1:8265"


def test_more_ranks_than_the_cluster_holds_is_one_error_at_once(local_ray, tmp_path):
    trainer = Trainer(sine_config(tmp_path, *RANKS, "runtime.workers=5", "runtime.cpus_per_worker=1",
                                  "tracking.enabled=false"))
    with pytest.raises(ClusterError, match=r"runtime.workers=5 .* asks for 5 CPU; the Ray cluster has 2 CPU"):
        trainer.fit(progress=False)
