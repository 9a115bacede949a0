"""A minimal progress bar on stderr, shown only on a terminal (no dependency on tqdm, so the core
runs on machines that only have torch)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30):
        self.total, self.label, self.width = max(total, 1), label, width
        self.enabled = enabled and sys.stderr.isatty()
        self.done, self.began, self.suffix = 0, time.perf_counter(), ""

    def update(self, count: int = 1, suffix: str | None = None) -> None:
        self.done += count
        if suffix is not None:
            self.suffix = suffix
        if self.enabled:
            filled = int(self.width * self.done / self.total)
            elapsed = time.perf_counter() - self.began
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                             f"{self.done}/{self.total} {elapsed:5.1f}s {self.suffix}\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
