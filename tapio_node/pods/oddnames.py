"""Rate-limited log lines for odd or hostile names the registry skips."""

from __future__ import annotations

import logging
import time


class OddNames:
    """One log line per odd name, and at most `burst` lines per minute."""

    def __init__(self, log: logging.Logger, burst: int = 20) -> None:
        self._log = log
        self._seen: set[str] = set()
        self._burst = burst
        self._window = 0.0
        self._lines = 0
        self.suppressed = 0

    def skip(self, what: str, path: str) -> None:
        if path in self._seen:
            return
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen.add(path)
        now = time.monotonic()
        if now - self._window > 60.0:
            if self.suppressed:
                self._log.warning("pods: %d more odd names skipped (not logged)", self.suppressed)
            self._window, self._lines, self.suppressed = now, 0, 0
        if self._lines >= self._burst:
            self.suppressed += 1
            return
        self._lines += 1
        self._log.warning("pods: skipping %s: %r", what, path)
