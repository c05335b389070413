"""Progress of long loops (training steps, sampling): a tqdm bar on a terminal, else a log line
every so often. Nothing shows with `dedt-ray -q` (dedt_ray logs at WARNING).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("dedt_ray")


class Progress:
    """`update_to(n, **postfix)` a counter towards `total`.

    On a terminal (stderr a TTY) a tqdm bar that stays as one line when closed; otherwise an
    INFO log line per `every` units (at least `min_seconds` apart) and one at the end."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "step",
        every: int | None = None,
        min_seconds: float = 0.0,
        bar: bool | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = every or max(1, total // 10)
        self.min_seconds = min_seconds
        self.n = 0
        self.logged_at, self.logged_time = 0, 0.0
        shown = log.isEnabledFor(logging.INFO)
        self.bar: Any = None
        if shown and (sys.stderr.isatty() if bar is None else bar):
            from tqdm.auto import tqdm

            # a terminal of unknown size (a pty without one, as under `script`): tqdm would
            # draw nothing in 0 columns and hide every bar below row 0
            sized = _columns() > 0
            self.bar = tqdm(
                total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=sized,
                ncols=None if sized else 80, nrows=None if sized else 24,
            )  # fmt: skip
        self.lines = shown and self.bar is None

    def update_to(self, n: int, **postfix: Any) -> None:
        """Set the counter to `n` (absolute, so repeated or resumed reports are harmless)."""
        n = min(int(n), self.total)
        text = ", ".join(f"{k} {_fmt(v)}" for k, v in postfix.items())
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n - self.bar.n)
        elif self.lines and self._due(n):
            log.info("%s: %s %d/%d%s", self.desc, self.unit, n, self.total,
                     f" {text}" if text else "")  # fmt: skip
            self.logged_at, self.logged_time = n, time.monotonic()
        self.n = n

    def _due(self, n: int) -> bool:
        if n <= self.logged_at:
            return False
        if n >= self.total:
            return True
        return (
            n - self.logged_at >= self.every
            and time.monotonic() - self.logged_time >= self.min_seconds
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _columns() -> int:
    """The terminal's width (0 when unknown: tqdm would draw nothing)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
