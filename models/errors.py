"""The one error type for bad input, on every floor of the project.

``InputError`` means "the user gave something wrong": a pair file, a scan, a
setting, a checkpoint, a run folder in use, a download, an archive. The
command lines (``finetune.py``, ``prepare_datasets.py``) print such an error
as one ``error:`` line and exit 1; any other exception is a bug and keeps its
traceback. It is defined here, on the lowest floor, because the model's own
weight files are input too (``models.weights``); every other floor imports it
from here.
"""
from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Something the user gave (a file, a folder, a setting) cannot be used; the message says what to change."""
