"""Kubernetes backend: a ``DaskCluster`` for the dask-kubernetes operator, shaped by the facility.

What it asks the operator for (see :func:`manifests`):

* a ``Secret`` with the cluster's own TLS credentials, mounted into scheduler and workers, which
  speak mutual TLS only;
* a ``Secret`` with the files that forwarded variables name (``X509_USER_PROXY``,
  ``BEARER_TOKEN_FILE``), mounted at the same paths, and the values of forwarded variables that
  are secrets themselves (``FACILITY_ACCESS_TOKEN``), referenced from the pods' environment so
  that a token never appears in a pod spec;
* a ``DaskCluster`` whose scheduler and workers run the notebook's own image
  (``JUPYTER_IMAGE_SPEC``) with the notebook's forwarded environment, sized by the granted
  request, labelled with the user for the chart's NetworkPolicy, owned by the notebook pod so that
  stopping the server removes the cluster, and with the operator's idle timeout;
* workers whose nanny sets the allocator's thresholds (see :mod:`facility.cluster.allocator`);
* for GPU workers, ``nvidia.com/gpu`` limits with the profile's node selector and tolerations;
* a ``DaskAutoscaler`` between the granted minimum and maximum.

The objects are applied with kr8s. Nothing here runs without a Kubernetes API; the manifests are
validated against the operator's CRD schemas and the Kubernetes object schemas in the tests.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import os
import time
from pathlib import Path
from typing import Any

import dask.config
from dask_kubernetes.operator.kubecluster.kubecluster import make_cluster_spec

from facility.cluster.allocator import allocator_environment
from facility.cluster.base import (
    ENGINE_PRELOAD,
    SCHEDULER_PRELOAD,
    ClusterBackend,
    ClusterError,
    ClusterInfo,
)
from facility.cluster.limits import Identity
from facility.cluster.security import FILES, create_credentials, pem_contents
from facility.config import FacilityConfig

IMAGE_ENV = "JUPYTER_IMAGE_SPEC"
TLS_MOUNT = "/etc/facility/tls"
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
USER_LABEL = "facility.dev/user"


def user_label(user: str) -> str:
    """A user's ``facility.dev/user`` value: the same slug KubeSpawner gives ``{username}`` (the
    name itself when it is a DNS label), so that a NetworkPolicy selects a user's server and
    their Dask pods alike."""
    from kubespawner.slugs import safe_slug

    return safe_slug(user, max_length=48)


def forwarded_environment(patterns: list[str], environ: dict[str, str]) -> dict[str, str]:
    """The notebook's variables that workers need (credentials, facility settings)."""
    return {key: value for key, value in sorted(environ.items())
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)}


def credential_files(forwarded: dict[str, str]) -> dict[str, Path]:
    """Forwarded variables that name a file (a proxy certificate, a token file): the file itself
    must reach the pods too, at the same path."""
    return {key: Path(value) for key, value in forwarded.items()
            if value.startswith("/") and Path(value).is_file()}


def secret_values(patterns: list[str], forwarded: dict[str, str],
                  files: dict[str, Path]) -> dict[str, str]:
    """Forwarded variables whose value is a secret (a token): they travel in the credentials
    Secret, because anyone allowed to read pods in the namespace can read a pod's plain env."""
    return {key: value for key, value in forwarded.items()
            if key not in files and any(fnmatch.fnmatchcase(key, p) for p in patterns)}


def _secret_env(pod: dict, secret: str, names: list[str]) -> None:
    for container in pod["containers"]:
        container["env"] = [e for e in container.get("env", []) if e["name"] not in names] + [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}
            for name in names]


def _mount_credentials(pod: dict, secret: str, files: dict[str, Path]) -> None:
    pod.setdefault("volumes", []).append({"name": "credentials", "secret": {
        "secretName": secret, "defaultMode": 0o400}})
    for container in pod["containers"]:
        container.setdefault("volumeMounts", []).extend(
            {"name": "credentials", "mountPath": str(path), "subPath": key, "readOnly": True}
            for key, path in files.items())


def _preload_args(modules: list[str]) -> list[str]:
    return [arg for module in modules for arg in ("--preload", module)]


def _tls_args(role: str) -> list[str]:
    return ["--tls-ca-file", f"{TLS_MOUNT}/{FILES['ca']}", "--tls-cert", f"{TLS_MOUNT}/{FILES['cert']}",
            "--tls-key", f"{TLS_MOUNT}/{FILES['key']}"] + (["--protocol", "tls"] if role == "scheduler"
                                                          else [])


def _scheduler_http_api() -> dict[str, str]:
    """The operator scales, retires workers gracefully and enforces ``idleTimeout`` through the
    scheduler's HTTP API (``/api/v1/adaptive_target``, ``/retire_workers``, ``/check_idle``) on
    the dashboard port; its fallback, Dask's RPC over plain TCP, cannot reach a TLS scheduler.
    The network policies open that port to the user's own pods and the operator only."""
    routes = [*dask.config.get("distributed.scheduler.http.routes"), "distributed.http.scheduler.api"]
    return {"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "value": repr(list(dict.fromkeys(routes)))}


def _worker_allocator(config: FacilityConfig) -> dict[str, str]:
    """The allocator's thresholds, as the worker's nanny reads them: merged into its
    ``pre-spawn-environ``, where a null removes Dask's own value (a plain variable could set one,
    not remove it). See :mod:`facility.cluster.allocator`."""
    return {"name": "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON",
            "value": repr(allocator_environment(config.cluster))}


def _place(pod: dict, priority_class: str | None, node_selector: dict[str, str],
           tolerations: list[dict[str, str]]) -> None:
    """Which nodes a pod may use and whom it yields to (regular nodes for schedulers, spot
    and GPU pools for workers)."""
    if priority_class:
        pod["priorityClassName"] = priority_class
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]


def _mount_tls(pod: dict, secret: str) -> None:
    pod.setdefault("volumes", []).append({"name": "tls", "secret": {"secretName": secret,
                                                                   "defaultMode": 0o400}})
    for container in pod["containers"]:
        container.setdefault("volumeMounts", []).append(
            {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})


class KubernetesBackend(ClusterBackend):
    """A DaskCluster managed by the dask-kubernetes operator in the user's namespace."""

    backend_name = "kubernetes"

    def image(self, environ: dict[str, str]) -> str:
        image = self.config.cluster.kubernetes.image or environ.get(IMAGE_ENV)
        if not image:
            raise ClusterError(f"cluster {self.name!r}: no worker image; set "
                               f"cluster.kubernetes.image or start from a notebook ({IMAGE_ENV})")
        return image

    def manifests(self, environ: dict[str, str] | None = None,
                  owner_pod: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Everything :meth:`start` applies, in order."""
        env = dict(os.environ if environ is None else environ)
        k8s, request = self.config.cluster.kubernetes, self.request
        secret = f"{self.name}-tls"
        resources: dict[str, dict[str, Any]] = {
            "requests": {"cpu": str(request.threads), "memory": str(request.memory)},
            "limits": {"cpu": str(request.threads), "memory": str(request.memory)}}
        if request.gpus:
            resources["limits"]["nvidia.com/gpu"] = str(request.gpus)
        forwarded = forwarded_environment(k8s.forward_env, env)
        endpoint = self.config.s3_endpoint()
        if endpoint:  # where workers read s3:// replicas
            forwarded.setdefault("AWS_ENDPOINT_URL_S3", endpoint)
        files = credential_files(forwarded)
        hidden = secret_values(k8s.secret_env, forwarded, files)
        credentials = f"{self.name}-credentials"
        cluster = make_cluster_spec(
            self.name, image=self.image(env), n_workers=request.min_workers, env=forwarded,
            scheduler_service_type=k8s.scheduler_service_type,
            idle_timeout=int(self.idle_timeout))
        labels = {USER_LABEL: user_label(self.identity.user), "dask.org/cluster-name": self.name}
        cluster["metadata"].update(namespace=k8s.namespace, labels=labels)
        if owner_pod is not None:
            cluster["metadata"]["ownerReferences"] = [{
                "apiVersion": "v1", "kind": "Pod", "name": owner_pod[0], "uid": owner_pod[1],
                "blockOwnerDeletion": False}]
        spec = cluster["spec"]
        scheduler = spec["scheduler"]["spec"]
        scheduler["containers"][0]["args"] = ["dask", "scheduler", "--host", "0.0.0.0",
                                              *_preload_args(SCHEDULER_PRELOAD), *_tls_args("scheduler")]
        scheduler["containers"][0]["resources"] = {"requests": {"cpu": "1", "memory": "2Gi"},
                                                   "limits": {"memory": "2Gi"}}
        scheduler["containers"][0].setdefault("env", []).append(_scheduler_http_api())
        worker = spec["worker"]["spec"]
        worker["containers"][0]["args"] = [
            "dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(request.threads),
            "--memory-limit", str(request.memory), "--dashboard", "--dashboard-address", "8788",
            *_preload_args(ENGINE_PRELOAD), *_tls_args("worker")]
        worker["containers"][0]["resources"] = resources
        worker["containers"][0].setdefault("env", []).append(_worker_allocator(self.config))
        if request.gpus:
            worker["containers"][0]["args"] += ["--resources", f"GPU={request.gpus}"]
        _place(scheduler, k8s.scheduler_priority_class, k8s.scheduler_node_selector, [])
        # GPU workers go to the GPU pool, whose nodes carry its labels, not the workers' pool's
        gpu_pool = request.gpus and k8s.gpu_node_selector
        _place(worker, k8s.worker_priority_class,
               k8s.gpu_node_selector if gpu_pool else k8s.worker_node_selector,
               [*k8s.worker_tolerations, *(k8s.gpu_tolerations if request.gpus else [])])
        for role in ("scheduler", "worker"):
            spec[role]["metadata"] = {"labels": {USER_LABEL: labels[USER_LABEL]}}
        for pod in (scheduler, worker):
            _mount_tls(pod, secret)
            if files:
                _mount_credentials(pod, credentials, files)
            if hidden:
                _secret_env(pod, credentials, sorted(hidden))
        spec["scheduler"]["service"]["selector"] = {"dask.org/cluster-name": self.name,
                                                     "dask.org/component": "scheduler"}
        secrets = [self._secret(secret, labels, pem_contents(self._credentials_folder()))]
        if files or hidden:
            secrets.append(self._secret(credentials, labels, {
                **{key: path.read_text() for key, path in files.items()}, **hidden}))
        return [*secrets, cluster, {
            "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
            "metadata": {"name": self.name, "namespace": k8s.namespace, "labels": labels},
            "spec": {"cluster": self.name, "minimum": request.min_workers,
                     "maximum": request.max_workers}}]

    def _credentials_folder(self) -> Path:
        if not (self.folder / FILES["key"]).exists():
            create_credentials(self.folder)
        return self.folder

    def _secret(self, name: str, labels: dict[str, str], contents: dict[str, str]) -> dict[str, Any]:
        data = {key: base64.b64encode(value.encode()).decode() for key, value in contents.items()}
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                "metadata": {"name": name, "namespace": self.config.cluster.kubernetes.namespace,
                             "labels": labels}}

    # -- talking to the API server (needs a cluster) -------------------------------------------

    def _api(self) -> Any:
        import kr8s

        return kr8s.api(namespace=self.config.cluster.kubernetes.namespace)

    def _owner_pod(self) -> tuple[str, str] | None:
        from kr8s.objects import Pod

        name = os.environ.get("HOSTNAME")
        if not name:
            return None
        try:
            pod = Pod.get(name, namespace=self.config.cluster.kubernetes.namespace, api=self._api())
        except Exception:  # noqa: BLE001 (no owner pod found: the cluster is left unowned)
            return None
        return pod.name, pod.metadata.uid

    def start(self) -> ClusterInfo:
        from kr8s.objects import object_from_spec

        running = self.running()
        if running is not None:
            return running
        api = self._api()
        for manifest in self.manifests(owner_pod=self._owner_pod()):
            object_from_spec(manifest, api=api, allow_unknown_type=True).create()
        deadline = time.monotonic() + self.config.cluster.worker_start_timeout
        while time.monotonic() < deadline:
            info = self.running()
            if info is not None:
                return info
            time.sleep(1)
        raise ClusterError(f"cluster {self.name!r}: scheduler not running after "
                           f"{self.config.cluster.worker_start_timeout:.0f} s: "
                           + "; ".join(explain_pods(*self._pods_and_events())))

    def running(self) -> ClusterInfo | None:
        import kr8s

        try:
            found = list(kr8s.get("daskclusters", self.name, api=self._api()))
        except Exception:  # noqa: BLE001 (unreachable API: the cluster counts as not running)
            return None
        if not found or found[0].raw.get("status", {}).get("phase") != "Running":
            return None
        host = f"{self.name}-scheduler.{self.config.cluster.kubernetes.namespace}"
        return ClusterInfo(self.name, self.backend_name, f"tls://{host}:{SCHEDULER_PORT}", host,
                           DASHBOARD_PORT, self.identity.user, None, self.request.notes)

    @classmethod
    def clusters_of(cls, config: FacilityConfig, identity: Identity) -> list[ClusterBackend]:
        """The DaskClusters labelled with the user, in the namespace the user's clusters go to."""
        import kr8s

        api = kr8s.api(namespace=config.cluster.kubernetes.namespace)
        try:
            found = kr8s.get("daskclusters", label_selector={USER_LABEL: user_label(identity.user)},
                             api=api)
            return [cls(config, obj.name, identity=identity) for obj in found]
        except Exception:  # noqa: BLE001 (unreachable API: no cluster is known to run)
            return []

    def stop(self) -> bool:
        import kr8s
        from kr8s.objects import Secret

        api, stopped = self._api(), False
        for obj in kr8s.get("daskclusters", self.name, api=api):
            obj.delete()
            stopped = True
        # deleted by name: the users' role may create and delete Secrets but never read them
        namespace = self.config.cluster.kubernetes.namespace
        for name in (f"{self.name}-tls", f"{self.name}-credentials"):
            with contextlib.suppress(kr8s.NotFoundError):
                Secret({"metadata": {"name": name, "namespace": namespace}}, api=api).delete()
        return stopped

    def adapt(self, client: Any, minimum: int, maximum: int) -> dict:
        import kr8s

        for autoscaler in kr8s.get("daskautoscalers", self.name, api=self._api()):
            autoscaler.patch({"spec": {"minimum": minimum, "maximum": maximum}})
            return {"minimum": minimum, "maximum": maximum}
        raise ClusterError(f"cluster {self.name!r} has no autoscaler; is it running?")

    def scale(self, client: Any, n: int) -> dict:
        import kr8s

        api = self._api()
        for autoscaler in kr8s.get("daskautoscalers", self.name, api=api):
            autoscaler.delete()
        for group in kr8s.get("daskworkergroups", f"{self.name}-default", api=api):
            group.patch({"spec": {"worker": {"replicas": n}}})
        return {"workers": n}

    def _pods_and_events(self) -> tuple[list[dict], list[dict]]:
        import kr8s

        api = self._api()
        pods = [p.raw for p in kr8s.get("pods", api=api,
                                        label_selector={"dask.org/cluster-name": self.name})]
        events = [e.raw for e in kr8s.get("events", api=api)]
        return pods, events

    def explain(self, client: Any) -> list[str]:
        return super().explain(client) + explain_pods(*self._pods_and_events())


def explain_pods(pods: list[dict], events: list[dict]) -> list[str]:
    """Why pods of a cluster are not running: pending reasons, image pulls, scheduler events."""
    reasons = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status", {})
        if status.get("phase") == "Running":
            continue
        for container in status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting")
            if waiting:
                reasons.append(f"pod {name}: {waiting.get('reason')}: {waiting.get('message', '')}"
                               .rstrip(": "))
        for condition in status.get("conditions", []):
            if condition.get("status") == "False" and condition.get("reason"):
                reasons.append(f"pod {name}: {condition['reason']}: {condition.get('message', '')}"
                               .rstrip(": "))
        for event in events:
            if event.get("involvedObject", {}).get("name") == name and event.get("type") == "Warning":
                reasons.append(f"pod {name}: event {event.get('reason')}: {event.get('message')}")
        if not any(r.startswith(f"pod {name}:") for r in reasons):
            reasons.append(f"pod {name}: {status.get('phase', 'Unknown')}")
    return reasons
