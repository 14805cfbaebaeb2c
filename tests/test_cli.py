"""The terminal as a user meets it: output piped into another program (``| cat``, ``| less``,
a log file) keeps its lines whole, and the help describes every command and every option."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from facility.cli import parse, parser
from facility.config import FacilityConfig

REPO = Path(__file__).resolve().parent.parent


def piped(config: FacilityConfig, *arguments: str, columns: str | None,
          codes: tuple[int, ...] = (0,)) -> str:
    """``facility ARGUMENTS | cat``: standard output is a pipe, not a terminal."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    done = subprocess.run(
        [sys.executable, "-m", "facility.cli", "--config", str(config.home / "facility.yaml"),
         *arguments], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300, env=env, check=False)
    assert done.returncode in codes, done.stdout
    return done.stdout


@pytest.mark.integration
@pytest.mark.parametrize("columns", [None, "80"])
def test_a_piped_run_prints_every_path_whole(facility_config: FacilityConfig,
                                             columns: str | None) -> None:
    """Long paths are not cut, ellipsised or broken across lines when the output is not a
    terminal, whatever COLUMNS says: each can be copied from the output and opened."""
    text = piped(facility_config, "run", "dimuon", "-d", "DY", columns=columns)
    printed = dict(re.findall(r"^\s+(histograms|plot|ledger|summary): (\S+)$", text, re.M))
    assert set(printed) == {"histograms", "plot", "ledger", "summary"}, text
    home = str(facility_config.home)
    for name, path in printed.items():
        assert path.startswith(home), (name, path)
        assert len(path) > 80, (name, path)  # longer than the line a terminal would have
        assert Path(path).is_file(), (name, path)
    assert "…" not in text


@pytest.mark.integration
def test_status_fits_100_columns_with_every_log_path_whole(
        facility_config: FacilityConfig) -> None:
    # 3 while the hub is stopped: only the browser tests start it
    text = piped(facility_config, "status", columns="80", codes=(0, 3))
    logs = dict(re.findall(r"^(\S+) log: (\S+)$", text, re.M))
    assert {"xrootd-east", "xrootd-west"} <= set(logs), text
    assert all(Path(logs[running]).is_file() for running in ("xrootd-east", "xrootd-west")), logs
    assert max(len(line) for line in text.splitlines() if " log: " not in line) <= 100
    assert "…" not in text


def subcommands(command: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command and subcommand, by how the user types it."""
    found = {}
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{command.prog} {name}".removeprefix("facility ")] = sub
                found.update(subcommands(sub))
    return found


def test_every_command_and_option_has_help() -> None:
    top = parser()
    commands = subcommands(top)
    assert {"run", "submit", "jobs", "clusters", "data", "data add"} <= set(commands)
    missing = []
    for name, command in {"": top, **commands}.items():
        if not command.description:
            missing.append(f"facility {name}: no description")
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"facility {name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_help_piped_lists_every_command_with_its_description() -> None:
    done = subprocess.run([sys.executable, "-m", "facility.cli", "--help"], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, timeout=60, check=True,
                          env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for listed in commands._choices_actions:
        assert listed.help
        assert re.search(rf"^\s+{listed.dest}\s+{re.escape(listed.help.split()[0])}", done.stdout,
                         re.M), listed.dest


def test_every_command_shows_examples_the_parser_takes() -> None:
    for name, command in subcommands(parser()).items():
        text = command.format_help()
        assert "examples:" in text, name
        lines = [line.split("  # ")[0].split() for line in text.split("examples:")[1].splitlines()
                 if line.strip()]
        assert lines, name
        for argv in lines:
            assert argv[:1 + name.count(" ") + 1] == ["facility", *name.split()], (name, argv)
            assert parse([a.strip("'") for a in argv[1:]]).command == argv[1], argv
            assert len("  " + " ".join(argv)) <= 100, argv
