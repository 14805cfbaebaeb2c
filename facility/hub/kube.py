"""User servers on Kubernetes: KubeSpawner, with the server's credentials in a Secret, and a
namespace of the user's own made on their first server.

KubeSpawner puts the server's hub API token (and the facility the user's VO access token) into
the pod spec as plain values, where anyone allowed to read pods in the namespace reads them.
Here they go into a Secret of the server's own (``<pod>-credentials``), which the pod's
environment references: the hub makes it before the pod and hands it to the pod as its owner
once the pod exists, so it goes when the pod goes. Users may then read pods (to explain a
cluster that does not start) without reading each other's tokens.

Before a user's server starts, the hub makes what the chart makes for the users it lists, from
the objects the chart renders for a placeholder user into the hub's configuration
(``user-objects.yaml``): with a namespace per user, the namespace and everything in it; in a
shared namespace, the user's own account and its role binding. This happens before KubeSpawner
starts (it makes the home volume claim, then the pod, there). Objects that exist are left as
they are.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import yaml
from jupyterhub.utils import maybe_future
from kubernetes_asyncio.client import (
    V1EnvVarSource,
    V1ObjectMeta,
    V1Secret,
    V1SecretKeySelector,
)
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.utils import FailToCreateError, create_from_dict
from kubespawner import KubeSpawner
from kubespawner.objects import make_owner_reference
from traitlets import List, Unicode

from facility.hub.welcome import FirstStart

HTTP_CONFLICT = 409
# the user the chart renders a user's objects for, in user-objects.yaml
PLACEHOLDER = "__USERNAME__"


def namespace_objects(text: str, username: str) -> list[dict[str, Any]]:
    """What the hub makes for ``username`` (their namespace and its objects, or their account
    in a shared one), from the chart's rendering for the placeholder."""
    return [doc for doc in yaml.safe_load_all(text.replace(PLACEHOLDER, username)) if doc]


def namespace_labels(text: str) -> dict[str, str]:
    """The labels of a user's Namespace, ``{username}`` where the user goes (KubeSpawner's
    ``user_namespace_labels``)."""
    [namespace] = [o for o in namespace_objects(text, "{username}") if o["kind"] == "Namespace"]
    return dict(namespace["metadata"]["labels"])


class FacilityKubeSpawner(FirstStart, KubeSpawner):
    """KubeSpawner whose server credentials reach the pod through a Secret, and that makes a
    user's objects before their first server, which opens the quick-start notebook
    (:mod:`facility.hub.welcome`)."""

    credential_variables = List(
        Unicode(), default_value=["JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "FACILITY_ACCESS_TOKEN"],
        config=True, help="variables of the server's environment that travel in its Secret")

    namespace_objects_file = Unicode(
        "", config=True, help="what the hub makes for a user before their first server "
                              "(user-objects.yaml); empty: nothing")

    _credentials: dict[str, str]

    @property
    def credentials_secret_name(self) -> str:
        return f"{self.pod_name}-credentials"

    async def _start(self) -> Any:
        # the user's objects come first: KubeSpawner makes the home volume claim, then the pod,
        # in the namespace (and with the account) they provide
        await _make_user_objects(self)
        started = await super()._start()
        self.started()
        return started

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the Secret's hooks come first; those an operator configured run after them
        for hook, ours in OUR_HOOKS.items():
            setattr(self, hook, _then(ours, getattr(self, hook)))


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


async def _make_user_objects(spawner: FacilityKubeSpawner) -> None:
    if not spawner.namespace_objects_file:
        return
    text = await asyncio.to_thread(Path(spawner.namespace_objects_file).read_text)
    username = spawner._expand_user_properties("{username}")
    for obj in namespace_objects(text, username):  # the namespace first, as rendered
        try:
            await create_from_dict(spawner.api.api_client, obj, namespace=spawner.namespace)
        except FailToCreateError as failed:
            if any(e.status != HTTP_CONFLICT for e in failed.api_exceptions):
                raise


# before the pod: its Secret; once the pod exists: the pod owns it
OUR_HOOKS = {"modify_pod_hook": _write_credentials, "after_pod_created_hook": _own_credentials}
