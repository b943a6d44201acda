"""`vlkit k8s` output, checked against Kubernetes' own schemas and against the plan it came from.

kubernetes-validate (strict: unknown fields fail, so a misspelt `readinesProbe` is caught) carries
the schemas of every Kubernetes release it supports, offline. What the schemas cannot see (labels
a selector must match, names one object gives another, quantity syntax, the flags vLLM accepts, the
`hf` command the init container runs) is checked here against the real things.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from scripts import images
from scripts.cli import main
from scripts.k8s import manifests as mf
from scripts.k8s import resources as res
from scripts.k8s.names import default_name
from scripts.planner import plan_for
from scripts.planner.models import BUILTIN_IDS
from tests.test_planner_vllm_parser import _parse, vllm_parser  # noqa: F401  (the pinned vLLM's parser)

GIB = 1024**3
MODEL = "Qwen/Qwen3-VL-4B-Instruct"
K8S_VERSIONS = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
# Kubernetes' resource.Quantity syntax (apimachinery's quantity.go); the JSON schemas leave it a string.
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def generate(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["k8s", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def objects(capsys, *args: str) -> dict[str, dict]:
    rc, out, err = generate(capsys, *args)
    assert rc == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    return {d["kind"]: d for d in docs}


def pod(sts: dict) -> dict:
    return sts["spec"]["template"]["spec"]


def vllm_container(sts: dict) -> dict:
    (c,) = pod(sts)["containers"]
    return c


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- Kubernetes' schemas ----------------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_manifests_validate_against_every_kubernetes_release_the_validator_ships(capsys, gpus):
    found = objects(capsys, "--model", MODEL, "--gpu-memory", "24GiB", "--gpus", str(gpus), "--replicas", "2",
                    "--namespace", "vision", "--storage-class", "fast-ssd", "--api-key-secret", "vllm-key",
                    "--hf-token-secret", "hf", "--image-pull-secret", "mirror", "--runtime-class", "nvidia",
                    "--node-selector", "nvidia.com/gpu.product=NVIDIA-L4")
    assert set(found) == {"Service", "StatefulSet"}
    assert len(K8S_VERSIONS) >= 10, K8S_VERSIONS
    for version in K8S_VERSIONS:
        for obj in found.values():
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_is_not_a_rubber_stamp(capsys):
    # The control: the same check on a broken StatefulSet must fail, or the test above proves nothing.
    sts = objects(capsys, "--gpu-memory", "24GiB")["StatefulSet"]
    vllm_container(sts)["readinesProbe"] = vllm_container(sts).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


def test_quantities_use_kubernetes_syntax(capsys):
    sts = objects(capsys, "--gpu-memory", "80GiB", "--gpus", "2", "--model", "Qwen/Qwen3-VL-8B-Instruct")["StatefulSet"]
    quantities = [pod(sts)["volumes"][0]["emptyDir"]["sizeLimit"],
                  sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]]
    for c in pod(sts)["initContainers"] + pod(sts)["containers"]:
        for kind in ("requests", "limits"):
            quantities += list(c["resources"][kind].values())
    assert quantities and all(isinstance(q, str) and QUANTITY.match(q) for q in quantities), quantities


# --- the plan, carried over ---------------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_the_container_runs_the_plans_flags_with_tensor_parallel_over_the_pods_gpus(capsys, gpus):
    plan = plan_for(model=MODEL, profile="16gb", gpu_memory_bytes=16 * GIB, gpu_count=gpus, context=16384)
    assert plan.fits
    sts = objects(capsys, "--model", MODEL, "--gpu-memory", "16GiB", "--gpus", str(gpus), "--context", "16384")["StatefulSet"]
    c = vllm_container(sts)
    assert c["image"] == images.VLLM_IMAGE
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [MODEL, "--host", "0.0.0.0", "--port", "8000", *plan.vllm_args]
    assert flag(c["args"], "--max-model-len") == "16384"
    if gpus > 1:
        assert flag(c["args"], "--tensor-parallel-size") == str(gpus)
    else:
        assert "--tensor-parallel-size" not in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert str(plan.context) in sts["metadata"]["annotations"]["vlkit/plan"]


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_vllms_own_parser_takes_the_container_command(vllm_parser, capsys, gpus):  # noqa: F811
    sts = objects(capsys, "--model", MODEL, "--gpu-memory", "16GiB", "--gpus", str(gpus))["StatefulSet"]
    args = vllm_container(sts)["args"]
    assert args[0] == MODEL
    ns, engine = _parse(vllm_parser, args[1:])  # the fixture puts an offline stand-in in the model's place
    assert (ns.host, ns.port) == ("0.0.0.0", 8000)
    assert engine.tensor_parallel_size == gpus


def _vllm_guarded_prefixes() -> tuple[str, ...]:
    """GUARDED_PREFIX of the pinned vLLM's API-key middleware, read from its source (importing the
    module needs vLLM's whole dependency tree, which the test venv does not carry)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm.entrypoints.serve.utils.server_utils")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "GUARDED_PREFIX" for t in n.targets)]
    return ast.literal_eval(value)


def test_probes_and_metrics_need_no_api_key_in_the_pinned_vllm(vllm_parser, capsys):  # noqa: F811
    GUARDED_PREFIX = _vllm_guarded_prefixes()
    assert "/v1" in GUARDED_PREFIX
    sts = objects(capsys, "--gpu-memory", "24GiB", "--api-key-secret", "vllm-key")["StatefulSet"]
    c = vllm_container(sts)
    paths = {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths.add(sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    assert paths == {"/health", "/metrics"}
    assert not any(p.startswith(GUARDED_PREFIX) for p in paths)
    key = next(e for e in c["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vllm-key", "key": "api-key"}


def test_what_one_object_names_the_other_has(capsys):
    found = objects(capsys, "--gpu-memory", "24GiB", "--gpus", "2", "--replicas", "3")
    svc, sts = found["Service"], found["StatefulSet"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and sts["spec"]["replicas"] == 3
    assert svc["spec"]["type"] == "ClusterIP"
    c = vllm_container(sts)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    (sp,) = svc["spec"]["ports"]
    assert sp["port"] == 8000 and sp["targetPort"] in ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
    volumes = {v["name"] for v in pod(sts)["volumes"]} | {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    for container in pod(sts)["initContainers"] + pod(sts)["containers"]:
        assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_cache_volume_shared_memory_and_environment(capsys):
    sts = objects(capsys, "--gpu-memory", "24GiB", "--gpus", "2", "--storage-class", "fast-ssd")["StatefulSet"]
    c = vllm_container(sts)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/cache": "cache", "/dev/shm": "dshm"}
    (shm,) = pod(sts)["volumes"]
    assert shm["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HOME"].startswith("/cache/") and env["HF_HUB_CACHE"].startswith("/cache/")
    assert env["VLLM_CACHE_ROOT"].startswith("/cache/") and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # the runner the plan's accounting is of
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["storageClassName"] == "fast-ssd"
    # /dev/shm is memory charged to the container: the limit must leave room for it and the processes.
    gib = lambda q: int(q.removesuffix("Gi"))  # noqa: E731
    assert gib(c["resources"]["limits"]["memory"]) >= gib(shm["emptyDir"]["sizeLimit"]) + res.MEMORY_BASE_GIB
    assert "cpu" not in c["resources"]["limits"] and int(c["resources"]["requests"]["cpu"]) >= 2
    # No VLLM_PORT=tcp://... from a Service called `vllm`, no API token in a pod that never uses it.
    assert pod(sts)["enableServiceLinks"] is False and pod(sts)["automountServiceAccountToken"] is False


def test_every_cache_path_lies_on_the_cache_volume_in_every_container(capsys):
    # Else the download lands on the container's own disk and is gone at the next start.
    sts = objects(capsys, "--gpu-memory", "24GiB")["StatefulSet"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    for c in pod(sts)["initContainers"] + pod(sts)["containers"]:
        mounts = [m["mountPath"].rstrip("/") + "/" for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
        paths = [e["value"] for e in c["env"] if e["name"] in ("HF_HOME", "HF_HUB_CACHE", "VLLM_CACHE_ROOT")]
        assert len(mounts) == 1 and paths, c["name"]
        assert all(p.startswith(mounts[0]) for p in paths), (c["name"], mounts, paths)


def test_the_sizing_table_in_the_docs_is_what_is_generated(capsys):
    text = (Path(__file__).parents[1] / "docs" / "KUBERNETES.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d) \| (\d+) \| (\d+)Gi \| (\d+)Gi \|$", text, re.M)
    assert [r[0] for r in rows] == ["1", "2", "4"]
    for gpus, cpu, memory, shm in rows:
        sts = objects(capsys, "--gpu-memory", "48GiB", "--gpus", gpus)["StatefulSet"]
        resources = vllm_container(sts)["resources"]
        assert resources["requests"]["cpu"] == cpu and resources["limits"]["memory"] == f"{memory}Gi"
        assert pod(sts)["volumes"][0]["emptyDir"]["sizeLimit"] == f"{shm}Gi"


def test_cache_size_follows_the_model_unless_given(capsys):
    def storage(*args):
        sts = objects(capsys, "--gpu-memory", "80GiB", *args)["StatefulSet"]
        return sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]

    small, large = storage("--model", "Qwen/Qwen3-VL-2B-Instruct"), storage("--model", "Qwen/Qwen3-VL-8B-Instruct")
    assert int(large.removesuffix("Gi")) > int(small.removesuffix("Gi")) >= res.CACHE_STEP_GIB
    assert int(large.removesuffix("Gi")) * GIB > 1.2 * plan_weights("Qwen/Qwen3-VL-8B-Instruct")
    assert storage("--cache-size", "50Gi") == "50Gi"
    assert storage("--cache-size", "1Ti") == "1024Gi"
    assert storage("--cache-size", "60GiB") == "60Gi"


def plan_weights(model: str) -> int:
    from scripts.planner import resolve_model

    return resolve_model(model).weight_bytes


def test_namespace_and_placement_only_when_asked(capsys):
    plain = objects(capsys, "--gpu-memory", "24GiB")
    assert all("namespace" not in o["metadata"] for o in plain.values())
    assert not {"nodeSelector", "imagePullSecrets", "runtimeClassName"} & set(pod(plain["StatefulSet"]))
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(plain["StatefulSet"])["tolerations"]
    placed = objects(capsys, "--gpu-memory", "24GiB", "--namespace", "vision", "--image-pull-secret", "mirror",
                     "--runtime-class", "nvidia",
                     "--node-selector", "nvidia.com/gpu.product=NVIDIA-L4", "--node-selector", "pool=gpu")
    assert all(o["metadata"]["namespace"] == "vision" for o in placed.values())
    assert pod(placed["StatefulSet"])["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4", "pool": "gpu"}
    assert pod(placed["StatefulSet"])["imagePullSecrets"] == [{"name": "mirror"}]
    assert pod(placed["StatefulSet"])["runtimeClassName"] == "nvidia"


def test_default_names_are_valid_for_every_builtin_model():
    names = {default_name(m) for m in BUILTIN_IDS}
    assert len(names) == len(BUILTIN_IDS)  # one name per model: two models side by side do not collide
    assert all(re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", n) and len(n) <= 52 for n in names)
    assert default_name("Org/9B.Very_Long-" + "x" * 80).startswith("vlkit-9b-very-long-")


# --- the model download -------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_snapshot(hub: Path, model: str, files: list[str], listed: list[str]) -> Path:
    """A model in the hub cache layout: refs/main, a snapshot holding `files`, and the tree listing
    huggingface_hub keeps of the commit (`trees/<commit>.json`, the format its _tree_cache.py
    documents) naming `listed`, against which an offline download checks the snapshot is complete."""
    import json

    repo = hub / ("models--" + model.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snap / name).write_text("{}")
    (repo / "trees").mkdir(exist_ok=True)
    tree = {"format_version": 1, "files": {n: {"size": 2, "blob_id": f"{i:040x}"} for i, n in enumerate(listed)}}
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps(tree))
    return snap


def _run_init_container(init: dict, cache: Path) -> subprocess.CompletedProcess:
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    env = {k: v.replace("/cache", str(cache), 1) if v.startswith("/cache/") else v for k, v in env.items()}
    env["HF_HUB_OFFLINE"] = "1"  # here: never the hub; the cached snapshot is what is being tested
    hf = Path(sys.executable).with_name("hf")
    return subprocess.run([str(hf), *init["command"][1:]], env={"PATH": os.environ.get("PATH", ""), **env},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_the_init_container_runs_the_real_hf_cli_into_the_volume(capsys, tmp_path):
    sts = objects(capsys, "--gpu-memory", "24GiB", "--model", MODEL, "--hf-token-secret", "hf")["StatefulSet"]
    (init,) = pod(sts)["initContainers"]
    assert init["image"] == images.VLLM_IMAGE and init["command"][:3] == ["hf", "download", MODEL]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in init["env"]
    assert "HF_HUB_OFFLINE" not in {e["name"] for e in init["env"]}  # it is the one that downloads
    assert _run_init_container(init, tmp_path).returncode != 0  # an empty volume and no hub: no start

    # Every --include counts (not only the last one): model.safetensors, listed in the commit but missing
    # from the volume, make the offline download fail; files no pattern includes do not.
    hub = tmp_path / "huggingface" / "hub"
    listed = ["config.json", "model.safetensors", "tokenizer.json", "README.md", "original/weights.pth"]
    snap = _hub_snapshot(hub, MODEL, ["config.json", "tokenizer.json"], listed)
    partial = _run_init_container(init, tmp_path)
    assert partial.returncode != 0 and "Incomplete snapshot" in partial.stderr
    _hub_snapshot(hub, MODEL, ["model.safetensors"], listed)
    done = _run_init_container(init, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(snap) in done.stdout


def test_no_download_leaves_the_volume_to_the_user(capsys):
    sts = objects(capsys, "--gpu-memory", "24GiB", "--no-download")["StatefulSet"]
    assert "initContainers" not in pod(sts)
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm_container(sts)["env"]


# --- determinism ----------------------------------------------------------------------------------------
def test_same_inputs_same_bytes_across_processes(tmp_path):
    args = ["k8s", "--gpu-memory", "24GiB", "--gpus", "2", "--replicas", "2", "--node-selector", "b=2",
            "--node-selector", "a=1", "--api-key-secret", "k"]
    outs = set()
    for seed in ("0", "1", "12345"):
        res_ = subprocess.run([sys.executable, "-m", "scripts", *args], capture_output=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).parents[1])
        assert res_.returncode == 0, res_.stderr
        outs.add(res_.stdout)
    assert len(outs) == 1


def test_the_folder_holds_the_same_objects_as_the_stream(capsys, tmp_path):
    args = ("--gpu-memory", "24GiB", "--gpus", "4")
    streamed = objects(capsys, *args)
    rc, out, _ = generate(capsys, *args, "--output", str(tmp_path / "k8s"))
    assert rc == 0 and out == ""
    written = {p.name: yaml.safe_load(p.read_text()) for p in (tmp_path / "k8s").iterdir()}
    assert written == {"service.yaml": streamed["Service"], "statefulset.yaml": streamed["StatefulSet"]}
    assert all(p.read_text().startswith("# Generated by `vlkit k8s`") for p in (tmp_path / "k8s").iterdir())


def test_manifests_refuse_a_plan_that_does_not_fit():
    plan = plan_for(model="Qwen/Qwen3-VL-8B-Instruct", profile="16gb", gpu_memory_bytes=8 * GIB)
    assert not plan.fits
    with pytest.raises(ValueError, match="does not fit"):
        mf.manifests(plan, mf.Cluster(name="x"))
