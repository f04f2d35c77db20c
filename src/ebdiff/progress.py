"""Progress fit for terminals and for files: `progress_bar(...)` takes tqdm's arguments and returns a
tqdm bar when its stream (stderr unless `file=`) is a terminal, else a `LineProgress` that writes one
plain line with the same fields (description, count, percentage, elapsed time, rate, postfix) each time
the postfix is set (the trainer sets it once per log interval) and otherwise at most every 30 s, plus a
last line when a kept bar (`leave=True`) closes past its last line. `EBDIFF_PROGRESS=bars|lines`
overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm

INTERVAL_S = 30.0  # the longest quiet stretch of a line log
MODES = ("auto", "bars", "lines")


def format_time(s: float) -> str:
    """Seconds as tqdm writes them: 05:07, 1:02:03."""
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def progress_line(desc: str, n: int, total: int | None, elapsed: float, rate: float | None, unit: str,
                  postfix: dict[str, Any]) -> str:
    """One progress line (pure): 'dense: 120/1000 (12%) 00:35, 3.43 it/s, loss=0.0412'."""
    count = f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n}"
    speed = f"{rate:.3g} {unit}/s" if rate else f"? {unit}/s"
    tail = "".join(f", {k}={v}" for k, v in postfix.items())
    return f"{desc + ': ' if desc else ''}{count} {format_time(elapsed)}, {speed}{tail}"


class LineProgress:
    """The subset of tqdm's interface ebdiff uses (iteration, update, set_postfix, set_description, close,
    context manager), writing lines instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
                 initial: int = 0, leave: bool = True, file=None, unit: str = "it", interval: float = INTERVAL_S,
                 **_tqdm_only: Any):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.desc, self.total, self.n, self.leave, self.file, self.unit = desc or "", total, initial, leave, file, unit
        self.interval, self.postfix, self.closed, self._n0, self._said = interval, {}, False, initial, None
        self._t0 = self._last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self.emit()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}
        self.emit()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self._said != (self.n, self.desc):  # a last line unless the last one says it
                self.emit()

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._n0) / elapsed if elapsed > 0 and self.n > self._n0 else None
        return progress_line(self.desc, self.n, self.total, elapsed, rate, self.unit, self.postfix)

    def emit(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self._last, self._said = time.monotonic(), (self.n, self.desc)


def use_bars(file=None) -> bool:
    """Bars when EBDIFF_PROGRESS says so, or (auto) when the stream is a terminal."""
    mode = os.environ.get("EBDIFF_PROGRESS", "auto")
    if mode not in MODES:
        mode = "auto"
    if mode != "auto":
        return mode == "bars"
    stream = file or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """tqdm(iterable, **kwargs) in a terminal (or when disabled), a `LineProgress` otherwise."""
    if kwargs.get("disable") or use_bars(kwargs.get("file")):
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
