"""The one way a message names an option, a figure or a step: in the words of the interface in use.

A helper's error tells the user what to change where they are: on a command
line a flag (``--test-writers 1-2``, ``--no-resume``, ``--out``), in the
notebook its parameter (``RESUME = False``, ``CKPT_DIR``,
``PREPARE_OPTIONS["test_writers"]``), in Python the argument (``resume=False``, ``ckpt_dir=``).
Every message that names one goes through ``option`` (or ``prepare_command``,
``rerun_hint``) when it is raised; no text is chosen after the fact. The
command lines run their work inside ``command_line("finetune.py")``; the
notebook calls ``use_interface("notebook")`` once; Python is the default.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["INTERFACES", "command_line", "flag", "format_metric", "interface", "notebook_parameter", "option",
           "prepare_command", "rerun_hint", "step", "use_interface", "writer_list", "writer_ranges"]

INTERFACES = ("python", "notebook", "command line")
_PROGRAM: ContextVar[str | None] = ContextVar("program", default=None)
_default = {"interface": "python"}
# Arguments whose flag is not simply the argument's name with dashes.
FLAGS = {"random_state": "--seed", "forgery_pairs_per_writer": "--forgery-pairs", "paper_protocol": "--paper",
         "ckpt_dir": "--out"}
# Settings the notebook sets under another name; the layout's pair-file options go in PREPARE_OPTIONS.
NOTEBOOK_NAMES = {"random_state": "SEED"}
PAIR_FILE_OPTIONS = ("train_ratio", "forgery_pairs_per_writer", "paper_protocol", "language", "test_writers",
                     "resplit", "test_ratio", "max_train_pairs", "max_val_pairs", "max_test_pairs", "random_forgeries")


@contextmanager
def command_line(program: str) -> Iterator[None]:
    """Within this block, messages name ``program``'s flags and commands."""
    token = _PROGRAM.set(program)
    try:
        yield
    finally:
        _PROGRAM.reset(token)


def use_interface(name: str) -> None:
    """Word messages for ``name`` (``"python"`` or ``"notebook"``) from now on, outside ``command_line`` blocks."""
    if name not in ("python", "notebook"):
        raise ValueError(f"interface must be 'python' or 'notebook' (command lines use command_line()), got {name!r}")
    _default["interface"] = name


def interface() -> str:
    """The interface messages are worded for now: one of ``INTERFACES``."""
    return "command line" if _PROGRAM.get() is not None else _default["interface"]


def writer_ranges(writers: Any) -> str:
    """Writer ids as the command lines read them: ``[1, 2, 3, 7]`` -> ``1-3,7``."""
    ids = sorted({int(writer) for writer in writers})
    parts, start = [], None
    for index, writer in enumerate(ids):
        if start is None:
            start = writer
        if index + 1 == len(ids) or ids[index + 1] != writer + 1:
            parts.append(str(start) if start == writer else f"{start}-{writer}")
            start = None
    return ",".join(parts)


def writer_list(text: str) -> list[int]:
    """Writer ids as the command lines write them: ``1-60`` or ``1,3,5-9`` -> ``[1, ..., 9]``."""
    writers = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        writers += list(range(int(low), int(high or low) + 1))
    return writers


def flag(name: str) -> str:
    """The command-line flag of the argument ``name`` (``test_writers`` -> ``--test-writers``, ``ckpt_dir`` -> ``--out``)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def notebook_parameter(name: str) -> str:
    """The notebook's parameter for the argument ``name`` (``epochs`` -> ``EPOCHS``; a pair-file option is a key of
    ``PREPARE_OPTIONS``)."""
    if name in PAIR_FILE_OPTIONS:
        return f'PREPARE_OPTIONS["{name}"]'
    return NOTEBOOK_NAMES.get(name, name.upper())


def option(name: str, value: Any = ...) -> str:
    """``name`` (and ``value``) as the user writes it in the interface in use.

    Command line: ``--test-writers 1-2``, ``--resume`` / ``--no-resume`` for a
    boolean, ``--out DIR`` for ``ckpt_dir``; notebook: ``RESUME = False``,
    ``PREPARE_OPTIONS["test_writers"] = [1, 2]``; Python: ``resume=False``. Without a value: the
    flag, the parameter or the argument's name alone.
    """
    where = interface()
    if where == "command line":
        if value is ...:
            return flag(name)
        if isinstance(value, bool):
            return flag(name) if value else "--no-" + flag(name)[2:]
        if name == "test_writers":
            value = writer_ranges(value)
        return f"{flag(name)} {value}"
    if where == "notebook":
        parameter = notebook_parameter(name)
        return parameter if value is ... else f"{parameter} = {value!r}"
    return name if value is ... else f"{name}={value!r}"


def prepare_command(dataset: str, data_root: str | os.PathLike, arguments: Mapping[str, Any]) -> str:
    """The call that writes a dataset's pair files with ``arguments``, in the words of the interface in use."""
    given = {name: value for name, value in arguments.items() if value is not None and value is not False}
    program = _PROGRAM.get()
    if program is None:
        listed = "".join(f", {name}={value!r}" for name, value in given.items())
        return f"prepare_datasets.ensure_pair_files({dataset!r}, {str(data_root)!r}{listed})"
    root = str(data_root)
    root = f'"{root}"' if " " in root else root
    command = "python finetune.py prepare" if program == "finetune.py" else f"python {program}"
    return " ".join([command, dataset, root, *(option(name, value) for name, value in given.items())])


def step(command_line: str, notebook: str, python: str) -> str:
    """The text of a step for the interface in use: a command, a notebook part or a Python call."""
    return {"command line": command_line, "notebook": notebook, "python": python}[interface()]


def rerun_hint() -> str:
    """How to continue an interrupted or stopped run, in the words of the interface in use."""
    return step("run the same command again", "run PART 7 again (or Runtime > Run all)",
                "call train_and_report (or fit) again")


def format_metric(name: str, value: float) -> str:
    """A validation figure for a log line: ``EER 12.34%`` (``value`` a fraction) or ``loss 0.1234``."""
    return f"EER {100 * value:.2f}%" if name == "eer" else f"loss {value:.4f}"
