"""Prometheus metrics (prefix `kernel_monitor_`), on a private registry.

Two kinds, as client_python's "Writing exporters" advises:

- the daemon's own activity (accesses, correlations, processing time,
  resyncs) is counted directly, exactly: `access(..., count=N)` adds N;
- the daemon's state (BPF loaded, ring buffer, drops, watched volumes ...)
  is read at scrape time from `register_state(fn)`, fn() -> DaemonState.

Cardinality guard: at most `max_series` label sets over all labelled
metrics; a new label set beyond that is counted under the label value
`__overflow__` instead, and `kernel_monitor_series_dropped_total` counts the
distinct label sets that were refused.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Container

import msgspec
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .events import ACCESS_KINDS

__all__ = ["Metrics", "DaemonState", "OVERFLOW", "PREFIX"]

PREFIX = "kernel_monitor"
OVERFLOW = "__overflow__"

# Seconds per event in user space: microseconds normally, ms when busy.
PROCESSING_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
                      1e-3, 2.5e-3, 1e-2, 0.1, 1.0)

# Kernel-to-user-space delay: wake-ups are batched when busy (a few ms).
LATENCY_BUCKETS = (1e-5, 2e-5, 3e-5, 4e-5, 5e-5, 7.5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                   1e-2, 2.5e-2, 0.1, 0.25, 1.0, 5.0)

# Access event type -> the volume kind its counter is kept under.
_ACCESS_KIND = {k.event_type: k.volume_kind for k in ACCESS_KINDS}


# Every way an access can go unreported; each is counted, never silent.
LOSS_REASONS = {
    "kernel_lost": "the ring buffer and the overflow map were both full",
    "kernel_skipped": "the kernel did not run the open program: another BPF program or a BPF "
                      "syscall held that CPU (its recursion_misses)",
    "fd_race": "the fd was closed by another thread before the exit hook read it",
    "syscall_drop": "a sampled pod_syscall record found the ring buffer full",
    "bad_record": "a ring-buffer record the daemon could not decode",
    "failed_group": "a decoded access the daemon failed to turn into an event",
    "unresolved": "an access to a volume removed before its record was read",
    "output_dropped": "an event line stdout's reader did not take in time (it stopped reading)",
}
LOSS_RECENT_SECONDS = 60.0
# A gone volume's series stay this long, so scrapes see their last value.
SERIES_GRACE_SECONDS = 300.0
# kube-api-access-<5 random chars>: one name per pod, so one label for all.
_SA_VOLUME = re.compile(r"kube-api-access-[a-z0-9]{5}")
SA_VOLUME_LABEL = "kube-api-access"


class DaemonState(msgspec.Struct, kw_only=True):
    """What the daemon knows about itself, read at each scrape and /healthz."""
    ebpf_loaded: bool
    ring_buffer_active: bool
    events_processed: int
    ring_buffer_drops: int
    watched_volumes: int
    watched_files: int
    watched_pods: int
    last_event_age_seconds: float | None
    loop_heartbeat_age_seconds: float
    backend: str
    status: str
    # Kernel features the BPF side runs without (tapio_node/kernel/compat.py).
    kernel_features_off: list[str] = []
    # Accesses that could not be reported, by reason (LOSS_REASONS), and
    # the reasons whose count grew within LOSS_RECENT_SECONDS.
    events_lost: dict[str, int] = {}
    losing: list[str] = []
    # Volumes that did not fit in watched_inodes: ever, and now.
    watch_capacity_exceeded: int = 0
    volumes_over_capacity: int = 0
    # The access store: "ok", "failing" (last_error says why) or "off".
    store: str = "off"
    store_error: str | None = None


class _StateCollector(Collector):
    def __init__(self, metrics: "Metrics"):
        self._metrics = metrics

    def describe(self):
        # Empty: the registry must not call collect() (and so the daemon's
        # state function) at registration time.
        return []

    def collect(self):
        fn = self._metrics._state_fn
        state = None
        if fn is not None:
            try:
                state = fn()
            except Exception:  # a scrape must not fail because the daemon is mid-reload
                state = None
        info = InfoMetricFamily(f"{PREFIX}_build", "tapio-node version and hook backend in use",
                                labels=["version", "backend"])
        info.add_metric([__version__, state.backend if state else "none"], {})
        yield info
        backend = InfoMetricFamily(f"{PREFIX}_backend", "The hook backend in use: lsm, fentry or tracepoint",
                                   labels=["backend"])
        backend.add_metric([state.backend if state else "none"], {})
        yield backend
        up = GaugeMetricFamily(f"{PREFIX}_state_up", "1 if the daemon state could be read at this scrape")
        up.add_metric([], 1 if state else 0)
        yield up
        if state is None:
            return
        p = PREFIX
        yield _gauge(f"{p}_ebpf_loaded", "1 if the BPF programs are loaded and attached", int(state.ebpf_loaded))
        yield _gauge(f"{p}_ring_buffer_active", "1 if the ring buffer is being polled", int(state.ring_buffer_active))
        yield CounterMetricFamily(f"{p}_events_processed", "Events read from the ring buffer and processed",
                                  value=state.events_processed)
        yield CounterMetricFamily(f"{p}_ring_buffer_drops", "Events the kernel could not put in the ring buffer",
                                  value=state.ring_buffer_drops)
        yield _gauge(f"{p}_watched_volumes", "ConfigMap/Secret/projected volumes in the inode map", state.watched_volumes)
        yield _gauge(f"{p}_watched_files", "Files (inodes) in the inode map", state.watched_files)
        yield _gauge(f"{p}_watched_pods", "Pods with at least one watched volume", state.watched_pods)
        lost = CounterMetricFamily(f"{p}_events_lost",
                                   "Accesses that could not be reported, by reason: "
                                   + "; ".join(f"{k}: {v}" for k, v in LOSS_REASONS.items()),
                                   labels=["reason"])
        for reason in LOSS_REASONS:
            lost.add_metric([reason], state.events_lost.get(reason, 0))
        yield lost
        yield CounterMetricFamily(f"{p}_watch_capacity_exceeded",
                                  "Times a volume could not be indexed: watched_inodes full "
                                  "(see max_watched_files)", value=state.watch_capacity_exceeded)
        yield _gauge(f"{p}_volumes_over_capacity", "Volumes not indexed now for lack of map room",
                     state.volumes_over_capacity)
        off = GaugeMetricFamily(f"{p}_kernel_feature_missing",
                                "1 for each kernel feature the BPF side runs without "
                                "(tapio-node check says what it costs)", labels=["feature"])
        for name in state.kernel_features_off:
            off.add_metric([name], 1)
        yield off
        yield _gauge(f"{p}_loop_heartbeat_age_seconds", "Seconds since the event loop last ran",
                     state.loop_heartbeat_age_seconds)
        if state.last_event_age_seconds is not None:
            yield _gauge(f"{p}_last_event_age_seconds", "Seconds since the last event was processed",
                         state.last_event_age_seconds)


# Object kinds the per-object gauges leave out: a downward-API file
# names no object (its "name" is a per-pod volume name).
_NO_OBJECT_KINDS = ("downwardAPI",)


def _object_label(kind: str, name: str) -> str:
    return SA_VOLUME_LABEL if kind == "projected" and _SA_VOLUME.fullmatch(name) else name


class _StoreCollector(Collector):
    """The access store's state and the per-node object gauges, at scrape time."""

    def __init__(self, store, max_series: int):
        self._store = store
        self._max = max_series

    def describe(self):
        return []

    def collect(self):
        st, p = self._store, PREFIX
        yield _gauge(f"{p}_store_up", "1 if the last access store open or write worked", int(st.up))
        errors = CounterMetricFamily(f"{p}_store_errors", "Access store failures (collection goes on), "
                                     "by operation: open, write, prune", labels=["operation"])
        for op, n in list(st.errors.items()):
            errors.add_metric([op], n)
        yield errors
        yield CounterMetricFamily(f"{p}_store_rows_dropped",
                                  "Aggregated access rows not stored: too many distinct rows "
                                  "between writes, or kept too long by a failing store",
                                  value=st.rows_dropped + st.retry_dropped)
        yield CounterMetricFamily(f"{p}_store_writes", "Batched access store transactions written",
                                  value=st.writes)
        yield CounterMetricFamily(f"{p}_store_commands_folded",
                                  "Access groups stored under \"(other commands)\": their container "
                                  "or host cgroup had used 64 distinct commands already",
                                  value=st.commands_folded())
        mounted = GaugeMetricFamily(f"{p}_volume_mounted", "1 while the object is mounted on this node",
                                    labels=["namespace", "kind", "name"])
        seen = set()
        for ns, kind, name in st.mounted_objects:
            if kind in _NO_OBJECT_KINDS or len(seen) >= self._max:
                continue
            labels = (ns, kind, _object_label(kind, name))
            if labels not in seen:
                seen.add(labels)
                mounted.add_metric(list(labels), 1)
        yield mounted
        last = GaugeMetricFamily(f"{p}_last_access_timestamp_seconds",
                                 "Unix time of the last read of a file of the object on this node",
                                 labels=["namespace", "kind", "name"])
        best: dict[tuple, float] = {}
        for (ns, kind, name), ts in list(st.last_access.items()):
            if kind in _NO_OBJECT_KINDS:
                continue
            labels = (ns, kind, _object_label(kind, name))
            if labels in best or len(best) < self._max:
                best[labels] = max(ts, best.get(labels, 0.0))
        for labels, ts in best.items():
            last.add_metric(list(labels), ts)
        yield last
        yield self._reads(st)

    def _reads(self, st):
        """Reads per object and reader workload (no pod, container or
        command label: those stay in the store), for the cluster view."""
        from tapio_node.store import ACC_KIND, ACC_NS, ACC_WORKLOAD, OBJ_KIND, OBJ_NAME, OWNER_NS

        fam = CounterMetricFamily(f"{PREFIX}_object_reads",
                                  "Reads of the object's files on this node by a reader workload, host "
                                  "unit or the kubelet, since the daemon started",
                                  labels=["namespace", "kind", "name", "reader_kind", "reader_namespace",
                                          "reader_workload", "cross_pod"])
        sums: dict[tuple, int] = {}
        for key, (count, cross) in list(st.totals.items()):
            kind = key[OBJ_KIND]
            if kind in _NO_OBJECT_KINDS:
                continue
            labels = (key[OWNER_NS], kind, _object_label(kind, key[OBJ_NAME]), key[ACC_KIND], key[ACC_NS],
                      key[ACC_WORKLOAD], "true" if cross else "false")
            if labels in sums or len(sums) < self._max:
                sums[labels] = sums.get(labels, 0) + count
        for labels, n in sums.items():
            fam.add_metric(list(labels), n)
        return fam


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class Metrics:
    """All of tapio-node's metrics; `registry` is what /metrics exposes."""

    def __init__(self, max_series: int = 10000):
        if max_series < 1:
            raise ValueError(f"metrics_max_series must be >= 1, got {max_series!r}")
        self.max_series = max_series
        # A `_created` twin per counter/histogram series doubles what Prometheus
        # stores for nothing an operator asks about (process-wide switch, 0.17+).
        if hasattr(prometheus_client, "disable_created_metrics"):
            prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self._access = {
            k.volume_kind: Counter(f"{p}_{k.metric}", k.metric_help, ["namespace", k.metric_label], registry=r)
            for k in ACCESS_KINDS
        }
        self._cross_pod = Counter(f"{p}_cross_pod_access", "Opens of another pod's volume file",
                                  ["namespace", "kind"], registry=r)
        self._violations = Counter(f"{p}_policy_violations",
                                   "Opens of a protected volume the enforcement policy denied "
                                   "(action=deny) or would deny (action=audit)",
                                   ["namespace", "kind", "name", "action"], registry=r)
        self._correlation = Counter(f"{p}_pod_correlation", "Pod correlation operations", ["operation"], registry=r)
        self._processing = Histogram(f"{p}_processing_duration_seconds", "User-space time to process one event",
                                     ["event_type"], buckets=PROCESSING_BUCKETS, registry=r)
        self._latency = Histogram(f"{p}_event_latency_seconds",
                                  "Time from the kernel recording an open to user space handling it",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._resyncs = Counter(f"{p}_resyncs", "Full rescans of the kubelet pods dir", ["reason"], registry=r)
        self._discrepancies = Counter(f"{p}_resync_discrepancies",
                                      "Map entries a resync had to add or remove (missed inotify events)", registry=r)
        self._dropped = Counter(f"{p}_series_dropped",
                                f"Label sets refused by the cardinality guard (counted under {OVERFLOW})", registry=r)
        self._http_refused = Counter(f"{p}_http_connections_refused",
                                     "Connections to listen_address closed unserved (too many, idle too long)",
                                     ["reason"], registry=r)
        self._new_reader = Counter(f"{p}_new_reader",
                                   "Readers (workload, host unit or kubelet) of an object never seen "
                                   "reading it before, after the learning period",
                                   ["namespace", "kind", "name"], registry=r)
        self._series: set[tuple] = set()
        # Access series -> the volumes that counted in it; ownerless series
        # -> when they are deleted (expire()).
        self._owners: dict[tuple, set[int]] = {}
        self._expiring: dict[tuple, float] = {}
        self._refused: set[tuple] = set()
        self._children: dict[tuple, object] = {}
        self._state_fn: Callable[[], DaemonState] | None = None
        r.register(_StateCollector(self))

    # -- the daemon's activity

    def access(self, event_type: str, namespace: str | None, name: str | None, count: int = 1,
               cross_pod: bool = False, volume_id: int | None = None) -> None:
        """Count `count` opens of a file of volume/object `name` in `namespace`;
        volume_id: the watched volume behind it, so the series can go with it."""
        kind = _ACCESS_KIND.get(event_type)
        if kind is None:
            raise ValueError(f"unknown access event type {event_type!r}; expected one of {sorted(_ACCESS_KIND)}")
        if kind == "projected" and name and _SA_VOLUME.fullmatch(name):
            name = SA_VOLUME_LABEL
        labels = (namespace or "", name or "")
        self._child(kind, self._access[kind], labels).inc(count)
        if volume_id is not None:
            series = (kind, labels)
            owners = self._owners.get(series)
            if owners is None:
                owners = self._owners[series] = set()
            if volume_id not in owners:
                owners.add(volume_id)
                self._expiring.pop(series, None)
        if cross_pod:
            self.cross_pod(namespace, kind, count)

    def cross_pod(self, namespace: str | None, kind: str, count: int = 1) -> None:
        """Count opens of `kind` ("configmap", "secret", "projected") by a process of another pod."""
        self._child("cross_pod", self._cross_pod, (namespace or "", kind)).inc(count)

    def policy_violation(self, namespace: str | None, kind: str, name: str | None, action: str,
                         count: int = 1) -> None:
        """Count opens of a protected volume by a process the policy does
        not allow: action "deny" (enforce) or "audit"."""
        self._child("policy", self._violations,
                    (namespace or "", kind, name or "", action)).inc(count)

    def latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def processing(self, event_type: str, seconds: float) -> None:
        self._child("processing", self._processing, (event_type,)).observe(seconds)

    def correlation(self, operation: str, n: int = 1) -> None:
        self._child("correlation", self._correlation, (operation,)).inc(n)

    def _child(self, metric: str, family, labels: tuple):
        """The labelled child, cached: labels() costs a lock and a dict
        build per call, and the daemon counts per folded group."""
        child = self._children.get((metric, labels))
        if child is None:
            child = family.labels(*self._guard(metric, labels))
            if len(self._children) < 4 * self.max_series:
                self._children[(metric, labels)] = child
        return child

    def expire(self, live_volumes: Container[int], now: float) -> int:
        """Delete the access series whose volumes are all gone, once they
        have been ownerless for SERIES_GRACE_SECONDS (pod churn must not
        fill the metrics_max_series cap for good). Returns how many went."""
        for series, owners in list(self._owners.items()):
            owners.difference_update([v for v in owners if v not in live_volumes])
            if not owners:
                del self._owners[series]
                self._expiring.setdefault(series, now + SERIES_GRACE_SECONDS)
        gone = [series for series, at in self._expiring.items() if at <= now]
        for series in gone:
            del self._expiring[series]
            kind, labels = series
            try:
                self._access[kind].remove(*labels)
            except KeyError:
                pass
            self._children.pop(series, None)
            self._series.discard(series)
        return len(gone)

    def new_reader(self, namespace: str, kind: str, name: str) -> None:
        self._child("new_reader", self._new_reader, (namespace, kind, name)).inc()

    def register_store(self, store) -> None:
        """Export the access store's health and its per-object gauges
        (a tapio_node.store.AccessStore), read at each scrape."""
        self.registry.register(_StoreCollector(store, self.max_series))

    def http_refused(self, reason: str) -> None:
        """A connection closed unserved: "too_many" or "idle" (a fixed set)."""
        self._http_refused.labels(reason).inc()

    def resync(self, reason: str, discrepancies: int = 0) -> None:
        self._resyncs.labels(*self._guard("resync", (reason,))).inc()
        if discrepancies:
            self._discrepancies.inc(discrepancies)

    # -- the daemon's state

    def register_state(self, fn: Callable[[], DaemonState]) -> None:
        """fn() is called at each scrape; it must be cheap and thread-safe (plain reads)."""
        self._state_fn = fn

    def state(self) -> DaemonState | None:
        return self._state_fn() if self._state_fn is not None else None

    @property
    def series(self) -> int:
        return len(self._series)

    def _guard(self, metric: str, labels: tuple) -> tuple:
        key = (metric, labels)
        if key in self._series:
            return labels
        if len(self._series) < self.max_series:
            self._series.add(key)
            return labels
        # Remember refused sets (bounded too) so each is counted once.
        if key not in self._refused:
            if len(self._refused) < self.max_series:
                self._refused.add(key)
            self._dropped.inc()
        return (OVERFLOW,) * len(labels)
