"""Which MLflow store a process records to. No mlflow import: `metadist submit` asks it without loading MLflow.

The store is `tracking.uri`, else $MLFLOW_TRACKING_URI, else the store of the person who submitted the
job ($METADIST_SUBMITTER_TRACKING_URI, set by `metadist submit`), else a SQLite file `mlflow.db` in the
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

SUBMITTER_URI = "METADIST_SUBMITTER_TRACKING_URI"


def tracking_uri(configured: str | None = None) -> str:
    """The store to record to: the config's, else $MLFLOW_TRACKING_URI, else the submitter's, else
    ./mlflow.db (absolute)."""
    # A cluster's own MLFLOW_TRACKING_URI (a KubeRay pod's ConfigMap) wins over the submitter's, which
    # may be a laptop's port-forward or SQLite file that the cluster cannot reach.
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get(SUBMITTER_URI)
    if uri:
        return uri
    # Absolute, because Tune trials and Ray jobs change directory.
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
