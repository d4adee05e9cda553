"""Every job file loads, and every full job has a small -debug sibling with the same protocol."""

from __future__ import annotations

import pytest

from metadist.config import flatten, load_config, to_dict

from ..conftest import ROOT

JOBS = sorted(p for p in (ROOT / "jobs").rglob("*.yaml") if "sweeps" not in p.parts)  # sweeps: test_sweep.py


@pytest.mark.parametrize("path", JOBS, ids=[str(p.relative_to(ROOT)) for p in JOBS])
def test_job_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


FULL = [p for p in JOBS if not p.stem.endswith("-debug") and p.parent.name != "jobs"]


@pytest.mark.parametrize("path", FULL, ids=[str(p.relative_to(ROOT)) for p in FULL])
def test_full_job_has_a_debug_sibling_with_the_same_protocol(path):
    debug = path.with_name(f"{path.stem}-debug.yaml")
    assert debug.is_file(), f"{path} needs a small sibling {debug.name}"
    full, small = to_dict(load_config(path)), to_dict(load_config(debug))
    if full["task"]["family"] == "sinusoid":
        for section in ("task", "model", "algorithm", "inner", "outer"):
            assert full[section] == small[section], section
    else:
        # Image jobs shrink images, filters and the inner loop to fit a 2-core CPU; the kind of problem
        # and the algorithm stay.
        for key in ("task.family", "task.ways", "task.shots", "model.name", "model.channels", "model.bn",
                    "algorithm.name", "outer.optimizer"):
            section, field = key.split(".")
            assert full[section][field] == small[section][field], key
    assert small["train"]["steps"] <= 1000


def test_sine_job_is_the_paper_protocol():
    cfg = load_config(ROOT / "jobs/sine/maml.yaml")
    assert (cfg.model.hidden, cfg.task.shots, cfg.inner.steps, cfg.inner.lr) == ([40, 40], 10, 1, 0.01)
    assert (cfg.outer.optimizer, cfg.outer.lr, cfg.train.meta_batch, cfg.train.steps) == ("adam", 1e-3, 25, 70000)
    assert (cfg.eval.shots, cfg.eval.episodes, cfg.eval.steps) == (5, 600, 10)
    assert cfg.task.amplitude == (0.1, 5.0) and cfg.task.x_range == (-5.0, 5.0)


@pytest.mark.parametrize("name", ["maml-stable", "fomaml", "metasgd", "reptile", "pretrain"])
def test_sine_rows_are_scored_under_the_paper_protocol(name):
    """Every row of the README's sinusoid table is evaluated as jobs/sine/maml.yaml is (5-shot, 600 test
    tasks, 0..10 steps at 0.01), whatever it changes in training; the stable job changes only the inner
    loop's length and the loss over its steps."""
    paper = flatten(to_dict(load_config(ROOT / "jobs/sine/maml.yaml")))
    job = flatten(to_dict(load_config(ROOT / f"jobs/sine/{name}.yaml")))
    evaluation = [k for k in paper if k.startswith("eval.") and k != "eval.lr"]
    assert [job[k] for k in evaluation] == [paper[k] for k in evaluation]
    # The test-time rate (eval.lr, else inner.lr): the paper's 0.01; Meta-SGD's rates start there and are learned.
    assert (job["eval.lr"] or job["inner.lr"]) == 0.01
    model = [k for k in paper if k.startswith("model.")]
    assert job["task.family"] == "sinusoid" and [job[k] for k in model] == [paper[k] for k in model]
    if name == "maml-stable":
        changed = {k for k, v in paper.items() if job[k] != v} - {"name"}
        assert changed == {"inner.steps", "algorithm.msl", "algorithm.msl_anneal_steps", "train.eval_every",
                           "eval.lr"}, changed
        assert job["algorithm.msl_anneal_steps"] > job["train.steps"]  # the weights stay uniform


OMNIGLOT_DEBUG = sorted((ROOT / "jobs/omniglot").glob("*-debug.yaml"))


@pytest.fixture(scope="module")
def omniglot_like(tmp_path_factory):
    """28 px grayscale shards with 20 classes in every split, 12 images each (Reptile's 10 shots + 1)."""
    from metadist.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth-omniglot")
    synth_dataset(out, per_class=12, size=28, seed=0, classes={"train": 20, "val": 20, "test": 20},
                  fmt="png", channels=1)
    return out


@pytest.mark.parametrize("path", OMNIGLOT_DEBUG, ids=[p.stem for p in OMNIGLOT_DEBUG])
def test_omniglot_debug_jobs_train(path, omniglot_like, tmp_path):
    from metadist.runtime.driver import Trainer

    cfg = load_config(path, [f"data.path={omniglot_like}", f"train.out_dir={tmp_path}", "train.steps=2",
                             "train.eval_every=2", "train.meta_batch=2", "eval.episodes=2", "eval.val_episodes=2",
                             "eval.steps=1", "tracking.enabled=false", "runtime.threads=1"])
    assert cfg.model.downsample == "stride" and cfg.task.rotations == (0, 90, 180, 270)
    trainer = Trainer(cfg)
    summary = trainer.fit(progress=False)
    assert trainer.model.feature_dim == cfg.model.filters * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2
    assert [r["steps"] for r in summary["eval"]["rows"]] == [0, 1]
    assert all(0 <= r["mean"] <= 100 for r in summary["eval"]["rows"])
    assert "val_accuracy" in summary["metrics"]
