"""The event JSON: the documented fields, then the names and flags added to them.

Events hold only strings, numbers and each other (no cycles), so they are
not tracked by the garbage collector (gc=False): one per folded group
would otherwise drive collections on the hot path."""
from __future__ import annotations

import time
from typing import NamedTuple

import msgspec


class EventKind(NamedTuple):
    """One event type, as every output names it. The strings are a
    contract: dashboards, alerts and `journalctl MESSAGE_ID=` use them."""
    event_type: str              # the JSON "event_type"
    volume_kind: str | None      # the kubelet volume plugin it reports on; None: not a file access
    metric: str | None           # its counter: kernel_monitor_<metric>_total
    metric_help: str | None
    metric_label: str | None     # that counter's label naming the object
    message_id: str | None       # journald MESSAGE_ID
    wording: str                 # the object as the journal's MESSAGE names it


CONFIGMAP = EventKind("configmap_access", "configmap", "configmap_access", "ConfigMap file opens",
                      "configmap", "c50a7d905b874921b39256c4b8e3ed30", "configmap")
SECRET = EventKind("secret_access", "secret", "secret_access", "Secret file opens",
                   "secret", "c74a8c7ec43e460e88a390d265110be6", "secret")
PROJECTED = EventKind("projected_access", "projected", "projected_access",
                      "Projected volume file opens", "volume",
                      "601c75ef1e83445397c510929610c98a", "projected volume")
SYSCALL = EventKind("pod_syscall", None, None, None, None, None, "syscall")
KINDS = (CONFIGMAP, SECRET, PROJECTED, SYSCALL)
# An access the enforcement policy denied or would deny: its own journal id.
POLICY_VIOLATION_MESSAGE_ID = "3c1b9f0e5d7a4e62a8f4d2b6c9e07a15"
VIOLATIONS = ("would_deny", "denied")
# A journal record of an event type not in KINDS still gets a fixed id.
OTHER_MESSAGE_ID = "fbb9f3d71d654d1390ebb72b5d3c4201"

BY_EVENT_TYPE = {k.event_type: k for k in KINDS}
BY_VOLUME_KIND = {k.volume_kind: k for k in KINDS if k.volume_kind}
ACCESS_KINDS = tuple(k for k in KINDS if k.metric)

CONFIGMAP_ACCESS = CONFIGMAP.event_type
SECRET_ACCESS = SECRET.event_type
PROJECTED_ACCESS = PROJECTED.event_type
POD_SYSCALL = SYSCALL.event_type


class ProcessInfo(msgspec.Struct, kw_only=True, gc=False):
    pid: int
    command: str
    cgroup_id: int
    tid: int | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    namespace: str | None = None
    pod_name: str | None = None
    role: str | None = None


class Workload(msgspec.Struct, gc=False):
    kind: str
    name: str


class AccessEvent(msgspec.Struct, kw_only=True, gc=False):
    event_type: str
    timestamp: str
    pod_uid: str
    namespace: str | None
    pod_name: str | None
    config_name: str
    config_name_source: str
    volume_name: str
    mount_path: str
    file: str
    path: str
    process: ProcessInfo
    cross_pod: bool | None
    # Beyond the documented event: names from the pod spec, and flags.
    source_kind: str | None = None      # configmap/secret/serviceAccountToken/downwardAPI (pod spec)
    source_key: str | None = None       # the key in that object (differs from file under items[].path)
    service_account: str | None = None
    workload: Workload | None = None
    app: str | None = None              # label app.kubernetes.io/name
    syscall: str = "openat"
    stale_inode: bool = False           # file no longer linked (e.g. a subPath after an update)
    path_truncated: bool = False
    file_truncated: bool = False        # `file` from the kernel's dentry names, cut at 63 bytes
    overflow: bool = False              # counted in the kernel while the ring buffer was full
    # The enforcement verdict: allowed | would_deny (audit) | denied; None with mode off.
    policy: str | None = None


class OverflowAccessEvent(AccessEvent, kw_only=True, gc=False):
    """Accesses the kernel counted while the ring buffer was full: one line
    for the group. Other lines have no count: each is one access."""
    count: int


class PodSyscallEvent(msgspec.Struct, kw_only=True, gc=False):
    event_type: str
    timestamp: str
    pod_uid: str | None
    namespace: str | None
    pod_name: str | None
    syscall_nr: int
    count: int
    process: ProcessInfo


_encoder = msgspec.json.Encoder()


def encode(event) -> bytes:
    return _encoder.encode(event)


def encode_lines(events) -> bytes:
    """Newline-delimited JSON, one encoder call for the whole batch."""
    buf = bytearray()
    for ev in events:
        _encoder.encode_into(ev, buf, len(buf))
        buf += b"\n"
    return bytes(buf)


class Clock:
    """Kernel CLOCK_MONOTONIC ns -> RFC 3339 UTC with ns, never 1970."""

    def __init__(self):
        self.refresh()

    def refresh(self) -> None:
        # Take the offset between two close readings of both clocks.
        best = None
        for _ in range(3):
            m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            r = time.clock_gettime_ns(time.CLOCK_REALTIME)
            m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, r - (m0 + m1) // 2)
        self.offset_ns = best[1]
        self._cache_sec = -1
        self._cache_prefix = ""

    def realtime_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def rfc3339(self, mono_ns: int) -> str:
        ns = mono_ns + self.offset_ns
        sec, frac = divmod(ns, 1_000_000_000)
        if sec != self._cache_sec:
            self._cache_sec = sec
            self._cache_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._cache_prefix}.{frac:09d}Z"
