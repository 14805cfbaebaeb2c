"""User servers on Kubernetes: KubeSpawner, with the server's credentials in a Secret.

KubeSpawner puts the server's hub API token (and the facility the user's VO access token) into
the pod spec as plain values, where anyone allowed to read pods in the namespace reads them.
Here they go into a Secret of the server's own (``<pod>-credentials``), which the pod's
environment references: the hub makes it before the pod and hands it to the pod as its owner
once the pod exists, so it goes when the pod goes. Users may then read pods (to explain a
cluster that does not start) without reading each other's tokens.
"""

from __future__ import annotations

import base64
from typing import Any

from jupyterhub.utils import maybe_future
from kubernetes_asyncio.client import (
    V1EnvVarSource,
    V1ObjectMeta,
    V1Secret,
    V1SecretKeySelector,
)
from kubernetes_asyncio.client.rest import ApiException
from kubespawner import KubeSpawner
from kubespawner.objects import make_owner_reference
from traitlets import List, Unicode, default, validate

HTTP_CONFLICT = 409


class FacilityKubeSpawner(KubeSpawner):
    """KubeSpawner whose server credentials reach the pod through a Secret."""

    credential_variables = List(
        Unicode(), default_value=["JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "FACILITY_ACCESS_TOKEN"],
        config=True, help="variables of the server's environment that travel in its Secret")

    _credentials: dict[str, str]

    @property
    def credentials_secret_name(self) -> str:
        return f"{self.pod_name}-credentials"

    async def get_pod_manifest(self) -> Any:
        pod = await super().get_pod_manifest()
        self._credentials = {}
        for container in pod.spec.containers:
            for variable in container.env or []:
                if variable.name in self.credential_variables and variable.value is not None:
                    self._credentials[variable.name] = variable.value
                    variable.value = None
                    variable.value_from = V1EnvVarSource(secret_key_ref=V1SecretKeySelector(
                        name=self.credentials_secret_name, key=variable.name))
        return pod

    def credentials_secret_manifest(self, owner: dict[str, Any] | None = None) -> V1Secret:
        """The Secret of the last pod manifest's credentials (owned by ``owner``, a pod)."""
        data = {key: base64.b64encode(value.encode()).decode()
                for key, value in self._credentials.items()}
        labels = self._build_common_labels(self._expand_all(self.extra_labels))
        owners = [make_owner_reference(owner["metadata"]["name"], owner["metadata"]["uid"])] \
            if owner else None
        return V1Secret(api_version="v1", kind="Secret", type="Opaque", data=data,
                        metadata=V1ObjectMeta(name=self.credentials_secret_name, labels=labels,
                                              owner_references=owners))

    # the Secret's hooks run whatever an operator configures: theirs come after
    @default("modify_pod_hook")
    def _write_credentials_first(self) -> Any:
        return _write_credentials

    @validate("modify_pod_hook")
    def _keep_writing_credentials(self, proposal: Any) -> Any:
        return _then(_write_credentials, proposal["value"])

    @default("after_pod_created_hook")
    def _give_credentials_to_the_pod(self) -> Any:
        return _own_credentials

    @validate("after_pod_created_hook")
    def _keep_giving_credentials(self, proposal: Any) -> Any:
        return _then(_own_credentials, proposal["value"])


def _then(ours: Any, theirs: Any) -> Any:
    """A hook that runs ours, then theirs (KubeSpawner's hooks take the spawner and the pod)."""
    if theirs is None or theirs is ours:
        return ours
    if getattr(theirs, "facility_hook", False):  # already both
        return theirs

    async def both(spawner: Any, pod: Any) -> Any:
        result = await ours(spawner, pod)
        answer = await maybe_future(theirs(spawner, pod if result is None else result))
        return result if answer is None else answer

    both.facility_hook = True  # type: ignore[attr-defined]
    return both


async def _write_credentials(spawner: FacilityKubeSpawner, pod: Any) -> Any:
    """Before the pod: its Secret, fresh (a restarted server gets new tokens)."""
    secret = spawner.credentials_secret_manifest()
    try:
        await spawner.api.create_namespaced_secret(spawner.namespace, secret)
    except ApiException as exc:
        if exc.status != HTTP_CONFLICT:
            raise
        await spawner.api.patch_namespaced_secret(secret.metadata.name, spawner.namespace,
                                                  {"data": secret.data})
    return pod


async def _own_credentials(spawner: FacilityKubeSpawner, pod: dict[str, Any]) -> None:
    """The pod owns its Secret: Kubernetes deletes the Secret with the pod."""
    owner = spawner.credentials_secret_manifest(pod).metadata.owner_references
    await spawner.api.patch_namespaced_secret(
        spawner.credentials_secret_name, spawner.namespace,
        {"metadata": {"ownerReferences": [spawner.api.api_client.sanitize_for_serialization(o)
                                          for o in owner]}})
