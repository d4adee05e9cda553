"""Every algorithm's mini-ImageNet debug job trains on Ray (2 workers streaming their own shards of a
synthetic dataset) and ends clearly above chance; a worker killed mid-step resumes its stream."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from metadist.config import load_config
from metadist.data.synth import synth_dataset
from metadist.runtime.driver import Trainer

from ..conftest import ROOT, crash_at


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-debug")
    synth_dataset(out, per_class=30, size=32, seed=0, shard_bytes=150_000)
    return out


def _cfg(name, synth, tmp_path, *extra):
    return load_config(ROOT / f"jobs/miniimagenet/{name}-debug.yaml",
                       [f"data.path={synth}", f"train.out_dir={tmp_path}", "train.steps=80", "eval.episodes=40",
                        "runtime.cpus_per_worker=0.5", "tracking.enabled=false", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "anil", "metasgd"])
def test_debug_job_trains_above_chance_on_ray(name, synth, tmp_path, local_ray):
    summary = Trainer(_cfg(name, synth, tmp_path)).fit(progress=False)
    rows = summary["eval"]["rows"]
    assert summary["runtime"]["workers"] == 2
    # 5-way: chance is 20%.
    assert rows[-1]["mean"] - rows[-1]["ci95"] > 40.0, rows[-1]


def test_killed_worker_continues_its_stream(synth, tmp_path, local_ray):
    cfg = _cfg("maml", synth, tmp_path, "train.steps=12", "eval.episodes=5")
    clean = Trainer(cfg)
    clean.fit(progress=False)
    killed = []

    def kill(step, executor):
        if step == 6 and not killed:
            killed.append(executor.pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    trainer = Trainer(cfg)
    trainer.start()
    trainer.executor.after_submit = kill
    summary = trainer.fit(progress=False)
    assert killed and summary["runtime"]["worker_restarts"] == 1
    # The replacement re-read its stream up to where the step began: the same episodes, the same result.
    assert all(torch.equal(trainer.params[k], clean.params[k]) for k in clean.params)


def test_resumed_image_run_continues_each_workers_stream(synth, tmp_path, local_ray):
    from metadist.runtime.driver import resume_trainer

    cfg = _cfg("maml", synth, tmp_path, "train.steps=12", "train.checkpoint_every=5", "eval.episodes=5",
               "tracking.enabled=false")
    clean = Trainer(cfg)
    clean.fit(progress=False)

    crashed = Trainer(cfg)
    crash_at(crashed, 8)  # the driver dies after this step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(progress=False)
    resumed = resume_trainer(crashed.run_dir)
    assert resumed.step == 5 and len(resumed.resume_data) == 2 and resumed.resume_data[0]["consumed"] > 0
    resumed.fit(progress=False)
    assert all(torch.equal(resumed.params[k], clean.params[k]) for k in clean.params)
