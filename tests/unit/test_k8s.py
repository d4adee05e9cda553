"""Kubernetes manifests (KubeRay and the MLflow server): every document parses and has the fields its
kind requires; no Secret with data is committed; jobs name files that exist; every Secret they use is
one docs/deploy.md creates.

Schemas: the plain kinds (Deployment, StatefulSet, Service, Job, ConfigMap) validate strictly (no
unknown field) against the Kubernetes OpenAPI schemas that kubernetes-validate ships, for the oldest
and newest Kubernetes the docs name. No offline schema knows KubeRay's CRDs, so their Ray fields are
checked here by hand and their pod templates validate as Kubernetes PodTemplates."""

from __future__ import annotations

import re
import shlex

import kubernetes_validate
import pytest
import yaml

from ..conftest import ROOT

MANIFESTS = sorted([*(ROOT / "infra/k8s").rglob("*.yaml"), *(ROOT / "infra/mlflow/k8s").glob("*.yaml")])


def _docs():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(ROOT), doc


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def test_there_are_manifests():
    kinds = {doc["kind"] for _, doc in _docs()}
    assert {"RayCluster", "RayJob", "ConfigMap"} <= kinds


@pytest.mark.parametrize("path, doc", list(_docs()), ids=lambda x: str(x) if not isinstance(x, dict) else x["kind"])
def test_manifest_has_what_its_kind_requires(path, doc):
    assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a DNS-1123 name"
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Secret":
        pytest.fail(f"{path}: credentials are created with kubectl, never committed")
    if kind == "RayCluster":
        assert doc["apiVersion"] == "ray.io/v1"
        assert spec["rayVersion"] == _image_ray_version()  # which test_infra checks against pyproject
        head = spec["headGroupSpec"]
        assert "rayStartParams" in head and _containers(head["template"])
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and "rayStartParams" in group
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for c in _containers(group["template"]):
                res = c["resources"]
                assert res["limits"].get("nvidia.com/gpu") == res["requests"].get("nvidia.com/gpu"), \
                    "extended resources need requests == limits"
    if kind == "RayJob":
        assert doc["apiVersion"] == "ray.io/v1"
        assert spec.get("clusterSelector") or spec.get("rayClusterSpec")
        args = shlex.split(spec["entrypoint"])
        assert args[:3] == ["python", "-m", "metadist.cli"] and args[3] in ("train", "tune")
        assert (ROOT / args[4]).is_file(), f"{args[4]} is not in the repository"
    if kind in ("Deployment", "StatefulSet"):
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        _containers(spec["template"])
    if kind == "Service":
        assert spec["selector"] and spec["ports"]


KUBERNETES = ("1.29.0", "1.37.0")  # docs/deploy.md: "Kubernetes 1.29 or later"


@pytest.mark.parametrize("version", KUBERNETES)
# Kubernetes' own groups (v1, apps/v1, batch/v1) have no dot; custom ones (ray.io/v1) do.
@pytest.mark.parametrize("path, doc", [(p, d) for p, d in _docs() if "." not in d["apiVersion"].split("/")[0]],
                         ids=lambda x: str(x) if not isinstance(x, dict) else f"{x['kind']}-{x['metadata']['name']}")
def test_plain_kinds_validate_against_the_kubernetes_schema(path, doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{path} {doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"]),
                *[(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]]
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
    return []


def test_kuberay_pod_templates_validate_as_kubernetes_pod_templates():
    seen = 0
    for path, doc in _docs():
        for name, template in _pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
            for version in KUBERNETES:
                try:
                    kubernetes_validate.validate(wrapped, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    pytest.fail(f"{path} {name} pod template: {err.message} at {list(err.path)}")
            seen += 1
    assert seen >= 2  # the head and the GPU group


def test_ray_token_authentication_is_on():
    (cluster,) = [doc for _, doc in _docs() if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"]["mode"] == "token"


def test_every_secret_a_manifest_uses_is_created_in_the_walkthrough():
    used: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("secretRef", "secretKeyRef") and isinstance(value, dict):
                    used.add(value["name"])
                elif key == "authOptions" and "secretName" in value:
                    used.add(value["secretName"])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for _, doc in _docs():
        walk(doc)
    created = set(re.findall(r"create secret generic ([\w-]+)", (ROOT / "docs/deploy.md").read_text()))
    assert used and used <= created, f"used but never created in docs/deploy.md: {used - created}"


def _image_ray_version() -> str:
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    return re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)


def test_rayjob_entrypoints_are_valid_metadist_commands():
    # The same check `metadist submit` makes on a laptop: a typo in a key fails here, not on the cluster.
    from metadist.config import load_config
    from metadist.sweeps.plan import load_sweep, plan_sweep

    jobs = [doc for _, doc in _docs() if doc["kind"] == "RayJob"]
    assert {shlex.split(j["spec"]["entrypoint"])[3] for j in jobs} == {"train", "tune"}
    executors = set()
    for job in jobs:
        args = shlex.split(job["spec"]["entrypoint"])
        overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        if args[3] == "tune":
            plan = plan_sweep(load_sweep(ROOT / args[4], overrides), ROOT / args[4])
            assert plan.job["runtime"]["device"] == "cuda" and plan.job["runtime"]["gpus_per_worker"] == 1
        else:
            cfg = load_config(ROOT / args[4], overrides)
            assert cfg.runtime.device == "cuda" and cfg.runtime.gpus_per_worker == 1
            executors.add(cfg.runtime.executor)
    assert executors == {"ray", "collective"}  # a training RayJob for each distributed path


def test_every_ray_pod_mounts_the_shared_volume_that_sweeps_write_to():
    docs = [doc for _, doc in _docs()]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "metadist-shared")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node mounts it at once
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    mounts = set()
    for _, template in _pod_templates(cluster):
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
        for c in template["spec"]["containers"]:
            paths = {m["mountPath"] for m in c["volumeMounts"] if volumes.get(m["name"]) == "metadist-shared"}
            assert len(paths) == 1, f"{c['name']} does not mount metadist-shared"
            mounts |= paths
        assert set(volumes.values()) <= claims
    (mount,) = mounts  # the same path on every pod
    # A job that names no output folder writes under the head's METADIST_OUT_DIR (the jobs' drivers run
    # there), which must be on the shared volume too, not in Ray's copy of the job's working directory.
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (out,) = [e["value"] for e in head["env"] if e["name"] == "METADIST_OUT_DIR"]
    assert out.startswith(mount + "/")
    for job in (d for d in docs if d["kind"] == "RayJob"):
        args = shlex.split(job["spec"]["entrypoint"])
        key = "out_dir" if args[3] == "tune" else "train.out_dir"
        (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
        assert value.startswith(mount + "/"), f"{job['metadata']['name']}: {key} is not on the shared volume"


def test_pods_get_mlflow_settings_from_configmap_and_secret():
    for path, doc in _docs():
        if doc["kind"] != "RayCluster":
            continue
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        for group in groups:
            for c in _containers(group["template"]):
                refs = {next(iter(r)): next(iter(r.values()))["name"] for r in c["envFrom"]}
                assert refs == {"configMapRef": "mlflow-tracking", "secretRef": "mlflow-credentials"}


def test_every_secret_key_used_is_in_the_documented_kubectl_command():
    text = "\n".join(p.read_text() for p in (ROOT / "infra/mlflow/k8s").glob("*.yaml"))
    used = set(re.findall(r"secretKeyRef: \{name: mlflow-server, key: (\w+)\}", text))
    created = set(re.findall(r"--from-literal=(\w+)=", (ROOT / "infra/mlflow/k8s/mlflow.yaml").read_text()))
    assert used and used <= created
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= created  # minio.yaml takes them through envFrom
