"""Shared fixtures: small configs that run in seconds on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from metadist.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sine_debug(tmp_path):
    """The sinusoid MAML debug job, shortened further, writing into a temporary folder."""
    def make(*overrides: str):
        return load_config(ROOT / "jobs/sine/maml-debug.yaml",
                           [f"train.out_dir={tmp_path / 'runs'}", "train.steps=40", "train.log_every=10",
                            "eval.episodes=40", "eval.steps=3", "algorithm.task_parallel=vmap",
                            *overrides])
    return make


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """Every test that records to MLflow records to its own SQLite store, never to ./mlflow.db."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def crash_at(trainer, step: int) -> None:
    """Make `trainer` die right after outer step `step`, as a driver killed with Ctrl-C would."""
    from metadist.runtime.driver import Callback, Every

    def crash(t):
        if t.step == step:
            raise KeyboardInterrupt

    trainer.callbacks.append(Callback(Every(1), crash))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: nothing listens on it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
