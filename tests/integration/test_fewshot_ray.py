"""The mini-ImageNet debug jobs on a synthetic dataset. Every algorithm's job meta-trains: after
training, one test-time step reaches a clearly lower loss on the test tasks than it did from the initial
parameters, and the final accuracy is far above chance. On Ray (2 workers streaming their own shards,
data.access: stream) MAML's job does the same. Drawn by index (the default for a local dataset), a worker
killed mid-step recomputes the same tasks, and a crashed driver resumes bit for bit with no position to
restore; the stream's position is restored by tests/unit/test_data.py.

The other algorithms, and the ResNet-12 jobs, run in-process: what Ray adds is the same for every
algorithm, and in-process they run beside the tests that use Ray (make test's parallel workers) instead
of after them. The ResNet-12 MAML job also runs on actors and on collective ranks, bit for bit alike."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from metadist.config import load_config
from metadist.data.synth import synth_dataset
from metadist.models import build_model
from metadist.runtime.checkpoint import load_checkpoint
from metadist.runtime.driver import Trainer

from ..conftest import ROOT, crash_at


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-debug")
    synth_dataset(out, per_class=30, size=32, seed=0, shard_bytes=150_000)
    return out


def _cfg(name, synth, tmp_path, *extra):
    return load_config(ROOT / f"jobs/miniimagenet/{name}-debug.yaml",
                       [f"data.path={synth}", f"train.out_dir={tmp_path}", "train.steps=30", "eval.episodes=40",
                        "runtime.cpus_per_worker=0.5", "tracking.enabled=false", *extra])


def _meta_trains(trainer: Trainer) -> dict:
    trainer.start()
    # On these easy synthetic classes even the initial parameters fine-tune well after 10 test-time steps,
    # so the test compares what meta-training is for: the loss after a single step.
    before = trainer.report(steps=1)["rows"][1]
    summary = trainer.fit(progress=False)
    rows = summary["eval"]["rows"]
    after = rows[1]
    assert after["loss_mean"] + after["loss_ci95"] < before["loss_mean"] - before["loss_ci95"], (before, after)
    # 5-way: chance is 20%.
    assert rows[-1]["mean"] - rows[-1]["ci95"] > 40.0, rows[-1]
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fomaml", "reptile", "anil", "metasgd",
                                  # ResNet-12 (16-32-64-128 at 32 px); MAML's with checkpointed inner steps
                                  "maml-resnet12", "anil-resnet12", "metasgd-resnet12"])
def test_every_algorithms_debug_job_meta_trains(name, synth, tmp_path):
    summary = _meta_trains(Trainer(_cfg(name, synth, tmp_path, "runtime.executor=local")))
    assert summary["runtime"]["executor"] == "local"


STREAM = ["data.access=stream", "algorithm.task_parallel=loop"]


@pytest.fixture(scope="module")
def stream_on_ray(synth, tmp_path_factory, local_ray):
    """MAML's debug job on 2 actors streaming their own shards: (trainer, summary)."""
    trainer = Trainer(_cfg("maml", synth, tmp_path_factory.mktemp("stream"), *STREAM))
    return trainer, _meta_trains(trainer)


@pytest.mark.slow
def test_debug_job_meta_trains_on_ray(stream_on_ray):
    summary = stream_on_ray[1]
    assert summary["runtime"]["executor"] == "ray" and summary["runtime"]["workers"] == 2


@pytest.mark.slow
def test_streamed_episodes_reach_collective_ranks_as_they_reach_actors(synth, tmp_path, stream_on_ray):
    """Rank r reads shards r, r+W, ... as actor r does, from the same position, and the checkpoint holds
    each rank's position. With 2 workers the all-reduced sum is the driver's sum (a + b = b + a), so the
    parameters agree bit for bit. (By index, a rank draws its tasks through the same TaskShard as an
    actor, by (seed, step, task index); tests/unit/test_data.py shows those do not depend on the split.)"""
    trainer = Trainer(_cfg("maml", synth, tmp_path, "runtime.executor=collective", *STREAM))
    trainer.fit(progress=False)
    ref = stream_on_ray[0]
    assert all(torch.equal(trainer.params[k], ref.params[k]) for k in ref.params)
    positions = load_checkpoint(trainer.run_dir / "checkpoint.pt")["data_cursor"]["workers"]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["consumed"] > 0 for p in positions)


# Per-step BatchNorm: the evaluation normalises with running statistics that only the driver updates.
SHORT = ["train.steps=12", "train.checkpoint_every=5", "eval.episodes=5", "model.bn=per_step"]


@pytest.fixture(scope="module")
def clean(synth, tmp_path_factory, local_ray):
    """The short MAML image run, uninterrupted: what a killed worker's or a crashed run's result must equal."""
    trainer = Trainer(_cfg("maml", synth, tmp_path_factory.mktemp("clean"), *SHORT))
    trainer.fit(progress=False)
    return trainer


def test_evaluation_on_the_workers_is_the_one_process_evaluation(clean):
    # The workers adapted 3 + 2 of the 5 fixed test episodes with the driver's parameters and running
    # statistics; gathered, their report is this process's own, bit for bit.
    report = json.loads((clean.run_dir / "eval.json").read_text())
    assert clean.executor is None and clean.report()["rows"] == report["rows"]
    # The running statistics matter to it: with a fresh model's, the same parameters score otherwise.
    trained = {k: v.clone() for k, v in clean.model.named_buffers()}
    clean.model.load_state_dict({**clean.model.state_dict(), **dict(build_model(clean.cfg).named_buffers())})
    try:
        assert clean.report()["rows"] != report["rows"]
    finally:
        clean.model.load_state_dict({**clean.model.state_dict(), **trained})


def test_a_corrupt_image_met_on_a_worker_is_the_users_one_line_error(synth, tmp_path, local_ray):
    # Every train image's bytes overwritten in place (the shards keep their sizes, so `verify: size` passes):
    # the worker that decodes one raises the data error, which the driver raises as itself, not as Ray's
    # task error with the worker's traceback.
    import numpy as np
    import shutil

    from metadist.data.format import DataError
    from metadist.data.manifest import Manifest

    bad = tmp_path / "bad"
    shutil.copytree(synth, bad)
    m = Manifest(bad)
    for row in m.rows("train"):
        with open(bad / m.samples["shard"][row], "r+b") as fh:
            fh.seek(int(m.samples["offset"][row]))
            fh.write(np.full(int(m.samples["size"][row]), 7, np.uint8).tobytes())
    trainer = Trainer(_cfg("maml", bad, tmp_path, *SHORT))
    with pytest.raises(DataError, match="cannot decode image") as err:
        trainer.fit(progress=False)
    # Ray's error is also an instance of the cause's class, and its text holds the worker's traceback.
    assert type(err.value) is DataError and "\n" not in str(err.value)


def test_killed_worker_recomputes_the_same_tasks(synth, tmp_path, clean):
    cfg = _cfg("maml", synth, tmp_path, *SHORT)
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
    # The replacement drew the step's tasks again by index: the same episodes, the same result.
    assert all(torch.equal(trainer.params[k], clean.params[k]) for k in clean.params)


def test_resumed_image_run_continues_bit_for_bit(synth, tmp_path, clean):
    from metadist.runtime.driver import resume_trainer

    cfg = _cfg("maml", synth, tmp_path, *SHORT)
    crashed = Trainer(cfg)
    crash_at(crashed, 8)  # the driver dies after this step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(progress=False)
    resumed = resume_trainer(crashed.run_dir)
    assert resumed.step == 5 and resumed.resume_data == [None, None]  # by index: the step is the position
    resumed.fit(progress=False)
    assert all(torch.equal(resumed.params[k], clean.params[k]) for k in clean.params)


@pytest.mark.slow
def test_resnet12_job_runs_on_actors_and_on_ranks_alike(synth, tmp_path, local_ray):
    """The ResNet-12 MAML debug job (checkpointed inner steps), with DropBlock on: 2 worker actors and 2
    collective ranks compute the same shards, draw the same DropBlock masks (seeded by the shard), and
    end with the same parameters bit for bit (a + b = b + a); the checkpoint setting is in the summary."""
    over = ["train.steps=2", "eval.episodes=4", "eval.steps=1", "model.drop_rate=0.1"]
    actors = Trainer(_cfg("maml-resnet12", synth, tmp_path / "actors", *over))
    initial = {k: v.clone() for k, v in actors.params.items()}
    summary = actors.fit(progress=False)
    assert summary["runtime"]["executor"] == "ray" and summary["throughput"]["inner_checkpoint"] is True
    ranks = Trainer(_cfg("maml-resnet12", synth, tmp_path / "ranks", *over, "runtime.executor=collective"))
    ranks.fit(progress=False)
    assert all(torch.equal(ranks.params[k], actors.params[k]) for k in actors.params)
    assert not any(torch.equal(actors.params[k], initial[k]) for k in initial)  # it did take steps
