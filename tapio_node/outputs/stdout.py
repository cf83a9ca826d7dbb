"""--output stdout: one JSON line per access."""
from __future__ import annotations

import collections
import logging
import os
import select
import sys
import threading
import time

import msgspec

from tapio_node import events as ev

_PLACEHOLDER = "\x00tapio-ts\x00"
log = logging.getLogger("tapio_node.outputs.stdout")


class StdoutSink:
    """One JSON object per line per access, exact: a group of N accesses
    writes N lines, each with its own kernel timestamp.

    A writer thread does the blocking writes, so a slow reader of our
    stdout (a pipe to jq, a log shipper) never stalls the ring-buffer
    drain; up to max_pending bytes wait in memory. Beyond that we wait at
    most STALL_SECONDS per flush, then drop the batch and count its lines
    (`dropped_lines`): a reader that stopped reading must not stop the
    daemon, its watchdog or its SIGTERM."""

    STALL_SECONDS = 0.5

    def __init__(self, stream=None, clock: ev.Clock | None = None,
                 max_pending: int = 16 << 20):
        self.fd = (stream or sys.stdout).fileno()
        self.clock = clock or ev.Clock()
        self._buf = bytearray()
        self.lines = 0
        self.max_pending = max_pending
        self._chunks: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None
        self.dropped_lines = 0
        self._thread = threading.Thread(target=self._writer, name="tapio-stdout", daemon=True)
        self._thread.start()

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                data = self._chunks.popleft()
            try:
                self._write_all(data)
            except OSError as exc:  # e.g. EPIPE: the reader went away
                self.error = exc
            with self._cond:
                self._pending -= len(data)
                self._cond.notify_all()

    def _writable(self) -> bool:
        try:
            return bool(select.select([], [self.fd], [], 0)[1])
        except (OSError, ValueError):
            return False

    def _write_all(self, data: bytes) -> None:
        off = 0
        while off < len(data):
            try:
                off += os.write(self.fd, data[off:])
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)

    def emit(self, event, count: int = 1, first_ns: int | None = None,
             last_ns: int | None = None, stamps: list[int] | None = None) -> None:
        if count == 1 or not stamps:
            self._buf += ev.encode(event)
            self._buf += b"\n"
            self.lines += 1
            return
        # Encode once, then splice each access's timestamp in.
        head, tail = ev.encode(msgspec.structs.replace(event, timestamp=_PLACEHOLDER)).split(
            _PLACEHOLDER.encode().replace(b"\x00", b"\\u0000"), 1)
        rfc = self.clock.rfc3339
        parts = [b"".join((head, rfc(ts).encode(), tail, b"\n")) for ts in stamps]
        self._buf += b"".join(parts)
        self.lines += len(parts)

    def flush(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        if not self._buf:
            return
        data, self._buf = bytes(self._buf), bytearray()
        if not self._pending and len(data) <= select.PIPE_BUF and self._writable():
            # Quiet times: write now rather than wake the writer thread
            # (latency); at most PIPE_BUF bytes to a writable fd cannot block.
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            data = data[n:]
            if not data:
                return
        with self._cond:
            deadline = time.monotonic() + self.STALL_SECONDS
            while self._pending > self.max_pending and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._pending > self.max_pending:
                lines = data.count(b"\n")
                if not self.dropped_lines:
                    log.error("stdout is not being read (%d bytes waiting): dropping events, "
                              "counted in kernel_monitor_events_lost_total{reason=\"output_dropped\"}",
                              self._pending)
                self.dropped_lines += lines
                return
            self._chunks.append(data)
            self._pending += len(data)
            self._cond.notify_all()

    def tick(self, now: float) -> None:
        self.flush()

    def close(self, timeout: float = 3.0) -> None:
        """Write out what is queued (bounded wait), then stop the writer."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout)
