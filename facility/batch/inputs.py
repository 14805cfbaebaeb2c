"""What a job runs, checked at submission: the notebook or script, its parameters or arguments.

Mistakes are refused before anything is queued, naming the file or the parameter: a missing
file, a notebook that is not one, a parameter the notebook does not declare in its ``parameters``
cell (papermill itself would only warn, and run the notebook with its defaults).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facility.batch.model import JobInputError, JobKind

PARAMETERS_TAG = "parameters"
DEFAULT_KERNEL = "python3"


@dataclass(frozen=True)
class JobInput:
    """A checked submission: what kind of file, where it is, what it is given."""

    kind: JobKind
    path: Path
    parameters: dict[str, Any]
    args: list[str]


def job_input(path: str | Path, parameters: dict[str, Any] | None, args: list[str] | None,
              kernel: str | None = None) -> JobInput:
    """Check a submission; raises naming the file or the parameter that is wrong."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no notebook or script {file}" + (
            "" if file.parent.is_dir() else f" (the folder {file.parent} does not exist either)"))
    parameters, args = dict(parameters or {}), [str(a) for a in args or []]
    if file.suffix == ".ipynb":
        if args:
            raise JobInputError(f"{file.name} is a notebook: give it parameters, not arguments "
                                f"({' '.join(args)})")
        check_parameters(file, parameters, kernel)
        return JobInput("notebook", file, parameters, [])
    if parameters:
        raise JobInputError(f"{file.name} is a script: give it arguments, not parameters "
                            f"({', '.join(parameters)}); parameters are for notebooks")
    if file.suffix != ".py" and not os.access(file, os.X_OK):
        raise JobInputError(f"{file} is neither a notebook (.ipynb), a Python script (.py) nor "
                            "an executable file")
    return JobInput("script", file, {}, args)


def script_command(file: Path, args: list[str], python: str) -> list[str]:
    """How a script job starts: Python scripts with the job's interpreter, others directly."""
    return [python, str(file), *args] if file.suffix == ".py" else [str(file), *args]


def notebook_parameters(file: Path, kernel: str | None = None) -> dict[str, Any] | None:
    """The notebook's declared parameters (name -> papermill's description); None when it has
    no cell tagged ``parameters``."""
    from papermill.inspection import _infer_parameters

    notebook = _read_notebook(file)
    if not any(PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []) for cell in notebook.cells):
        return None
    metadata = notebook.metadata
    name = kernel or metadata.get("kernelspec", {}).get("name") or DEFAULT_KERNEL
    language = (metadata.get("language_info", {}).get("name")
                or metadata.get("kernelspec", {}).get("language") or "python")
    return {p.name: p._asdict() for p in _infer_parameters(notebook, name=name, language=language)}


def _read_notebook(file: Path) -> Any:
    from papermill.iorw import load_notebook_node

    try:
        return load_notebook_node(str(file))
    except (UnicodeDecodeError, ValueError, KeyError, AttributeError) as exc:
        raise JobInputError(f"{file} is not a readable notebook: {exc}") from None


def check_parameters(file: Path, parameters: dict[str, Any], kernel: str | None = None) -> None:
    """Every given parameter must be declared by the notebook; the message lists the ones it has
    and the nearest name to a mistyped one."""
    declared = notebook_parameters(file, kernel)
    if not parameters:
        return
    for name, value in parameters.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise JobInputError(f"parameter {name!r}: {value!r} ({type(value).__name__}) cannot be "
                                "passed to a notebook; give text, numbers, booleans, lists or "
                                "mappings (on the command line: -r NAME VALUE keeps text)") from None
    if declared is None:
        raise JobInputError(f"{file.name} has no cell tagged '{PARAMETERS_TAG}', so it takes no "
                            f"parameters ({', '.join(parameters)}); tag the cell that sets them")
    unknown = [name for name in parameters if name not in declared]
    if not unknown:
        return
    hints = []
    for name in unknown:
        near = difflib.get_close_matches(name, list(declared), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    known = ", ".join(declared) or "none"
    raise JobInputError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)} "
                        f"for {file.name}; its parameters: {known}")
