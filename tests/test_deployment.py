"""The chart as one deployment: the facility chart rendered together with the jupyterhub chart,
the jupyterhub chart's own hub configuration executed with the rendered values and the hub
image's ``jupyterhub_config.d``, and KubeSpawner building each user's server pod.

What a pod gets is then checked against the rest of the render: the hub's API URL resolves
from the pod's namespace to the hub's Service, the namespace and service account exist, the
hub may make and watch the pod there, the pod fits a node pool of docs/operator.md, and every
pod of the user's image lands on nodes the pre-puller visits.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import http.server
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dask.utils import parse_bytes
from distributed import Client

from facility.cluster.kubernetes import TLS_MOUNT, KubernetesBackend
from facility.cluster.limits import Identity, WorkerRequest
from facility.cluster.security import security_from
from facility.config import FacilityConfig, load_config
from facility.deploy import chart
from tests.admission import evaluate
from tests.conftest import free_port
from tests.hub_pod import HubPod, find
from tests.network_policy import Endpoint, Network, selects

REPO = Path(__file__).resolve().parent.parent
CI_VALUES = REPO / "helm" / "facility" / "ci"
MINIMAL, MAXIMAL = CI_VALUES / "minimal-values.yaml", CI_VALUES / "maximal-values.yaml"
SHARED = CI_VALUES / "shared-namespace-values.yaml"
NODE_POOLS = yaml.safe_load((CI_VALUES / "node-pools.yaml").read_text())
RELEASE_NAMESPACE = "facility"
K8S_VERSIONS = ("1.30.0", "1.37.0")
# the VO's endpoints, so that the hub does not look them up at an issuer that does not exist
ENDPOINTS = """
facility:
  hub:
    vo:
      authorize_url: https://iam.example.org/authorize
      token_url: https://iam.example.org/token
      userinfo_url: https://iam.example.org/userinfo
"""
LAYOUTS = {
    "own namespaces": ([MAXIMAL], [
        {"user": "alice", "groups": ["cms"], "profile": "cpu-small"},
        {"user": "alice", "groups": ["cms"], "profile": "cpu-large"},
        {"user": "bob", "groups": ["cms", "cms/gpu"], "profile": "gpu"}]),
    "namespace made by the hub": ([MINIMAL], [
        {"user": "dave", "groups": ["cms"], "profile": "cpu-small"}]),
    "shared namespace": ([MINIMAL, SHARED], [
        {"user": "carol", "groups": ["cms"], "profile": "cpu-small"}]),
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chart") / "facility"
    left_out = chart.assemble(path)
    assert left_out == [], (f"{left_out}: put the jupyterhub chart into {chart.DEPENDENCIES} "
                            "(see its README) or run `helm dependency build helm/facility`")
    return path


@pytest.fixture(scope="module", params=list(LAYOUTS))
def deployment(request: pytest.FixtureRequest, build: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    values, servers = LAYOUTS[request.param]
    folder = tmp_path_factory.mktemp("hub")
    endpoints = folder / "endpoints.yaml"
    endpoints.write_text(ENDPOINTS)
    objects = chart.template(build, [*values, endpoints], namespace=RELEASE_NAMESPACE)
    hub = HubPod(objects, RELEASE_NAMESPACE, folder / "pod")
    spawned = hub.spawn(servers, secrets_outside={"facility-vo-client": "made-by-the-operator"})
    for server in spawned["servers"]:  # what the hub makes before a user's first server
        account = server["pod"]["spec"]["serviceAccountName"]
        if not [o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == account
                and o["metadata"].get("namespace") == server["namespace"]]:
            objects += _hub_objects(objects, server["pod"]["metadata"]["labels"]["facility.dev/user"])
    site_cidrs = bool(yaml.safe_load(values[0].read_text())["networkPolicy"].get("allowedCIDRs"))
    return {"objects": objects, "requests": servers, "site_cidrs": site_cidrs, "hub": hub, **spawned}


# -- Kubernetes semantics the checks need ------------------------------------------------------


def resolves_to(host: str, from_namespace: str, services: list[dict[str, Any]]) -> str | None:
    """The Service (namespace/name) a host name reaches from a pod: a short name resolves only
    in the pod's own namespace, ``name.namespace`` and longer forms anywhere."""
    parts = host.split(".")
    if len(parts) == 1:
        name, namespace = parts[0], from_namespace
    elif parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]):
        name, namespace = parts[0], parts[1]
    else:
        return None
    for service in services:
        if service["metadata"]["name"] == name and \
                service["metadata"].get("namespace", RELEASE_NAMESPACE) == namespace:
            return f"{namespace}/{name}"
    return None


def namespace_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"].get("namespace", RELEASE_NAMESPACE))


def allowed(objects: list[dict[str, Any]], account: tuple[str, str], verb: str, resource: str,
            namespace: str | None, group: str = "", name: str | None = None) -> bool:
    """RBAC: may the service account (namespace, name) ``verb`` the ``resource`` (of API
    ``group``, the object ``name``) in ``namespace`` (None: in all namespaces at once, which
    only a ClusterRoleBinding grants)?"""
    def grants(role: dict[str, Any]) -> bool:
        return any(resource in rule.get("resources", []) and verb in rule.get("verbs", [])
                   and group in rule.get("apiGroups", [])
                   and ("resourceNames" not in rule or name in rule["resourceNames"])
                   for rule in role.get("rules", []))

    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and (s["namespace"], s["name"]) == account
                   for s in binding.get("subjects", [])):
            continue
        if binding["kind"] == "RoleBinding" and namespace_of(binding) != namespace:
            continue
        ref = binding["roleRef"]
        role = find(objects, ref["kind"], ref["name"], namespace_of(binding)) \
            if ref["kind"] == "Role" else find(objects, "ClusterRole", ref["name"], RELEASE_NAMESPACE)
        if grants(role):
            return True
    return False


def fits(pod: dict[str, Any], pool: dict[str, Any]) -> bool:
    """The pod's node selector matches the pool's labels and it tolerates the pool's taints."""
    spec = pod.get("spec", pod)
    if any(pool["labels"].get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    return all(any(tolerates(t, taint) for t in spec.get("tolerations") or [])
               for taint in pool["taints"])


def tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    if toleration.get("effect") not in (None, "", taint["effect"]):
        return False
    if toleration.get("operator") == "Exists":
        return toleration.get("key") in (None, "", taint["key"])
    return toleration.get("key") == taint["key"] and toleration.get("value") == taint.get("value")


def pools_for(pod: dict[str, Any]) -> list[str]:
    return [pool["name"] for pool in NODE_POOLS if fits(pod, pool)]


def container_env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [notebook] = [c for c in pod["spec"]["containers"] if c["name"] == "notebook"]
    return {e["name"]: e for e in notebook["env"]}


# -- the tests ---------------------------------------------------------------------------------


def test_user_servers_reach_the_hub_api_from_their_namespace(deployment: dict[str, Any]) -> None:
    services = [o for o in deployment["objects"] if o["kind"] == "Service"]
    for server in deployment["servers"]:
        pod, namespace = server["pod"], server["namespace"]
        assert namespace != RELEASE_NAMESPACE
        for name in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
            url = container_env(pod)[name]["value"]
            host, port = url.split("://")[1].split("/")[0].split(":")
            assert resolves_to(host, namespace, services) == f"{RELEASE_NAMESPACE}/hub", url
            hub_service = find(deployment["objects"], "Service", "hub", RELEASE_NAMESPACE)
            assert int(port) in [p["port"] for p in hub_service["spec"]["ports"]]


def test_server_pods_are_valid_and_everything_they_name_exists(deployment: dict[str, Any]) -> None:
    objects = deployment["objects"]
    for server in deployment["servers"]:
        pod, namespace = server["pod"], server["namespace"]
        pod["metadata"]["namespace"] = namespace
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        assert find(objects, "Namespace", namespace, namespace)
        assert find(objects, "ServiceAccount", pod["spec"]["serviceAccountName"], namespace)
        for volume in pod["spec"]["volumes"]:
            if "configMap" in volume:
                assert find(objects, "ConfigMap", volume["configMap"]["name"], namespace)
        assert find(objects, "PriorityClass", pod["spec"]["priorityClassName"], namespace)


def test_the_hub_may_make_and_watch_server_pods_where_kubespawner_looks(
        deployment: dict[str, Any]) -> None:
    objects, hub = deployment["objects"], (RELEASE_NAMESPACE, "hub")
    for server in deployment["servers"]:
        namespace = server["namespace"]
        for resource in ("pods", "persistentvolumeclaims"):
            assert allowed(objects, hub, "create", resource, namespace), (resource, namespace)
            assert allowed(objects, hub, "delete", resource, namespace), (resource, namespace)
        # KubeSpawner's reflectors list and watch in the spawner's namespace, or in all of them
        # when each user has a namespace of their own
        where = None if server["enable_user_namespaces"] else namespace
        watched = ["pods"] + (["events"] if server["events_enabled"] else [])
        for resource in watched:
            for verb in ("list", "watch"):
                assert allowed(objects, hub, verb, resource, where), (verb, resource, where)


def test_server_pods_fit_a_node_pool_and_get_the_profile_resources(
        deployment: dict[str, Any]) -> None:
    for request, server in zip(deployment["requests"], deployment["servers"], strict=True):
        pod = server["pod"]
        expected = ["gpu"] if request["profile"] == "gpu" else ["regular"]
        assert pools_for(pod) == expected, (request, pod["spec"].get("nodeSelector"))
        [notebook] = pod["spec"]["containers"]
        resources = notebook["resources"]
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
        assert ("nvidia.com/gpu" in resources["limits"]) == (request["profile"] == "gpu")


def test_servers_get_their_tokens_from_a_secret_of_their_own(deployment: dict[str, Any]) -> None:
    for server in deployment["servers"]:
        assert server["hooks"] == ["_write_credentials", "_own_credentials"]  # the spawner's
        pod, secret = server["pod"], server["secret"]
        user = pod["metadata"]["labels"]["hub.jupyter.org/username"]
        env = container_env(pod)
        assert f"-of-{user}" not in json.dumps(pod)  # no token anywhere in the pod spec
        for name in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "FACILITY_ACCESS_TOKEN"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": secret["metadata"]["name"], "key": name}
        assert base64.b64decode(secret["data"]["JUPYTERHUB_API_TOKEN"]).decode() == \
            f"hub-token-of-{user}"
        assert base64.b64decode(secret["data"]["FACILITY_ACCESS_TOKEN"]).decode() == \
            f"vo-token-of-{user}"
        assert env["FACILITY_ACCESS_TOKEN_EXPIRES"]["value"] == "4102444800"
        secret["metadata"]["namespace"] = server["namespace"]
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(secret, version, strict=True)


def test_a_users_first_server_opens_the_quickstart_notebook_and_keeps_outputs_at_home(
        deployment: dict[str, Any]) -> None:
    """Every server here is its spawner's first: JupyterLab opens the quick-start notebook,
    which the pod copies from the image into the home, and runs and jobs write below the home;
    terminals keep the image's PATH (the `facility` command) and JupyterLab asks no news."""
    for server in deployment["servers"]:
        pod = server["pod"]
        env = container_env(pod)
        assert env["JUPYTERHUB_DEFAULT_URL"]["value"] == "/lab/tree/quickstart.ipynb"
        assert env["FACILITY_OUTPUT_DIR"]["value"] == "/home/jovyan/facility-output"
        [notebook] = pod["spec"]["containers"]
        assert "facility.hub.lab=True" in notebook["args"]
        [terminals] = [a for a in notebook["args"] if a.startswith("--ServerApp.terminado_settings=")]
        assert "FACILITY_SERVER_PATH" in terminals
        copy = notebook["lifecycle"]["postStart"]["exec"]["command"]
        assert "/opt/facility/notebooks/*.ipynb" in copy[-1]


def test_the_hub_writes_server_secrets_without_reading_any(deployment: dict[str, Any]) -> None:
    objects, hub = deployment["objects"], (RELEASE_NAMESPACE, "hub")
    for server in deployment["servers"]:
        for verb in ("create", "patch"):
            assert allowed(objects, hub, verb, "secrets", server["namespace"])
        for verb in ("get", "list", "watch"):
            assert not allowed(objects, hub, verb, "secrets", server["namespace"])
            assert not allowed(objects, hub, verb, "secrets", None)


def test_the_hubs_secrets_reach_pods_by_reference(deployment: dict[str, Any]) -> None:
    hub = find(deployment["objects"], "Deployment", "hub", RELEASE_NAMESPACE)
    [container] = hub["spec"]["template"]["spec"]["containers"]
    secret_like = [e for e in container["env"] if "SECRET" in e["name"] or "TOKEN" in e["name"]]
    assert secret_like
    assert all("valueFrom" in e for e in secret_like)
    hub_secret = find(deployment["objects"], "Secret", "hub", RELEASE_NAMESPACE)
    assert "values.yaml" in hub_secret["data"]
    values = yaml.safe_load(base64.b64decode(hub_secret["data"]["values.yaml"]))
    assert "facility" not in values  # the jupyterhub chart's values only


def test_the_jupyterhub_chart_is_taken_from_the_kept_packages(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    [package] = chart.DEPENDENCIES.glob("jupyterhub-4.*.tgz")
    shutil.copy(package, kept / package.name)
    bare = tmp_path / "chart"  # the chart as cloned (no `helm dependency build` run in it)
    shutil.copytree(chart.CHART, bare, ignore=shutil.ignore_patterns("jupyterhub-*.tgz"))
    assert chart.assemble(tmp_path / "with", bare, dependencies=kept) == []
    assert (tmp_path / "with" / "charts" / package.name).is_file()
    [why] = chart.assemble(tmp_path / "without", bare, dependencies=tmp_path / "nothing-here")
    assert "jupyterhub chart" in why
    assert "helm dependency build" in why


# -- Dask pods, placeholders and the pre-puller on the node pools ------------------------------


def _cluster(objects: list[dict[str, Any]], namespace: str, home: Path, user: str,
             gpus: int = 0) -> dict[str, Any]:
    """The DaskCluster the kubernetes backend makes from the configuration the chart gives the
    user's namespace."""
    config_map = find(objects, "ConfigMap", "facility-config", namespace)
    (home / "facility.yaml").write_text(config_map["data"]["facility.yaml"])
    config = load_config(home / "facility.yaml", environ={})
    config.home = home
    request = WorkerRequest(1, 4, threads=2, memory=8 * 2**30, gpus=gpus)
    backend = KubernetesBackend(config, f"{user}-zpeak", request=request,
                                identity=Identity(user, ("cms",)), idle_timeout=900)
    [cluster] = [m for m in backend.manifests(environ={"JUPYTER_IMAGE_SPEC": "user:1"})
                 if m["kind"] == "DaskCluster"]
    return cluster


@pytest.mark.parametrize(("gpus", "worker_pool"), [(0, "spot"), (1, "gpu")])
def test_dask_pods_fit_their_node_pools(build: Path, tmp_path: Path, gpus: int,
                                        worker_pool: str) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    cluster = _cluster(objects, "facility-alice", tmp_path, "alice", gpus)
    assert pools_for(cluster["spec"]["scheduler"]["spec"]) == ["regular"]
    assert pools_for(cluster["spec"]["worker"]["spec"]) == [worker_pool]


def test_the_pre_puller_visits_every_pool_the_user_image_runs_on(build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    for name in ("continuous-image-puller", "hook-image-puller"):
        puller = find(objects, "DaemonSet", name, RELEASE_NAMESPACE)["spec"]["template"]
        assert pools_for(puller) == ["regular", "spot", "gpu"], name


def test_placeholders_hold_the_room_of_a_default_server_below_workers(build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    placeholders = find(objects, "StatefulSet", "user-placeholder", RELEASE_NAMESPACE)
    spec = placeholders["spec"]["template"]["spec"]
    config = FacilityConfig.model_validate(yaml.safe_load(
        find(objects, "ConfigMap", "facility-config", RELEASE_NAMESPACE)["data"]["facility.yaml"]))
    [default] = [p for p in config.hub.profiles if p.default]
    [pause] = spec["containers"]
    assert float(pause["resources"]["requests"]["cpu"]) == default.cpu
    assert parse_bytes(pause["resources"]["requests"]["memory"]) == parse_bytes(default.memory)
    assert pools_for(spec) == ["regular"]
    priorities = {p["metadata"]["name"]: p["value"] for p in objects if p["kind"] == "PriorityClass"}
    worker_class = config.cluster.kubernetes.worker_priority_class
    assert worker_class is not None
    assert priorities[spec["priorityClassName"]] < priorities[worker_class]


# -- operations --------------------------------------------------------------------------------


def test_long_running_pods_request_what_they_need(build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    for name in ("hub", "proxy", "user-scheduler", "facility-dask-kubernetes-operator"):
        spec = find(objects, "Deployment", name, RELEASE_NAMESPACE)["spec"]["template"]["spec"]
        for container in spec["containers"]:
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (name, container["name"])
            assert "memory" in resources.get("limits", {}), (name, container["name"])


def test_the_chart_needs_the_kubernetes_that_runs_its_admission_policy(build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE, kube_version="1.30.0")
    policies = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    assert policies
    assert {p["apiVersion"] for p in policies} == {"admissionregistration.k8s.io/v1"}
    for policy in policies:
        kubernetes_validate.validate(policy, "1.30.0", strict=True)
    with pytest.raises(chart.ChartError, match="kubeVersion"):
        chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE, kube_version="1.29.9")


# -- what the operator asks a facility scheduler -----------------------------------------------


def _pod_process(container: dict[str, Any], credentials: Path, extra: list[str],
                 env: dict[str, str]) -> subprocess.Popen:
    """A container's command as a local process: its own arguments and environment, the TLS
    Secret's files where it mounts them, ports of this machine's choosing."""
    argv = [a.replace(TLS_MOUNT, str(credentials)) for a in container["args"]]
    variables = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    argv = [a.replace("$(DASK_WORKER_NAME)", env.get("DASK_WORKER_NAME", "")) for a in argv]
    return subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:], *extra],
                            env={**os.environ, **variables, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _await_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def operator_sees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A scheduler and one worker started exactly as the DaskCluster says (ports aside), and the
    operator's own functions pointed at them as they would be at the scheduler's Service."""
    from dask_kubernetes.operator.controller import controller

    (tmp_path / "facility.yaml").write_text(
        "home: .\ncluster: {backend: kubernetes, kubernetes: {namespace: analysis}}\n")
    config = load_config(tmp_path / "facility.yaml", environ={})
    backend = KubernetesBackend(config, "alice-ops", request=WorkerRequest(1, 4, threads=1,
                                memory=2**30), identity=Identity("alice"), idle_timeout=900)
    [cluster] = [m for m in backend.manifests(environ={"JUPYTER_IMAGE_SPEC": "user:1"})
                 if m["kind"] == "DaskCluster"]
    credentials = backend._credentials_folder()
    comm, dashboard = free_port(), free_port()
    scheduler = _pod_process(cluster["spec"]["scheduler"]["spec"]["containers"][0], credentials,
                             ["--port", str(comm), "--dashboard-address", f"127.0.0.1:{dashboard}"],
                             {})
    worker = _pod_process(cluster["spec"]["worker"]["spec"]["containers"][0], credentials,
                          ["--dashboard-address", f"127.0.0.1:{free_port()}"],
                          {"DASK_WORKER_NAME": "alice-ops-default-worker-0",
                           "DASK_SCHEDULER_ADDRESS": f"tls://127.0.0.1:{comm}"})

    async def scheduler_address(service: str, namespace: str, port_name: str = "tcp-comm",
                                **_: Any) -> str:
        assert (service, namespace) == ("alice-ops-scheduler", "analysis")
        return f"tcp://127.0.0.1:{dashboard if port_name == 'http-dashboard' else comm}"

    monkeypatch.setattr(controller, "get_scheduler_address", scheduler_address)
    try:
        _await_http(f"http://127.0.0.1:{dashboard}/health")
        yield {"controller": controller, "worker": worker, "dashboard": dashboard,
               "security": security_from(credentials), "address": f"tls://127.0.0.1:{comm}"}
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait()


def test_a_pods_scheduler_and_worker_load_the_run_engine_before_the_first_task(
        operator_sees: dict[str, Any]) -> None:
    """The engine's preload has run in both (its setup freezes their start-up objects: nothing
    else does), so a run's first tasks wait on neither import."""
    with Client(operator_sees["address"], security=operator_sees["security"], timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        [worker_frozen] = client.run(gc.get_freeze_count).values()
        scheduler_frozen = client.run_on_scheduler(gc.get_freeze_count)
    assert worker_frozen > 0
    assert scheduler_frozen > 0


def test_the_operator_scales_retires_and_checks_idleness_over_the_schedulers_api(
        operator_sees: dict[str, Any]) -> None:
    controller, log = operator_sees["controller"], logging.getLogger("operator")
    with Client(operator_sees["address"], security=operator_sees["security"], timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
    assert asyncio.run(controller.get_desired_workers("alice-ops-scheduler", "analysis")) == 0
    idle_since = asyncio.run(controller.check_scheduler_idle("alice-ops-scheduler", "analysis", log))
    assert 0 < time.time() - idle_since < 120
    retired = asyncio.run(controller.retire_workers(1, "alice-ops-scheduler", "alice-ops-default",
                                                    "analysis", log))
    assert retired == ["alice-ops-default-worker-0"]  # gracefully, through the API
    assert operator_sees["worker"].wait(timeout=60) is not None


def test_without_the_api_the_operators_fallback_cannot_reach_a_tls_scheduler(
        operator_sees: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """What the operator met before the scheduler served the API: a 404 on the dashboard port,
    then Dask's RPC over plain TCP, which the TLS scheduler does not speak."""
    class NotServed(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *_: Any) -> None:
            pass

    controller = operator_sees["controller"]
    real = controller.get_scheduler_address
    with http.server.HTTPServer(("127.0.0.1", 0), NotServed) as dashboard:
        threading.Thread(target=dashboard.serve_forever, daemon=True).start()

        async def without_api(service: str, namespace: str, port_name: str = "tcp-comm",
                              **kw: Any) -> str:
            if port_name == "http-dashboard":
                return f"tcp://127.0.0.1:{dashboard.server_port}"
            return str(await real(service, namespace, port_name=port_name, **kw))

        monkeypatch.setattr(controller, "get_scheduler_address", without_api)
        with pytest.raises(controller.SchedulerCommError):
            asyncio.run(controller.get_desired_workers("alice-ops-scheduler", "analysis"))
        dashboard.shutdown()


# -- who reaches whom --------------------------------------------------------------------------

OUTSIDE = {"data server on the internet": "203.0.113.10",
           "cloud metadata server": "169.254.169.254",
           "a service of the cluster": "10.96.0.42",
           "a node of the cluster": "192.168.1.7",
           "the Kubernetes API server": "172.20.0.10",
           "the site's XCache": "10.20.30.40"}


def _network(objects: list[dict[str, Any]]) -> Network:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for policy in policies:
        policy["metadata"].setdefault("namespace", RELEASE_NAMESPACE)
    labels = {o["metadata"]["name"]: o["metadata"].get("labels", {})
              for o in objects if o["kind"] == "Namespace"}
    return Network(policies, labels)


def _release_pod(objects: list[dict[str, Any]], name: str, **ports: int) -> Endpoint:
    template = find(objects, "Deployment", name, RELEASE_NAMESPACE)["spec"]["template"]
    return Endpoint(RELEASE_NAMESPACE, template["metadata"]["labels"], ports)


def _dask(home: Path, objects: list[dict[str, Any]], namespace: str,
          user: str) -> dict[str, Endpoint]:
    """A user's scheduler and worker as the network sees them: labels and named ports."""
    cluster = _cluster(objects, namespace, home, user)
    ports = {"tcp-comm": 8786, "http-dashboard": 8787}
    return {role: Endpoint(namespace, {"dask.org/cluster-name": cluster["metadata"]["name"],
                                       "dask.org/component": role,
                                       **cluster["spec"][role]["metadata"]["labels"]}, ports)
            for role in ("scheduler", "worker")}


def test_users_pods_reach_what_they_need_and_nothing_else(deployment: dict[str, Any],
                                                         tmp_path: Path) -> None:
    objects, network = deployment["objects"], _network(deployment["objects"])
    hub = _release_pod(objects, "hub", http=8081)
    proxy = _release_pod(objects, "proxy")
    operator = _release_pod(objects, "facility-dask-kubernetes-operator")
    dns = Endpoint("kube-system", {"k8s-app": "kube-dns"})
    stranger = Endpoint(RELEASE_NAMESPACE, {"app": "something-else"})
    for server in deployment["servers"]:
        user, namespace = server["pod"]["metadata"]["labels"]["hub.jupyter.org/username"], \
            server["namespace"]
        me = Endpoint(namespace, server["pod"]["metadata"]["labels"])
        dask = _dask(tmp_path, objects, namespace, user)
        assert network.allows(proxy, me, 8888)
        assert network.allows(hub, me, 8888)
        assert not network.allows(stranger, me, 8888)
        assert network.allows(me, hub, 8081)
        assert network.allows(me, dns, 53, "UDP")
        assert network.allows(me, dask["scheduler"], 8786)
        assert network.allows(dask["worker"], dask["scheduler"], 8786)
        assert network.allows(operator, dask["scheduler"], 8787)
        for pod in (me, dask["worker"]):
            reached = {what for what, address in OUTSIDE.items()
                       if network.allows(pod, Endpoint(address=address), 443)}
            site = {"the site's XCache"} if deployment["site_cidrs"] else set()
            assert reached == {"data server on the internet", "the Kubernetes API server", *site}
        assert not network.allows(me, proxy, 8001)  # the proxy's API: the hub's only


def test_users_do_not_reach_each_others_servers_or_clusters(build: Path, tmp_path: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    network = _network(objects)
    alice = Endpoint("facility-alice", {"component": "singleuser-server",
                                        "facility.dev/user": "alice"})
    bob = Endpoint("facility-bob", {"component": "singleuser-server", "facility.dev/user": "bob"})
    alice_dask = _dask(tmp_path, objects, "facility-alice", "alice")
    assert network.allows(alice, alice_dask["scheduler"], 8786)
    assert not network.allows(bob, alice_dask["scheduler"], 8786)
    assert not network.allows(bob, alice_dask["worker"], 8788)
    assert not network.allows(bob, alice, 8888)


def test_servers_may_read_their_namespaces_pods_but_no_secrets(deployment: dict[str, Any]) -> None:
    """Owner references of a server's clusters and ``explain()`` read pods; no credentials are in
    pod specs, so this holds in a shared namespace too."""
    objects = deployment["objects"]
    for server in deployment["servers"]:
        namespace = server["namespace"]
        account = (namespace, server["pod"]["spec"]["serviceAccountName"])
        for resource in ("pods", "events"):
            for verb in ("get", "list", "watch"):
                assert allowed(objects, account, verb, resource, namespace), (verb, resource)
        for verb in ("get", "list", "watch"):
            assert not allowed(objects, account, verb, "secrets", namespace)
        assert allowed(objects, account, "create", "secrets", namespace)


# -- TLS presets -------------------------------------------------------------------------------

PRESETS = REPO / "helm" / "facility" / "presets"
HOSTS = ("jupyterhub: {proxy: {https: {hosts: [hub.facility.example.org], "
         "letsencrypt: {contactEmail: ops@facility.example.org}}}}")


@pytest.mark.parametrize("preset", ["tls-letsencrypt.yaml", "tls-secret.yaml"])
def test_tls_presets_serve_the_public_address_over_https(build: Path, tmp_path: Path,
                                                         preset: str) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(HOSTS)
    objects = chart.template(build, [MAXIMAL, PRESETS / preset, hosts], namespace=RELEASE_NAMESPACE)
    public = find(objects, "Service", "proxy-public", RELEASE_NAMESPACE)
    assert 443 in [p["port"] for p in public["spec"]["ports"]]
    for obj in objects:  # what the presets change: the proxy's pods, services and config
        if obj["apiVersion"] in ("v1", "apps/v1"):
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    if preset == "tls-letsencrypt.yaml":
        traefik = find(objects, "Deployment", "autohttps", RELEASE_NAMESPACE)
        assert traefik["spec"]["template"]["spec"]["containers"]
    else:
        proxy = find(objects, "Deployment", "proxy", RELEASE_NAMESPACE)["spec"]["template"]["spec"]
        assert any(v.get("secret", {}).get("secretName") == "facility-hub-tls"
                   for v in proxy["volumes"])


def test_a_certificate_for_another_host_is_refused(build: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("jupyterhub: {proxy: {https: {hosts: [hub.elsewhere.org]}}}")
    with pytest.raises(chart.ChartError, match=r"must include hub\.facility\.example\.org, the host"):
        chart.template(build, [MAXIMAL, PRESETS / "tls-secret.yaml", hosts], namespace=RELEASE_NAMESPACE)


# -- a new configuration reaches the hub -------------------------------------------------------


def test_the_hub_watches_the_configuration_it_mounts(deployment: dict[str, Any]) -> None:
    watcher = deployment["services"]["config-watch"]
    hub: HubPod = deployment["hub"]
    mounted = hub.environment({"facility-vo-client": "x"})["FACILITY_CONFIG"]
    assert watcher["command"][1:5] == ["-m", "facility.hub.config_watch", "--file", mounted]
    volumes = {v["name"]: v for v in hub.spec["volumes"]}
    [mount] = [m for m in hub.container["volumeMounts"] if m["mountPath"] == "/etc/facility"]
    assert "subPath" not in mount  # a folder mount: Kubernetes updates the file in place
    assert volumes[mount["name"]]["configMap"]["name"] == "facility-config"


def test_a_changed_configuration_stops_the_hub_and_the_same_one_does_not(tmp_path: Path) -> None:
    config = tmp_path / "facility.yaml"
    config.write_text("hub: {idle_culler_timeout: 3600}\n")
    watch = f"{sys.executable} -m facility.hub.config_watch --file {config} --every 0.1"
    hub = subprocess.Popen(["sh", "-c", f"{watch} & wait"])  # the watcher's parent, as the hub
    try:
        time.sleep(1.0)
        config.write_text(config.read_text())  # rewritten, same content
        time.sleep(1.0)
        assert hub.poll() is None
        config.write_text("hub: {idle_culler_timeout: 7200}\n")
        assert hub.wait(timeout=30) == -signal.SIGTERM
    finally:
        hub.kill()
        hub.wait()


def test_an_operators_pod_hook_runs_after_the_one_that_writes_the_secret() -> None:
    from facility.hub import kube

    calls: list[str] = []

    async def ours(spawner: Any, pod: dict[str, Any]) -> dict[str, Any]:
        calls.append("secret")
        return {**pod, "secret": True}

    def theirs(spawner: Any, pod: dict[str, Any]) -> dict[str, Any]:
        calls.append(f"operator saw secret={pod['secret']}")
        return {**pod, "operator": True}

    both = kube._then(ours, theirs)
    assert asyncio.run(both(None, {})) == {"secret": True, "operator": True}
    assert calls == ["secret", "operator saw secret=True"]
    assert kube._then(ours, None) is ours
    assert kube._then(ours, both) is both  # not wrapped twice


# -- a user the chart does not list ------------------------------------------------------------


RESOURCES = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps",
             "ResourceQuota": "resourcequotas", "LimitRange": "limitranges",
             "NetworkPolicy": "networkpolicies", "RoleBinding": "rolebindings"}


def _in_namespace(objects: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    return sorted((o for o in objects if o["metadata"].get("namespace") == namespace
                   or (o["kind"] == "Namespace" and o["metadata"]["name"] == namespace)),
                  key=lambda o: (o["kind"], o["metadata"]["name"]))


def _hub_objects(objects: list[dict[str, Any]], user: str) -> list[dict[str, Any]]:
    from facility.hub.kube import namespace_objects

    text = find(objects, "ConfigMap", "facility-config", RELEASE_NAMESPACE)["data"]["user-objects.yaml"]
    return sorted(namespace_objects(text, user), key=lambda o: (o["kind"], o["metadata"]["name"]))


def test_the_hub_makes_a_users_namespace_as_the_chart_does(build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    assert _hub_objects(objects, "alice") == _in_namespace(objects, "facility-alice")


def test_the_hub_may_make_an_unlisted_users_namespace_and_only_users_namespaces(
        build: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    carol, hub = _hub_objects(objects, "carol"), (RELEASE_NAMESPACE, "hub")
    assert {o["metadata"].get("namespace", "facility-carol") for o in carol} == {"facility-carol"}
    for obj in carol:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        group = obj["apiVersion"].rpartition("/")[0]
        where = None if obj["kind"] == "Namespace" else "facility-carol"
        assert allowed(objects, hub, "create", RESOURCES[obj["kind"]], where, group), obj["kind"]
        if obj["kind"] == "RoleBinding":  # granting a role needs the right to bind it
            assert allowed(objects, hub, "bind", "clusterroles", "facility-carol",
                           "rbac.authorization.k8s.io", obj["roleRef"]["name"])
    assert not allowed(objects, hub, "bind", "clusterroles", None, "rbac.authorization.k8s.io",
                       "cluster-admin")
    [policy] = [p for p in objects if p["kind"] == "ValidatingAdmissionPolicy"
                and p["metadata"]["name"].endswith("hub-namespaces")]
    namespace = next(o for o in carol if o["kind"] == "Namespace")
    account = next(o for o in carol if o["kind"] == "ServiceAccount")
    assert admitted_by_hub(policy, namespace, None) == []
    assert admitted_by_hub(policy, account, namespace) == []
    elsewhere = {**account, "metadata": {**account["metadata"], "namespace": "kube-system"}}
    system = {"metadata": {"name": "kube-system", "labels": {}}}
    assert admitted_by_hub(policy, elsewhere, system)
    privileged = json.loads(json.dumps(namespace))
    privileged["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "privileged"
    assert admitted_by_hub(policy, privileged, None)


def admitted_by_hub(policy: dict[str, Any], obj: dict[str, Any],
                    namespace: dict[str, Any] | None) -> list[str]:
    """The messages of the policy's validations that the hub creating ``obj`` fails."""
    request = {"userInfo": {"username": f"system:serviceaccount:{RELEASE_NAMESPACE}:hub"},
               "namespace": obj["metadata"].get("namespace", ""), "operation": "CREATE"}
    failed = evaluate(policy, request, obj, namespace=namespace)
    assert failed is not None  # the policy applies to the hub
    return failed


def test_kubespawner_labels_a_users_namespace_as_the_chart_does(deployment: dict[str, Any]) -> None:
    for server in deployment["servers"]:
        assert server["namespace_objects_file"].endswith("/etc/facility/user-objects.yaml")
        if not server["enable_user_namespaces"]:
            continue
        user = server["pod"]["metadata"]["labels"]["hub.jupyter.org/username"]
        rendered = find(deployment["objects"], "Namespace", server["namespace"], server["namespace"])
        assert server["namespace_labels"] == rendered["metadata"]["labels"]
        assert server["namespace_labels"]["facility.dev/user"] == user


def test_prometheus_finds_the_clusters_of_users_the_chart_does_not_list(build: Path,
                                                                        tmp_path: Path) -> None:
    objects = chart.template(build, [MAXIMAL], namespace=RELEASE_NAMESPACE)
    cluster = _cluster(objects + _hub_objects(objects, "dave"), "facility-dave", tmp_path, "dave")
    base = {**cluster["metadata"]["labels"], "dask.org/cluster-name": cluster["metadata"]["name"]}
    for kind, role in (("ServiceMonitor", "scheduler"), ("PodMonitor", "worker")):
        [monitor] = [o for o in objects if o["kind"] == kind]
        assert monitor["spec"]["namespaceSelector"] == {"any": True}
        assert selects(monitor["spec"]["selector"], {**base, "dask.org/component": role})
        assert not selects(monitor["spec"]["selector"], {"dask.org/component": role})  # not ours


def test_in_a_shared_namespace_the_hub_makes_only_the_users_account_there(build: Path) -> None:
    objects = chart.template(build, [MINIMAL, SHARED], namespace=RELEASE_NAMESPACE)
    carol = _hub_objects(objects, "carol")
    assert {(o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in carol} == {
        ("ServiceAccount", "facility-user-carol", "facility-users"),
        ("RoleBinding", "facility-user-carol", "facility-users")}
    [policy] = [p for p in objects if p["kind"] == "ValidatingAdmissionPolicy"
                and p["metadata"]["name"].endswith("hub-namespaces")]
    shared = find(objects, "Namespace", "facility-users", "facility-users")
    for obj in carol:
        assert admitted_by_hub(policy, obj, shared) == []
    lookalike = json.loads(json.dumps(shared))
    lookalike["metadata"]["name"] = "facility-users-2"
    moved = {**carol[0], "metadata": {**carol[0]["metadata"], "namespace": "facility-users-2"}}
    assert admitted_by_hub(policy, moved, lookalike)
