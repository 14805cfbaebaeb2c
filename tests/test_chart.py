"""The Helm chart without a cluster: linted, rendered with helm, every object validated.

Kubernetes objects are checked with kubernetes-validate, the operator's custom objects against
the CRDs the render itself carries (the copy inside the installed dask_kubernetes package); the
values against the schema generated from the configuration model; and the hub module is loaded
the way the jupyterhub chart's hub loads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import dask_kubernetes
import jsonschema
import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config

from facility.cluster.limits import Identity, WorkerRequest
from facility.config import FacilityConfig
from facility.deploy import chart
from facility.hub.authenticator import VOAuthenticator
from tests.admission import evaluate
from tests.network_policy import selects

REPO = Path(__file__).resolve().parent.parent
CI_VALUES = REPO / "helm" / "facility" / "ci"
MINIMAL, MAXIMAL = CI_VALUES / "minimal-values.yaml", CI_VALUES / "maximal-values.yaml"
SHARED = CI_VALUES / "shared-namespace-values.yaml"  # with MINIMAL: every user in one namespace
K8S_VERSION = "1.37.0"
# the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
K8S_VERSIONS = ("1.30.0", K8S_VERSION)
# the cluster autoscaler's default --expendable-pods-priority-cutoff: pending pods of a lower
# priority never make it add a node
AUTOSCALER_CUTOFF = -10
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
DASK_KINDS = {"daskclusters", "daskjobs", "daskworkergroups", "daskautoscalers"}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart with its dependencies, as `make chart` assembles it."""
    path = tmp_path_factory.mktemp("chart") / "facility"
    left_out = chart.assemble(path)
    assert all("jupyterhub" in why for why in left_out)
    return path


def values_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


def render(build: Path, *values: Path) -> list[dict[str, Any]]:
    return chart.template(build, list(values))


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict:
    [found] = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name
               and namespace in (None, o["metadata"].get("namespace"))]
    return found


# -- the schema --------------------------------------------------------------------------------


def test_values_schema_is_generated_from_the_configuration_model() -> None:
    committed = json.loads((chart.CHART / "values.schema.json").read_text())
    assert committed == chart.values_schema(), \
        "values.schema.json drifted from FacilityConfig: run python -m facility.deploy.chart schema"
    assert committed["properties"]["facility"]["additionalProperties"] is False
    assert "ClusterConfig" in committed["$defs"]


def test_the_default_values_validate_and_hold_a_valid_facility_configuration() -> None:
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    jsonschema.validate(values, chart.values_schema())
    FacilityConfig.model_validate(values["facility"])


@pytest.mark.parametrize(("bad", "message"), [
    ("facility: {cluster: {max_workerz: 3}}", "at '/facility/cluster': additional properties 'max_workerz'"),
    ("facility: {cluster: {threads_per_worker: 0}}",
     "at '/facility/cluster/threads_per_worker': minimum: got 0, want 1"),
    ("facility: {cluster: {memory_limit: lots}}", "at '/facility/cluster/memory_limit'"),
    ("facility: {cluster: {kubernetes: {user_namespace_template: Facility}}}",
     "at '/facility/cluster/kubernetes/user_namespace_template'"),
    ("users: [Alice]", "at '/users/0'"),
    ("jupyterhubb: {}", "additional properties 'jupyterhubb' not allowed"),
    ("facility: {hub: {vo: {issuer: null}}}", "facility.hub.vo.issuer: set the VO's OpenID issuer URL"),
    ("voClient: {secret: ''}", "voClient.secret: the hub's client secret"),
    ("facility: {cluster: {kubernetes: {namespace: facility, user_namespace_template: null}}}",
     'facility.cluster.kubernetes.namespace ("facility"): set a namespace for users\' servers'),
    ("users: [a--b]", "at '/users/0'"),
    ("networkPolicy: {operatorNamespace: dask-operator}",
     "networkPolicy.operatorNamespace (dask-operator) names an operator installed outside"),
    ("dask-kubernetes-operator: {enabled: false}", "networkPolicy.operatorNamespace: the namespace"),
])
def test_bad_values_are_refused_naming_the_value(build: Path, tmp_path: Path, bad: str,
                                                 message: str) -> None:
    with pytest.raises(chart.ChartError) as refused:
        render(build, MINIMAL, values_file(tmp_path, bad))
    assert message in str(refused.value)


# -- lint and render ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [MINIMAL, MAXIMAL], ids=["minimal", "maximal"])
def test_helm_lint_strict_passes(build: Path, values: Path) -> None:
    assert "0 chart(s) failed" in chart.lint(build, [values])


@pytest.mark.parametrize("values", [MINIMAL, MAXIMAL], ids=["minimal", "maximal"])
def test_every_rendered_object_validates(build: Path, values: Path) -> None:
    objects = render(build, values)
    crds = {(c["spec"]["group"], c["spec"]["names"]["kind"]): c
            for c in by_kind(objects, "CustomResourceDefinition")}
    assert {kind for _, kind in crds} == {"DaskCluster", "DaskJob", "DaskWorkerGroup", "DaskAutoscaler"}
    kinds = set()
    for obj in objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        kinds.add(obj["kind"])
        if (group, obj["kind"]) in crds:
            [version] = crds[(group, obj["kind"])]["spec"]["versions"]
            jsonschema.validate(obj, version["schema"]["openAPIV3Schema"])
        elif group == "monitoring.coreos.com":
            assert_prometheus_monitor(obj)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    assert {"ConfigMap", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "PriorityClass",
            "Deployment"} <= kinds


def assert_prometheus_monitor(obj: dict[str, Any]) -> None:
    """The fields the Prometheus operator needs (its CRDs are not part of this render)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    spec = obj["spec"]
    endpoints = spec["endpoints"] if obj["kind"] == "ServiceMonitor" else spec["podMetricsEndpoints"]
    assert spec["selector"]["matchLabels"]
    assert all(e["port"] == "http-dashboard" and e["path"] == "/metrics" for e in endpoints)


def test_the_operator_is_the_installed_dask_kubernetes(build: Path) -> None:
    objects = render(build, MINIMAL)
    version = dask_kubernetes.__version__
    meta = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    declared = {d["name"]: d for d in meta["dependencies"]}
    assert declared["dask-kubernetes-operator"]["version"] == version
    assert declared["jupyterhub"]["version"].startswith("4.")
    # the hub, the proxy and the user scheduler are Deployments too when the jupyterhub chart is in
    [operator] = [d for d in by_kind(objects, "Deployment") if "operator" in d["metadata"]["name"]]
    assert operator["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{version}")
    shipped = {yaml.safe_load(p.read_text())["metadata"]["name"]
               for p in (chart.OPERATOR_CHART / "crds").glob("*.yaml")}
    assert {c["metadata"]["name"] for c in by_kind(objects, "CustomResourceDefinition")} == shipped


def test_make_chart_writes_the_maximal_manifests(tmp_path: Path) -> None:
    output = tmp_path / "manifests.yaml"
    done = subprocess.run([sys.executable, "-m", "facility.deploy.chart", "render", "-f", str(MAXIMAL),
                           "-o", str(output), "--build", str(tmp_path / "build")],
                          capture_output=True, text=True, check=True)
    assert "wrote" in done.stdout
    text = output.read_text()
    assert text.startswith("# helm template of helm/facility")
    assert {"Namespace", "ResourceQuota", "LimitRange", "ServiceMonitor", "PodMonitor"} <= \
        {d["kind"] for d in yaml.safe_load_all(text) if d}


# -- what the objects say ----------------------------------------------------------------------


def test_users_may_manage_only_dask_objects_of_their_namespace(build: Path, tmp_path: Path) -> None:
    objects = render(build, MAXIMAL)
    [role] = [r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == "facility-facility-user"]
    for rule in role["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
        written = set(rule["verbs"]) & WRITE_VERBS
        if rule["apiGroups"] == ["kubernetes.dask.org"]:
            assert set(rule["resources"]) <= DASK_KINDS
        elif written:  # a cluster's TLS keys and credentials: made and removed, never read
            assert rule["resources"] == ["secrets"]
            assert set(rule["verbs"]) == {"create", "delete"}
    assert role["rules"][-1]["resources"] == ["pods", "pods/log", "events"]
    # granted only inside users' namespaces, each to that namespace's own account
    users_bindings = [b for b in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding")
                      if b["roleRef"]["name"] == "facility-facility-user"]
    assert {b["kind"] for b in users_bindings} == {"RoleBinding"}
    assert {b["metadata"]["namespace"] for b in users_bindings} == {"facility-alice", "facility-bob"}
    for binding in users_bindings:
        user = binding["metadata"]["namespace"].removeprefix("facility-")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"facility-user-{user}",
                                        "namespace": binding["metadata"]["namespace"]}]
    # in a shared namespace: one account each, bound there
    listed = values_file(tmp_path, "users: [alice, bob]")
    shared = [b for b in by_kind(render(build, MINIMAL, SHARED, listed), "RoleBinding")
              if b["roleRef"]["name"] == "facility-facility-user"]
    assert {(b["metadata"]["namespace"], b["subjects"][0]["name"]) for b in shared} == {
        ("facility-users", "facility-user-alice"), ("facility-users", "facility-user-bob")}


def test_each_user_namespace_has_quota_limits_and_the_configuration(build: Path) -> None:
    objects = render(build, MAXIMAL)
    for user in ("alice", "bob"):
        namespace = f"facility-{user}"
        labels = named(objects, "Namespace", namespace)["metadata"]["labels"]
        assert labels["facility.dev/user"] == user
        assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
        assert labels["hub.jupyter.org/network-access-hub"] == "true"
        quota = named(objects, "ResourceQuota", "facility-user", namespace)["spec"]["hard"]
        assert quota["requests.nvidia.com/gpu"] == "4"
        limits = named(objects, "LimitRange", "facility-user", namespace)["spec"]["limits"][0]
        assert limits["max"] == {"cpu": "16", "memory": "64Gi"}
        config = yaml.safe_load(named(objects, "ConfigMap", "facility-config", namespace)["data"]
                                ["facility.yaml"])
        assert FacilityConfig.model_validate(config).cluster.kubernetes.namespace == namespace
        spawner_role = named(objects, "RoleBinding", "facility-hub-spawner", namespace)
        assert spawner_role["subjects"] == [{"kind": "ServiceAccount", "name": "hub",
                                             "namespace": "facility"}]


def cluster_pod_labels(config: FacilityConfig, user: str) -> dict[str, dict[str, str]]:
    """Labels of a user's scheduler and workers, as the kubernetes backend asks for them."""
    from facility.cluster.kubernetes import KubernetesBackend

    backend = KubernetesBackend(config, f"{user}-zpeak", request=WorkerRequest(1, 2, threads=1, memory=2**30),
                                identity=Identity(user, ("cms",)))
    [cluster] = [m for m in backend.manifests(environ={"JUPYTER_IMAGE_SPEC": "img"})
                 if m["kind"] == "DaskCluster"]
    base = {"dask.org/cluster-name": cluster["metadata"]["name"]}
    return {role: {**base, "dask.org/component": role, **cluster["spec"][role]["metadata"]["labels"]}
            for role in ("scheduler", "worker")}


def reaches(policy: dict[str, Any], source: dict[str, str]) -> bool:
    """Whether a pod of the policy's namespace with ``source`` labels is let in."""
    return any(selects(peer["podSelector"], source) for rule in policy["spec"]["ingress"]
               for peer in rule["from"] if "namespaceSelector" not in peer)


def test_a_users_schedulers_open_only_to_their_own_pods_in_a_shared_namespace(
        build: Path, tmp_path: Path) -> None:
    objects = render(build, MINIMAL, SHARED, values_file(tmp_path, "users: [alice, bob]"))
    config = FacilityConfig.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "facility-config", "facility-users")["data"]["facility.yaml"]))
    assert config.cluster.kubernetes.namespace == "facility-users"
    config.home = tmp_path
    # the policies that let traffic in (beside the namespace's deny-all and egress rules)
    policies = [p for p in by_kind(objects, "NetworkPolicy") if p["spec"].get("ingress")]
    alice = cluster_pod_labels(config, "alice")
    alice_notebook = {"component": "singleuser-server", "facility.dev/user": "alice"}
    bob_notebook = {"component": "singleuser-server", "facility.dev/user": "bob"}
    carol_scheduler = cluster_pod_labels(config, "carol")["scheduler"]
    for target in alice.values():
        applying = [p for p in policies if selects(p["spec"]["podSelector"], target)]
        assert [p["metadata"]["name"] for p in applying] == ["facility-dask-alice"]
        assert reaches(applying[0], alice_notebook)
        assert reaches(applying[0], alice["worker"])
        assert not reaches(applying[0], bob_notebook)
    # users the chart does not know share one policy: only facility pods, and TLS per cluster
    [others] = [p for p in policies if selects(p["spec"]["podSelector"], carol_scheduler)]
    assert others["metadata"]["name"] == "facility-dask"
    assert reaches(others, bob_notebook)
    assert not reaches(others, {"app": "something-else"})


def test_in_user_namespaces_dask_pods_open_to_their_namespace_and_the_operator(build: Path) -> None:
    objects = render(build, MAXIMAL)
    policy = named(objects, "NetworkPolicy", "facility-dask", "facility-alice")
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[0] == {"podSelector": {}}
    # the operator the chart deploys, where it deploys it
    [operator] = [d for d in by_kind(objects, "Deployment") if "operator" in d["metadata"]["name"]]
    operator_namespace = {"kubernetes.io/metadata.name": operator["metadata"].get("namespace", "facility")}
    assert selects(peers[1]["namespaceSelector"], operator_namespace)
    assert selects(peers[1]["podSelector"], operator["spec"]["template"]["metadata"]["labels"])
    scrape = policy["spec"]["ingress"][1]  # monitoring is on: Prometheus, dashboard port only
    prometheus = {"kubernetes.io/metadata.name": "monitoring"}
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": prometheus}}]
    assert scrape["ports"] == [{"port": "http-dashboard", "protocol": "TCP"}]


def test_schedulers_outrank_workers_under_the_configured_names(build: Path) -> None:
    objects = render(build, MAXIMAL)
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    k8s = values["facility"]["cluster"]["kubernetes"]
    scheduler = named(objects, "PriorityClass", k8s["scheduler_priority_class"])
    worker = named(objects, "PriorityClass", k8s["worker_priority_class"])
    placeholders = named(objects, "PriorityClass", "facility-user-placeholder-priority")
    assert scheduler["value"] == 0  # with user servers: never takes a server's place
    assert worker["value"] >= AUTOSCALER_CUTOFF  # pending workers make the autoscaler add nodes
    assert AUTOSCALER_CUTOFF <= placeholders["value"] < worker["value"] < scheduler["value"]
    assert worker["preemptionPolicy"] == "Never"


# -- the hub, as the jupyterhub chart's hub loads it --------------------------------------------


def services_url(c: Config) -> str:
    [culler] = [s for s in c.JupyterHub.services if s["name"] == "idle-culler"]
    return next(arg for arg in culler["command"] if arg.startswith("--url="))


class FakeGroup:
    def __init__(self, name: str) -> None:
        self.name = name


class SpawnerView:
    """What profile_list reads of a spawner: its user's groups."""

    def __init__(self, *groups: str) -> None:
        self.user = type("User", (), {"groups": [FakeGroup(g) for g in groups]})()
        self.namespace = "facility-alice"


def test_the_hub_module_with_chart_values_configures_jupyterhub(build: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = values_file(tmp_path, """
facility:
  hub:
    vo:
      authorize_url: https://cms-auth.example.org/authorize
      token_url: https://cms-auth.example.org/token
      userinfo_url: https://cms-auth.example.org/userinfo
""")
    objects = render(build, MAXIMAL, explicit)
    config_file = tmp_path / "facility.yaml"
    config_file.write_text(named(objects, "ConfigMap", "facility-config", "facility")["data"]["facility.yaml"])
    presets = yaml.safe_load((chart.CHART / "values.yaml").read_text())["jupyterhub"]
    monkeypatch.setenv("FACILITY_CONFIG", str(config_file))
    monkeypatch.setenv("FACILITY_HUB_CLIENT_SECRET", "from-the-secret")
    c = Config()
    # what the jupyterhub chart's own configuration has set before the facility's is loaded
    c.KubeSpawner.environment = {"FACILITY_CONFIG": presets["singleuser"]["extraEnv"]["FACILITY_CONFIG"]}
    c.JupyterHub.services = [{"name": "other-service", "url": "http://other:8000"}]
    hub_file = REPO / "images" / "hub" / "jupyterhub_config.d" / "facility.py"
    exec(compile(hub_file.read_text(), str(hub_file), "exec"), {"c": c})

    assert c.JupyterHub.authenticator_class is VOAuthenticator
    assert c.VOAuthenticator.oauth_callback_url == "https://hub.facility.example.org/hub/oauth_callback"
    assert c.VOAuthenticator.client_secret == "from-the-secret"
    assert c.VOAuthenticator.admin_groups == {"cms/facility-admins"}
    assert c.JupyterHub.spawner_class == "facility.hub.kube.FacilityKubeSpawner"
    assert "bind_url" not in c.JupyterHub
    assert "db_url" not in c.JupyterHub
    spawner = c.KubeSpawner
    assert spawner.environment["FACILITY_CONFIG"] == "/etc/facility/facility.yaml"
    assert spawner.environment["BEARER_TOKEN_FILE"] == "/home/jovyan/.facility/token"
    assert spawner.environment["FACILITY_CLUSTER__KUBERNETES__NAMESPACE"](SpawnerView()) == "facility-alice"
    assert spawner.extra_labels == {"facility.dev/user": "{username}"}
    assert services_url(c) == "--url=http://127.0.0.1:8081/hub/api"
    assert spawner.enable_user_namespaces is True
    assert spawner.user_namespace_template == "facility-{username}"
    assert [p["slug"] for p in spawner.profile_list(SpawnerView("cms"))] == ["cpu-small", "cpu-large"]
    gpu = spawner.profile_list(SpawnerView("cms", "cms/gpu"))[-1]["kubespawner_override"]
    assert gpu["image"] == "registry.example.org/facility/user-gpu:0.1.0"
    assert gpu["extra_resource_limits"] == {"nvidia.com/gpu": "1"}
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other-service", "idle-culler", "config-watch"}
    assert services["config-watch"]["command"][-4:] == ["--file", str(config_file), "--every", "30"]
    assert "--timeout=7200" in services["idle-culler"]["command"]
    assert presets["cull"]["enabled"] is False  # the facility's culler, not a second one


# -- the images --------------------------------------------------------------------------------


IMAGES = REPO / "images"


def pinned(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("image", ["hub", "user-cpu", "user-gpu"])
def test_images_install_the_tested_pins_with_the_tested_python(image: str) -> None:
    dockerfile = (IMAGES / image / "Dockerfile").read_text()
    assert "COPY pyproject.toml constraints.txt" in dockerfile
    assert "-c constraints.txt ." in dockerfile
    python = ".".join(map(str, sys.version_info[:3]))
    assert f"python:{python}-" in dockerfile or f"python install {python}" in dockerfile


def test_the_constraints_are_what_the_tests_run() -> None:
    wrong = {name: (version, metadata.version(name)) for name, version in
             pinned(REPO / "constraints.txt").items() if metadata.version(name) != version}
    assert wrong == {}


def test_the_images_extra_requirements_resolve_against_the_tested_pins(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    extras = [IMAGES / "hub" / "requirements.txt", IMAGES / "user-gpu" / "requirements.txt"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                    "--only-binary", ":all:", "--report", str(report), "-c", str(REPO / "constraints.txt"),
                    *[arg for path in extras for arg in ("-r", str(path))]],
                   check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    wanted = {**pinned(extras[0]), **pinned(extras[1])}
    assert {name: resolved[name] for name in wanted} == wanted
    tested = pinned(REPO / "constraints.txt")
    assert {n: v for n, v in resolved.items() if n in tested and tested[n] != v} == {}
    # nothing an image installs is left to whatever the index has that day
    assert {n: v for n, v in resolved.items() if n not in tested and n not in wanted} == {}


def test_the_gpu_image_adds_the_headers_of_its_own_cuda_release() -> None:
    dockerfile = (IMAGES / "user-gpu" / "Dockerfile").read_text()
    [base] = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    major, minor = base.split(":")[1].split(".")[:2]
    assert "-runtime-" in base
    for package in ("cuda-cudart-dev", "cuda-nvrtc-dev"):
        assert f"{package}-{major}-{minor}" in dockerfile


# -- the admission policy, evaluated with a CEL interpreter -------------------------------------


OWNERSHIP = ("a user's account may make and change only that user's Dask objects (labelled "
             "facility.dev/user with the user, named after the user)")
MOUNT = "a Dask pod may mount only its own cluster's Secrets (<cluster>-tls, <cluster>-credentials)"
ENV = "a Dask pod's environment may come only from its own cluster's Secrets"
ACCOUNT = "Dask pods run with their user's account (facility-user-<user>) or none"
HOME = "a Dask pod may mount only its user's home (claim-<user>), no other volume claim"
SECRETS = ("a user's account may make and delete only that user's Secrets (labelled facility.dev/user "
           "with the user, named after the user's cluster)")


def policy(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return named(objects, "ValidatingAdmissionPolicy", f"facility-facility-{name}")


def admitted(policy: dict[str, Any], obj: dict[str, Any] | None, user: str = "alice",
             operation: str = "CREATE", old: dict[str, Any] | None = None,
             account: str | None = None) -> list[str] | None:
    """What the policy says to ``user``'s account (or ``account``) asking for ``operation`` in
    the shared namespace: the failed validations' messages, None if it does not apply."""
    username = account or f"system:serviceaccount:facility-users:facility-user-{user}"
    request = {"userInfo": {"username": username}, "namespace": "facility-users",
               "operation": operation}
    return evaluate(policy, request, obj, old)


def shared_cluster(build: Path, tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shared-namespace render, and alice's DaskCluster as the backend makes it there."""
    from tests.test_kubernetes import render as cluster_manifests

    objects = render(build, MINIMAL, SHARED)
    config = FacilityConfig.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "facility-config", "facility-users")["data"]["facility.yaml"]))
    config.home = tmp_path
    return objects, cluster_manifests(config)["DaskCluster"]


def copy(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(obj))


def test_dask_pods_get_only_their_own_clusters_secrets(build: Path, tmp_path: Path) -> None:
    from tests.test_batch import daskjob_manifests

    objects, mine = shared_cluster(build, tmp_path)
    pods = policy(objects, "dask-pods")
    binding = named(objects, "ValidatingAdmissionPolicyBinding", "facility-facility-dask-pods")
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert admitted(pods, mine) == []
    config = FacilityConfig.model_validate(yaml.safe_load(
        named(objects, "ConfigMap", "facility-config", "facility-users")["data"]["facility.yaml"]))
    config.home = tmp_path
    assert admitted(pods, daskjob_manifests(config, 2)["DaskJob"]) == []

    foreign_mount = copy(mine)  # mallory's cluster, mounting alice's Secrets
    foreign_mount["metadata"].update(name="mallory-steal", labels={"facility.dev/user": "mallory"})
    assert admitted(pods, foreign_mount, "mallory") == [MOUNT, ENV]
    borrowed = copy(mine)
    borrowed["spec"]["worker"]["spec"]["serviceAccountName"] = "hub"
    assert admitted(pods, borrowed) == [ACCOUNT]
    others = copy(mine)
    others["spec"]["worker"]["spec"]["serviceAccountName"] = "facility-user-bob"
    assert admitted(pods, others) == [ACCOUNT]


def test_the_admission_policy_has_no_side_doors(build: Path, tmp_path: Path) -> None:
    """Init containers, the legacy ``serviceAccount`` field and CSI secret volumes are checked
    like the rest; users cannot make a worker group, which could name another user's cluster."""
    objects, mine = shared_cluster(build, tmp_path)
    pods = policy(objects, "dask-pods")
    victim = "bob-zpeak-credentials"  # another cluster's (this one is alice-zpeak)
    init = copy(mine)
    init["spec"]["worker"]["spec"]["initContainers"] = [{"name": "copy", "image": "busybox", "env": [
        {"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": victim, "key": "FACILITY_ACCESS_TOKEN"}}}]}]
    assert admitted(pods, init) == [ENV]
    legacy = copy(mine)
    legacy["spec"]["scheduler"]["spec"]["serviceAccount"] = "hub"
    assert admitted(pods, legacy) == [ACCOUNT]
    csi = copy(mine)
    csi["spec"]["worker"]["spec"]["volumes"].append(
        {"name": "vault", "csi": {"driver": "secrets-store.csi.k8s.io"}})
    assert admitted(pods, csi) == [MOUNT]
    [role] = [r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == "facility-facility-user"]
    groups = [rule for rule in role["rules"] if "daskworkergroups" in rule["resources"]]
    assert groups
    assert all("create" not in rule["verbs"] for rule in groups)


def test_users_sharing_a_namespace_cannot_touch_each_others_clusters(build: Path,
                                                                     tmp_path: Path) -> None:
    objects, alices = shared_cluster(build, tmp_path)
    pods, secrets = policy(objects, "dask-pods"), policy(objects, "user-secrets")
    assert admitted(pods, alices, "bob") == [OWNERSHIP]  # made in alice's name
    relabelled = copy(alices)
    relabelled["metadata"]["labels"]["facility.dev/user"] = "bob"
    assert OWNERSHIP in (admitted(pods, relabelled, "bob", "UPDATE", old=alices) or [])
    assert admitted(pods, None, "bob", "DELETE", old=alices) == [OWNERSHIP]
    assert admitted(pods, None, "alice", "DELETE", old=alices) == []
    lookalike = copy(alices)  # mallory's own, named so that alice's Secrets would fit it
    lookalike["metadata"]["labels"] = {"facility.dev/user": "mallory"}
    assert OWNERSHIP in (admitted(pods, lookalike, "mallory") or [])
    home = copy(alices)
    home["metadata"].update(name="bob-peek", labels={"facility.dev/user": "bob"})
    home["spec"]["worker"]["spec"]["volumes"] = [
        {"name": "home", "persistentVolumeClaim": {"claimName": "claim-alice"}}]
    assert HOME in (admitted(pods, home, "bob") or [])
    home["spec"]["worker"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "claim-bob"
    assert HOME not in (admitted(pods, home, "bob") or [HOME])
    group = {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup",
             "metadata": {"name": "alice-zpeak-default", "labels": alices["metadata"]["labels"]},
             "spec": {"cluster": "alice-zpeak", "worker": alices["spec"]["worker"]}}
    assert admitted(pods, group, "bob", "UPDATE", old=group) == [OWNERSHIP]  # scaling alice's
    assert admitted(pods, group, "alice", "UPDATE", old=group) == []
    operator = "system:serviceaccount:facility:facility-dask-kubernetes-operator"
    assert admitted(pods, group, "alice", "UPDATE", old=group, account=operator) is None
    tls = {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "alice-zpeak-tls", "labels": {"facility.dev/user": "alice"}}}
    assert admitted(secrets, tls) == []
    assert admitted(secrets, None, "bob", "DELETE", old=tls) == [SECRETS]
    squatted = {**tls, "metadata": {**tls["metadata"], "labels": {"facility.dev/user": "bob"}}}
    assert admitted(secrets, squatted, "bob") == [SECRETS]  # a Secret named after alice's cluster
