"""The cluster-launcher YAMLs validate against the schema Ray itself ships, and pin the Ray version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ..conftest import ROOT

LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    images = [v for k, v in cfg["docker"].items() if k.endswith("image")]
    pinned = re.search(r"ray\[[^\]]+\]>=([\d.]+)", (ROOT / "pyproject.toml").read_text()).group(1)
    assert images and all(f"ray:{pinned}." in img for img in images), images
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_start_and_stop_scripts_are_valid_bash():
    import subprocess

    for script in ("start-head.sh", "stop-head.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / "cluster" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
