"""The Ray executor on a real local Ray (2 CPUs): same results as the local executor, and the same bits
as a run with the same seed and workers after a worker killed with SIGKILL mid-step, or after a
whole-run crash resumed from its checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from metadist import evaluation
from metadist.runtime.driver import Trainer, resume_trainer

from ..conftest import crash_at, rel_err, sine_config

# Fractional CPUs so that three workers fit on the 2-CPU test cluster; one torch thread each.
RAY = ["runtime.executor=ray", "runtime.cpus_per_worker=0.5", "runtime.threads=1"]


def _fit(cfg, **hooks):
    trainer = Trainer(cfg)
    for name, fn in hooks.items():
        setattr(trainer, name, fn)
    summary = trainer.fit(progress=False)
    return trainer, summary


# The configuration every test below runs: 30 steps of the sinusoid debug job, a checkpoint every 10.
# 25 tasks: uneven shares for 2 (13 + 12) and 3 (9 + 8 + 8) workers.
STEPS = ["train.steps=30", "train.checkpoint_every=10", "eval.episodes=10"]


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory):
    """One uninterrupted run on 2 workers, and its summary: the reference of the tests below."""
    return _fit(sine_config(tmp_path_factory.mktemp("w2"), *STEPS, *RAY, "runtime.workers=2"))


def test_ray_workers_reproduce_the_local_executor(local_ray, sine_debug, two_workers, monkeypatch):
    ref, _ = _fit(sine_debug(*STEPS))

    def not_here(*args, **kwargs):
        raise AssertionError("the driver adapted evaluation episodes itself")

    # The workers evaluate: this process may not (they are other processes, and keep the real function).
    monkeypatch.setattr(evaluation, "episode_curves", not_here)
    runs = {w: _fit(sine_debug(*STEPS, *RAY, f"runtime.workers={w}")) for w in (1, 3)}
    monkeypatch.undo()
    runs[2] = two_workers
    for w, (trainer, summary) in runs.items():
        assert rel_err(trainer.params, ref.params) < 1e-5, w
        assert summary["runtime"]["workers"] == w and summary["runtime"]["executor"] == "ray"
        # 10 test episodes in shares of 10, 5 + 5 and 4 + 3 + 3, gathered: this process's own report, bit
        # for bit (the trainer's executor is closed, so it evaluates here).
        assert trainer.report()["rows"] == summary["eval"]["rows"], w
    assert not local_ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in local_ray.util.placement_group_table().values())


def test_worker_killed_mid_step_is_replaced_and_results_are_unchanged(sine_debug, two_workers):
    clean = two_workers[0]
    killed = []

    def kill_worker_1(step, executor):
        # The step's work has just been submitted: the worker is busy with it when the signal lands.
        if step == 7 and not killed:
            pid = executor.pids()[1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    trainer = Trainer(sine_debug(*STEPS, *RAY, "runtime.workers=2"))
    trainer.start()
    trainer.executor.after_submit = kill_worker_1
    summary = trainer.fit(progress=False)
    assert killed
    assert summary["runtime"]["worker_restarts"] == 1
    assert trainer.history[-1]["worker_restarts"] == 1
    # The same seed and workers give the same bits, and the kill changed none of them (the crashed run
    # below shows the same for a resumed driver).
    assert all(torch.equal(trainer.params[k], clean.params[k]) for k in clean.params)


def test_crashed_run_resumes_bit_identically(sine_debug, two_workers):
    whole, whole_summary = two_workers
    crashed = Trainer(sine_debug(*STEPS, *RAY, "runtime.workers=2"))
    crash_at(crashed, 25)  # the driver dies after this step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(progress=False)
    resumed = resume_trainer(crashed.run_dir)
    assert resumed.step == 20
    summary = resumed.fit(progress=False)
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)
    assert summary["eval"]["rows"] == whole_summary["eval"]["rows"]
    steps = [r["step"] for r in resumed.history]
    assert steps == [20, 29]  # logging resumed where the checkpoint left off, nothing logged twice


def test_trpo_on_navigation_sums_its_products_over_workers_as_the_local_executor_computes_them(local_ray, tmp_path):
    # The TRPO step's meta-gradient, Fisher-vector products and line-search losses are sums over the
    # workers' shards of the step's trajectories, which stay in the workers: 2 workers give the local
    # executor's sums (5 tasks: shares of 3 and 2), up to float32 summation order. A worker SIGKILLed
    # within the step is replaced, and the replacement, which never saw the step, samples its
    # trajectories again: the same products, bit for bit.
    from metadist.algorithms import make_spec
    from metadist.config import load_config
    from metadist.runtime.flat import Layout
    from metadist.runtime.local import LocalExecutor
    from metadist.runtime.ray_executor import RayExecutor

    from ..conftest import ROOT

    cfg = load_config(ROOT / "jobs/rl/maml-navigation-debug.yaml", [
        f"train.out_dir={tmp_path / 'runs'}", "task.shots=8", "task.query=8", *RAY, "runtime.workers=2"])
    params = Trainer(cfg).params
    spec = make_spec(cfg, 3, task_parallel="vmap")
    v = {k: torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) for k, p in params.items()}
    candidate = {k: p + 0.01 * v[k] for k, p in params.items()}
    local, remote = LocalExecutor(cfg), RayExecutor(cfg, Layout.of(params))
    try:
        sums = {}
        for name, ex in (("local", local), ("ray", remote)):
            step = ex.compute(params, 3, spec, 5)
            sums[name] = (step.grads, step.sums, ex.fvp(params, 3, spec, 5, v), ex.surrogate(params, 3, spec, 5, candidate))
        os.kill(remote.pids()[1], signal.SIGKILL)
        again = remote.fvp(params, 3, spec, 5, v)
        assert remote.restarts == 1
        assert all(torch.equal(again[k], sums["ray"][2][k]) for k in v)
        assert torch.equal(remote.surrogate(params, 3, spec, 5, candidate), sums["ray"][3])
    finally:
        remote.close()
    (g0, m0, h0, s0), (g1, m1, h1, s1) = sums["local"], sums["ray"]
    assert rel_err(g1, g0) < 1e-5 and rel_err(h1, h0) < 1e-5
    assert torch.allclose(s1, s0, rtol=1e-5) and m1["tasks"].item() == 5
    assert m1["return_after"].item() == pytest.approx(m0["return_after"].item(), rel=1e-5)
