"""PodSpecs: the specs of this node's pods, in memory, off the event hot path.

Two background threads keep it current, one per source (each optional,
merged): the static pod manifests (:mod:`tapio_node.podspec.static`) and
the Kubernetes API (:mod:`tapio_node.podspec.api`). :meth:`PodSpecs.get`
is a dict lookup that never blocks. The threads back off (capped,
jittered) and take a fresh client after each failure; :meth:`PodSpecs.stop`
interrupts a blocked read.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from tapio_node.config import KernelCollector, node_name_of
from tapio_node.podspec.api import (
    SERVICE_ACCOUNT_DIR,
    Gone,
    SourceError,
    api_client,
    api_config,
    list_pods,
    watch_pods,
)
from tapio_node.podspec.model import Pod, PodMeta, pod_meta
from tapio_node.podspec.static import dir_signature, scan_manifests

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ metrics


_metrics_cache: "weakref.WeakKeyDictionary[Any, _Metrics]" = weakref.WeakKeyDictionary()


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.up = Gauge(
            "kernel_monitor_podspec_source_up",
            "1 when pod specs come from the Kubernetes API (list+watch healthy), else 0",
            registry=registry,
        )
        self.pods = Gauge("kernel_monitor_podspec_pods", "Pod specs known, by source", ["source"], registry=registry)
        self.relists = Counter("kernel_monitor_podspec_relists_total", "Full pod lists from the API", registry=registry)
        self.restarts = Counter(
            "kernel_monitor_podspec_watch_restarts_total", "Pod watches restarted, by reason", ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "kernel_monitor_podspec_errors_total", "Pod spec source errors, by reason", ["reason"], registry=registry
        )


def _metrics_for(metrics: Any) -> _Metrics | None:
    if metrics is None:
        return None
    registry = getattr(metrics, "registry", metrics)
    m = _metrics_cache.get(registry)
    if m is None:
        m = _metrics_cache[registry] = _Metrics(registry)
    return m


# ------------------------------------------------------------------ PodSpecs


class _Snapshot(msgspec.Struct, frozen=True):
    by_uid: dict[str, PodMeta] = {}
    by_name: dict[tuple[str, str], PodMeta] = {}


class PodSpecs:
    """Pod specs of this node's pods, kept current by a background thread.

    Lookups (:meth:`get`, :meth:`get_by_name`) read an immutable snapshot that
    the threads replace whole, so they never wait for a lock.
    """

    def __init__(
        self,
        *,
        static_pods_path: str,
        kubeconfig: str | None,
        node_name: str,
        in_cluster: bool | None = None,
        on_state: Callable[[bool, str], None] | None = None,
        metrics: Any = None,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        static_interval: float = 2.0,
        watch_timeout: int = 300,
        tombstone_ttl: float = 300.0,
    ) -> None:
        self.static_pods_path = static_pods_path
        self.kubeconfig = kubeconfig
        self.node_name = (node_name or socket.gethostname()).lower()
        self.in_cluster = in_cluster
        self.service_account_dir = service_account_dir
        self._on_state = on_state
        self._m = _metrics_for(metrics)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._static_interval = static_interval
        self._watch_timeout = watch_timeout
        self._tombstone_ttl = tombstone_ttl

        self.up = False
        self.api_source: str | None = None  # e.g. "kubeconfig /etc/kubernetes/kubelet.conf"
        self.last_error: str | None = None
        self._static_ok = False
        self._api_hopeful = False  # True while the API may still deliver a missing pod soon

        self._api: dict[str, PodMeta] = {}
        self._static: list[PodMeta] = []
        self._gone: dict[str, tuple[float, PodMeta]] = {}
        self._snap = _Snapshot()
        self.version = 0  # grows with each change of the specs (the access store's inventory follows)
        self._write = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._warned = False

    # ----------------------------------------------------------- public API

    @property
    def source(self) -> str:
        parts = [p for p, on in (("static", self._static_ok), ("api", self.up)) if on]
        return "+".join(parts) or "none"

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._api_hopeful = True
        for name, fn in (("tapio-podspec-static", self._run_static), ("tapio-podspec-api", self._run_api)):
            t = threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._interrupt()
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                # Stuck in a connect; it is a daemon thread and exits at its next check.
                log.debug("pod specs: thread %s still finishing", t.name)
        self._threads = []

    def get(self, pod_uid: str) -> PodMeta | None:
        return self._snap.by_uid.get(pod_uid)

    def get_by_name(self, namespace: str, name: str) -> PodMeta | None:
        return self._snap.by_name.get((namespace, name))

    def wait_for(self, pod_uid: str, timeout: float) -> PodMeta | None:
        """get(), waiting up to `timeout` s while the API may still deliver the pod."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                meta = self.get(pod_uid)
                if meta is not None or not self._api_hopeful or self._stop.is_set():
                    return meta
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def pods(self) -> list[PodMeta]:
        """Every known pod spec (a copy)."""
        return list(self._snap.by_name.values())

    # --------------------------------------------------------- index upkeep

    def _rebuild(self) -> None:
        now = time.monotonic()
        with self._write:
            self._gone = {u: (t, m) for u, (t, m) in self._gone.items() if t > now}
            by_uid: dict[str, PodMeta] = {}
            by_name: dict[tuple[str, str], PodMeta] = {}
            # Later layers win: tombstones < static manifests < live API objects.
            layers = [[m for _, m in self._gone.values()], self._static, list(self._api.values())]
            for layer in layers:
                for m in layer:
                    for uid in (m.uid, m.mirror_uid):
                        if uid:
                            by_uid[uid] = m
                    by_name[(m.namespace, m.name)] = m
            self._snap = _Snapshot(by_uid, by_name)
            self.version += 1
            if self._m:
                self._m.pods.labels("api").set(len(self._api))
                self._m.pods.labels("static").set(len(self._static))
        with self._changed:
            self._changed.notify_all()

    def _replace_api(self, metas: list[PodMeta]) -> None:
        new = {m.uid: m for m in metas if m.uid}
        dead = time.monotonic() + self._tombstone_ttl
        with self._write:
            for uid, m in self._api.items():
                if uid not in new:
                    self._gone[uid] = (dead, m)
            self._api = new
        self._rebuild()

    def _upsert_api(self, m: PodMeta) -> None:
        with self._write:
            if not m.uid or self._api.get(m.uid) == m:
                return  # most MODIFIED events are status changes: nothing we keep
            self._api[m.uid] = m
            self._gone.pop(m.uid, None)
        self._rebuild()

    def _delete_api(self, m: PodMeta) -> None:
        with self._write:
            old = self._api.pop(m.uid, m)
            # Its processes may still open files for a moment; keep the spec a while.
            self._gone[m.uid] = (time.monotonic() + self._tombstone_ttl, old)
        self._rebuild()

    # ----------------------------------------------------------- state

    def _set_state(self, up: bool, text: str, reason: str | None = None) -> None:
        was = self.up
        self.up = up
        self._api_hopeful = up
        if self._m:
            self._m.up.set(1 if up else 0)
            if reason:
                self._m.errors.labels(reason).inc()
        if up:
            self.last_error = None
            if not was:
                log.info("pod specs: %s", text)
        else:
            self.last_error = text
            if was or not self._warned:
                self._warned = True
                log.warning(
                    "pod specs: no Kubernetes API source (%s); events name volumes, not objects "
                    "(config_name_source=volume_name) until it works; retrying with backoff",
                    text,
                )
            else:
                log.debug("pod specs: still down: %s", text)
        with self._changed:
            self._changed.notify_all()
        if self._on_state is not None and (up != was or not up):
            try:
                self._on_state(up, text)
            except Exception:
                log.exception("pod specs: on_state callback failed")

    def _backoff(self, attempt: int) -> float:
        d = min(self._backoff_cap, self._backoff_base * (2 ** min(max(attempt - 1, 0), 30)))
        return d / 2 + random.uniform(0, d / 2)  # jitter: nodes must not relist in lockstep

    def _guard(self, fn: Callable[[], None]) -> None:
        # The thread never dies of a bug: log it and run the loop again after a pause.
        while not self._stop.is_set():
            try:
                fn()
                return
            except Exception:
                log.exception("pod specs: %s failed; restarting it", threading.current_thread().name)
                self._stop.wait(self._backoff_cap)

    # ---------------------------------------------------------- static

    def _run_static(self) -> None:
        last = ("init",)
        while not self._stop.is_set():
            sig = dir_signature(self.static_pods_path)
            if sig != last:
                last = sig
                self._load_static(sig is not None)
            self._stop.wait(self._static_interval)

    def _load_static(self, exists: bool) -> None:
        pods: list[PodMeta] = []
        if exists:
            try:
                pods, errors = scan_manifests(self.static_pods_path, self.node_name)
            except OSError as e:
                log.warning("pod specs: cannot read static pod manifests in %s: %s", self.static_pods_path, e)
                exists = False
            else:
                for path, why in errors:
                    log.warning("pod specs: skipping static pod manifest %s: %s", path, why)
        with self._write:
            self._static = pods
            self._static_ok = exists
        self._rebuild()

    # -------------------------------------------------------------- API

    def _run_api(self) -> None:
        attempt = gone_streak = 0
        relist_rv: str | None = "0"
        while not self._stop.is_set():
            client = None
            try:
                cfg, desc = api_config(
                    kubeconfig=self.kubeconfig, in_cluster=self.in_cluster, service_account_dir=self.service_account_dir
                )
                client = api_client(cfg)
                self.api_source = desc
                rv = self._relist(client, relist_rv)
                relist_rv = rv
                self._set_state(True, f"watching pods of node {self.node_name} via {desc}")
                attempt = 0
                while not self._stop.is_set():
                    began = time.monotonic()
                    rv, events, dropped = self._watch(client, rv)
                    relist_rv = rv
                    if events:
                        attempt = gone_streak = 0
                    if dropped or (not events and time.monotonic() - began < 1.0):
                        # Dropped, or ended at once with nothing in it: re-watch from rv, without spinning.
                        attempt += 1
                        self._stop.wait(self._backoff(attempt))
            except Gone:
                # Our resourceVersion is compacted away: only a fresh list is complete.
                relist_rv = None
                gone_streak += 1
                if self._m:
                    self._m.restarts.labels("gone").inc()
                log.info("pod specs: watch expired (410 Gone); relisting")
                if gone_streak > 1:
                    # Gone again right after a relist: do not hammer the API server.
                    self._stop.wait(self._backoff(gone_streak))
                continue
            except SourceError as e:
                if self._stop.is_set():
                    return
                attempt += 1
                if attempt >= 2 and relist_rv:
                    # Our resourceVersion may be what the server rejects ("too large" after
                    # an etcd restore): take any cached state, cheap for a recovering server.
                    relist_rv = "0"
                self._set_state(False, str(e), e.reason)
                self._stop.wait(self._backoff(attempt))
            except Exception as e:  # e.g. a vanished tokenFile, a failing exec plugin: never kill the thread
                if self._stop.is_set():
                    return
                attempt += 1
                log.debug("pod specs: unexpected error", exc_info=True)
                self._set_state(False, f"{type(e).__name__}: {e}", "internal")
                self._stop.wait(self._backoff(attempt))
            finally:
                if client is not None:
                    client.close()

    def _relist(self, client: Any, rv: str | None) -> str:
        try:
            try:
                pods, new_rv = list_pods(client, self.node_name, resource_version=rv, on_response=self._track_socket)
            except Gone:
                if rv is None:
                    raise SourceError("API answered 410 Gone to a fresh list", "http_4xx") from None
                pods, new_rv = list_pods(client, self.node_name, resource_version=None, on_response=self._track_socket)
        finally:
            with self._sock_lock:
                self._sock = None
        self._replace_api([pod_meta(p) for p in pods])
        if self._m:
            self._m.relists.inc()
        return new_rv

    def _interrupt(self) -> None:
        with self._sock_lock:
            s = self._sock
        if s is not None:
            try:
                # Plain shutdown(), not SSLSocket's: wakes the thread blocked in recv.
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch(self, client: Any, rv: str) -> tuple[str, int, bool]:
        """Watch from `rv` until the stream ends: (last rv, events seen, dropped?).

        Raises Gone (relist) or SourceError (no answer: reconnect after backoff).
        """
        try:
            rv, events, end = watch_pods(
                client, self.node_name, rv, on_event=self._on_event, stopped=self._stop.is_set,
                watch_timeout=self._watch_timeout, on_response=self._track_socket,
            )
        finally:
            with self._sock_lock:
                self._sock = None
        if end != "stopped" and self._m:
            self._m.restarts.labels(end).inc()
        return rv, events, end == "dropped"

    def _track_socket(self, resp: Any) -> None:
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._sock_lock:
            self._sock = sock
        if self._stop.is_set():
            self._interrupt()  # stop() ran before the socket was known

    def _on_event(self, kind: str, pod: Pod) -> None:
        if kind == "DELETED":
            self._delete_api(pod_meta(pod))
        else:
            self._upsert_api(pod_meta(pod))


def from_config(kc: KernelCollector, **kw: Any) -> PodSpecs:
    """PodSpecs for a config.KernelCollector (kubeconfig, node_name, static_pods_path); not started."""
    return PodSpecs(
        static_pods_path=kc.static_pods_path,
        kubeconfig=kc.kubeconfig or None,
        node_name=node_name_of(kc),
        **kw,
    )
