"""Progress that reads well wherever the output goes.

A terminal or a notebook gets a tqdm bar. Anything else (a log file, a SLURM job's output,
a pipe) gets a log line at most every :data:`LOG_EVERY_S` seconds or every
:data:`LOG_EVERY_FRACTION` of the work, whichever comes first (but no two 5 % lines within
:data:`LOG_MIN_INTERVAL_S`), with done/total, the elapsed time and an estimate of the time
left. A bar written to a file is one ever-growing line of
carriage returns; a silent run is worse.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from dask.utils import format_time
from tqdm.auto import tqdm

logger = logging.getLogger("kompot_dask")

LOG_EVERY_S = 30.0
LOG_EVERY_FRACTION = 0.05
LOG_MIN_INTERVAL_S = 2.0
"""Fewer lines for short runs: a 5 % line waits until this long after the previous line."""


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means no notebook
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether progress is shown as a live bar (a terminal on stderr, or a notebook)."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    return tty or _in_notebook()


class LogProgress:
    """The bar's interface (``update``, ``close``, a context manager) as periodic log lines."""

    def __init__(self, total: int, desc: str, unit: str, *, every_s: float = LOG_EVERY_S,
                 every_fraction: float = LOG_EVERY_FRACTION, min_interval_s: float = LOG_MIN_INTERVAL_S,
                 clock=time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = 0
        self._every_s = every_s
        self._min_interval = min_interval_s
        self._step = max(1, int(round(every_fraction * self.total)))
        self._clock = clock
        self._t0 = self._last_t = clock()
        self._last_n = 0
        self._closed = False
        if self.total:
            logger.info("%s: %d %ss to run", self.desc, self.total, self.unit)

    def line(self) -> str:
        elapsed = self._clock() - self._t0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f} %), {format_time(elapsed)} elapsed"
        if 0 < self.n < self.total:
            text += f", about {format_time(elapsed / self.n * (self.total - self.n))} left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        since = now - self._last_t
        if (self.n >= self.total or since >= self._every_s
                or (self.n - self._last_n >= self._step and since >= self._min_interval)):
            self._emit(now)

    def _emit(self, now: float) -> None:
        if self.n == self._last_n and self.n != 0:
            return
        logger.info("%s", self.line())
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:
                self._emit(self._clock())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A tqdm bar where it can be seen live, periodic log lines elsewhere, nothing when
    ``enabled`` is false."""
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True)
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit)
    return LogProgress(total, desc, unit)
