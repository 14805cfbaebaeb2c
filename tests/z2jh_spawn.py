"""Run inside the laid-out hub pod (see ``hub_pod.py``): JupyterHub initialises from the
jupyterhub chart's ``jupyterhub_config.py``, then KubeSpawner builds each requested server's pod.

    python z2jh_spawn.py CONFIG_FILE '[{"user": "alice", "groups": ["cms"], "profile": "cpu-small"}]'

Prints one JSON line: the hub's API URL and, per server, the pod manifest and the spawner's
namespace settings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from jupyterhub import orm
from jupyterhub.app import JupyterHub
from kubernetes_asyncio.client import ApiClient


def _user(app: JupyterHub, name: str, groups: list[str]) -> Any:
    found = orm.User.find(app.db, name)
    if found is not None:
        return app.users[found.id]
    orm_user = orm.User(name=name)
    app.db.add(orm_user)
    for group_name in groups:
        group = orm.Group.find(app.db, group_name) or orm.Group(name=group_name)
        app.db.add(group)
        orm_user.groups.append(group)
    app.db.commit()
    return app.users[orm_user.id]


async def _server(app: JupyterHub, request: dict[str, Any]) -> dict[str, Any]:
    user = _user(app, request["user"], request["groups"])
    # a user's second server is a named one
    spawner = user.get_or_create_spawner("" if "" not in user.spawners else request["profile"], "")
    spawner.user_options = {"profile": request["profile"]}
    await spawner.load_user_options()
    spawner.api_token = f"hub-token-of-{request['user']}"
    # what the VO login leaves in the user's state, and what the hub does with it before a spawn
    await user.save_auth_state({"access_token": f"vo-token-of-{request['user']}",
                                "expires_at": 4102444800})
    await app.authenticator.pre_spawn_start(user, spawner)
    pod = await spawner.get_pod_manifest()
    secret = spawner.credentials_secret_manifest() \
        if hasattr(spawner, "credentials_secret_manifest") else None
    return {"pod": ApiClient().sanitize_for_serialization(pod),
            "secret": ApiClient().sanitize_for_serialization(secret),
            "namespace": spawner.namespace,
            "hooks": [getattr(getattr(spawner, h, None), "__name__", None)
                      for h in ("modify_pod_hook", "after_pod_created_hook")],
            "namespace_labels": spawner._expand_all(spawner.user_namespace_labels),
            "namespace_objects_file": getattr(spawner, "namespace_objects_file", ""),
            "enable_user_namespaces": spawner.enable_user_namespaces,
            "events_enabled": spawner.events_enabled}


async def main(config_file: str, requests: list[dict[str, Any]]) -> None:
    app = JupyterHub.instance(config_file=config_file)
    await app.initialize([])
    servers = [await _server(app, request) for request in requests]
    services = {s["name"]: s for s in app.services}
    print(json.dumps({"hub_api_url": app.hub.api_url, "servers": servers, "services": services}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
