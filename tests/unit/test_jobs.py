"""Every job file loads, and every full job has a small -debug sibling with the same protocol."""

from __future__ import annotations

import pytest

from metadist.config import load_config, to_dict

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
