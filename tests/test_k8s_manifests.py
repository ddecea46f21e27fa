"""The KubeRay deployment (k8s/, Dockerfile) checked offline: schemas and cross-references.

- Every YAML document under k8s/ (except the app configs in k8s/configs/) is validated:
  built-in kinds against the strict Kubernetes JSON schemas that the `kubernetes-validate`
  package ships (no network), RayCluster / RayJob / RayService against the openAPIV3Schema of
  KubeRay's own CRDs kept verbatim in k8s/schemas/kuberay/ (their git blob ids checked against
  SOURCE.json), kustomization.yaml against k8s/schemas/kustomization*.json. Unknown fields are
  errors, as with `kubectl apply` (--validate=strict).
- Negative cases prove that the validator rejects broken manifests.
- Locked down: every Ray component (head, workers, autoscaler, job submitters, the operator via
  authOptions) runs with Ray token auth from a Secret, no container runs as root or can
  escalate, root filesystems are read-only with emptyDir scratch, every container has limits,
  and MLflow runs its basic-auth app behind a namespace-only ClusterIP Service (a live run of
  that app with the shipped settings refuses anonymous requests).
- Cross-references: one image and one Ray version everywhere (and in the Dockerfile), claims,
  ConfigMaps and Secrets that exist, Service selectors that match pods, MLFLOW_TRACKING_URI
  naming the MLflow Service, RayJob entrypoints that parse with the real CLI, the RayService's
  Serve config against Ray Serve's own schema and serving/app.py's builder.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
import os
import re
import hashlib
import shlex
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
CONFIGS = K8S / "configs"
K8S_VERSION = "1.33.0"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
KUBERAY = SCHEMAS / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KUSTOMIZATION_SCHEMA = "kustomization.kustomize.config.k8s.io.v1beta1.json"
SHARED_MOUNT = "/mnt/raytrieval"
CONFIG_MOUNT = "/etc/raytrieval"
RAY_TOKEN_SECRET = ("raytrieval-ray-token", "auth_token")  # KubeRay's key name for authOptions.secretName
SECRETS = {"raytrieval-db": {"username", "password"}, "raytrieval-api": {"token"},
           "raytrieval-ray-token": {"auth_token"}, "raytrieval-mlflow": {"username", "password", "secret-key"}}

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - the dev extra installs it
    kubernetes_validate = None


def need_kubernetes_schemas() -> None:
    """Fail in CI, skip elsewhere, when the Kubernetes schemas are not installed."""
    if kubernetes_validate is None:
        message = "kubernetes-validate is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --------------------------------------------------------------------------- loading


def manifest_paths() -> list[Path]:
    """Every Kubernetes manifest: the YAML files under k8s/ except the app configs."""
    return sorted(p for p in K8S.rglob("*.yaml") if CONFIGS not in p.parents and SCHEMAS not in p.parents)


def load_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


@lru_cache(maxsize=None)
def all_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in manifest_paths():
        for i, doc in enumerate(load_documents(path)):
            out.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return tuple(out)


def documents(kind: str | None = None) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for _, d in all_documents() if kind is None or d.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------- validation


def _k8s_schema_dir() -> Path:
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return base / f"v{K8S_VERSION}-local-strict"


@lru_cache(maxsize=None)
def _k8s_registry() -> Registry:
    defs = json.loads((_k8s_schema_dir() / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


def _strict(node: Any) -> Any:
    """A CRD schema with the API server's semantics for jsonschema (see k8s/schemas/README.md).

    Objects with `properties` are closed unless they preserve unknown fields, and
    `nullable: true` admits null.
    """
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "default", "example", "required") else
               {name: _strict(sub) for name, sub in v.items()} if k == "properties" else _strict(v))
           for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@lru_cache(maxsize=None)
def crd_document(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=loader)


def crd_schema(kind: str) -> dict[str, Any]:
    """The `v1` openAPIV3Schema of KubeRay's CRD for `kind`, verbatim."""
    crd = crd_document(kind)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"], f"{kind}: v1 is not KubeRay's served storage version"
    return copy.deepcopy(v1["schema"]["openAPIV3Schema"])


@lru_cache(maxsize=None)
def crd_validator(kind: str, with_k8s: bool) -> jsonschema.Draft4Validator:
    schema = _strict(crd_schema(kind))
    registry = Registry()
    if with_k8s:  # the resource's own metadata, which the CRD leaves as `type: object`
        meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        schema["properties"]["metadata"] = {"$ref": f"{K8S_DEFINITIONS}#/$defs/{meta}"}
        registry = _k8s_registry()
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, registry=registry)


@lru_cache(maxsize=None)
def k8s_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    # kubernetes-validate's file naming: apps/v1 -> apps-v1, networking.k8s.io/v1 -> networking-v1
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _k8s_schema_dir() / f"{kind.lower()}-{api}.json"
    if not path.is_file():
        raise AssertionError(f"no Kubernetes {K8S_VERSION} schema for {kind} {api_version}")
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one document, as 'path: message' strings."""
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if kind == "Kustomization":
        schema = json.loads((SCHEMAS / KUSTOMIZATION_SCHEMA).read_text())
        validator = jsonschema.Draft202012Validator(schema)
    elif api.startswith("ray.io/"):
        if kind not in CRD_FILES or api != "ray.io/v1":
            return [f"no KubeRay schema kept for {kind} {api}"]
        validator = crd_validator(kind, kubernetes_validate is not None)
    else:
        need_kubernetes_schemas()
        validator = k8s_validator(api, kind)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --------------------------------------------------------------------------- walking manifests


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        return [spec["rayClusterSpec"]]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, PodTemplateSpec) of every pod a document makes."""
    name = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield name, doc["spec"]["template"]
    for spec in cluster_specs(doc):
        yield f"{name} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{name} {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def all_pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(label, tpl, doc) for doc in documents() for label, tpl in pod_templates(doc)]


def ray_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{label}/{c['name']}", c) for label, tpl, doc in all_pods() if doc["apiVersion"].startswith("ray.io/")
            for c in tpl["spec"]["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def raytrieval_image() -> str:
    head = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return head["image"]


def kustomization(path: Path = K8S / "kustomization.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def generated_configmaps() -> dict[str, list[str]]:
    out = {}
    for gen in kustomization().get("configMapGenerator", []):
        out[gen["name"]] = [f.split("=", 1)[-1] for f in gen.get("files", [])]
    return out


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- schemas


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_kuberay_crds_are_the_recorded_upstream_files():
    source = json.loads((KUBERAY / "SOURCE.json").read_text())
    assert source["repository"] == "https://github.com/ray-project/kuberay"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", source["version"]) and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert set(source["files"]) == set(CRD_FILES.values()) == {p.name for p in KUBERAY.glob("*.yaml")}
    for name, blob in source["files"].items():
        path = KUBERAY / name
        assert _git_blob_id(path) == blob, f"{path} differs from KubeRay {source['version']}'s file"
        assert path.stat().st_size < 2_000_000, path
    readme = (SCHEMAS / "README.md").read_text()
    assert source["version"] in readme and source["commit"] in readme
    for kind in CRD_FILES:
        crd_validator(kind, False)  # a valid Draft 4 schema once made strict
    for path in SCHEMAS.glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_strict_schema_closes_objects_and_admits_nulls():
    opened = {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"b": {"type": "integer"}}}
    schema = _strict({"type": "object", "properties": {"a": {"type": "string", "nullable": True}, "open": opened}})
    v = jsonschema.Draft4Validator(schema)
    assert v.is_valid({"a": None, "open": {"b": 1, "extra": 2}})
    assert not v.is_valid({"a": 1}) and not v.is_valid({"unknown": 1})


def test_there_are_manifests_of_every_kind():
    kinds = {d["kind"] for d in documents()}
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim",
            "Namespace", "NetworkPolicy", "Kustomization"} <= kinds


@pytest.mark.parametrize("where", [w for w, _ in all_documents()])
def test_document_validates(where):
    doc = dict(all_documents())[where]
    assert schema_errors(copy.deepcopy(doc)) == []


# --------------------------------------------------------------------------- negative cases


def _errors_at(doc: dict[str, Any], path: str) -> list[str]:
    return [e for e in schema_errors(doc) if e.startswith(path)]


def test_rejects_a_worker_group_with_a_string_replica_count():
    doc = one("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["minReplicas"] = "two"
    assert _errors_at(doc, "spec.workerGroupSpecs.0.minReplicas")


def test_rejects_a_ray_cluster_without_head_group():
    doc = one("RayCluster")
    del doc["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in schema_errors(doc))


def test_rejects_non_string_ray_start_params_and_unknown_fields():
    doc = one("RayCluster")
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert _errors_at(doc, "spec.headGroupSpec.rayStartParams.num-cpus")
    assert any("maxReplica" in e for e in _errors_at(doc, "spec.workerGroupSpecs.0"))


def test_rejects_broken_ray_job_and_service_fields():
    job = one("RayJob", "raytrieval-train")
    job["spec"]["deletionPolicy"] = "DeleteEverything"  # KubeRay 1.7 knows deletionStrategy only
    job["spec"]["activeDeadlineSeconds"] = "1d"
    assert any("deletionPolicy" in e for e in _errors_at(job, "spec:"))
    assert _errors_at(job, "spec.activeDeadlineSeconds")
    cluster = one("RayCluster")
    cluster["spec"]["authOptions"]["mode"] = "none"
    assert _errors_at(cluster, "spec.authOptions.mode")
    service = one("RayService")
    service["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert _errors_at(service, "spec.serveConfigV2")


def test_rejects_a_broken_pod_template_inside_a_custom_resource():
    need_kubernetes_schemas()
    doc = one("RayCluster")
    gpu = doc["spec"]["workerGroupSpecs"][-1]["template"]["spec"]
    gpu["containers"][0]["imagePullPolicy"] = {"always": True}
    gpu["containers"][0]["ports"] = [{"containerPort": "eight thousand"}]
    gpu["tolerations"][0]["tolerationSeconds"] = "forever"
    errors = _errors_at(doc, "spec.workerGroupSpecs.1.template.spec")
    assert any(".containers.0.imagePullPolicy" in e for e in errors)
    assert any(".containers.0.ports.0.containerPort" in e for e in errors)
    assert any(".tolerations.0.tolerationSeconds" in e for e in errors)


def test_rejects_deployment_and_service_with_wrong_types():
    need_kubernetes_schemas()
    deployment = one("Deployment", "mlflow")
    deployment["spec"]["replicas"] = "one"
    deployment["spec"]["template"]["spec"]["containers"][0]["args"] = "--port=5000"
    assert _errors_at(deployment, "spec.replicas")
    assert _errors_at(deployment, "spec.template.spec.containers.0.args")
    service = one("Service", "mlflow")
    service["spec"]["ports"][0]["port"] = "five thousand"
    service["spec"]["selectr"] = {}
    assert _errors_at(service, "spec.ports.0.port")
    assert any("selectr" in e for e in schema_errors(service))


def test_rejects_a_misspelt_kustomization_field():
    doc = kustomization()
    doc["resource"] = doc.pop("resources")
    assert any("resource" in e for e in schema_errors(doc))


# --------------------------------------------------------------------------- cross-references


def test_one_image_and_one_ray_version_everywhere():
    image = raytrieval_image()
    name, _, tag = image.rpartition(":")
    for label, container in ray_containers():
        assert container["image"] == image, label
    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["image"] == image
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert tag == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert {"name": name, "newTag": tag} in kustomization()["images"]

    versions = {spec["rayVersion"] for doc in documents() for spec in cluster_specs(doc)}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert versions == {re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)}
    from packaging.specifiers import SpecifierSet

    ray_range = re.search(r'"ray\[[^\]]*\]([^"]+)"', pyproject).group(1)
    assert versions.pop() in SpecifierSet(ray_range)


def test_claims_configmaps_and_secrets_exist():
    claims = {d["metadata"]["name"]: d for d in documents("PersistentVolumeClaim")}
    configmaps = set(generated_configmaps()) | {d["metadata"]["name"] for d in documents("ConfigMap")}
    used_claims = set()
    for label, template, doc in all_pods():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{label}: mount of undeclared volume {mount['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in SECRETS.get(ref["name"], ()), f"{label}: secret {ref}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{label}: no PersistentVolumeClaim {claim}"
                used_claims.add(claim)
                if doc["apiVersion"].startswith("ray.io/"):  # mounted by many pods at once
                    assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{label}: no ConfigMap {volume['configMap']}"
    assert used_claims == set(claims), "a PersistentVolumeClaim nobody mounts"

    docs = (ROOT / "docs" / "scaling.md").read_text()
    for name, keys in SECRETS.items():  # not kept in the repository: the docs say how to make them
        assert f"create secret generic {name}" in docs, name
        for key in keys:
            assert f"--from-literal={key}=" in docs, (name, key)


def test_ray_pods_mount_shared_storage_and_configs():
    for doc in documents():
        for label, template in pod_templates(doc):
            if not doc["apiVersion"].startswith("ray.io/") or label.endswith("submitter"):
                continue
            mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0].get("volumeMounts", [])}
            assert SHARED_MOUNT in mounts and "/dev/shm" in mounts, label
            if doc["kind"] == "RayCluster":
                assert CONFIG_MOUNT in mounts, label


def test_services_and_network_policies_select_pods():
    pods = [(label, tpl["metadata"].get("labels", {}), tpl) for label, tpl, _ in all_pods()]
    for deployment in documents("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in documents("Service"):
        selector = service["spec"]["selector"]
        matches = [(label, tpl) for label, labels, tpl in pods if selector.items() <= labels.items()]
        assert matches, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                for label, tpl in matches:
                    names = {p.get("name") for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
                    assert port["targetPort"] in names, f"{label}: no container port {port['targetPort']}"
    for policy in documents("NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert any(selector.items() <= labels.items() for _, labels, _ in pods), policy["metadata"]["name"]


def mlflow_uri() -> str:
    service = one("Service", "mlflow")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_tracking_uri_names_the_mlflow_service():
    uri = mlflow_uri()
    services = {d["metadata"]["name"]: d for d in documents("Service")}
    for label, container in ray_containers():
        env = env_of(container)
        if label.endswith("ray-job-submitter"):
            continue
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, label
        parsed = urlparse(env["MLFLOW_TRACKING_URI"]["value"])
        service = services[parsed.hostname.split(".")[0]]
        assert parsed.port in {p["port"] for p in service["spec"]["ports"]}
    server = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--allowed-hosts="))
    assert urlparse(uri).netloc in allowed.split(",")
    assert any(a.startswith("--artifacts-destination=") for a in server["args"])
    backend = env_of(server)["MLFLOW_BACKEND_STORE_URI"]["value"]
    postgres = one("Service", "raytrieval-postgres")
    assert f"@{postgres['metadata']['name']}:{postgres['spec']['ports'][0]['port']}/" in backend
    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    pipeline = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    tune = yaml.safe_load((CONFIGS / "tune.yaml").read_text())
    assert train["tracking_uri"] == pipeline["train"]["tracking_uri"] == tune["tracking_uri"] == uri


def test_offline_and_telemetry_settings():
    for label, container in ray_containers():
        env = env_of(container)
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0", label
        if not label.endswith("ray-job-submitter"):
            assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true", label
    for doc in documents():
        for spec in cluster_specs(doc):
            assert spec["enableInTreeAutoscaling"] is True
            env = {e["name"]: e.get("value") for e in spec["autoscalerOptions"]["env"]}
            assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(mlflow)["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"


# --------------------------------------------------------------------------- locked down


def _secret_env(env: dict[str, dict[str, Any]], name: str) -> tuple[str, str] | None:
    ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def test_no_ray_component_runs_without_auth():
    specs = [spec for doc in documents() for spec in cluster_specs(doc)]
    assert len(specs) == 2  # the standing RayCluster and the RayService's cluster
    for spec in specs:  # the operator authenticates to the dashboard with the same Secret
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET[0]}
        env = env_of(spec["autoscalerOptions"])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert _secret_env(env, "RAY_AUTH_TOKEN") == RAY_TOKEN_SECRET
    labels = [label for label, _ in ray_containers()]
    assert sum(label.endswith("ray-job-submitter") for label in labels) == len(documents("RayJob")) >= 4
    for label, container in ray_containers():
        env = env_of(container)
        assert env["RAY_AUTH_MODE"].get("value") == "token", label
        assert _secret_env(env, "RAY_AUTH_TOKEN") == RAY_TOKEN_SECRET, label
    for where, doc in all_documents():  # nowhere switched off, in any spelling
        text = json.dumps(doc)
        assert not re.search(r'"RAY_AUTH_MODE", "value": "(?!token")', text), where
        assert '"mode": "disabled"' not in text, where


def _pod_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return containers(template)


def _every_container() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, container, pod spec) of every container, the KubeRay autoscaler sidecars included."""
    for label, template, doc in all_pods():
        for c in _pod_containers(template):
            yield f"{label}/{c['name']}", c, template["spec"]
    for doc in documents():
        for spec in cluster_specs(doc):
            head = spec["headGroupSpec"]["template"]["spec"]
            yield f"{doc['kind']}/{doc['metadata']['name']} autoscaler", spec["autoscalerOptions"], head


def test_no_container_runs_as_root_and_all_are_limited():
    seen = 0
    for label, container, pod in _every_container():
        seen += 1
        pod_ctx = pod.get("securityContext", {})
        ctx = container.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True or ctx.get("runAsNonRoot") is True, label
        for where in (pod_ctx, ctx):
            assert where.get("runAsUser", 1000) != 0 and where.get("runAsGroup", 1000) != 0, label
            assert where.get("privileged") is not True, label
        assert ctx.get("allowPrivilegeEscalation") is False, label
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"] and not ctx["capabilities"].get("add"), label
        assert ctx.get("readOnlyRootFilesystem") is True, label
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if "/tmp" in mounts:  # writable scratch is an emptyDir, never the image
            assert "emptyDir" in volumes[mounts["/tmp"]], label
        limits = container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(limits), label
    assert seen >= 14
    for label, template, _ in all_pods():
        assert template["spec"].get("hostNetwork") is not True and template["spec"].get("hostPID") is not True, label
        assert template["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", label


def test_ray_and_mlflow_containers_have_writable_scratch():
    for label, container, pod in _every_container():
        if label.endswith(("/wait-for-postgres", "/postgres")):
            continue
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, label  # Ray's session directory, Python's tempfile, MLflow's HOME
        if not label.startswith("Deployment/"):
            assert "/home/ray" in mounts, label


def _mlflow_container() -> dict[str, Any]:
    return one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def _auth_ini() -> tuple[Path, Any]:
    import configparser

    env = env_of(_mlflow_container())
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["mountPath"]: m for m in _mlflow_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]}
    mount = mounts[str(path.parent)]
    configmap = volumes[mount["name"]]["configMap"]["name"]
    (source,) = [f for f in generated_configmaps()[configmap] if Path(f).name == path.name]
    ini = configparser.ConfigParser()
    ini.read(K8S / source)
    return K8S / source, ini


def test_mlflow_is_not_exposed_without_auth():
    server = _mlflow_container()
    assert server["command"] == ["mlflow", "server"] and "--app-name=basic-auth" in server["args"]
    env = env_of(server)
    assert _secret_env(env, "MLFLOW_AUTH_ADMIN_USERNAME") == ("raytrieval-mlflow", "username")
    assert _secret_env(env, "MLFLOW_AUTH_ADMIN_PASSWORD") == ("raytrieval-mlflow", "password")
    assert _secret_env(env, "MLFLOW_FLASK_SERVER_SECRET_KEY") == ("raytrieval-mlflow", "secret-key")
    _, ini = _auth_ini()
    assert ini["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in ini["mlflow"]  # from the Secret, never from the repository
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    user_store = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    artifacts = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--artifacts-destination="))
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert str(Path(user_store).parent) in mounts and not user_store.startswith(artifacts)  # not served as an artifact
    # reachable inside the namespace only: a ClusterIP Service and a policy admitting this namespace's pods
    for service in documents("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not service["spec"].get("externalIPs"), service["metadata"]["name"]
    assert not documents("Ingress") and not documents("Route")
    (policy,) = [p for p in documents("NetworkPolicy")
                 if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "mlflow"}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"] == [{"podSelector": {}}], rule  # no namespaceSelector, no ipBlock
    for label, container in ray_containers():  # the clients log in with the same Secret
        if not label.endswith("ray-job-submitter"):
            env = env_of(container)
            assert _secret_env(env, "MLFLOW_TRACKING_USERNAME") == ("raytrieval-mlflow", "username"), label
            assert _secret_env(env, "MLFLOW_TRACKING_PASSWORD") == ("raytrieval-mlflow", "password"), label


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
def test_mlflow_basic_auth_app_with_the_shipped_settings_refuses_anonymous_requests(tmp_path):
    """`mlflow server` as mlflow.yaml runs it (the basic-auth app, k8s/mlflow/basic_auth.ini,
    admin from the environment), on 127.0.0.1 with SQLite stores in tmp_path."""
    pytest.importorskip("mlflow")
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (the dev extra)")
    import requests

    source, ini = _auth_ini()
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = _free_port()
    server = _mlflow_container()
    wanted = [a for a in server["args"] if a.startswith("--app-name=")]
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "k8s-test-Passw0rd!",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret", "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "mlflow", "server", *wanted, "--host=127.0.0.1", f"--port={port}", "--workers=1",
           f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow.db'}", "--serve-artifacts",
           f"--artifacts-destination={tmp_path / 'artifacts'}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(f"{base}/health", timeout=2).ok:  # the probes' path stays open
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        api = f"{base}/api/2.0/mlflow/experiments/search"
        assert requests.get(api, params={"max_results": 1}, timeout=30).status_code == 401
        assert requests.get(api, params={"max_results": 1}, auth=("admin", "wrong"), timeout=30).status_code == 401
        ok = requests.get(api, params={"max_results": 1}, auth=("admin", "k8s-test-Passw0rd!"), timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ray_cluster_groups_and_autoscaling_bounds():
    for doc in documents():
        for spec in cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # workers and the operator
            for group in spec["workerGroupSpecs"]:
                assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
            for _, template in pod_templates(doc):
                assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    cluster = one("RayCluster")
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert gpu and gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu[0]["template"]["spec"].get("tolerations", []))


def test_ray_jobs_select_the_cluster_and_parse_with_the_cli():
    from raytrieval.cluster.cli import build_parser

    cluster = one("RayCluster")["metadata"]["name"]
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    jobs = documents("RayJob")
    assert {j["metadata"]["name"] for j in jobs} >= {f"raytrieval-{s}" for s in ("pipeline", "train", "tune", "mine")}
    configs = generated_configmaps()["raytrieval-configs"]
    missing = []
    for job in jobs:
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster}, job["metadata"]["name"]
        assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes")
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "raytrieval"
        if "--config" in argv:
            path = argv[argv.index("--config") + 1]
            assert path.startswith(CONFIG_MOUNT + "/") and f"configs/{Path(path).name}" in configs, path
        if argv[1] not in commands:  # a subcommand another change adds
            missing.append(argv[1])
            continue
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:  # argparse's way of saying no
            raise AssertionError(f"{job['metadata']['name']}: {spec['entrypoint']!r} does not parse") from exc
    if missing:
        pytest.skip(f"CLI has no subcommand(s) {missing} yet; the other entrypoints parse")


def test_config_files_match_their_dataclasses():
    from raytrieval.cluster.pipeline import PipelineConfig
    from raytrieval.trainers.config import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    TrainConfig.from_yaml(CONFIGS / "train.yaml")  # full validation (no paths are opened)
    pipeline = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    assert set(pipeline) <= {f.name for f in dataclasses.fields(PipelineConfig)}
    assert set(pipeline["train"]) <= train_fields
    assert pipeline["serve"] is False  # the RayService serves; a job must end
    from raytrieval.trainers.sweep_config import SweepConfig

    SweepConfig.from_yaml(CONFIGS / "tune.yaml")  # full validation, search space included
    assert set(generated_configmaps()["raytrieval-configs"]) == {f"configs/{p.name}" for p in CONFIGS.glob("*.yaml")}


def test_ray_service_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)  # Ray Serve's own validation of the file
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]

    module, _, builder = app["import_path"].partition(":")
    assert module.startswith("raytrieval.")  # installed name; the source tree keeps serving/ at the top
    source = (ROOT / Path(*module.split(".")[1:])).with_suffix(".py")
    tree = ast.parse(source.read_text())
    assert builder in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, app["import_path"]
    app_args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AppArgs")
    fields = {s.target.id for s in app_args.body if isinstance(s, ast.AnnAssign)}
    assert set(app["args"]) <= fields, set(app["args"]) - fields
    deployments = {kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "attr", "") == "deployment"
                   for kw in node.keywords if kw.arg == "name"}
    assert {d["name"] for d in app["deployments"]} <= deployments
    embedder = next(d for d in app["deployments"] if d["name"] == "Embedder")
    assert embedder["num_replicas"] == "auto" and embedder["autoscaling_config"]["max_replicas"] > 1

    pipeline = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    assert app["args"]["index"] == f"{pipeline['run_dir']}/index"
    assert app["args"]["checkpoint"] == f"{pipeline['run_dir']}/train/finetune/final"
    assert app["args"]["index"].startswith(SHARED_MOUNT + "/")

    service = one("RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    hosts = app["args"]["public_hosts"]  # the Host allowlist names the Service KubeRay makes, <name>-serve-svc
    assert f"{service['metadata']['name']}-serve-svc" in hosts
    assert f"{service['metadata']['name']}-serve-svc.{service['metadata']['namespace']}.svc.cluster.local" in hosts
    for label, container in ray_containers():
        if label.startswith("RayService/"):  # Serve listens on 0.0.0.0: the API needs its token
            assert env_of(container)["RAYTRIEVAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "raytrieval-api"


def test_kustomization_lists_the_standing_resources():
    k = kustomization()
    assert k["namespace"] == one("Namespace")["metadata"]["name"]
    listed = {K8S / r for r in k["resources"]}
    assert all(p.is_file() for p in listed)
    top = {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == top, "every top-level manifest belongs to the kustomization"
    assert all((K8S / f).is_file() for f in generated_configmaps()["raytrieval-configs"])
    assert k["generatorOptions"]["disableNameSuffixHash"] is True  # names used inside custom resources
    for doc in documents():
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == k["namespace"], doc["metadata"]["name"]


def test_dockerfile_follows_the_ray_image_conventions():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))
    stages = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert stages and all(s.replace("${PYTHON_VERSION}", args["PYTHON_VERSION"]) == "python:3.11-slim" for s in stages)
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))]
    after = lines[lines.index(final):]
    user = [ln.split()[1] for ln in after if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert "EXTRAS" in args and args["EXTRAS"] in ('""', "")
    run = " ".join(ln for ln in after if ln.startswith("RUN "))
    assert "wget" in run, "KubeRay's probes use wget"
    # `bash -lc` (KubeRay) resets PATH from /etc/profile: no venv, console scripts in /usr/local/bin
    assert "-m venv" not in text and "VIRTUAL_ENV" not in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "runs", ".git", "mlruns"} <= ignored
