"""Progress of the stages a user waits on. On a terminal, a tqdm bar; in a log file, CI or nohup (not a
terminal), plain lines: when a stage starts, at each tenth of it or after 20 s, and when it ends.

`show` everywhere: None chooses by the terminal, True always a bar, False nothing; within `silenced()`,
None means nothing too (for stages, such as a sensitivity metric's, that take no `show`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

LINE_SECONDS = 20.0  # in a log, the longest silence while steps finish (issue 35: a line at least every 30 s)
LINE_FRACTION = 0.1  # and a line at each tenth of the stage,
LINE_GAP_SECONDS = 5.0  # unless the last line is younger than this (short stages: a start and an end line)
_silenced = False


def bar(total: int, desc: str, show: bool | None = None, initial: int = 0, leave: bool = False,
        iterable: Iterable | None = None):
    """A counter of `total` steps, or an iterator over `iterable` that counts its items, with tqdm's
    `update(n)`, `set_postfix`, `close()` and `with`: a bar, log lines or nothing."""
    show = False if show is None and _silenced else show
    if show is None and not _terminal():
        return LogLines(total, desc, initial, iterable)
    return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, disable=show is False)


def note(message: str, show: bool | None = None) -> None:
    """One line of news between bars (on stderr, as the bars are)."""
    if show is not False and not (show is None and _silenced):
        tqdm.write(message, file=sys.stderr)


@contextlib.contextmanager
def silenced(when: bool = True) -> Iterator[None]:
    """Within it (when `when`), progress left to choose (show=None) shows nothing."""
    global _silenced
    before, _silenced = _silenced, _silenced or when
    try:
        yield
    finally:
        _silenced = before


@contextlib.contextmanager
def stage(desc: str, show: bool | None = None) -> Iterator[None]:
    """A stage without countable steps: a line when it starts and one with its time when it ends."""
    started = time.perf_counter()
    note(f"{desc} ...", show)
    yield
    note(f"{desc}: done in {_duration(time.perf_counter() - started)}", show)


class LogLines:
    """A bar for logs: a line at start, at each tenth, after `LINE_SECONDS` of silence, and at the end."""

    def __init__(self, total: int, desc: str, initial: int = 0, iterable: Iterable | None = None):
        self.total, self.desc, self.n, self.iterable, self.postfix = total, desc, initial, iterable, ""
        self.initial = initial  # steps done before this process (a resumed study): not in the rate
        self.started = self.printed = time.perf_counter()
        self.next_fraction, self.closed = LINE_FRACTION, False
        self._line("started")

    def update(self, steps: int = 1) -> None:
        self.n += steps
        now, fraction = time.perf_counter(), self.n / max(self.total, 1)
        silence = now - self.printed
        due = (fraction >= self.next_fraction and silence >= LINE_GAP_SECONDS) or silence >= LINE_SECONDS
        if due and self.n < self.total:  # the last step's line is close()'s
            self._line(self._estimate(now))
        while self.next_fraction <= fraction:
            self.next_fraction += LINE_FRACTION

    def close(self) -> None:
        if not self.closed:
            self._line(f"done in {_duration(time.perf_counter() - self.started)}")
            self.closed = True

    def set_postfix(self, **values) -> None:
        self.postfix = ", " + ", ".join(f"{name} {value}" for name, value in values.items())

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _estimate(self, now: float) -> str:
        elapsed = now - self.started
        rate = elapsed / max(self.n - self.initial, 1)
        return f"{_duration(elapsed)}, about {_duration(rate * (self.total - self.n))} left"

    def _line(self, status: str) -> None:
        self.printed = time.perf_counter()
        note(f"{time.strftime('%H:%M:%S')} {self.desc}: {self.n}/{self.total}, {status}{self.postfix}")


def _terminal() -> bool:
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
