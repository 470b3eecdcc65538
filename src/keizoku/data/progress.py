"""Progress of ``keizoku tokenize``: over the input bytes on disk, with docs/s, MB/s (text read) and tokens/s.

A live bar on a terminal; in a batch job's log, a plain line every ``log_every`` seconds with the ETA.
"""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total_bytes: int, console, live: bool, log=None, log_every: float = 30.0):
        self.enabled = live
        self.total = max(total_bytes, 1)
        self.done = 0
        self.docs = self.tokens = self.text_bytes = 0
        self.start = self._last_log = time.perf_counter()
        self._log, self._log_every = log, log_every
        if live:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                            TextColumn("{task.fields[rates]}"), TimeRemainingColumn(), console=console, transient=False)
            self._task = self._bar.add_task("tokenize", total=self.total, rates="")
            self._bar.start()

    def update(self, name: str, disk_bytes: int, docs: int, tokens: int, text_bytes: int) -> None:
        """A chunk of input ``name`` is written: ``disk_bytes`` of the file on disk, its documents, tokens, text."""
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        self.done += disk_bytes
        now = time.perf_counter()
        dt = max(now - self.start, 1e-9)
        rates = (f"{self.docs / dt:,.0f} docs/s  {self.text_bytes / dt / 1e6:,.2f} MB/s  "
                 f"{self.tokens / dt / 1e6:,.2f}M tok/s")
        if self.enabled:
            self._bar.update(self._task, advance=disk_bytes, description=name[-40:], rates=rates)
        elif self._log is not None and now - self._last_log >= self._log_every:
            self._last_log = now
            frac = self.done / self.total
            eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
            self._log(f"{100 * frac:5.1f}%  {self.docs:,} docs  {self.tokens:,} tokens  {rates}  "
                      f"ETA {eta:,.0f} s  ({name})")

    def stop(self) -> None:
        if self.enabled:
            self._bar.stop()
