"""Progress bars that read well wherever they are shown.

On a terminal a bar updates in place, and in a notebook it is tqdm's widget, as tqdm draws them. Written to
a file (``finetune.py demo 2> log.txt``, a scheduler's log, a pipe) tqdm would redraw the bar with carriage
returns, many times a second, into one ever longer line; there each bar here is a line of its own instead, at
most one every ``LINE_INTERVAL_S`` seconds, and a bar that stays when it ends leaves its final line.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from time import monotonic
from typing import Any, TextIO

from tqdm import autonotebook
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

__all__ = ["FileProgressBar", "LINE_INTERVAL_S", "progress_bar", "write_line"]

LINE_INTERVAL_S = 30.0
# tqdm.autonotebook is tqdm's notebook widget in a Jupyter or Colab kernel, and the plain bar elsewhere.
IN_NOTEBOOK = autonotebook.tqdm is not std_tqdm


class FileProgressBar(std_tqdm):
    """A tqdm bar for a file: each refresh is a new line, at most one every ``LINE_INTERVAL_S`` seconds; nothing
    is erased or redrawn. ``leave`` keeps the final line, as it keeps the bar on a terminal."""

    def __init__(self, *args: Any, leave: bool | None = True, **kwargs: Any) -> None:
        # Set before tqdm's __init__, which displays the bar once (the first line waits for the interval).
        self.last_line_at = monotonic()
        self.keeps_final_line = leave is not False  # tqdm's None keeps a bar at position 0, the only one here
        # miniters=1: tqdm checks the clock every step, and its monitor thread never forces a redraw.
        super().__init__(*args, leave=False, mininterval=LINE_INTERVAL_S, miniters=1, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm's messages that erase a bar: a line in a file cannot be taken back
            return False
        now = monotonic()
        if now - self.last_line_at < LINE_INTERVAL_S:  # also a redraw after tqdm.write
            return False
        self.last_line_at = now
        self.write_own_line()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: earlier lines stay in the file."""

    def close(self) -> None:
        if not self.disable and self.keeps_final_line:
            self.write_own_line()
        super().close()

    def write_own_line(self) -> None:
        self.fp.write(f"{self}\n")
        self.fp.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, file: TextIO | None = None, **tqdm_options: Any
                 ) -> std_tqdm:
    """``tqdm(iterable, **tqdm_options)`` drawn as its output suits: the notebook widget in a notebook, a bar
    updated in place on a terminal, and otherwise ``FileProgressBar``'s lines (by default on stderr, as tqdm)."""
    stream = file if file is not None else sys.stderr
    if IN_NOTEBOOK and file is None:
        return auto_tqdm(iterable, **tqdm_options)
    if stream is not None and getattr(stream, "isatty", lambda: False)():
        return std_tqdm(iterable, file=stream, **tqdm_options)
    return FileProgressBar(iterable, file=stream, **tqdm_options)


def write_line(message: str) -> None:
    """Print ``message`` on stdout without breaking a bar that runs on a terminal (tqdm.write)."""
    std_tqdm.write(message)
