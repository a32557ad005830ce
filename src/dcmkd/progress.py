"""Progress of long work outside the training loop (decoding an image folder, evaluating a test
set): a tqdm bar on a terminal; elsewhere (a log file, a pipe, a batch job) one line per
interval, and nothing at all for work that ends within the first interval."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

#: seconds between two lines off a terminal
INTERVAL = 30.0


class Progress:
    """Counts ``total`` units of work named ``what``: ``update(n)`` as they are done, ``close()``
    (or use as a context manager) at the end. ``quiet`` shows nothing; ``stream`` defaults to
    standard error; ``log`` (default: a line on ``stream``) receives the lines off a terminal."""

    def __init__(self, total: int | None, what: str, *, unit: str = "it", quiet: bool = False,
                 interval: float = INTERVAL, stream: TextIO | None = None,
                 log: Callable[[str], None] | None = None):
        self.total, self.what, self.unit, self.interval = total, what, unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        self.done, self.enabled, self.bar = 0, not quiet, None
        self.t0 = self.last = time.perf_counter()
        if self.enabled and _is_terminal(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:   # tqdm is optional: lines, then
                return
            self.bar = tqdm(total=total, desc=what, unit=unit, leave=False, file=self.stream,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``decoding images: 1200/10000 img (12%), 40 img/s, about 3.7 min left``."""
        elapsed = max((now if now is not None else time.perf_counter()) - self.t0, 1e-9)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.what}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"about {_duration(left)} left" if left != float("inf") else "time left unknown"
        return (f"{self.what}: {self.done}/{self.total} {self.unit} "
                f"({100 * self.done / self.total:.0f}%), {rate:.3g} {self.unit}/s, {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable[T], total: int | None = None, what: str = "working", *,
          unit: str = "it", quiet: bool = False, interval: float = INTERVAL,
          stream: TextIO | None = None, log: Callable[[str], None] | None = None,
          size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield ``items``, counting each (or ``size(item)`` units: the images of a batch) in a
    :class:`Progress`; ``total`` defaults to ``len(items)`` where it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, what, unit=unit, quiet=quiet, interval=interval, stream=stream,
                  log=log) as progress:
        for item in items:
            yield item
            progress.update(size(item) if size is not None else 1)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a closed or file-less stream
        return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["Progress", "track", "INTERVAL"]
