"""The ``facility`` command: up / down / status / run / submit / jobs / data / bench / demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from facility.config import ConfigError, FacilityConfig, load_config

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _config(args: argparse.Namespace) -> FacilityConfig:
    return load_config(args.config)


def cmd_up(args: argparse.Namespace) -> int:
    from facility.embedded.facility import up

    config = _config(args)
    up(config, report=console.print)
    console.print(f"state and logs: {config.state_path}")
    console.print("stop everything with: facility down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from facility.embedded.facility import down

    down(_config(args), report=console.print)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from facility.embedded.facility import status

    table = Table("service", "state", "pid", "ports", "log")
    states = status(_config(args))
    for s in states:
        state = "healthy" if s.healthy else ("running, not ready" if s.running else "stopped")
        table.add_row(s.name, state, str(s.pid or "-"), ",".join(map(str, s.ports)) or "-",
                      str(s.log))
    console.print(table)
    return 0 if all(s.healthy for s in states) else 3


def cmd_data_generate(args: argparse.Namespace) -> int:
    from facility.data.samples import generate_samples

    config = _config(args)
    catalog = generate_samples(config, args.sample or None, force=args.force, report=console.print)
    console.print(f"catalog {config.catalog_path}: {', '.join(sorted(catalog.datasets))}")
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from facility.data.catalog import load_catalog

    catalog = load_catalog(_config(args).catalog_path)
    table = Table("dataset", "files", "events", "data/MC", "regions")
    for name, ds in sorted(catalog.datasets.items()):
        regions = sorted({r.region for f in ds.files for r in f.replicas})
        table.add_row(name, str(len(ds.files)), f"{ds.events:,}",
                      "data" if ds.metadata.is_data else "MC", ", ".join(regions))
    console.print(table)
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from facility.data.catalog import load_catalog

    ds = load_catalog(_config(args).catalog_path).get(args.name)
    console.print(f"[bold]{args.name}[/bold]  tree={ds.tree}  events={ds.events:,}  "
                  f"metadata={ds.metadata.model_dump(exclude_none=True)}")
    for entry in ds.files:
        console.print(f"  {entry.name}  {entry.events:,} events")
        for replica in entry.replicas:
            console.print(f"    [{replica.region}] {replica.url}")
    return 0


def _progress_printer() -> tuple[Any, Callable[[Any], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("chunks"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[events]:>12,} events  {task.fields[rate]:>10,.0f} ev/s"),
                   TimeElapsedColumn(), console=console, transient=False)
    task = bar.add_task("run", total=None, events=0, rate=0.0)

    def update(p: Any) -> None:
        bar.update(task, completed=p.chunks_done, total=p.chunks_total, events=p.events,
                   rate=p.events_per_second)

    return bar, update


def print_summary(summary: dict[str, Any]) -> None:
    console.print(f"[bold]events[/bold] {summary['events']:,} in {summary['chunks']['done']} chunks "
                  f"({summary['chunks']['skipped']} skipped, {summary['chunks']['retried']} retried) "
                  f"on {summary['workers_used']} workers; {summary['wall_seconds']:.1f} s, "
                  f"{summary['events_per_second']:,.0f} events/s")
    for name, counts in summary["per_dataset"].items():
        console.print(f"  {name}: {counts['events_processed']:,} of "
                      f"{counts['events_in_catalog']:,} events, {counts['files']} files")
    console.print(f"  replicas read: {', '.join(sorted(summary['replicas_used'])) or '-'}")
    for item in summary["skipped"]:
        console.print(f"  [yellow]skipped[/yellow] {item['file']} entries {item['entries']}: "
                      f"{item['reason']}")
    fit = summary.get("analysis", {}).get("fit")
    if fit:
        console.print(f"[bold]Z peak[/bold] fitted at {fit['peak']:.3f} ± {fit['peak_error']:.3f} "
                      f"GeV (resolution {fit['sigma']:.2f} GeV, width {fit['width']:.2f} "
                      f"GeV, χ²/ndf {fit['chi2_per_dof']:.2f})")
    outputs = summary.get("outputs", {})
    for key in ("histograms", "plot", "ledger"):
        if key in outputs:
            console.print(f"  {key}: {outputs[key]}")
    if outputs.get("directory"):
        console.print(f"  summary: {Path(outputs['directory']) / 'summary.json'}")


def cmd_run(args: argparse.Namespace) -> int:
    from facility.processing.runner import run

    config = _config(args)
    bar, update = _progress_printer()
    with bar:
        result = run(args.processor, args.dataset, config=config, chunk_size=args.chunk_size,
                     on_bad_input="skip" if args.skip_bad_input else None, progress=update,
                     output=Path(args.output) if args.output else True)
    print_summary(result.summary)
    if args.json:
        console.print_json(json.dumps(result.summary, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facility.data.samples import generate_samples
    from facility.embedded.facility import up
    from facility.processing.runner import run

    config = _config(args)
    generate_samples(config, report=console.print)
    up(config, report=console.print)
    bar, update = _progress_printer()
    with bar:
        result = run("dimuon", args.dataset, config=config, progress=update)
    print_summary(result.summary)
    hub = config.hub
    first = hub.dev_users[0] if hub.dev_users else None
    console.print(f"\nJupyterHub: [bold]http://{hub.host}:{hub.port}[/bold]"
                  + (f"  (dev login: {first.username} / {first.password}; "
                     "the quick-start notebook is in your home)" if first else ""))
    console.print("the facility is still up; stop it with: [bold].venv/bin/facility down[/bold]")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scale is not None:
        from facility.cluster.scale_bench import scale_command

        return scale_command(_config(args), args.scale or [1, 2, 4], console)
    from facility.processing.bench import bench_command

    return bench_command(_config(args), args, console)


def cmd_clusters(args: argparse.Namespace) -> int:
    from facility.cluster.limits import Identity
    from facility.cluster.local import local_clusters

    config = _config(args)
    user = Identity.current().user
    mine = [c for c in local_clusters(config) if args.all_users or c.identity.user == user]
    if args.action == "stop":
        chosen = mine if args.all else [c for c in mine if c.name in args.names]
        unknown = set(args.names) - {c.name for c in chosen}
        if unknown:
            raise LookupError(f"no cluster named {', '.join(sorted(unknown))} of user {user!r}; "
                              "see `facility clusters`")
        for cluster in chosen:
            console.print(f"{'stopped' if cluster.stop() else 'was not running'}: {cluster.name}")
        return 0
    table = Table("cluster", "user", "state", "workers asked", "owner pid", "scheduler", "dashboard")
    for cluster in mine:
        info = cluster.running()
        table.add_row(cluster.name, cluster.identity.user, "running" if info else "stopped",
                      cluster.request.describe(), str(info.owner_pid or "-") if info else "-",
                      info.scheduler_address if info else "-",
                      (info.dashboard_link() or "-") if info else "-")
    Console(width=max(console.width, 160)).print(table)
    return 0


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """``-p NAME VALUE`` (numbers, booleans, lists as YAML) and ``-r NAME VALUE`` (kept text)."""
    import yaml

    values = {}
    for name, value in args.parameter or []:
        try:
            values[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise ValueError(f"parameter {name!r}: {value!r} is not a YAML value ({problem}); "
                             f"-r {name} VALUE passes it as text") from None
    values.update(dict(args.raw_parameter or []))
    return values


def cmd_submit(args: argparse.Namespace) -> int:
    from facility.batch import submit

    job = submit(args.path, _parameters(args), args=args.args, workers=args.workers,
                 min_workers=args.min_workers, max_workers=args.max_workers, threads=args.threads,
                 memory=args.memory, gpus=args.gpus, name=args.name, config=_config(args))
    record = job.record
    console.print(f"job {record.id} ({record.name}): {record.state}; cluster: "
                  f"{record.describe_request()}; outputs: {record.output}", soft_wrap=True)
    if not args.wait:
        console.print(f"follow it with: facility jobs status {record.id}")
        return 0
    final = job.wait()
    console.print(f"job {final.id}: {final.state}" + (f": {final.error}" if final.error else ""))
    return 0 if final.state == "succeeded" else 1


def _duration(job: Any) -> str:
    if job.started is None:
        return "-"
    seconds = (job.finished or time.time()) - job.started
    return f"{seconds:,.0f} s"


def _print_job(job: Any) -> None:
    from facility.batch.model import timestamp

    for label, value in (("job", f"{job.id} ({job.name})"), ("user", job.user),
                         ("state", job.state), ("input", f"{job.kind} {job.path}"),
                         ("parameters", json.dumps(job.parameters) if job.parameters else None),
                         ("arguments", " ".join(job.args) or None),
                         ("cluster", job.describe_request()), ("runner", job.runner),
                         ("submitted", timestamp(job.submitted)), ("started", timestamp(job.started)),
                         ("finished", timestamp(job.finished)), ("ran", _duration(job)),
                         ("exit code", job.exit_code), ("reason", job.error),
                         ("outputs", job.output)):
        if value is not None:
            console.print(f"{label:>11}: {value}", markup=False, soft_wrap=True)


def cmd_jobs(args: argparse.Namespace) -> int:
    from facility.batch.base import runner_for

    runner = runner_for(_config(args))
    if args.action == "list":
        table = Table("job", "name", "state", "submitted", "ran", "cluster", "exit / reason")
        for job in runner.jobs():
            table.add_row(str(job.id), job.name, job.state,
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted)),
                          _duration(job), job.describe_request(),
                          job.error or ("" if job.exit_code is None else str(job.exit_code)))
        Console(width=max(console.width, 160)).print(table)
        return 0
    if args.job is None:
        raise LookupError(f"`facility jobs {args.action}` needs a job id; `facility jobs list` "
                          "shows yours")
    return JOB_ACTIONS[args.action](runner, args.job)


def _job_status(runner: Any, job_id: int) -> int:
    _print_job(runner.status(job_id))
    return 0


def _job_logs(runner: Any, job_id: int) -> int:
    text = runner.logs(runner.status(job_id))
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _job_cancel(runner: Any, job_id: int) -> int:
    job, before = runner.cancel(job_id)
    console.print(f"job {job.id}: cancelled (it was {before})" if before in ("queued", "running")
                  else f"job {job.id} had already ended: {before}")
    return 0


def _job_outputs(runner: Any, job_id: int) -> int:
    job = runner.status(job_id)
    console.print(f"{job.output_dir} ({job.state})", markup=False)
    for path in job.output_files():
        console.print(f"  {path.relative_to(job.output_dir)}  {path.stat().st_size:,} bytes",
                      markup=False)
    return 0


JOB_ACTIONS: dict[str, Callable[[Any, int], int]] = {
    "status": _job_status, "logs": _job_logs, "cancel": _job_cancel, "outputs": _job_outputs}


def _submit_parser(sub: Any) -> None:
    submit = sub.add_parser("submit", help="run a notebook or script as a batch job",
                            description="Run a notebook (papermill) or script as a batch job "
                                        "with a Dask cluster of its own; it outlives the "
                                        "notebook server. Script arguments follow the path "
                                        "(after `--` if they start with a dash).")
    submit.add_argument("path", help="notebook (.ipynb) or script")
    submit.add_argument("args", nargs="*", help="arguments of a script")
    submit.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="notebook parameter; the value is read as YAML (5000, true, [a, b])")
    submit.add_argument("-r", "--raw-parameter", nargs=2, action="append",
                        metavar=("NAME", "VALUE"), help="notebook parameter kept as text")
    submit.add_argument("--workers", type=int, help="workers of the job's cluster (0: none)")
    submit.add_argument("--min-workers", type=int)
    submit.add_argument("--max-workers", type=int)
    submit.add_argument("--threads", type=int, help="threads per worker")
    submit.add_argument("--memory", help="memory per worker, e.g. 4GiB")
    submit.add_argument("--gpus", type=int, help="GPUs per worker")
    submit.add_argument("--name", help="a label for the job (default: the file name)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="your batch jobs: list, status, logs, cancel, outputs")
    jobs.add_argument("action", nargs="?", default="list",
                      choices=["list", "status", "logs", "cancel", "outputs"])
    jobs.add_argument("job", nargs="?", type=int, help="job id")
    jobs.set_defaults(func=cmd_jobs)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="facility", description=__doc__)
    top.add_argument("--config", help="configuration file (default: $FACILITY_CONFIG or ./facility.yaml)")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded facility").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the embedded facility").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show what runs").set_defaults(func=cmd_status)

    run_p = sub.add_parser("run", help="run a processor over a dataset")
    run_p.add_argument("processor", help="shipped name (dimuon, ttbar) or module:Class")
    run_p.add_argument("--dataset", "-d", action="append", required=True)
    run_p.add_argument("--chunk-size", type=int)
    run_p.add_argument("--skip-bad-input", action="store_true",
                       help="finish without unreadable files and report them")
    run_p.add_argument("--output", help="output folder (default: a new one in the output area)")
    run_p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    run_p.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", help="write the configured samples and catalog them")
    gen.add_argument("sample", nargs="*")
    gen.add_argument("--force", action="store_true")
    gen.set_defaults(func=cmd_data_generate)
    data.add_parser("list", help="datasets in the catalog").set_defaults(func=cmd_data_list)
    show = data.add_parser("show", help="files and replicas of a dataset")
    show.add_argument("name")
    show.set_defaults(func=cmd_data_show)

    demo = sub.add_parser("demo", help="generate samples, start the facility, run dimuon")
    demo.add_argument("--dataset", default="DYJetsToMuMu")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="facility vs plain coffea vs the raw read ceiling")
    bench.add_argument("--events", type=int, default=2_000_000)
    bench.add_argument("--files", type=int, default=4)
    bench.add_argument("--workers", type=int, default=None)
    bench.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is shown")
    bench.add_argument("--scale", type=int, nargs="*", metavar="N",
                       help="instead: seconds from connect() to N workers ready (default 1 2 4)")
    bench.set_defaults(func=cmd_bench)

    clusters = sub.add_parser("clusters", help="your Dask clusters: list, or stop some")
    clusters.add_argument("action", nargs="?", choices=["list", "stop"], default="list")
    clusters.add_argument("names", nargs="*", help="clusters to stop")
    clusters.add_argument("--all", action="store_true", help="stop all of them")
    clusters.add_argument("--all-users", action="store_true", help="every user's (operators)")
    clusters.set_defaults(func=cmd_clusters)
    _submit_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, RuntimeError, LookupError, OSError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
