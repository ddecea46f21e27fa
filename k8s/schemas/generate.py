"""Write the KubeRay v1 JSON Schemas kept beside this file (rayclusters/rayjobs/rayservices).

Run from the repository root after editing the tables below:

    .venv/bin/python k8s/schemas/generate.py

The schemas are the ``openAPIV3Schema`` of the KubeRay ``ray.io/v1`` CRDs, transcribed from
the Go API types of ray-project/kuberay (``ray-operator/apis/ray/v1/raycluster_types.go``,
``rayjob_types.go``, ``rayservice_types.go``) with controller-gen's rules (a json tag with
``omitempty`` or a ``+optional`` marker is optional, ``int32`` is ``integer``/``int32``,
``map[string]string`` is an object of strings, ``+kubebuilder:default`` and ``Enum`` markers
kept, ``XValidation`` rules of the form ``self in [...]`` turned into ``enum``), and checked
against the generated CRDs in ``ray-operator/config/crd/bases/`` (required lists of
``headGroupSpec`` and ``workerGroupSpecs``, formats).

Two deliberate differences from the CRDs, both documented in k8s/schemas/README.md:

- Embedded Kubernetes types (the PodTemplateSpec of every group, Services, EnvVars,
  ResourceRequirements, ...) are not copied (they make the CRDs 0.7 to 2 MB). Each is a node
  ``{"type": "object", "x-kubernetes-preserve-unknown-fields": true,
  "x-raytrieval-k8s-type": "<Kubernetes definition name>"}``: valid on its own, and the test
  (tests/test_k8s_manifests.py) swaps it for a ``$ref`` into the Kubernetes definitions that
  the `kubernetes-validate` package ships, so pod templates are validated field by field.
- Objects are closed (``additionalProperties: false``), as ``kubectl apply`` does with its
  default ``--validate=strict`` (an unknown field is an error, not silently pruned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = "ray-project/kuberay ray-operator/apis/ray/v1/*_types.go (KubeRay v1 API), cross-checked with ray-operator/config/crd/bases/ray.io_*.yaml"

# --------------------------------------------------------------------------- building blocks


def k8s(name: str) -> dict[str, Any]:
    """An embedded Kubernetes type (resolved by the test against kubernetes-validate)."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "x-raytrieval-k8s-type": name}


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = sorted(required)
    out.update(extra)
    return out


def string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def boolean(**extra: Any) -> dict[str, Any]:
    return {"type": "boolean", **extra}


def int32(**extra: Any) -> dict[str, Any]:
    return {"type": "integer", "format": "int32", **extra}


def int64(**extra: Any) -> dict[str, Any]:
    return {"type": "integer", "format": "int64", **extra}


def number(**extra: Any) -> dict[str, Any]:
    return {"type": "number", **extra}


def string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


def time(nullable: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "format": "date-time"}
    if nullable:
        out = {"type": ["string", "null"], "format": "date-time", "nullable": True}
    return out


QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
    "x-kubernetes-int-or-string": True,
}

MANAGED_BY = string(enum=["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"],
                    description="immutable; XValidation `self in [...]` of the CRD")

# --------------------------------------------------------------------------- RayCluster

AUTOSCALER_OPTIONS = obj({
    "resources": k8s("io.k8s.api.core.v1.ResourceRequirements"),
    "image": string(),
    "imagePullPolicy": string(),
    "securityContext": k8s("io.k8s.api.core.v1.SecurityContext"),
    "idleTimeoutSeconds": int32(),
    "upscalingMode": string(enum=["Default", "Aggressive", "Conservative"]),
    "env": array(k8s("io.k8s.api.core.v1.EnvVar")),
    "envFrom": array(k8s("io.k8s.api.core.v1.EnvFromSource")),
    "volumeMounts": array(k8s("io.k8s.api.core.v1.VolumeMount")),
})

REDIS_CREDENTIAL = obj({"valueFrom": k8s("io.k8s.api.core.v1.EnvVarSource"), "value": string()})

GCS_FT_OPTIONS = obj({
    "redisUsername": REDIS_CREDENTIAL,
    "redisPassword": REDIS_CREDENTIAL,
    "externalStorageNamespace": string(),
    "redisAddress": string(),
}, required=("redisAddress",))

HEAD_GROUP_SPEC = obj({
    "template": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
    "headService": k8s("io.k8s.api.core.v1.Service"),
    "enableIngress": boolean(),
    "rayStartParams": string_map(),
    "serviceType": string(),
}, required=("rayStartParams", "template"))

WORKER_GROUP_SPEC = obj({
    "suspend": boolean(),
    "groupName": string(),
    "replicas": int32(default=0),
    "minReplicas": int32(default=0),
    "maxReplicas": int32(default=2147483647),
    "idleTimeoutSeconds": int32(),
    "rayStartParams": string_map(),
    "template": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
    "scaleStrategy": obj({"workersToDelete": array(string())}),
    "numOfHosts": int32(default=1),
}, required=("groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"))

RAY_CLUSTER_SPEC = obj({
    "suspend": boolean(),
    "managedBy": MANAGED_BY,
    "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headServiceAnnotations": string_map(),
    "enableInTreeAutoscaling": boolean(),
    "gcsFaultToleranceOptions": GCS_FT_OPTIONS,
    "headGroupSpec": {"$ref": "#/$defs/HeadGroupSpec"},
    "rayVersion": string(),
    "workerGroupSpecs": array({"$ref": "#/$defs/WorkerGroupSpec"}),
}, required=("headGroupSpec",))

RAY_CLUSTER_STATUS = obj({
    "state": string(),
    "desiredCPU": QUANTITY,
    "desiredMemory": QUANTITY,
    "desiredGPU": QUANTITY,
    "desiredTPU": QUANTITY,
    "lastUpdateTime": time(nullable=True),
    "stateTransitionTimes": {"type": "object", "additionalProperties": time()},
    "endpoints": string_map(),
    "head": obj({"podIP": string(), "serviceIP": string(), "podName": string(), "serviceName": string()}),
    "reason": string(),
    "conditions": array(k8s("io.k8s.apimachinery.pkg.apis.meta.v1.Condition")),
    "readyWorkerReplicas": int32(),
    "availableWorkerReplicas": int32(),
    "desiredWorkerReplicas": int32(),
    "minWorkerReplicas": int32(),
    "maxWorkerReplicas": int32(),
    "observedGeneration": int64(),
})

RAY_CLUSTER_DEFS = {
    "RayClusterSpec": RAY_CLUSTER_SPEC,
    "HeadGroupSpec": HEAD_GROUP_SPEC,
    "WorkerGroupSpec": WORKER_GROUP_SPEC,
    "RayClusterStatus": RAY_CLUSTER_STATUS,
}

# --------------------------------------------------------------------------- RayJob

RAY_JOB_SPEC = obj({
    "activeDeadlineSeconds": int32(),
    "backoffLimit": int32(default=0),
    "rayClusterSpec": {"$ref": "#/$defs/RayClusterSpec"},
    "submitterPodTemplate": k8s("io.k8s.api.core.v1.PodTemplateSpec"),
    "metadata": string_map(),
    "clusterSelector": string_map(),
    "submitterConfig": obj({"backoffLimit": int32()}),
    "managedBy": MANAGED_BY,
    "deletionPolicy": string(enum=["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"],
                             description="XValidation `self in [...]` of the CRD"),
    "entrypoint": string(),
    "runtimeEnvYAML": string(),
    "jobId": string(),
    "submissionMode": string(default="K8sJobMode"),
    "entrypointResources": string(),
    "entrypointNumCpus": number(),
    "entrypointNumGpus": number(),
    "ttlSecondsAfterFinished": int32(default=0),
    "shutdownAfterJobFinishes": boolean(),
    "suspend": boolean(),
})

RAY_JOB_STATUS = obj({
    "jobId": string(),
    "rayClusterName": string(),
    "dashboardURL": string(),
    "jobStatus": string(),
    "jobDeploymentStatus": string(),
    "reason": string(),
    "message": string(),
    "startTime": time(),
    "endTime": time(),
    "succeeded": int32(default=0),
    "failed": int32(default=0),
    "rayClusterStatus": {"$ref": "#/$defs/RayClusterStatus"},
    "observedGeneration": int64(),
})

# --------------------------------------------------------------------------- RayService

SERVE_DEPLOYMENT_STATUS = obj({"status": string(), "message": string(), "healthLastUpdateTime": time()})
APP_STATUS = obj({
    "status": string(),
    "message": string(),
    "healthLastUpdateTime": time(),
    "serveDeploymentStatuses": {"type": "object", "additionalProperties": SERVE_DEPLOYMENT_STATUS},
})
RAY_SERVICE_STATUS = obj({
    "applicationStatuses": {"type": "object", "additionalProperties": APP_STATUS},
    "rayClusterName": string(),
    "rayClusterStatus": {"$ref": "#/$defs/RayClusterStatus"},
})

RAY_SERVICE_SPEC = obj({
    "serveConfigV2": string(description="Serve config (ServeDeploySchema) as a YAML multi-line string"),
    "rayClusterConfig": {"$ref": "#/$defs/RayClusterSpec"},
    "serviceUnhealthySecondThreshold": int32(description="deprecated, unused"),
    "deploymentUnhealthySecondThreshold": int32(description="deprecated, unused"),
    "serveService": k8s("io.k8s.api.core.v1.Service"),
})

RAY_SERVICE_STATUSES = obj({
    "activeServiceStatus": {"$ref": "#/$defs/RayServiceStatus"},
    "pendingServiceStatus": {"$ref": "#/$defs/RayServiceStatus"},
    "serviceStatus": string(),
    "observedGeneration": int64(),
    "lastUpdateTime": time(),
})

# --------------------------------------------------------------------------- documents


def document(kind: str, plural: str, spec: dict[str, Any], status: dict[str, Any],
             defs: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://raytrieval.invalid/k8s/schemas/{plural}.ray.io.v1.json",
        "title": f"{kind} (ray.io/v1)",
        "description": f"openAPIV3Schema of the KubeRay CRD {plural}.ray.io, version v1. Source: {SOURCE}. "
                       "Embedded Kubernetes types are x-raytrieval-k8s-type placeholders (see README.md).",
        "type": "object",
        "properties": {
            "apiVersion": string(enum=["ray.io/v1"]),
            "kind": string(enum=[kind]),
            "metadata": k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
            "spec": spec,
            "status": status,
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "$defs": defs,
    }


def schemas() -> dict[str, dict[str, Any]]:
    cluster = document("RayCluster", "rayclusters", {"$ref": "#/$defs/RayClusterSpec"},
                       {"$ref": "#/$defs/RayClusterStatus"}, dict(RAY_CLUSTER_DEFS))
    job = document("RayJob", "rayjobs", RAY_JOB_SPEC, RAY_JOB_STATUS, dict(RAY_CLUSTER_DEFS))
    service = document("RayService", "rayservices", RAY_SERVICE_SPEC, RAY_SERVICE_STATUSES,
                       {**RAY_CLUSTER_DEFS, "RayServiceStatus": RAY_SERVICE_STATUS})
    return {
        "rayclusters.ray.io.v1.json": cluster,
        "rayjobs.ray.io.v1.json": job,
        "rayservices.ray.io.v1.json": service,
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def main() -> None:
    for name, schema in schemas().items():
        (HERE / name).write_text(render(schema))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
