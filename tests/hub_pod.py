"""The jupyterhub chart's hub, run from what the chart renders, without Kubernetes.

The hub pod's files are laid out from the rendered objects it mounts (the jupyterhub chart's
ConfigMap and Secret with ``jupyterhub_config.py``, ``z2jh.py`` and the values, the facility's
ConfigMap), its environment is the rendered container's (Secret references resolved, and the
variables Kubernetes adds for the Services of its namespace), and the hub image's
``jupyterhub_config.d`` is put where the image puts it. The one change to the chart's files is
the folder they live in: ``/usr/local/etc/jupyterhub`` and ``/etc/facility`` are moved under a
temporary folder.

``spawn`` then initialises JupyterHub from that configuration in a separate process (the
script ``z2jh_spawn.py``) and has KubeSpawner build the pod manifest of each requested server.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
HUB_ETC = "/usr/local/etc/jupyterhub"
MOVED = (HUB_ETC, "/etc/facility", "/srv/jupyterhub")


def find(objects: list[dict[str, Any]], kind: str, name: str, namespace: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
               and o["metadata"].get("namespace", namespace) == namespace]
    return found


def _volume_files(objects: list[dict[str, Any]], volume: dict[str, Any],
                  namespace: str) -> dict[str, bytes]:
    if "configMap" in volume:
        data = find(objects, "ConfigMap", volume["configMap"]["name"], namespace).get("data", {})
        return {key: value.encode() for key, value in data.items()}
    if "secret" in volume:
        secret = find(objects, "Secret", volume["secret"]["secretName"], namespace)
        files = {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}
        return files | {key: value.encode() for key, value in secret.get("stringData", {}).items()}
    return {}


@dataclass
class HubPod:
    """The hub's container as the chart renders it, laid out under ``root``."""

    objects: list[dict[str, Any]]
    namespace: str
    root: Path

    def __post_init__(self) -> None:
        deployment = find(self.objects, "Deployment", "hub", self.namespace)
        self.spec = deployment["spec"]["template"]["spec"]
        [self.container] = self.spec["containers"]

    def moved(self, path: str) -> str:
        for folder in MOVED:
            path = path.replace(folder, f"{self.root}{folder}")
        return path

    def lay_out(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for mount in self.container["volumeMounts"]:
            files = _volume_files(self.objects, volumes[mount["name"]], self.namespace)
            target = Path(self.moved(mount["mountPath"]))
            if "subPath" in mount:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files[mount["subPath"]])
                continue
            target.mkdir(parents=True, exist_ok=True)
            for key, content in files.items():
                (target / key).write_bytes(content)
        for name in ("jupyterhub_config.py", "z2jh.py"):
            path = Path(self.moved(f"{HUB_ETC}/{name}"))
            path.write_text(self.moved(path.read_text()))
        # what images/hub/Dockerfile copies into the image
        shutil.copytree(REPO / "images" / "hub" / "jupyterhub_config.d",
                        Path(self.moved(f"{HUB_ETC}/jupyterhub_config.d")))

    def environment(self, secrets_outside: dict[str, str]) -> dict[str, str]:
        """The container's variables; ``secrets_outside`` stands in for Secrets the chart does
        not make (keyed by Secret name)."""
        env = {}
        for service in self.objects:
            if service["kind"] == "Service" and \
                    service["metadata"].get("namespace", self.namespace) == self.namespace:
                key = service["metadata"]["name"].upper().replace("-", "_")
                env[f"{key}_SERVICE_HOST"] = "10.96.0.10"
                env[f"{key}_SERVICE_PORT"] = str(service["spec"]["ports"][0]["port"])
        for variable in self.container["env"]:
            env[variable["name"]] = self._value(variable, secrets_outside)
        return {key: self.moved(value) for key, value in env.items()}

    def _value(self, variable: dict[str, Any], secrets_outside: dict[str, str]) -> str:
        if "value" in variable:
            return str(variable["value"])
        source = variable["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            return self.namespace
        ref = source["secretKeyRef"]
        try:
            secret = find(self.objects, "Secret", ref["name"], self.namespace)
        except ValueError:
            return secrets_outside[ref["name"]]
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    def spawn(self, servers: list[dict[str, Any]], secrets_outside: dict[str, str]
              ) -> dict[str, Any]:
        """Initialise the hub and build the pod of each server ({user, groups, profile})."""
        self.lay_out()
        workdir = Path(self.moved("/srv/jupyterhub"))
        workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.root / "kubeconfig"  # KubeSpawner loads one; it is never called
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "none",
            "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
            "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
            "users": [{"name": "none", "user": {"token": "unused"}}]}))
        env = {**self.environment(secrets_outside), "KUBECONFIG": str(kubeconfig),
               "HOME": str(self.root), "PATH": str(Path(sys.executable).parent)}
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("z2jh_spawn.py")),
             self.moved(f"{HUB_ETC}/jupyterhub_config.py"), json.dumps(servers)],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError(f"the hub did not start:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.splitlines()[-1])
