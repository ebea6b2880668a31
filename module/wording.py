"""The words a message uses for an option: Python arguments (``test_writers=[1, 2]``) or flags (``--test-writers 1-2``).

A helper's error should tell the user what to change in the interface they
are using. Python callers (the notebook included) get argument names; the
command lines run their work inside ``command_line("finetune.py")``, and the
same messages then name flags and whole commands that work there.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["command_line", "flag", "option", "prepare_command", "writer_ranges"]

_PROGRAM: ContextVar[str | None] = ContextVar("program", default=None)
# Arguments whose flag is not simply the argument's name with dashes.
FLAGS = {"random_state": "--seed", "forgery_pairs_per_writer": "--forgery-pairs", "paper_protocol": "--paper"}


@contextmanager
def command_line(program: str) -> Iterator[None]:
    """Within this block, messages name ``program``'s flags instead of Python arguments."""
    token = _PROGRAM.set(program)
    try:
        yield
    finally:
        _PROGRAM.reset(token)


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


def flag(name: str) -> str:
    """The command-line flag of the argument ``name`` (``test_writers`` -> ``--test-writers``)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def option(name: str, value: Any = ...) -> str:
    """``name`` (and ``value``) as the user writes it here: ``--test-writers 1-2`` on a command line,
    ``test_writers=[1, 2]`` in Python. Without a value: ``--test-writers`` or ``test_writers=``.
    """
    if _PROGRAM.get() is None:
        return f"{name}=" if value is ... else f"{name}={value!r}"
    if value is ... or value is True:
        return flag(name)
    if name == "test_writers":
        value = writer_ranges(value)
    return f"{flag(name)} {value}"


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
