"""The dataset layouts the project reads, one module a layout, and what a file name says about its scan.

Each of ``cedar.py``, ``gpds.py`` and ``bhsig.py`` fills in one
``DatasetLayout`` (name and aliases, file names, folder scan, pair
generation and its options, synthetic twin); ``DATASETS`` lists them.
Adding a layout is one more module and its line here. ``signature_of``,
``writer_of`` and ``pair_kind`` read any layout's file names.
"""
from __future__ import annotations

import os

from models.errors import InputError
from module.data.datasets.bhsig import BHSIG
from module.data.datasets.cedar import CEDAR
from module.data.datasets.gpds import GPDS
from module.data.datasets.record import DatasetLayout, Signature

__all__ = ["DATASETS", "DatasetLayout", "Signature", "dataset_layout", "pair_kind", "signature_of", "writer_of"]

DATASETS: dict[str, DatasetLayout] = {layout.name: layout for layout in (CEDAR, GPDS, BHSIG)}


def dataset_layout(name: str) -> DatasetLayout:
    """The layout called ``name`` (any case, or an alias such as the seed's ``gdps``).

    Raises:
        InputError: no layout has that name.
    """
    wanted = str(name).lower()
    for layout in DATASETS.values():
        if wanted == layout.name or wanted in layout.aliases:
            return layout
    raise InputError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def signature_of(path: str | os.PathLike) -> Signature | None:
    """What a scan's file name says in any layout (writer, forged, sample), or ``None`` when it follows none.

    A forgery's writer is the writer whose signature it imitates.
    """
    for layout in DATASETS.values():
        signature = layout.signature_of(path)
        if signature is not None:
            return signature
    return None


def writer_of(path: str | os.PathLike) -> int | None:
    """The writer id in a file name of any layout, or ``None``."""
    signature = signature_of(path)
    return None if signature is None else signature.writer


def pair_kind(reference: str, query: str) -> str | None:
    """The kind of a pair's query, read from the file names: ``"genuine"`` (the reference writer's own),
    ``"skilled"`` (a forgery of the reference writer) or ``"random"`` (another writer's genuine signature).

    None when a name follows no layout, the reference is a forgery, or the
    query is a forgery of another writer.
    """
    signed, questioned = signature_of(reference), signature_of(query)
    if signed is None or questioned is None or signed.forged:
        return None
    if questioned.forged:
        return "skilled" if questioned.writer == signed.writer else None
    return "genuine" if questioned.writer == signed.writer else "random"
