"""Kubernetes job runner: every job is a ``DaskJob`` of the dask-kubernetes operator.

What it asks the API server for (see :meth:`KubernetesRunner.manifests`), in the namespace and
with the user label of the user's clusters (``facility.dev/user``, which the chart's RBAC and
NetworkPolicy select on) plus ``facility.dev/job``:

* the cluster's TLS ``Secret`` and the ``Secret`` with the user's forwarded credentials, exactly
  as for an interactive cluster (:class:`facility.cluster.kubernetes.KubernetesBackend`);
* a ``DaskJob`` whose cluster is that cluster's spec (notebook image, forwarded environment,
  granted workers, mutual TLS) and whose job pod runs the same entry point as a local job
  (``python -m facility.batch.job ID``) in the user image, with the service account, resources
  and volumes of ``batch.kubernetes``, the same environment and credentials, and the cluster's
  TLS credentials where ``connect()`` looks for them. The operator deletes the cluster when the
  job pod ends.

The job pod reads its inputs and records its outcome in the job store under the facility's state
folder, and writes its outputs to the output area: both must be on a volume the pod mounts
(``batch.kubernetes.volumes``, e.g. the user's home). A job whose pod could not say how it ended
is brought up to date from the DaskJob's status. Nothing here runs without a Kubernetes API; the
manifests are validated against the operator's CRD and the Kubernetes schemas in the tests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dask.utils import parse_bytes

from facility.batch.base import JobRunner
from facility.batch.model import Job, JobError, JobState, job_cluster_name
from facility.cluster.base import ClusterBackend, cluster_folder
from facility.cluster.kubernetes import (
    SCHEDULER_PORT,
    USER_LABEL,
    KubernetesBackend,
    explain_pods,
    user_label,
)
from facility.cluster.limits import Identity, WorkerRequest

JOB_LABEL = "facility.dev/job"
JOB_CONTAINER = "job"
HTTP_FORBIDDEN = 403
PROBES = ("ports", "readinessProbe", "livenessProbe", "startupProbe")
NEVER_STARTS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                "CreateContainerError")


def for_user(items: list[dict[str, Any]], user: str) -> list[dict[str, Any]]:
    """Volumes and mounts with ``{username}`` as the hub spells it in pod and claim names (the
    user's home is ``claim-{username}``)."""
    return list(json.loads(json.dumps(items).replace("{username}", user_label(user))))


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def unwatchable(status: int | None, why: str, pod: str, namespace: str, waited: float,
                patience: float) -> str | None:
    """A job whose pod may not be looked at would wait for ever: once patience is out, the
    refusal is the reason it fails. Other errors (the API out of reach) change nothing."""
    if status != HTTP_FORBIDDEN or waited < patience:
        return None
    return (f"the job pod {pod} has not reported running after {waited:.0f} s and cannot be "
            f"looked at: {why} (the account needs get and list on pods and events in namespace "
            f"{namespace})")


def runner_failure(pod: dict[str, Any] | None, events: list[dict[str, Any]], waited: float,
                   patience: float) -> str | None:
    """Why a job pod will never run (an image that cannot be pulled, a quota or limit that
    refuses it, no node after ``patience`` seconds), or None while it may still start."""
    if pod is None:
        creation = [e for e in events if e.get("reason") == "FailedCreate"]
        if creation:
            return f"the job pod could not be created: {creation[-1].get('message')}"
        return None if waited < patience else f"no job pod after {waited:.0f} s"
    status = pod.get("status", {})
    for container in status.get("containerStatuses", []):
        waiting = container.get("state", {}).get("waiting") or {}
        if waiting.get("reason") in NEVER_STARTS:
            return f"the job pod cannot start: {waiting['reason']}: {waiting.get('message', '')}"
    if status.get("phase") == "Pending" and waited >= patience:
        return (f"the job pod is still pending after {waited:.0f} s: "
                + "; ".join(explain_pods([pod], events)))
    return None


class KubernetesRunner(JobRunner):
    """DaskJobs in the user's namespace, one per batch job."""

    runner_name = "kubernetes"

    def check_setup(self) -> None:
        if not self.config.batch.kubernetes.volumes:
            raise JobError("batch.kubernetes.volumes is empty: a job pod must mount the volume "
                           "that holds the facility's state and output area, e.g. "
                           "[{name: home, persistentVolumeClaim: {claimName: claim-{username}}}] "
                           "with batch.kubernetes.volume_mounts")

    def backend(self, job: Job) -> KubernetesBackend:
        """The job's cluster as the kubernetes backend shapes it (a scheduler alone for a job
        that asked for no workers: a DaskJob always has a cluster)."""
        request = job.request or WorkerRequest.from_config(self.config, min_workers=0, max_workers=0)
        return KubernetesBackend(self.config, job_cluster_name(job.user, job.id), request=request,
                                 identity=Identity(job.user), idle_timeout=0)

    def manifests(self, job: Job, environ: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Everything :meth:`launch` creates, in order: the Secrets, then the DaskJob."""
        env = self.inputs(job)[1] if environ is None else environ
        backend = self.backend(job)
        objects = backend.manifests(environ=env)
        [cluster] = [o for o in objects if o["kind"] == "DaskCluster"]
        namespace = cluster["metadata"]["namespace"]
        labels = {USER_LABEL: user_label(job.user), JOB_LABEL: str(job.id)}
        daskjob = {
            "apiVersion": "kubernetes.dask.org/v1", "kind": "DaskJob",
            "metadata": {"name": backend.name, "namespace": namespace, "labels": labels},
            "spec": {"job": {"metadata": {"labels": labels},
                             "spec": self.job_pod(job, backend, cluster, namespace)},
                     "cluster": {"metadata": {"labels": labels}, "spec": cluster["spec"]}}}
        adaptive = job.request is not None and job.request.min_workers != job.request.max_workers
        autoscaler = [o for o in objects if o["kind"] == "DaskAutoscaler" and adaptive]
        for obj in autoscaler:
            obj["metadata"]["labels"] = labels
        return [*(o for o in objects if o["kind"] == "Secret"), daskjob, *autoscaler]

    def job_pod(self, job: Job, backend: KubernetesBackend, cluster: dict[str, Any],
                namespace: str) -> dict[str, Any]:
        """The scheduler's pod (image, environment, credentials, placement on regular nodes)
        made into the job's: its command, resources, service account and volumes."""
        settings = self.config.batch.kubernetes
        pod = copy.deepcopy(cluster["spec"]["scheduler"]["spec"])
        container = pod["containers"][0]
        for key in PROBES:
            container.pop(key, None)
        memory = str(parse_bytes(settings.memory))
        container.update(
            name=JOB_CONTAINER, args=["python", "-m", "facility.batch.job", str(job.id)],
            resources={"requests": {"cpu": str(settings.cpu), "memory": memory},
                       "limits": {"memory": memory}})
        if settings.image:
            container["image"] = settings.image
        container["env"] = [e for e in container.get("env", []) if e["name"] != "DASK_SCHEDULER_ADDRESS"] + [
            {"name": "DASK_SCHEDULER_ADDRESS",
             "value": f"tls://{backend.name}-scheduler.{namespace}:{SCHEDULER_PORT}"}]
        container["volumeMounts"] = [*container.get("volumeMounts", []), {
            "name": "tls", "mountPath": str(cluster_folder(self.config, backend.name)),
            "readOnly": True}, *for_user(settings.volume_mounts, job.user)]
        pod["volumes"] = [*pod.get("volumes", []), *for_user(settings.volumes, job.user)]
        pod["restartPolicy"] = "Never"
        if settings.service_account:
            pod["serviceAccountName"] = settings.service_account.replace(
                "{username}", user_label(job.user))
        return pod

    # -- talking to the API server (needs a cluster) -------------------------------------------

    def _namespace(self, job: Job) -> str:
        return str(job.handle.get("namespace") or self.config.cluster.kubernetes.namespace)

    def _api(self, namespace: str) -> Any:
        import kr8s

        return kr8s.api(namespace=namespace)

    def launch(self, job: Job) -> dict[str, Any]:
        from kr8s.objects import object_from_spec

        manifests = self.manifests(job)
        namespace = manifests[-1]["metadata"]["namespace"]
        api = self._api(namespace)
        name = next(m for m in manifests if m["kind"] == "DaskJob")["metadata"]["name"]
        try:
            for manifest in manifests:
                object_from_spec(manifest, api=api, allow_unknown_type=True).create()
        except Exception:
            self.kill(dataclasses.replace(job, handle={"name": name, "namespace": namespace}))
            raise
        return {"name": name, "namespace": namespace}

    def _daskjob(self, job: Job) -> dict[str, Any] | None:
        import kr8s

        found = list(kr8s.get("daskjobs", job.handle["name"], api=self._api(self._namespace(job))))
        return found[0].raw if found else None

    def ended(self, job: Job) -> tuple[JobState, str | None] | None:
        try:
            daskjob = self._daskjob(job)
        except Exception:  # noqa: BLE001 (see the comment below)
            return None  # the API is out of reach: nothing is known, nothing changes
        if daskjob is None:
            return "failed", f"the DaskJob {job.handle['name']} was deleted"
        status = daskjob.get("status", {}).get("jobStatus")
        if status in ("Successful", "Failed"):
            self.backend(job).stop()  # the job's Secrets (the operator removes its cluster)
            return ("succeeded", None) if status == "Successful" else (
                "failed", f"the job pod {job.handle['name']}-runner failed; its log: "
                          f"`facility jobs logs {job.id}`")
        why = self._never_starts(job)
        if why is None:
            return None
        self.kill(job)
        return "failed", why

    def _never_starts(self, job: Job) -> str | None:
        import kr8s

        api, name = self._api(self._namespace(job)), f"{job.handle['name']}-runner"
        waited = time.time() - (job.started or time.time())
        patience = self.config.batch.kubernetes.start_timeout
        try:
            pods = [p.raw for p in kr8s.get("pods", name, api=api)]
            events = [e.raw for e in kr8s.get("events", api=api)
                      if e.raw.get("involvedObject", {}).get("name") in (name, job.handle["name"])]
        except kr8s.ServerError as refused:
            return unwatchable(_status(refused), str(refused), name, self._namespace(job),
                               waited, patience)
        except Exception:  # noqa: BLE001 (see the comment below)
            return None  # out of reach: nothing is known, nothing changes
        return runner_failure(pods[0] if pods else None, events, waited, patience)

    def kill(self, job: Job) -> None:
        import kr8s

        if job.handle.get("name"):
            for daskjob in kr8s.get("daskjobs", job.handle["name"],
                                    api=self._api(self._namespace(job))):
                daskjob.delete()
        self.backend(job).stop()

    def logs(self, job: Job) -> str:
        """The job pod's log while the API server keeps it, else the log file."""
        from kr8s.objects import Pod

        if job.handle.get("name"):
            with contextlib.suppress(Exception):
                pod = Pod.get(f"{job.handle['name']}-runner", namespace=self._namespace(job),
                              api=self._api(self._namespace(job)))
                return "\n".join(pod.logs())
        return super().logs(job)

    @contextmanager
    def cluster(self, job: Job) -> Iterator[ClusterBackend | None]:
        """The operator starts the DaskJob's cluster beside the job pod, and deletes it when the
        pod ends: the job waits for it and leaves it alone."""
        if job.request is None:
            yield None
            return
        backend = self.backend(job)
        deadline = time.monotonic() + self.config.cluster.worker_start_timeout
        while backend.running() is None:
            if time.monotonic() > deadline:
                raise JobError(f"job {job.id}: the DaskJob's cluster {backend.name!r} is not "
                               f"running after {self.config.cluster.worker_start_timeout:.0f} s")
            time.sleep(1)
        yield backend
