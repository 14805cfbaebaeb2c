"""The ``facility`` command: up / down / status / run / submit / jobs / data / bench / demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from facility import __version__
from facility.config import FacilityConfig, load_config
from facility.errors import FacilityError, UsageError
from facility.text import plural

# piped output (`| cat`, a log file) is never wrapped: paths and URLs stay whole
TABLE_COLUMNS = 100  # the widest a table is printed; what does not fit follows it
console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


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

    table = Table("service", "state", "pid", "ports")
    states = status(_config(args))
    for s in states:
        state = "healthy" if s.healthy else ("running, not ready" if s.running else "stopped")
        table.add_row(s.name, state, str(s.pid or "-"), ",".join(map(str, s.ports)) or "-")
    print_table(table, [f"{s.name} log: {s.log}" for s in states])
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
    table = Table("dataset", "files", "events", "schema", "data/MC", "regions")
    for name, ds in sorted(catalog.datasets.items()):
        regions = sorted({r.region for f in ds.files for r in f.replicas})
        table.add_row(name, str(len(ds.files)), f"{ds.events:,}", ds.schema_name,
                      "data" if ds.metadata.is_data else "MC", ", ".join(regions))
    print_table(table, [])
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from facility.data.catalog import load_catalog

    ds = load_catalog(_config(args).catalog_path).get(args.name)
    console.print(f"[bold]{args.name}[/bold]  tree={ds.tree}  schema={ds.schema_name}  "
                  f"events={ds.events:,}  "
                  f"metadata={ds.metadata.model_dump(exclude_none=True)}")
    for entry in ds.files:
        console.print(f"  {entry.name}  {entry.events:,} events")
        for replica in entry.replicas:
            console.print(f"    [{replica.region}] {replica.url}")
    return 0


@contextlib.contextmanager
def _cluster_inspector(config: FacilityConfig) -> Iterator[Any]:
    """Files are inspected where runs read them: on the facility's cluster, with its token."""
    from facility.data.access import check_workers_token, renew_reader_token
    from facility.data.register import inspect_on_cluster
    from facility.processing.dispatch import close_client
    from facility.processing.runner import client_for

    renew_reader_token(config)
    client, mine = client_for(config, None)
    try:
        check_workers_token(client, config)
        yield inspect_on_cluster(client, config.processing.open_timeout)
    finally:
        if mine:
            close_client(client)


def cmd_data_add(args: argparse.Namespace) -> int:
    from facility.data.register import AddRequest, add_dataset

    config = _config(args)
    request = AddRequest(args.name, args.sources, tree=args.tree, schema=args.schema,
                         metadata=args.meta, replicas=args.replica, region=args.region,
                         sum_genweight=args.sum_genweight, replace=args.replace)
    with _cluster_inspector(config) as inspect:
        dataset = add_dataset(config, request, inspect)
    console.print(f"added {dataset.name}: {len(dataset.files)} files, {dataset.events:,} events, "
                  f"tree {dataset.tree}, schema {dataset.schema_name}")
    if dataset.metadata.sum_genweight is not None:
        console.print(f"  sum of {args.sum_genweight}: {dataset.metadata.sum_genweight:.6g}")
    console.print(f"catalog: {config.catalog_path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from facility.data.register import check_dataset

    config = _config(args)
    with _cluster_inspector(config) as inspect:
        checks = check_dataset(config, args.name, inspect)
    bad = [c for c in checks if c.status != "ok"]
    for check in bad:
        console.print(f"[red]{check.status}[/red] {check.dataset}/{check.file} {check.url}: "
                      f"{escape(check.detail)}", soft_wrap=True)
    console.print(f"{args.name}: {len(checks) - len(bad)} of {len(checks)} replicas as "
                  f"catalogued" + (f", {len(bad)} missing or changed" if bad else ""))
    return 3 if bad else 0


def cmd_data_remove(args: argparse.Namespace) -> int:
    from facility.data.register import remove_dataset

    config = _config(args)
    dataset = remove_dataset(config, args.name)
    console.print(f"removed {args.name} ({len(dataset.files)} files) from {config.catalog_path}; "
                  "the files themselves are left in place")
    return 0


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[Any], None]]:
    """A progress bar that appears with the first result and stays on screen once the run is
    over; a run that fails before a chunk is done takes it away and prints its error alone.
    The figures are those of every other progress display (:mod:`facility.processing.progress`)."""
    from rich.progress import BarColumn, Progress, TextColumn

    from facility.processing.progress import chunks, figures

    bar = Progress(BarColumn(), TextColumn("{task.fields[chunks]} · {task.fields[figures]}"),
                   console=console, transient=False)
    task = bar.add_task("run", total=None, chunks="", figures="")

    def update(p: Any) -> None:
        if p.chunks_total <= 0:
            return  # nothing planned yet: no empty bar
        bar.update(task, completed=p.chunks_done, total=p.chunks_total, chunks=chunks(p),
                   figures=figures(p))
        if not bar.live.is_started:
            bar.start()

    try:
        yield update
    except BaseException:
        bar.live.transient = not bar.tasks[0].completed
        raise
    finally:
        if bar.live.is_started:
            bar.stop()


def _headline(summary: dict[str, Any]) -> str:
    chunks = summary["chunks"]
    parts = [f"{chunks['skipped']} skipped" + (f": {summary['events_skipped']:,} events"
                                               if summary.get("events_skipped") else ""),
             f"{chunks['retried']} retried"]
    if chunks.get("resumed"):
        parts.append(f"{chunks['resumed']} from the journal")
    if summary["files"].get("skipped"):
        parts.append(f"{summary['files']['skipped']} files skipped whole")
    return (f"[bold]events[/bold] {summary['events']:,} in {plural(chunks['done'], 'chunk')} "
            f"({', '.join(parts)}) on {plural(summary['workers_used'], 'worker')}; "
            f"{summary['wall_seconds']:.1f} s, {summary['events_per_second']:,.0f} events/s")


def print_summary(summary: dict[str, Any]) -> None:
    console.print(_headline(summary))
    for name, counts in summary["per_dataset"].items():
        skipped = (f", [yellow]{counts['events_skipped']:,} skipped[/yellow]"
                   if counts.get("events_skipped") else "")
        console.print(f"  {name}: {counts['events_processed']:,} of "
                      f"{counts['events_in_catalog']:,} events{skipped}, {counts['files']} files")
    console.print(f"  replicas read: {', '.join(sorted(summary['replicas_used'])) or '-'}")
    for url, failed in summary.get("replicas_failed", {}).items():
        console.print(f"  [yellow]replica failed[/yellow] {escape(url)} ({failed['problem']}, "
                      f"{failed['times']}x; another replica was read): {escape(failed['reason'])}",
                      soft_wrap=True)
    for endpoint in summary.get("endpoints_unhealthy", []):
        console.print(f"  [yellow]unhealthy[/yellow] endpoint {endpoint}: its replicas were read last")
    for item in summary["skipped"]:
        console.print(f"  [yellow]skipped[/yellow] {escape(item['file'])} entries "
                      f"{escape(str(item['entries']))} ({item['events']:,} events, "
                      f"{item['stage']}): {escape(item['reason'])}", soft_wrap=True)
    for differ in summary["files"].get("entries_differ_from_catalog", []):
        console.print(f"  [yellow]catalog differs[/yellow] {differ['file']}: the catalog says "
                      f"{differ['catalog']:,} events, the file has {differ['file_has']:,}")
    for retired in summary.get("workers_retired", []):
        console.print(f"  [yellow]retired[/yellow] worker {escape(retired['worker'])}: "
                      f"{escape(retired['reason'])}")
    analysis = summary.get("analysis", {})
    fit = analysis.get("fit")
    if fit:
        console.print(f"[bold]Z peak[/bold] fitted at {fit['peak']:.3f} ± {fit['peak_error']:.3f} "
                      f"GeV (resolution {fit['sigma']:.2f} GeV, width {fit['width']:.2f} "
                      f"GeV, χ²/ndf {fit['chi2_per_dof']:.2f})")
    elif analysis.get("fit_error"):
        console.print(f"  [yellow]no fit[/yellow] {escape(analysis['fit_error'])}", soft_wrap=True)
    outputs = summary.get("outputs", {})
    for key in ("histograms", "plot", "ledger"):
        if key in outputs:
            console.print(f"  {key}: {outputs[key]}", soft_wrap=True)
    for refused in outputs.get("not_in_root_file", []):
        console.print(f"  [yellow]not in the ROOT file[/yellow] {escape(refused['histogram'])}: "
                      f"{escape(refused['reason'])}")
    if outputs.get("directory") and "error" not in outputs:
        console.print(f"  summary: {Path(outputs['directory']) / 'summary.json'}", soft_wrap=True)


def cmd_run(args: argparse.Namespace) -> int:
    from facility.processing.runner import run

    if args.resume is None and (args.processor is None or not args.dataset):
        raise UsageError("`facility run` needs a processor and -d DATASET, or --resume RUN")
    config = _config(args)
    with _progress_bar() as update:
        result = run(args.processor, args.dataset, config=config, chunk_size=args.chunk_size,
                     on_bad_input="skip" if args.skip_bad_input else None,
                     max_skipped_fraction=args.max_skipped_fraction, progress=update,
                     output=Path(args.output) if args.output else True, name=args.name,
                     resume=args.resume, schema=args.schema)
    print_summary(result.summary)
    if args.json:
        console.print_json(json.dumps(result.summary, default=str))
    if result.output_error:
        err_console.print(f"[red]error (the facility):[/red] {escape(result.output_error)}",
                          soft_wrap=True)
        return 5
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from facility.data.samples import generate_samples
    from facility.embedded.facility import up
    from facility.processing.runner import run

    config = _config(args)
    generate_samples(config, report=console.print)
    up(config, report=console.print)
    with _progress_bar() as update:
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
    if args.scale_sim:
        from facility.processing.scale_sim import print_rows, run_rows

        rows = run_rows(args.config, args.slots, args.chunk_seconds, args.hist_bins, args.waves)
        print_rows(rows, args, console, as_json=args.json)
        return 0
    if args.scale is not None:
        from facility.cluster.scale_bench import scale_command

        return scale_command(_config(args), args.scale, console, as_json=args.json)
    from facility.processing.bench import bench_command

    return bench_command(_config(args), args, console, err_console)


def cmd_chaos(args: argparse.Namespace) -> int:
    from facility.config import config_file
    from facility.embedded.chaos import FAULTS, Chaos, final_line, run_chaos

    config = _config(args)
    source = Path(args.config) if args.config else config_file()
    datasets = args.dataset or [sample.name for sample in config.samples[:1]]
    if not datasets:
        raise UsageError("no dataset to run: give -d DATASET")
    faults = args.faults.split(",") if args.faults else list(FAULTS)
    chaos = Chaos(config, source.resolve() if source else None, args.processor, datasets,
                  args.chunk_size, args.seed, report=lambda line: console.print(line, markup=False,
                                                                                  soft_wrap=True))
    verdicts = run_chaos(chaos, args.runs, faults)
    console.print(final_line(verdicts), markup=False)
    return 0 if all(v.identical for v in verdicts) else 1


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
            raise UsageError(f"no cluster named {', '.join(sorted(unknown))} of user {user!r}; "
                              "see `facility clusters`")
        for cluster in chosen:
            console.print(f"{'stopped' if cluster.stop() else 'was not running'}: {cluster.name}")
        return 0
    table = Table("cluster", "user", "state", "workers asked", "owner pid")
    addresses = []
    for cluster in mine:
        info = cluster.running()
        table.add_row(cluster.name, cluster.identity.user, "running" if info else "stopped",
                      cluster.request.describe(), str(info.owner_pid or "-") if info else "-")
        if info:
            addresses.append(f"{cluster.name}: scheduler {info.scheduler_address}, dashboard "
                             f"{info.dashboard_link() or '-'}")
    print_table(table, addresses)
    return 0


def print_table(table: Table, long_values: list[str]) -> None:
    """A table within ``TABLE_COLUMNS``; the values too long for a cell (addresses, links,
    reasons) follow it, each whole on a line of its own, so none is cut or split mid-name."""
    width = min(console.width, TABLE_COLUMNS) if console.is_terminal else TABLE_COLUMNS
    Console(width=width, highlight=False).print(table)
    for line in long_values:
        console.print(line, markup=False, soft_wrap=True)


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """``-p NAME VALUE`` (numbers, booleans, lists as YAML) and ``-r NAME VALUE`` (kept text)."""
    import yaml

    values = {}
    for name, value in args.parameter or []:
        try:
            values[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise UsageError(f"parameter {name!r}: {value!r} is not a YAML value ({problem}); "
                             f"-r {name} VALUE passes it as text") from None
    values.update(dict(args.raw_parameter or []))
    return values


def cmd_submit(args: argparse.Namespace) -> int:
    from facility.batch import submit

    if None not in (args.min_workers, args.max_workers) and args.min_workers > args.max_workers:
        raise UsageError(f"--min-workers {args.min_workers} is more than --max-workers "
                         f"{args.max_workers}")

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
    from facility.batch.model import JobAccessError

    try:
        runner = runner_for(_config(args))
    except JobAccessError as exc:  # another account's store: the job asked for, named
        raise JobAccessError(f"job {args.job}: {exc}" if args.job is not None else str(exc)) \
            from None
    if args.action == "list":
        table = Table("job", "name", "state", "submitted", "ran", "cluster", "exit")
        reasons = []
        for job in runner.jobs():
            table.add_row(str(job.id), job.name, job.state,
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.submitted)),
                          _duration(job), job.describe_request(),
                          "" if job.exit_code is None else str(job.exit_code))
            if job.error:
                reasons.append(f"job {job.id}: {job.error}")
        print_table(table, reasons)
        return 0
    if args.job is None:
        raise UsageError(f"`facility jobs {args.action}` needs a job id; `facility jobs list` "
                          "shows yours")
    if args.action == "logs":
        return _job_logs(runner, args.job, follow=args.follow)
    return JOB_ACTIONS[args.action](runner, args.job)


def _job_status(runner: Any, job_id: int) -> int:
    _print_job(runner.status(job_id))
    return 0


def _job_logs(runner: Any, job_id: int, follow: bool = False, every: float = 1.0) -> int:
    """The job's log; with ``follow``, what it adds as it runs, until the job ends."""
    from facility.batch.model import FINISHED

    shown = ""
    while True:
        job = runner.status(job_id)
        text = runner.logs(job)
        new = text[len(shown):] if text.startswith(shown) else text
        sys.stdout.write(new)
        sys.stdout.flush()
        shown = text
        if not follow or job.state in FINISHED:
            break
        time.sleep(every)
    if shown and not shown.endswith("\n"):
        sys.stdout.write("\n")
    if follow:
        console.print(f"job {job.id}: {job.state}" + (f": {job.error}" if job.error else ""),
                      soft_wrap=True)
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


def count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value
    return parse


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
    submit.add_argument("--workers", type=count(0), help="workers of the job's cluster (0: none)")
    submit.add_argument("--min-workers", type=count(0), help="fewest workers the cluster scales to")
    submit.add_argument("--max-workers", type=count(0), help="most workers the cluster scales to")
    submit.add_argument("--threads", type=count(1), help="threads per worker")
    submit.add_argument("--memory", help="memory per worker, e.g. 4GiB")
    submit.add_argument("--gpus", type=count(0), help="GPUs per worker")
    submit.add_argument("--name", help="a label for the job (default: the file name)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="your batch jobs: list, status, logs, cancel, outputs")
    jobs.add_argument("action", nargs="?", default="list",
                      choices=["list", "status", "logs", "cancel", "outputs"],
                      help="list (the default), status, logs, cancel or outputs of a job")
    jobs.add_argument("job", nargs="?", type=int, help="job id")
    jobs.add_argument("-f", "--follow", action="store_true",
                      help="with logs: keep printing what the job writes until it ends")
    jobs.set_defaults(func=cmd_jobs)


DESCRIPTION = """\
The analysis facility: the embedded facility on this machine, runs of coffea
processors over catalogued datasets, batch jobs and the data catalog.
`facility COMMAND --help` tells more of each command."""
EXAMPLES = """examples:
  facility up                                  start the embedded facility
  facility data list                           the datasets in the catalog
  facility run dimuon -d DYJetsToMuMu          run a processor over a dataset
  facility submit zpeak_job.ipynb -p dataset DYJetsToMuMu --workers 4
  facility submit skim.py --workers 2 -- --year 2018
  facility jobs logs 12 --follow               a job's log as it runs
  facility clusters                            your Dask clusters
  facility down                                stop it all
"""


# what each command's own --help ends with: command lines to copy, each with what it does
COMMAND_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "up": [("facility up", "start the servers, the hub and the default cluster")],
    "down": [("facility down", "stop everything `facility up` started")],
    "status": [("facility status", "servers, hub, clusters and their addresses")],
    "run": [("facility run dimuon -d DYJetsToMuMu", "the shipped dimuon analysis"),
            ("facility run mymodule:MyProcessor -d MyDY --chunk-size 200000", "your own"),
            ("facility run --resume dimuon-1", "finish an interrupted run")],
    "data": [("facility data list", "the datasets in the catalog")],
    "data generate": [("facility data generate", "write every configured sample")],
    "data add": [("facility data add MyDY 'data/dy/*.root' --meta year=2018 --sum-genweight",
                  "your files")],
    "data check": [("facility data check DYJetsToMuMu", "open every replica again")],
    "data remove": [("facility data remove MyDY", "drop it from the catalog")],
    "data list": [("facility data list", "names, files, events, schema, regions")],
    "data show": [("facility data show DYJetsToMuMu", "its files and replicas")],
    "demo": [("facility demo", "samples, the facility, and dimuon over DYJetsToMuMu")],
    "bench": [("facility bench", "events/s: read ceiling, hand-written, coffea, facility"),
              ("facility bench --scale-sim --slots 500 2000", "the run engine at many slots")],
    "chaos": [("facility chaos --runs 4 --faults worker,server", "kill parts, compare")],
    "clusters": [("facility clusters", "your clusters"),
                 ("facility clusters stop default", "stop one")],
    "submit": [("facility submit zpeak_job.ipynb -p dataset DYJetsToMuMu --workers 4",
                "a notebook with a parameter"),
               ("facility submit skim.py --workers 2 -- --year 2018", "a script's arguments")],
    "jobs": [("facility jobs", "your jobs"), ("facility jobs logs 12 --follow", "a job's log"),
             ("facility jobs cancel 12", "stop a job")],
}


def _examples(command: str) -> str:
    """Lines to paste into a shell as they are: what each does is a shell comment."""
    return "examples:\n" + "\n".join(f"  {line}  # {what}" for line, what in
                                      COMMAND_EXAMPLES[command])


class HelpFormatter(argparse.HelpFormatter):
    """Prose wrapped to the terminal; examples kept line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _described(command: argparse.ArgumentParser, path: str = "") -> argparse.ArgumentParser:
    """Each command's own ``--help`` opens with what it does (its line in the list of commands
    where it has no longer description) and ends with examples."""
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for listed in action._choices_actions:
                sub, name = action.choices[listed.dest], f"{path} {listed.dest}".strip()
                line = listed.help or ""
                sub.description = sub.description or f"{line[:1].upper()}{line[1:]}."
                if name in COMMAND_EXAMPLES:
                    sub.epilog, sub.formatter_class = _examples(name), HelpFormatter
                _described(sub, name)
    return command


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="facility", description=DESCRIPTION, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"facility {__version__}")
    top.add_argument("--config", help="configuration file (default: $FACILITY_CONFIG or ./facility.yaml)")
    sub = top.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded facility").set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the embedded facility").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show what runs").set_defaults(func=cmd_status)

    run_p = sub.add_parser(
        "run", help="run a processor over datasets, or resume an interrupted run",
        description="Run a coffea processor over catalog datasets on the facility's cluster. "
                    "The run keeps a journal in its output folder: if it is interrupted "
                    "(Ctrl-C, a killed command, a lost scheduler), `--resume NAME` processes "
                    "only what is missing. Exit codes: 2 a wrong request, 3 bad input data, "
                    "4 an error in your processor, 5 the facility (scheduler, cluster, servers).")
    run_p.add_argument("processor", nargs="?",
                       help="shipped name (dimuon, ttbar) or module:Class; optional with --resume")
    run_p.add_argument("--dataset", "-d", action="append", help="catalog dataset (repeatable)")
    run_p.add_argument("--chunk-size", type=_positive_int, metavar="EVENTS",
                       help="events per chunk (default: the configured chunk size)")
    run_p.add_argument("--skip-bad-input", action="store_true",
                       help="finish without damaged or missing files and report them (never "
                            "skips for unreachable servers or errors in the processor)")
    run_p.add_argument("--max-skipped-fraction", type=float, metavar="F",
                       help="with --skip-bad-input: fail if more than this fraction of the events "
                            "is skipped (default: processing.max_skipped_fraction)")
    run_p.add_argument("--name", help="the run's name: its folder in the output area")
    run_p.add_argument("--resume", metavar="RUN",
                       help="continue an interrupted run (its name or folder): only missing chunks "
                            "are processed; a complete run's result is read back")
    run_p.add_argument("--schema", help="event schema for every dataset (nanoaod, physlite, "
                                        "pfnano, base, ...; default: each dataset's in the "
                                        "catalog, or the processor's own)")
    run_p.add_argument("--output", help="output folder (default: a new one in the output area)")
    run_p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    run_p.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", help="write the configured samples and catalog them")
    gen.add_argument("sample", nargs="*", help="samples to write (default: every configured one)")
    gen.add_argument("--force", action="store_true", help="write them again if they exist")
    gen.set_defaults(func=cmd_data_generate)
    add = data.add_parser(
        "add", help="inspect your files on the cluster and add them as a dataset",
        description="Add files (paths, globs, directories, or root://, https://, s3:// URLs) as "
                    "a dataset. Each file is opened on the cluster: its tree is found, its "
                    "entries counted, a few events built with the schema. A file that cannot "
                    "be read or does not fit is refused, and nothing is written.")
    add.add_argument("name", help="the dataset's name in the catalog")
    add.add_argument("sources", nargs="+", metavar="SOURCE",
                     help="paths, globs, directories, or root://, https://, s3:// URLs")
    add.add_argument("--tree", help="tree or RNTuple name (default: the file's only one, or "
                                    "Events / CollectionTree)")
    add.add_argument("--schema", default="nanoaod",
                     help="event schema: nanoaod, physlite, pfnano, base, ... (default nanoaod)")
    add.add_argument("--meta", action="append", metavar="KEY=VALUE",
                     help="metadata the processor finds in events.metadata (repeatable)")
    add.add_argument("--replica", action="append", metavar="REGION=BASE_URL",
                     help="another copy of every file at BASE_URL/<file name> (repeatable)")
    add.add_argument("--region", help="region of the given files (default: found from the "
                                      "path or server)")
    add.add_argument("--sum-genweight", nargs="?", const="genWeight", metavar="BRANCH",
                     help="sum the generator weights (default branch genWeight) over every file")
    add.add_argument("--replace", action="store_true", help="replace a dataset of that name")
    add.set_defaults(func=cmd_data_add)
    check = data.add_parser("check", help="open every replica again: report missing or changed")
    check.add_argument("name", help="the dataset to check")
    check.set_defaults(func=cmd_data_check)
    remove = data.add_parser("remove", help="drop a dataset from the catalog (files are kept)")
    remove.add_argument("name", help="the dataset to drop")
    remove.set_defaults(func=cmd_data_remove)
    data.add_parser("list", help="datasets in the catalog").set_defaults(func=cmd_data_list)
    show = data.add_parser("show", help="files and replicas of a dataset")
    show.add_argument("name", help="the dataset to show")
    show.set_defaults(func=cmd_data_show)

    demo = sub.add_parser("demo", help="generate samples, start the facility, run dimuon")
    demo.add_argument("--dataset", default="DYJetsToMuMu",
                      help="the sample to run over (default DYJetsToMuMu)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="facility vs plain coffea vs the raw read ceiling")
    bench.add_argument("--events", type=int, default=2_000_000,
                       help="events of the benchmark sample (default 2,000,000)")
    bench.add_argument("--files", type=int, default=4, help="files the sample is written in (default 4)")
    bench.add_argument("--workers", type=int, default=None,
                       help="Dask workers (default: the cluster's max_workers)")
    bench.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is shown")
    bench.add_argument("--scale", type=int, nargs="*", metavar="N",
                       help="instead: seconds from connect() to N single-threaded workers "
                            "ready, and a run over them (default 1 8 64)")
    bench.add_argument("--scale-sim", action="store_true",
                       help="instead: the run engine at many emulated task slots (sleeping "
                            "chunks): chunks settled per second, slot utilisation, client and "
                            "scheduler costs")
    bench.add_argument("--slots", type=_positive_int, nargs="+", default=[100, 500, 1000, 2000],
                       help="with --scale-sim: slot counts to sweep (default 100 500 1000 2000)")
    bench.add_argument("--chunk-seconds", type=float, default=1.0,
                       help="with --scale-sim: how long each chunk sleeps (default 1)")
    bench.add_argument("--hist-bins", type=_positive_int, default=10_000,
                       help="with --scale-sim: bins of each chunk's 2-D histogram (default 10000)")
    bench.add_argument("--waves", type=_positive_int, default=50,
                       help="with --scale-sim: chunks per slot (default 50)")
    bench.add_argument("--json", action="store_true", help="print the table as JSON")
    bench.set_defaults(func=cmd_bench)

    chaos = sub.add_parser(
        "chaos", help="check that runs lose nothing when parts of the facility are killed",
        description="Run an analysis N times on the running embedded facility while SIGKILLing, "
                    "at a random moment of each run, a worker, all workers, the nearest data "
                    "server, the client (then --resume) or the scheduler (then --resume); compare "
                    "each result bin by bin with a fault-free run. What is killed is restarted.")
    chaos.add_argument("--runs", type=_positive_int, default=10, help="runs with a fault (default 10)")
    chaos.add_argument("--faults", help="comma-separated subset of: worker, workers, server, "
                                        "client, scheduler (default: all, in turn)")
    chaos.add_argument("--processor", default="dimuon", help="shipped name or module:Class")
    chaos.add_argument("--dataset", "-d", action="append",
                       help="dataset (default: the first configured sample)")
    chaos.add_argument("--chunk-size", type=_positive_int, metavar="EVENTS",
                       help="default: about 40 chunks over the datasets")
    chaos.add_argument("--seed", type=int, help="random seed for the faults' order and moments")
    chaos.set_defaults(func=cmd_chaos)

    clusters = sub.add_parser("clusters", help="your Dask clusters: list, or stop some")
    clusters.add_argument("action", nargs="?", choices=["list", "stop"], default="list",
                          help="list (the default) or stop")
    clusters.add_argument("names", nargs="*", help="clusters to stop")
    clusters.add_argument("--all", action="store_true", help="stop all of them")
    clusters.add_argument("--all-users", action="store_true", help="every user's (operators)")
    clusters.set_defaults(func=cmd_clusters)
    _submit_parser(sub)
    return _described(top)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of events, got {value}")
    return value


def _report_error(exc: FacilityError) -> None:
    err_console.print(f"[red]error ({exc.who}):[/red] {escape(str(exc))}", soft_wrap=True,
                      emoji=False)
    for note in getattr(exc, "__notes__", []):
        err_console.print(f"  {note}", markup=False, soft_wrap=True)


def _script_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """``facility submit PATH [options] -- ARGS``: what follows ``--`` is the script's, whatever
    options come before it (argparse alone would not give it to the script's arguments)."""
    if "submit" in argv and "--" in argv[argv.index("submit"):]:
        cut = argv.index("--", argv.index("submit"))
        return argv[:cut], argv[cut + 1:]
    return argv, []


def parse(argv: list[str]) -> argparse.Namespace:
    own, script = _script_arguments(argv)
    args = parser().parse_args(own)
    if script:
        args.args = [*args.args, *script]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return int(args.func(args))
    except FacilityError as exc:
        _report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt as stop:
        err_console.print("[red]interrupted[/red]")
        for note in getattr(stop, "__notes__", []):
            err_console.print(f"  {note}", markup=False, soft_wrap=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
