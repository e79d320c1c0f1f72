"""Progress lines on the console for every stage that runs longer than a few seconds.

    progress = Progress("unlearn", total=40, unit="steps")
    for step in ...:
        ...
        progress.update(loss=0.51)       # prints at most once every `every_s` seconds
    progress.close()                     # the final line

One line per report, `label: 12/40 steps (30%), 1.9 steps/s, ETA 15 s, loss=0.51`, on stdout, flushed:
it reaches the driver's console from Ray workers (Ray forwards worker output) and `ray job logs`
from a job's entrypoint, unlike a tqdm bar, whose carriage returns do not survive either.
"""

from __future__ import annotations

import numbers
import sys
import time


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fields(fields: dict) -> list[str]:
    """`key=value`, non-integer real numbers (numpy's scalars included) to 4 significant digits."""
    return [f"{k}={v:.4g}" if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) else f"{k}={v}"
            for k, v in fields.items()]


class Progress:
    def __init__(self, label: str, total: int | None = None, *, unit: str = "", every_s: float = 10.0,
                 done: int = 0, stream=None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done, self.start_done = done, done
        self.stream = stream or sys.stdout
        self.t0 = self.last = time.monotonic()

    def line(self, **fields) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.label}: {self.done}{'/' + str(self.total) if self.total else ''}{unit}"
                 + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        if rate > 0:
            parts.append(f"{rate:.3g}{unit or ' items'}/s" if rate >= 1 else f"{1 / rate:.3g} s each")
            if self.total and self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return ", ".join(parts + _fields(fields))

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(**fields), file=self.stream, flush=True)

    def close(self, **fields) -> None:
        """The final line (elapsed time), whatever the interval."""
        unit = f" {self.unit}" if self.unit else ""
        print(", ".join([f"{self.label}: done, {self.done}{unit} in {_duration(time.monotonic() - self.t0)}",
                         *_fields(fields)]), file=self.stream, flush=True)
