"""The KubeRay v1 CRD fields our manifests use, as JSON Schema, for validation without a Kubernetes API server.

Transcribed by hand from KubeRay's published CRDs (``ray.io_rayclusters.yaml`` / ``ray.io_rayjobs.yaml``, API
version ray.io/v1; checked against kuberay commit feeaf72 of 2026-08-19) and from the Kubernetes core/v1 pod
fields they embed. Only a subset: every object is closed (``additionalProperties: false``) as the API server's
structural pruning effectively is, so a misspelled or unknown field fails here as it would be dropped there.
Field types and enums are the CRD's.
"""
from __future__ import annotations


def obj(required: tuple[str, ...] = (), **props) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
INT_OR_STR = {"anyOf": [INT, STR]}
STR_MAP = {"type": "object", "additionalProperties": STR}
QUANTITIES = {"type": "object", "additionalProperties": INT_OR_STR}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


CONTAINER = obj(
    ("name",), name=STR, image=STR, command=arr(STR), args=arr(STR),
    env=arr(obj(("name",), name=STR, value=STR)),
    resources=obj(requests=QUANTITIES, limits=QUANTITIES),
    ports=arr(obj(("containerPort",), containerPort=INT, name=STR, protocol=STR)),
    volumeMounts=arr(obj(("name", "mountPath"), name=STR, mountPath=STR, readOnly=BOOL, subPath=STR)),
)
VOLUME = obj(("name",), name=STR,
             persistentVolumeClaim=obj(("claimName",), claimName=STR, readOnly=BOOL),
             emptyDir=obj(medium=STR, sizeLimit=INT_OR_STR))
POD_TEMPLATE = obj(
    metadata=obj(labels=STR_MAP, annotations=STR_MAP),
    spec=obj(("containers",), containers=arr(CONTAINER), volumes=arr(VOLUME), nodeSelector=STR_MAP,
             serviceAccountName=STR,
             tolerations=arr(obj(key=STR, operator={"enum": ["Exists", "Equal"]}, value=STR,
                                 effect={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}))),
)
HEAD_GROUP = obj(("template",), rayStartParams=STR_MAP, template=POD_TEMPLATE,
                 serviceType={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, enableIngress=BOOL)
WORKER_GROUP = obj(("groupName", "template"), groupName=STR, replicas=INT, minReplicas=INT, maxReplicas=INT,
                   rayStartParams=STR_MAP, template=POD_TEMPLATE, suspend=BOOL)
RAY_CLUSTER_SPEC = obj(
    ("headGroupSpec",), rayVersion=STR, enableInTreeAutoscaling=BOOL,
    authOptions=obj(mode={"enum": ["disabled", "token"]}, secretName=STR, enableK8sTokenAuth=BOOL),
    autoscalerOptions=obj(upscalingMode={"enum": ["Default", "Aggressive", "Conservative"]},
                          idleTimeoutSeconds=INT, image=STR),
    headGroupSpec=HEAD_GROUP, workerGroupSpecs=arr(WORKER_GROUP), suspend=BOOL,
)
METADATA = obj(("name",), name=STR, namespace=STR, labels=STR_MAP, annotations=STR_MAP)

RAY_CLUSTER = obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": "ray.io/v1"},
                  kind={"const": "RayCluster"}, metadata=METADATA, spec=RAY_CLUSTER_SPEC)
RAY_JOB = obj(
    ("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": "ray.io/v1"}, kind={"const": "RayJob"},
    metadata=METADATA,
    spec=obj(("entrypoint",), entrypoint=STR, runtimeEnvYAML=STR, rayClusterSpec=RAY_CLUSTER_SPEC,
             clusterSelector=STR_MAP, shutdownAfterJobFinishes=BOOL, ttlSecondsAfterFinished=INT,
             activeDeadlineSeconds=INT, backoffLimit=INT, suspend=BOOL, entrypointNumCpus={"type": "number"},
             entrypointNumGpus={"type": "number"},
             submissionMode={"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]}),
)
PVC = obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": "v1"},
          kind={"const": "PersistentVolumeClaim"}, metadata=METADATA,
          spec=obj(("accessModes", "resources"), accessModes=arr({"enum": ["ReadWriteOnce", "ReadOnlyMany",
                                                                            "ReadWriteMany", "ReadWriteOncePod"]}),
                   storageClassName=STR, resources=obj(requests=QUANTITIES)))
SCHEMAS = {"RayCluster": RAY_CLUSTER, "RayJob": RAY_JOB, "PersistentVolumeClaim": PVC}
