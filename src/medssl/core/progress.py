"""Progress of long loops: a live tqdm bar on a terminal; one line per step on stderr when it is a file or a pipe
(DVC stages, CI logs, Prefect workers), so a log shows where a run is without a terminal's redraws.

    with Progress("pretrain simclr", total=epochs, start=done, unit="epoch", items=n_images) as bar:
        for epoch in bar:      # yields start+1 .. total
            ...                # the line for an epoch: "pretrain simclr: epoch 3/100 · 812 img/s · ETA 4:31"
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Iterate start+1 .. total. items: images per step, for a throughput figure; quiet: no lines (a bar only)."""

    def __init__(self, desc: str, total: int, start: int = 0, unit: str = "epoch", items: int | None = None,
                 quiet: bool = False, leave: bool = True):
        self.desc, self.total, self.start, self.unit, self.items, self.quiet = desc, total, start, unit, items, quiet
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(range(start + 1, total + 1), desc=desc, unit=unit, disable=not self.tty, leave=leave)
        self.note = ""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()

    def set(self, note: str) -> None:
        """A short status shown after the next step's figures (e.g. the loss)."""
        self.note = note

    def __iter__(self):
        t0 = last = time.perf_counter()
        for i in self.bar:
            yield i
            now = time.perf_counter()
            rate = f" · {self.items / (now - last):,.0f} img/s" if self.items else ""
            eta = (now - t0) / (i - self.start) * (self.total - i)
            text = f"{rate.removeprefix(' · ')}{' · ' if rate and self.note else ''}{self.note}"
            if self.tty:
                self.bar.set_postfix_str(text, refresh=False)
            elif not self.quiet:
                print(f"{self.desc}: {self.unit} {i}/{self.total}{rate} · ETA {_clock(eta)}"
                      f"{' · ' + self.note if self.note else ''}", file=sys.stderr, flush=True)
            last = now
