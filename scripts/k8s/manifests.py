"""A plan for the 16gb profile, as Kubernetes objects: a StatefulSet of vLLM pods and their Service.

Why a StatefulSet: each replica gets its own cache volume from volumeClaimTemplates, so scaling out
works with any storage class (ReadWriteOnce is what most clusters' default class offers), a pod
that restarts finds its model and vLLM's compile cache where it left them, and a rolling update
replaces a pod in place instead of waiting for a second free GPU node and a volume the old pod
still holds. The replicas sit behind one ClusterIP Service: horizontal scaling is `replicas`.

Only the plan's public fields are read (`plan_for(...)` -> Plan); the vLLM flags are the plan's
`vllm_args`, with `--tensor-parallel-size` = the GPUs of one pod, as the planner emits it.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from scripts import images
from scripts.k8s import resources as res
from scripts.stack.compose import CONTAINER_PORT, READY_PATHS
from scripts.stack.download import ALLOW_PATTERNS

GIB = 1024**3

# The same layout as docker/Dockerfile.16gb: one volume at /cache holds the Hugging Face hub cache
# and vLLM's torch.compile cache (VLLM_CACHE_ROOT), so a restart skips both the download and the compile.
CACHE_MOUNT = "/cache"
HF_CACHE_ENV = {"HF_HOME": "/cache/huggingface", "HF_HUB_CACHE": "/cache/huggingface/hub"}
VLLM_CACHE_ROOT = "/cache/vllm"
CACHE_VOLUME = "cache"
SHM_VOLUME = "dshm"
HEALTH_PATH = READY_PATHS["16gb"]     # vLLM's /health: 200 once the engine is up, 503 when it died
PORT_NAME = "http"
# vLLM's API-key middleware guards /v1 (and a few other API prefixes) only: /health and /metrics
# answer without the key, so probes and Prometheus need none.
API_KEY_SECRET_KEY = "api-key"
HF_TOKEN_SECRET_KEY = "token"

# Probes. Start-up = loading the weights, profiling, torch.compile and CUDA graph capture: minutes
# on a cold cache (FP8 checkpoints on Hopper add DeepGEMM's warm-up), so the startupProbe allows
# 30 minutes before liveness takes over. The download runs before it, in the init container.
PROBE_PERIOD_S = 10
STARTUP_BUDGET_S = 30 * 60
PROBE_TIMEOUT_S = 5
LIVENESS_FAILURES = 6          # a minute without an answer: the engine is wedged, restart it
READINESS_FAILURES = 3


@dataclass(frozen=True)
class Cluster:
    """What differs from one cluster to the next (the flags of `vlkit k8s`); the rest is the plan's."""

    name: str
    namespace: str | None = None
    replicas: int = 1
    storage_class: str | None = None       # None: the cluster's default StorageClass
    cache_gib: int = res.CACHE_STEP_GIB
    api_key_secret: str | None = None      # a Secret with key `api-key`: vLLM then wants Bearer <key>
    hf_token_secret: str | None = None     # a Secret with key `token`: for gated or private models
    image_pull_secret: str | None = None
    runtime_class: str | None = None       # e.g. `nvidia` where it is not containerd's default runtime
    node_selector: tuple[tuple[str, str], ...] = ()
    download: bool = True                  # False: the volume is populated beforehand (air-gapped)


def _gib(n: int) -> str:
    return f"{n}Gi"


def _labels(c: Cluster) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": c.name}


def _metadata(c: Cluster, **extra) -> dict:
    meta: dict = {"name": c.name}
    if c.namespace:
        meta["namespace"] = c.namespace
    meta["labels"] = {**_labels(c), "app.kubernetes.io/part-of": "vlkit", "app.kubernetes.io/managed-by": "vlkit"}
    meta.update(extra)
    return meta


def plan_summary(plan) -> str:
    gib = round(plan.gpu_total_bytes / GIB, 2)
    return (f"{plan.model} on {plan.gpu_count} x {gib:g} GiB GPU(s) per pod: context {plan.context} tokens, "
            f"KV cache {plan.kv_cache_tokens} tokens, vLLM {images.VLLM_VERSION}")


def _env(values: dict[str, str]) -> list[dict]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _probe(failures: int, period: int = PROBE_PERIOD_S) -> dict:
    return {"httpGet": {"path": HEALTH_PATH, "port": PORT_NAME}, "periodSeconds": period,
            "timeoutSeconds": PROBE_TIMEOUT_S, "failureThreshold": failures}


def vllm_command(plan) -> list[str]:
    """`vllm serve` with the plan's flags; the hub id resolves offline in the cache volume."""
    return ["vllm", "serve", plan.model, "--host", "0.0.0.0", "--port", str(CONTAINER_PORT), *plan.vllm_args]


def download_command(model: str) -> list[str]:
    """`hf download` of what serving needs (the patterns `vlkit download` uses) into HF_HUB_CACHE.

    Idempotent: files already in the cache are not fetched again; with the hub unreachable a
    complete cached snapshot is used as it is, so a restarting pod does not depend on the hub."""
    cmd = ["hf", "download", model]
    for pattern in ALLOW_PATTERNS:
        cmd += ["--include", pattern]
    return cmd


def _vllm_container(plan, c: Cluster) -> dict:
    gpus = str(plan.gpu_count)
    # The model is on the volume: vLLM never asks the hub at run time (the init container did).
    env = _env({**HF_CACHE_ENV, "VLLM_CACHE_ROOT": VLLM_CACHE_ROOT, "HF_HUB_OFFLINE": "1", **images.VLLM_ENV})
    if c.api_key_secret:
        env.append(_secret_env("VLLM_API_KEY", c.api_key_secret, API_KEY_SECRET_KEY))
    memory = _gib(res.memory_gib(plan.gpu_count))
    command = vllm_command(plan)
    return {
        "name": "vllm",
        "image": images.VLLM_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": command[:2],
        "args": command[2:],
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": str(res.cpu_request(plan.gpu_count)), "memory": memory, "nvidia.com/gpu": gpus},
            "limits": {"memory": memory, "nvidia.com/gpu": gpus},
        },
        "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT},
                         {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "startupProbe": _probe(STARTUP_BUDGET_S // PROBE_PERIOD_S),
        "readinessProbe": _probe(READINESS_FAILURES, period=5),
        "livenessProbe": _probe(LIVENESS_FAILURES),
    }


def _download_container(plan, c: Cluster) -> dict:
    env = _env({**HF_CACHE_ENV,
                # No PyPI query for a newer hf CLI, and no xet chunk cache (up to 10 GB on the volume)
                # for what is downloaded once.
                "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_XET_CHUNK_CACHE_SIZE_BYTES": "0"})
    if c.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", c.hf_token_secret, HF_TOKEN_SECRET_KEY))
    memory = _gib(res.DOWNLOAD_MEMORY_GIB)
    return {
        "name": "download",
        "image": images.VLLM_IMAGE,  # the image the pod pulls anyway; it ships huggingface_hub's `hf`
        "imagePullPolicy": "IfNotPresent",
        "command": download_command(plan.model),
        "env": env,
        "resources": {"requests": {"cpu": str(res.DOWNLOAD_CPU), "memory": memory}, "limits": {"memory": memory}},
        "volumeMounts": [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
    }


def _pod_spec(plan, c: Cluster) -> dict:
    spec: dict = {
        # The pods never call the Kubernetes API; and no <SERVICE>_PORT variables: a Service named
        # `vllm` would inject VLLM_PORT=tcp://..., which vLLM reads as its own setting and dies on.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if c.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": c.image_pull_secret}]
    if c.runtime_class:
        spec["runtimeClassName"] = c.runtime_class
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    # GPU nodes are often tainted so that only GPU pods land there (GPU operator, most clouds).
    spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if c.download:
        spec["initContainers"] = [_download_container(plan, c)]
    spec["containers"] = [_vllm_container(plan, c)]
    spec["volumes"] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory",
                                                         "sizeLimit": _gib(res.shm_gib(plan.gpu_count))}}]
    return spec


def statefulset(plan, c: Cluster) -> dict:
    pod_labels = {**_labels(c), "app.kubernetes.io/version": images.VLLM_VERSION}
    claim: dict = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": _gib(c.cache_gib)}}}
    if c.storage_class:
        claim["storageClassName"] = c.storage_class
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(c, annotations={"vlkit/plan": plan_summary(plan)}),
        "spec": {
            "serviceName": c.name,
            "replicas": c.replicas,
            # Replicas start together (each start takes minutes); updates still go one pod at a time.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            # Deleting or scaling down keeps the volumes: the downloaded model stays for the next pod.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "selector": {"matchLabels": _labels(c)},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    # Per pod, not on the Service: each replica's own counters (the Service would
                    # answer from a random replica). /metrics needs no API key.
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(CONTAINER_PORT),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": _pod_spec(plan, c),
            },
            "volumeClaimTemplates": [{"metadata": {"name": CACHE_VOLUME, "labels": _labels(c)}, "spec": claim}],
        },
    }


def service(c: Cluster) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(c),
        "spec": {
            "type": "ClusterIP",  # inside the cluster only; expose it through your ingress/gateway
            "selector": _labels(c),
            "ports": [{"name": PORT_NAME, "port": CONTAINER_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def manifests(plan, c: Cluster) -> list[dict]:
    """The objects for a plan that fits, in the order to apply them (the Service governs the set)."""
    if not plan.fits:
        raise ValueError(f"the plan does not fit: {plan.refusal}")
    if plan.profile != "16gb":
        raise ValueError(f"vlkit k8s deploys vLLM (the 16gb profile), not the {plan.profile} profile")
    return [service(c), statefulset(plan, c)]


def header(plan) -> str:
    return (f"# Generated by `vlkit k8s` (vlkit {images.VLKIT_VERSION}) from the plan for {plan_summary(plan)}.\n"
            "# Regenerate it rather than edit it; what to change for your cluster: docs/KUBERNETES.md.\n")


def to_yaml(obj: dict) -> str:
    # Insertion order (apiVersion, kind, metadata, spec) reads better than sorted keys and is just as
    # deterministic; a wide line keeps long flags on one line.
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=4096)


def stream(plan, objects: list[dict]) -> str:
    """One multi-document YAML (for stdout: `vlkit k8s ... | kubectl apply -f -`)."""
    return header(plan) + "".join("---\n" + to_yaml(o) for o in objects)


def files(plan, objects: list[dict]) -> dict[str, str]:
    """One file per object, named by its kind (service.yaml, statefulset.yaml)."""
    return {f"{o['kind'].lower()}.yaml": header(plan) + to_yaml(o) for o in objects}
