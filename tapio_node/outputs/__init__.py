"""Where events go: stdout JSON lines (outputs.stdout), the journal
(outputs.journal), or nowhere (metrics only). Every sink is a Sink."""
from __future__ import annotations

from typing import Protocol

from tapio_node import events as ev

__all__ = ["Sink", "NullSink", "open_sink"]


class Sink(Protocol):
    """One folded group at a time: `event` stands for `count` identical
    accesses; first_ns/last_ns are the kernel CLOCK_MONOTONIC times of the
    first and last (None: the event's own timestamp), `stamps` those of
    each access when the reader kept them."""

    dropped_lines: int  # events lost because the output would not take them

    def emit(self, event, count: int = 1, first_ns: int | None = None,
             last_ns: int | None = None, stamps: list[int] | None = None) -> None: ...

    def flush(self) -> None:
        """End of a batch: hand what emit() queued to the output."""

    def tick(self, now: float) -> int | None:
        """Called about once a second with time.monotonic()."""

    def close(self) -> None:
        """Write out everything pending."""


class NullSink:
    dropped_lines = 0

    def emit(self, event, count=1, first_ns=None, last_ns=None, stamps=None) -> None:
        pass

    def flush(self) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def open_sink(output: str, clock: ev.Clock, *, stream=None, journal_fold_window: float = 10.0) -> Sink:
    """The sink for `--output stdout|journal|none`."""
    if output == "stdout":
        from tapio_node.outputs.stdout import StdoutSink

        return StdoutSink(stream, clock)
    if output == "journal":
        from tapio_node.outputs.journal import JournalSink

        return JournalSink(window=journal_fold_window, kernel_clock=clock)
    return NullSink()
