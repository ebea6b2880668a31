"""What the project knows of one dataset layout, as one record (``DatasetLayout``); one module a layout fills it in."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["DatasetLayout", "Signature"]


class Signature(NamedTuple):
    """What a scan's file name says: whose signature it is (a forgery: whose it imitates), and which sample."""

    writer: int
    forged: bool
    sample: int


@dataclass(frozen=True)
class DatasetLayout:
    """One dataset layout: its names, folders, pair files and synthetic twin.

    Attributes:
        name: the name settings and command lines use (``"cedar"``).
        aliases: other spellings taken for it (the seed's ``"gdps"``).
        title: for messages and help (``"CEDAR"``).
        naming: its file names, for notes (``"original_{w}_{n} / forgeries_{w}_{n}"``).
        folders: where the scans are under the root, for messages.
        signature: a file name (no folder) -> ``Signature``, or ``None`` when the name is not this layout's.
        scan: ``scan(root, **options)`` -> the layout's ``FoundScans`` (see each module).
        generate: ``generate(root, **arguments, out_dir=None)`` writes the pair files (``layouts.write_splits``'s dict).
        options: the generator's own options (besides ``val_ratio`` and ``random_state``): name ->
            ``(argparse settings, help)``; both command lines and ``ensure_pair_files`` take them.
        real_counts: genuine and forged samples a writer in the real dataset.
        synthetic_files: ``(writers, n_genuine, n_forged, rng, **extra)`` -> ``(plan, facts)``: the relative path of
            every scan of a synthetic corpus in this layout, as ``(writer, forged, sample, path)``.
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    naming: str
    folders: str
    signature: Callable[[str], Signature | None]
    scan: Callable[..., Any]
    generate: Callable[..., dict]
    options: Mapping[str, tuple[dict[str, Any], str]]
    real_counts: tuple[int, int]
    synthetic_files: Callable[..., tuple[list[tuple[int, bool, int, str]], dict]]

    def signature_of(self, path: str | os.PathLike) -> Signature | None:
        """``signature`` of a path's file name."""
        return self.signature(os.path.basename(os.fspath(path)))
