"""Where a process records: its MLflow store and the folder its runs go under. No mlflow import:
`metadist submit` asks it without loading MLflow.

The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else the store of the person who submitted the
job ($METADIST_SUBMITTER_TRACKING_URI, set by `metadist submit`), else a SQLite file `mlflow.db` in the
working directory. Runs go under `train.out_dir`, else $METADIST_OUT_DIR, else `runs` in the working
directory (sweeps: their `out_dir`, else $METADIST_OUT_DIR/sweeps, else `runs/sweeps`).

A Ray job runs in Ray's copy of the working directory it was submitted with
(`<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/`), which Ray deletes when its
cache fills or the session ends, and where nobody looks. A job never writes there: without a store or
a folder of its own, it takes the cluster's ($MLFLOW_TRACKING_URI and $METADIST_OUT_DIR, which
cluster/start-head.sh sets on the head, whose jobs inherit them), and where the cluster sets none
either, it stops at once with one line that says what to set.
"""

from __future__ import annotations

import os
from pathlib import Path

from metadist.errors import UserError

SUBMITTER_URI = "METADIST_SUBMITTER_TRACKING_URI"
OUT_DIR = "METADIST_OUT_DIR"
# Where Ray unpacks a job's working directory: <temp>/session_*/runtime_resources/working_dir_files/<pkg>/
_PACKAGE_PARENTS = ("runtime_resources", "working_dir_files")


class PlaceError(UserError, ValueError):
    """A Ray job would write its results into Ray's temporary copy of its working directory."""


def ray_job_package(cwd: Path | None = None) -> Path | None:
    """The copy of a submitted working directory that this process runs in (a Ray job's), else None."""
    parts = (cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 2] == _PACKAGE_PARENTS:
            return Path(*parts[:i + 3])
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def _in_package(package: Path) -> str:
    return f"would be in Ray's temporary copy of this job's working directory ({package}), which Ray deletes"


def tracking_uri(configured: str | None = None) -> str:
    """The store to record to: the config's, else $MLFLOW_TRACKING_URI, else the submitter's, else
    ./mlflow.db (absolute); in a Ray job, never a SQLite file in the job's working directory."""
    # A cluster's own MLFLOW_TRACKING_URI (a KubeRay pod's ConfigMap) wins over the submitter's, which
    # may be a laptop's port-forward or SQLite file that the cluster cannot reach.
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get(SUBMITTER_URI)
    package = ray_job_package()
    if not uri:
        if package is not None:
            raise PlaceError(f"this Ray job has no MLflow store: ./mlflow.db {_in_package(package)}; set "
                             f"MLFLOW_TRACKING_URI in the cluster's environment (cluster/start-head.sh sets it "
                             f"and {OUT_DIR}), or tracking.uri")
        # Absolute, because Tune trials and Ray jobs change directory.
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    if package is not None and uri.startswith("sqlite:///") and _inside(Path(uri[len("sqlite:///"):]), package):
        raise PlaceError(f"MLflow store {uri}: it {_in_package(package)}; give a store outside it (an absolute "
                         f"sqlite:////path or a server)")
    return uri


def out_dir(configured: str | None, key: str, default: str, under: str = "") -> Path:
    """The folder runs go under: `configured` (config key `key`), else $METADIST_OUT_DIR (its subfolder
    `under`), else `default`; in a Ray job, never a folder in the job's working directory."""
    env = os.environ.get(OUT_DIR)
    path = Path(configured) if configured else (Path(env) / under if env else None)
    package = ray_job_package()
    if package is None:
        return path or Path(default)
    if path is None:
        raise PlaceError(f"this Ray job has no output folder: ./{default} {_in_package(package)}; set "
                         f"{OUT_DIR} in the cluster's environment (cluster/start-head.sh sets it and "
                         f"MLFLOW_TRACKING_URI), or {key} to an absolute path")
    if _inside(path, package):
        named = f"{key}={configured}" if configured else f"{OUT_DIR}={env}"
        raise PlaceError(f"{named}: it {_in_package(package)}; give an absolute path outside it")
    return path
