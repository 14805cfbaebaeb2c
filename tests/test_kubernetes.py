"""The kubernetes backend without a cluster: what it would apply, validated against the schemas.

The DaskCluster and DaskAutoscaler are checked against the CRD schemas shipped in the installed
dask_kubernetes package; the Secret, the pods and the scheduler Service against the Kubernetes
object schemas (kubernetes-validate).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask_kubernetes
import jsonschema
import kubernetes_validate
import pytest
import yaml

from facility.cluster.kubernetes import KubernetesBackend, explain_pods
from facility.cluster.limits import Identity, WorkerRequest
from facility.config import FacilityConfig, load_config
from tests import allocator_probe

CRDS = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / \
    "dask-kubernetes-operator" / "crds"
K8S_VERSION = "1.37.0"
NOTEBOOK_ENV = {"JUPYTER_IMAGE_SPEC": "registry.example/facility-notebook:2026.11",
                "FACILITY_CATALOG": "/data/catalog.yaml", "X509_USER_PROXY": "/tmp/x509up_u1000",
                "BEARER_TOKEN_FILE": "/tmp/bt", "JUPYTERHUB_USER": "alice", "HOME": "/home/alice",
                "JUPYTERHUB_API_TOKEN": "secret-not-forwarded", "FACILITY_ACCESS_TOKEN": "eyJ.access",
                "FACILITY_ACCESS_TOKEN_EXPIRES": "1790000000", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
                "AWS_SECRET_ACCESS_KEY": "s3-secret-value"}


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{kind.lower()}.yaml").read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def kubernetes_config(home: Path, more: str = "") -> FacilityConfig:
    """A configuration for the kubernetes backend in namespace ``analysis``, plus ``more`` YAML."""
    (home / "facility.yaml").write_text("""
home: .
cluster:
  backend: kubernetes
  kubernetes:
    operator: true
    namespace: analysis
    gpu_node_selector: {nvidia.com/gpu.present: "true"}
    gpu_tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
""" + more)
    return load_config(home / "facility.yaml", environ={})


@pytest.fixture
def config(tmp_path: Path) -> FacilityConfig:
    return kubernetes_config(tmp_path)


def render(config: FacilityConfig, gpus: int = 0) -> dict[str, dict[str, Any]]:
    """The manifests by kind; the credentials Secret as ``Secret/credentials``."""
    request = WorkerRequest(1, 6, threads=2, memory=8 * 2**30, gpus=gpus)
    backend = KubernetesBackend(config, "alice-zpeak", request=request,
                                identity=Identity("alice", ("cms",)), idle_timeout=900)
    home = config.home
    proxy, token = home / "x509up_u1000", home / "bt"
    proxy.write_text("-----BEGIN CERTIFICATE-----\nproxy\n")
    token.write_text("eyJ.token")
    environ = {**NOTEBOOK_ENV, "X509_USER_PROXY": str(proxy), "BEARER_TOKEN_FILE": str(token)}
    manifests = backend.manifests(environ=environ, owner_pod=("jupyter-alice", "0f0e-uid"))
    return {("Secret/credentials" if m["metadata"]["name"].endswith("-credentials") else m["kind"]): m
            for m in manifests}


def validate_k8s(obj: dict[str, Any]) -> None:
    for version in ("1.30.0", K8S_VERSION):  # the oldest the chart supports, the newest
        kubernetes_validate.validate(obj, version, strict=True)


def pod(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("gpus", [0, 1])
def test_manifests_validate_against_crds_and_kubernetes_schemas(config: FacilityConfig,
                                                                gpus: int) -> None:
    objects = render(config, gpus)
    assert list(objects) == ["Secret", "Secret/credentials", "DaskCluster", "DaskAutoscaler"]
    validate_k8s(objects["Secret/credentials"])
    jsonschema.validate(objects["DaskCluster"], crd_schema("DaskCluster"))
    jsonschema.validate(objects["DaskAutoscaler"], crd_schema("DaskAutoscaler"))
    validate_k8s(objects["Secret"])
    spec = objects["DaskCluster"]["spec"]
    validate_k8s(pod(spec["scheduler"]["spec"], "scheduler"))
    validate_k8s(pod(spec["worker"]["spec"], "worker"))
    validate_k8s({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "scheduler"},
                  "spec": spec["scheduler"]["service"]})


def test_the_validation_catches_a_wrong_manifest(config: FacilityConfig) -> None:
    objects = render(config)
    objects["DaskAutoscaler"]["spec"]["minimum"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        jsonschema.validate(objects["DaskAutoscaler"], crd_schema("DaskAutoscaler"))
    worker = objects["DaskCluster"]["spec"]["worker"]["spec"]
    worker["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(pod(worker, "worker"))


def test_workers_run_the_notebook_image_with_its_environment_and_tls(config: FacilityConfig) -> None:
    objects = render(config)
    cluster = objects["DaskCluster"]
    assert cluster["metadata"]["namespace"] == "analysis"
    assert cluster["metadata"]["labels"]["facility.dev/user"] == "alice"
    assert cluster["metadata"]["ownerReferences"][0]["name"] == "jupyter-alice"
    assert cluster["spec"]["idleTimeout"] == 900
    worker = cluster["spec"]["worker"]["spec"]
    container = worker["containers"][0]
    assert container["image"] == NOTEBOOK_ENV["JUPYTER_IMAGE_SPEC"]
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert set(plain) == {"FACILITY_CATALOG", "X509_USER_PROXY", "BEARER_TOKEN_FILE", "JUPYTERHUB_USER",
                          "FACILITY_ACCESS_TOKEN_EXPIRES", "AWS_ACCESS_KEY_ID",
                          "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"}
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert from_secret == {
        "FACILITY_ACCESS_TOKEN": {"name": "alice-zpeak-credentials", "key": "FACILITY_ACCESS_TOKEN"},
        "AWS_SECRET_ACCESS_KEY": {"name": "alice-zpeak-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "eyJ.access" not in yaml.safe_dump(cluster)
    assert "s3-secret-value" not in yaml.safe_dump(cluster)
    assert container["resources"]["limits"] == {"cpu": "2", "memory": str(8 * 2**30)}
    assert "--tls-ca-file" in container["args"]
    assert "nodeSelector" not in worker
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert scheduler["args"][-2:] == ["--protocol", "tls"]
    secret = objects["Secret"]
    assert base64.b64decode(secret["data"]["key.pem"]).startswith(b"-----BEGIN PRIVATE KEY")
    carried = objects["Secret/credentials"]["data"]
    assert base64.b64decode(carried["BEARER_TOKEN_FILE"]) == b"eyJ.token"
    assert base64.b64decode(carried["FACILITY_ACCESS_TOKEN"]) == b"eyJ.access"
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert mounts[str(config.home / "bt")] == "BEARER_TOKEN_FILE"
    assert mounts[str(config.home / "x509up_u1000")] == "X509_USER_PROXY"
    assert objects["DaskAutoscaler"]["spec"] == {"cluster": "alice-zpeak", "minimum": 1, "maximum": 6}


def test_gpu_workers_ask_for_gpus_on_gpu_nodes(config: FacilityConfig) -> None:
    worker = render(config, gpus=1)["DaskCluster"]["spec"]["worker"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker["containers"][0]["args"][-2:] == ["--resources", "GPU=1"]


# A worker pod's nanny, as `dask worker` starts it, with the environment the pod is given.
NANNY_IN_A_POD = """
import asyncio, json
import cloudpickle
from distributed import Client, Nanny, Scheduler
from tests import allocator_probe

async def main():
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
        async with Nanny(scheduler.address, nthreads=1, dashboard_address=":0"):
            async with Client(scheduler.address, asynchronous=True) as client:
                cloudpickle.register_pickle_by_value(allocator_probe)
                report = client.submit(allocator_probe.allocator_report, pure=False)
                print(json.dumps(await report))

asyncio.run(main())
"""


def worker_process_allocator(pod_env: dict[str, str]) -> tuple[int, str | None, str | None]:
    """What a worker process started by a real nanny with ``pod_env`` reports (see
    :func:`tests.allocator_probe.allocator_report`)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", NANNY_IN_A_POD], env={**environ, **pod_env},
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    faults, trim, mmap = json.loads(done.stdout.strip().splitlines()[-1])
    return faults, trim, mmap


@pytest.mark.parametrize("thresholds", ["", "  malloc_trim_threshold: null\n  malloc_mmap_threshold: null\n"],
                         ids=["the facility's", "glibc's adaptive"])
def test_worker_pods_nanny_gives_its_workers_the_allocators_thresholds(
        tmp_path: Path, thresholds: str) -> None:
    config = kubernetes_config(tmp_path, thresholds)  # more of the cluster section
    container = render(config)["DaskCluster"]["spec"]["worker"]["spec"]["containers"][0]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    faults, trim, mmap = worker_process_allocator(pod_env)
    if thresholds:  # glibc's adaptive thresholds: Dask's 65536 is removed, not kept
        assert (trim, mmap) == (None, None)
        return
    assert (trim, mmap) == (str(config.cluster.malloc_trim_threshold),
                            str(config.cluster.malloc_mmap_threshold))
    assert allocator_probe.kept_freed_memory(faults), \
        f"{faults} page faults: freed memory went back to the OS after every round"


def test_a_notebook_without_an_image_is_told_what_to_set(config: FacilityConfig) -> None:
    from facility.cluster.base import ClusterError

    backend = KubernetesBackend(config, "alice-x", identity=Identity("alice"))
    with pytest.raises(ClusterError, match=r"set cluster\.kubernetes\.image or start from a notebook"):
        backend.manifests(environ={})


def test_explain_pending_pods_with_their_events() -> None:
    pods = [
        {"metadata": {"name": "alice-zpeak-default-worker-1"}, "status": {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                "reason": "Unschedulable",
                                                "message": "0/12 nodes are available: 12 Insufficient memory."}]}},
        {"metadata": {"name": "alice-zpeak-default-worker-2"}, "status": {
            "phase": "Pending", "containerStatuses": [{"state": {"waiting": {
                "reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.example/x"'}}}]}},
        {"metadata": {"name": "alice-zpeak-scheduler"}, "status": {"phase": "Running"}},
    ]
    events = [{"type": "Warning", "reason": "FailedScheduling", "message": "Insufficient memory",
               "involvedObject": {"name": "alice-zpeak-default-worker-1"}},
              {"type": "Normal", "reason": "Pulling", "message": "pulling",
               "involvedObject": {"name": "alice-zpeak-default-worker-2"}}]
    reasons = explain_pods(pods, events)
    assert reasons == [
        "pod alice-zpeak-default-worker-1: Unschedulable: 0/12 nodes are available: 12 Insufficient memory.",
        "pod alice-zpeak-default-worker-1: event FailedScheduling: Insufficient memory",
        'pod alice-zpeak-default-worker-2: ImagePullBackOff: Back-off pulling image "registry.example/x"',
    ]


def test_schedulers_stay_on_regular_nodes_and_workers_may_use_spot_pools(config: FacilityConfig) -> None:
    k8s = config.cluster.kubernetes
    k8s.scheduler_priority_class, k8s.worker_priority_class = "facility-scheduler", "facility-worker"
    k8s.scheduler_node_selector, k8s.worker_node_selector = {"node-pool": "regular"}, {"node-pool": "spot"}
    k8s.worker_tolerations = [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
    cluster = render(config, gpus=1)["DaskCluster"]
    jsonschema.validate(cluster, crd_schema("DaskCluster"))
    scheduler, worker = cluster["spec"]["scheduler"], cluster["spec"]["worker"]
    assert scheduler["spec"]["priorityClassName"] == "facility-scheduler"
    assert scheduler["spec"]["nodeSelector"] == {"node-pool": "regular"}
    assert "tolerations" not in scheduler["spec"]
    assert worker["spec"]["priorityClassName"] == "facility-worker"
    assert worker["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in worker["spec"]["tolerations"]] == ["spot", "nvidia.com/gpu"]
    assert worker["metadata"]["labels"] == scheduler["metadata"]["labels"] == {"facility.dev/user": "alice"}


def test_user_labels_are_the_slugs_the_hub_gives_user_servers(config: FacilityConfig) -> None:
    from kubespawner.slugs import safe_slug

    backend = KubernetesBackend(config, "zpeak", request=WorkerRequest(1, 1, threads=1, memory=2**30),
                                identity=Identity("j.doe_2", ("cms",)))
    [cluster] = [m for m in backend.manifests(environ=NOTEBOOK_ENV) if m["kind"] == "DaskCluster"]
    label = cluster["spec"]["worker"]["metadata"]["labels"]["facility.dev/user"]
    assert label == safe_slug("j.doe_2", max_length=48) != "j.doe_2"
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "w", "labels": {"facility.dev/user": label}}, "spec": {"containers": []}}, K8S_VERSION)


def test_a_users_clusters_are_the_daskclusters_labelled_with_the_user(
        config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Dask sidebar lists on Kubernetes: the user's DaskClusters, found by the label the
    manifests give them, in the namespace their clusters go to."""
    import kr8s

    asked: list[dict[str, Any]] = []

    class Found:
        def __init__(self, name: str) -> None:
            self.name = name

    def get(kind: str, *names: str, **options: Any) -> list[Found]:
        asked.append({"kind": kind, "names": names, "selector": options["label_selector"],
                      "namespace": options["api"].namespace})
        return [Found("alice-zpeak"), Found("alice-job-7")]

    monkeypatch.setattr(kr8s, "get", get)
    monkeypatch.setattr(kr8s, "api", lambda namespace: type("Api", (), {"namespace": namespace}))
    found = KubernetesBackend.clusters_of(config, Identity("alice"))
    assert [(b.name, b.identity.user) for b in found] == [("alice-zpeak", "alice"), ("alice-job-7", "alice")]
    assert asked == [{"kind": "daskclusters", "names": (), "selector": {"facility.dev/user": "alice"},
                      "namespace": "analysis"}]
    manifest_labels = KubernetesBackend(config, "alice-zpeak", identity=Identity("alice")).manifests(
        NOTEBOOK_ENV)[-2]["metadata"]["labels"]
    assert manifest_labels["facility.dev/user"] == "alice"

    def unreachable(*args: Any, **options: Any) -> list[Found]:
        raise ConnectionError("no API server")

    monkeypatch.setattr(kr8s, "get", unreachable)
    assert KubernetesBackend.clusters_of(config, Identity("alice")) == []
