"""The journald access log: one structured record per access, folded.

`journalctl TAPIO_CONFIG_NAME=db-credentials` answers "who read this secret".
Identical accesses (same pid, accessor pod, owner pod, volume, key) within
`window` seconds fold into one record with TAPIO_COUNT and first/last time,
so a process reading a file in a loop writes one record per window, not one
per open. The first access of a new (accessor, volume) pair is written at
once. The fold table is capped; on overflow the oldest entry is flushed early.

MESSAGE_ID per event type: MESSAGE_IDS, from tapio_node.events.KINDS
(stable; use with `journalctl MESSAGE_ID=...`).

Fields: TAPIO_EVENT_TYPE, TAPIO_NAMESPACE, TAPIO_POD_NAME, TAPIO_POD_UID,
TAPIO_CONFIG_NAME(_SOURCE), TAPIO_VOLUME, TAPIO_FILE, TAPIO_PATH (owner side);
TAPIO_ACCESSOR_POD (ns/name or "host"), TAPIO_ACCESSOR_POD_UID,
TAPIO_CONTAINER_ID, TAPIO_CROSS_POD, TAPIO_ROLE, TAPIO_PROCESS_PID,
TAPIO_PROCESS_COMM, TAPIO_CGROUP_ID (reader side); TAPIO_COUNT,
TAPIO_FIRST_SEEN, TAPIO_LAST_SEEN; optional TAPIO_SYSCALL, TAPIO_WORKLOAD,
TAPIO_SERVICE_ACCOUNT, TAPIO_APP, TAPIO_SOURCE_KIND, TAPIO_STALE_INODE;
TAPIO_POLICY (allowed, would_deny, denied: enforcement on); OBJECT_PID on
records written as the access happens. PRIORITY is warning (4) for a
secret read from another pod or the host and for a policy violation, info
(6) otherwise. A violation (would_deny, denied) has its own MESSAGE_ID,
events.POLICY_VIOLATION_MESSAGE_ID.

Without the journald socket the records go to stderr, one line each, with an
sd-daemon(3) priority prefix ("<4>", "<6>"), and a notice says so once.
"""
from __future__ import annotations

import os
import sys
import time

from tapio_node import events as ev
from tapio_node.host import JOURNAL_SOCKET

__all__ = ["JournalSink", "MESSAGE_IDS", "record_fields"]

__all__ = ["JournalSink", "MESSAGE_IDS", "record_fields"]

MESSAGE_IDS = {k.event_type: k.message_id for k in ev.KINDS if k.message_id}

PRIORITY_WARNING = 4
PRIORITY_INFO = 6


class _Fold:
    __slots__ = ("event", "count", "first", "last", "start")

    def __init__(self, event, count, first, last, start):
        self.event = event
        self.count = count
        self.first = first
        self.last = last
        self.start = start


def _accessor(proc) -> str:
    # A host process has no pod; tell host programs apart by name so a new
    # program reading a secret on the node is logged at once.
    if proc is None:
        return "host:?"
    if proc.pod_uid:
        return proc.pod_uid
    return "host:" + (proc.command or "?")


def _accessor_pod(proc) -> str:
    if proc is None or not proc.pod_uid:
        return "host"
    if proc.namespace and proc.pod_name:
        return f"{proc.namespace}/{proc.pod_name}"
    return proc.pod_uid


def record_fields(event, count: int, first: str | None, last: str | None, identifier: str,
                  live: bool = False) -> dict[str, str]:
    """The journal fields of one (possibly folded) record; None values left out."""
    proc = event.process
    ekind = ev.BY_EVENT_TYPE.get(event.event_type)
    kind = ekind.wording if ekind else event.event_type
    cross = getattr(event, "cross_pod", None)
    policy = getattr(event, "policy", None)
    violation = policy in ev.VIOLATIONS
    priority = PRIORITY_WARNING if (violation or (ekind is ev.SECRET and cross)) else PRIORITY_INFO
    accessor = _accessor_pod(proc)
    if proc is not None and proc.role:
        accessor += f", {proc.role}"
    owner = f"{event.namespace}/" if event.namespace else ""
    owner += event.config_name or event.volume_name or "?"
    verb = {"denied": "was denied", "would_deny": "read (enforce would deny)"}.get(policy, "read")
    message = (
        f"{(proc.command if proc else None) or '?'}[{proc.pid if proc else '?'}] ({accessor}) "
        f"{verb} {kind} {owner} key {event.file or event.path or '?'}"
    )
    if cross:
        message += " (cross-pod)"
    workload = getattr(event, "workload", None)
    if count > 1:
        message += f", {count} times from {first} to {last}"
    fields = {
        "MESSAGE": message,
        "MESSAGE_ID": (ev.POLICY_VIOLATION_MESSAGE_ID if violation else
                       ekind.message_id if ekind and ekind.message_id else ev.OTHER_MESSAGE_ID),
        "PRIORITY": priority,
        "SYSLOG_IDENTIFIER": identifier,
        "TAPIO_EVENT_TYPE": event.event_type,
        "TAPIO_NAMESPACE": event.namespace,
        "TAPIO_POD_NAME": event.pod_name,
        "TAPIO_POD_UID": event.pod_uid,
        "TAPIO_CONFIG_NAME": event.config_name,
        "TAPIO_CONFIG_NAME_SOURCE": event.config_name_source,
        "TAPIO_VOLUME": event.volume_name,
        "TAPIO_FILE": event.file,
        "TAPIO_PATH": event.path,
        "TAPIO_ACCESSOR_POD": _accessor_pod(proc),
        "TAPIO_ACCESSOR_POD_UID": proc.pod_uid if proc else None,
        "TAPIO_CONTAINER_ID": proc.container_id if proc else None,
        "TAPIO_CROSS_POD": None if cross is None else ("true" if cross else "false"),
        "TAPIO_ROLE": proc.role if proc else None,
        "TAPIO_PROCESS_PID": proc.pid if proc else None,
        # journald adds OBJECT_COMM/EXE/CMDLINE/SYSTEMD_CGROUP of this pid when
        # the sender is root. Only for records written as the access happens:
        # by the time a fold is flushed the pid may belong to another process.
        "OBJECT_PID": proc.pid if (proc and live) else None,
        "TAPIO_PROCESS_COMM": proc.command if proc else None,
        "TAPIO_CGROUP_ID": proc.cgroup_id if proc else None,
        "TAPIO_SYSCALL": getattr(event, "syscall", None),
        "TAPIO_SOURCE_KIND": getattr(event, "source_kind", None),
        "TAPIO_SERVICE_ACCOUNT": getattr(event, "service_account", None),
        "TAPIO_WORKLOAD": f"{workload.kind}/{workload.name}" if workload else None,
        "TAPIO_APP": getattr(event, "app", None),
        "TAPIO_STALE_INODE": "true" if getattr(event, "stale_inode", False) else None,
        "TAPIO_PATH_TRUNCATED": "true" if getattr(event, "path_truncated", False) else None,
        "TAPIO_POLICY": policy,
        "TAPIO_COUNT": count,
        "TAPIO_FIRST_SEEN": first,
        "TAPIO_LAST_SEEN": last,
    }
    return {k: str(v) for k, v in fields.items() if v is not None and v != ""}


class JournalSink:
    """Folding journald writer, a Sink: emit() per folded group, tick()
    from the loop, close() at exit.

    `clock` (monotonic seconds) is injectable so folding can be tested
    without sleeping; tick() takes the time explicitly for the same reason.
    `kernel_clock` turns the kernel times emit() gets into RFC 3339.
    """

    dropped_lines = 0

    def __init__(
        self,
        window: float = 10.0,
        identifier: str = "tapio-node",
        *,
        max_entries: int = 4096,
        max_pairs: int = 65536,
        socket_path: str = JOURNAL_SOCKET,
        stream=None,
        clock=time.monotonic,
        kernel_clock: ev.Clock | None = None,
    ):
        if window < 0:
            raise ValueError(f"journal fold window must be >= 0 seconds, got {window!r}")
        if max_entries < 1 or max_pairs < 1:
            raise ValueError("journal max_entries and max_pairs must be >= 1")
        self.window = float(window)
        self.identifier = identifier
        self.max_entries = max_entries
        self.max_pairs = max_pairs
        self._stream = stream
        self._clock = clock
        self._rfc3339 = (kernel_clock or ev.Clock()).rfc3339
        self._table: dict[tuple, _Fold] = {}   # insertion order == start order
        self._pairs: dict[tuple, None] = {}    # LRU of (accessor, owner pod, volume)
        self.records_written = 0
        self._sendv = None
        self._warned = False
        reason = None
        if not os.path.exists(socket_path):
            reason = f"journald socket {socket_path} not found"
        else:
            try:
                from systemd.journal import sendv
                self._sendv = sendv
            except ImportError as e:
                reason = f"python-systemd is not installed ({e})"
        if reason:
            self._notice(f"{reason}; writing the access log to stderr, one line per record")

    @property
    def using_journald(self) -> bool:
        return self._sendv is not None

    def emit(self, event, count: int = 1, first_ns: int | None = None,
             last_ns: int | None = None, stamps: list[int] | None = None) -> None:
        """Record `count` identical accesses, the first and last at these
        kernel times (None: at the event's timestamp); one record holds
        them all, so `stamps` is not needed."""
        rfc = self._rfc3339
        first = rfc(first_ns) if first_ns else event.timestamp
        last = rfc(last_ns) if last_ns else first
        if self.window == 0:
            self._write(event, count, first, last, live=True)
            return
        proc = event.process
        accessor = _accessor(proc)
        key = (proc.pid if proc else 0, accessor, event.pod_uid, event.volume_name, event.file,
               getattr(event, "policy", None))
        entry = self._table.get(key)
        if entry is not None:
            if entry.count == 0:
                entry.first = first
            entry.count += count
            entry.last = last
            return
        now = self._clock()
        pair = (accessor, event.pod_uid, event.volume_name)
        if pair in self._pairs:
            entry = _Fold(event, count, first, last, now)
        else:
            # First access of this pair: write now; later repeats fold.
            self._remember(pair)
            self._write(event, count, first, last, live=True)
            entry = _Fold(event, 0, None, None, now)
        if len(self._table) >= self.max_entries:
            oldest = next(iter(self._table))
            self._flush(self._table.pop(oldest))
        self._table[key] = entry

    def tick(self, now_monotonic: float | None = None) -> int:
        """Flush folds whose window has closed; returns records written."""
        now = self._clock() if now_monotonic is None else now_monotonic
        written = 0
        table = self._table
        while table:
            key = next(iter(table))
            entry = table[key]
            if now - entry.start < self.window:
                break   # later entries started later
            del table[key]
            written += self._flush(entry)
        return written

    def flush(self) -> None:
        """Nothing to do at the end of a batch: records go out as they are made."""

    def close(self) -> None:
        """Flush everything pending (at SIGTERM or reload)."""
        table, self._table = self._table, {}
        for entry in table.values():
            self._flush(entry)

    def pending(self) -> int:
        return sum(1 for e in self._table.values() if e.count)

    # -- internals

    def _remember(self, pair) -> None:
        if len(self._pairs) >= self.max_pairs:
            del self._pairs[next(iter(self._pairs))]
        self._pairs[pair] = None

    def _flush(self, entry: _Fold) -> int:
        if entry.count == 0:
            return 0
        self._write(entry.event, entry.count, entry.first, entry.last)
        return 1

    def _write(self, event, count, first, last, live: bool = False) -> None:
        fields = record_fields(event, count, first, last, self.identifier, live)
        self.records_written += 1
        if self._sendv is not None:
            try:
                self._sendv(*(f"{k}={v}" for k, v in fields.items()))
                return
            except OSError as e:
                self._notice(f"journald send failed ({e}); writing records to stderr until it works again")
        stream = self._stream or sys.stderr
        # One record, one line: a newline in a command or path must not
        # forge a second log line (the journal itself keeps fields apart).
        stream.write(f"<{fields['PRIORITY']}>{_one_line(fields['MESSAGE'])}\n")
        stream.flush()

    def _notice(self, text: str) -> None:
        if self._warned:
            return
        self._warned = True
        stream = self._stream or sys.stderr
        stream.write(f"<4>{self.identifier}: {text}\n")
        stream.flush()


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def _one_line(text: str) -> str:
    """Control characters as \\xNN (backslashes doubled, so it stays unambiguous)."""
    return text.replace("\\", "\\\\").translate(_CONTROL)
