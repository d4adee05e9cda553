"""Shared fixtures: small configs that run in seconds on a 2-core CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metadist.config import load_config
from metadist.net import free_port  # noqa: F401  (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


def sine_config(out: Path, *overrides: str):
    """The sinusoid MAML debug job, shortened further, writing its runs under `out`."""
    return load_config(ROOT / "jobs/sine/maml-debug.yaml",
                       [f"train.out_dir={out / 'runs'}", "train.steps=40", "train.log_every=10",
                        "eval.episodes=40", "eval.steps=3", "algorithm.task_parallel=vmap", *overrides])


@pytest.fixture
def sine_debug(tmp_path):
    """`sine_config` writing into the test's temporary folder."""
    return lambda *overrides: sine_config(tmp_path, *overrides)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables created and nothing in it, made once for the session:
    creating the tables costs about 1.5 s here, copying the file a millisecond."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def new_store(tmp_path_factory, empty_store: Path, name: str = "store") -> str:
    """The URI of a fresh copy of `empty_store`, in a folder of its own."""
    path = tmp_path_factory.mktemp(name) / "mlflow.db"
    shutil.copyfile(empty_store, path)
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path_factory, monkeypatch, empty_store):
    """Every test that records to MLflow records to its own SQLite store, never to ./mlflow.db. The store
    starts as a copy of `empty_store`, in a folder of its own beside the test's `tmp_path` (which stays
    empty for the test to inspect); metadist creates its experiments with their artifacts beside the
    database, so nothing of one test's store points at another's folder."""
    uri = new_store(tmp_path_factory, empty_store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def crash_at(trainer, step: int) -> None:
    """Make `trainer` die right after outer step `step`, as a driver killed with Ctrl-C would."""
    from metadist.runtime.driver import Callback, Every

    def crash(t):
        if t.step == step:
            raise KeyboardInterrupt

    trainer.callbacks.append(Callback(Every(1), crash))


def rel_err(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of two parameter dicts."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    den = sum((b[k] ** 2).sum() for k in b).sqrt()
    return (num / den).item()





RAY_MODULE = "tests/integration/test_ray_runtime.py::"  # a module whose every test uses Ray


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`), the tests that use this
    process's Ray run in one worker, one after another, as without xdist: they share one local Ray, and
    stop and start it around the modules that need it stopped. The modules whose commands start a Ray of
    their own (tune, a head) name their own group; the other tests run beside both."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and \
                {"local_ray", "no_local_ray"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.hookimpl(trylast=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Refuse to run if the grouping above did not take effect. xdist marks a group by a suffix on each
    node id, which pytest 9.2 no longer keeps (pytest-xdist issue 1386): the Ray tests would then run in
    two workers at once."""
    if node.config.option.dist == "loadgroup" and any(RAY_MODULE in i for i in ids) and not any(
            i.endswith("@ray") for i in ids):
        raise pytest.UsageError("--dist loadgroup did not group the Ray tests (pytest-xdist issue 1386 with "
                                "pytest 9.2); install the pytest pinned in pyproject.toml")
