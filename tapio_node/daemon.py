"""The main loop: one thread, one epoll, the ring buffer drained a batch
at a time; systemd notify/watchdog, SIGHUP reload, SIGTERM clean exit."""
from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

import msgspec

from tapio_node import __version__, events as ev, host
from tapio_node.attribution import Attributor, count_access, overflow_record
from tapio_node.config import (RESTART_KEYS, ConfigError, KernelCollector, duration_seconds,
                               hook_backend_of, load_config, node_name_of, plugins_for)
from tapio_node.enforcement import Enforcer
from tapio_node.kernel.records import REC_ACCESS
from tapio_node.outputs import NullSink, open_sink

log = logging.getLogger("tapio_node.daemon")

# Adaptive wake-ups: below BUSY_RATE the kernel wakes us per record (low
# latency). Above it the kernel never wakes us and we stop waiting on the
# ring's fd (it is readable whenever one byte is pending, which would have
# us drain after every record); we drain every BUSY_POLL_MS instead.
# Draining rarely, in big batches, matters more than it seems: measured
# here, a reader draining continuously made each watched open cost the
# opener ~4-5 us in the kernel, against 0.7 us when it drains every 10-20 ms
# (cross-core cache traffic on the records).
BUSY_RATE = 2000.0
IDLE_RATE = 500.0
RATE_WINDOW = 0.01
BUSY_POLL_MS = 20
# A wake-up threshold the ring never reaches: BPF_RB_NO_WAKEUP always.
NEVER_WAKE = 0xFFFFFFFF
IDLE_POLL_MS = 250
PERIODIC_SECONDS = 1.0
# Longest one drain may run before the loop turns again (watchdog, inotify,
# the state /healthz reads): a flood of unfoldable records cannot stall it.
DRAIN_BUDGET_SECONDS = 0.05
# Overflow counts are drained one flip after they were written: this often.
OVERFLOW_SECONDS = 0.25
# The access store's mount inventory is taken this often (last_mounted's
# resolution); the access rows go every PERIODIC_SECONDS.
MOUNT_INVENTORY_SECONDS = 30.0
# ... and sooner after a change (pods, volumes, pod specs), but not more
# often than this: on a big node the inventory costs tens of ms of the loop.
MOUNT_CHANGE_SECONDS = 5.0




def _human_rate(r: float) -> str:
    return f"{r / 1000:.1f}k" if r >= 1000 else f"{r:.0f}"


class Daemon:
    def __init__(self, kc: KernelCollector, *, output: str = "stdout",
                 config_path: str | None = None, stream=None, notifier=None):
        self.kc = kc
        self.output = output
        self.config_path = config_path
        self.stream = stream or sys.stdout
        if notifier is None:
            from tapio_node.notify import Notifier
            notifier = Notifier()
        self.notifier = notifier
        self.clock = ev.Clock()
        self.kernel = None
        self.reader = None
        self.volumes = None
        self.pods = None
        self.podspecs = None
        self.attribution: Attributor | None = None
        self.enforcer = None
        self.http = None
        self.sink = NullSink()
        self.metrics = None
        self.store = None
        self.row_keys = None
        self.alerts = None
        self._next_inventory = 0.0
        self._inventory_mark = ()
        self.events_processed = 0
        self.unresolved = 0
        self.failed_groups = 0
        self.drain_cut = 0  # drains ended by DRAIN_BUDGET_SECONDS with records left
        # Loss counts as last seen, and when each last grew (/healthz degraded);
        # state() runs in the HTTP threads and the loop.
        self._loss_seen: dict[str, int] = {}
        self._loss_grew: dict[str, float] = {}
        self._loss_lock = threading.Lock()
        self._behind = False  # the last drain was cut: poll again at once
        self.last_event_mono: float | None = None
        self.heartbeat = time.monotonic()
        self.ready = False
        self.status_text = "starting"
        self._stop = False
        self._reload = False
        self._rate = 0.0
        self._busy = False
        self._recent = 0
        self._recent_start = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self._unresolved_logged = 0
        self._sig_r = self._sig_w = None
        self._epoll = None
        self._mounts_fd = None
        self._fd_handlers: dict[int, object] = {}

    # -- state for /healthz and /metrics -----------------------------------
    def state(self):
        from tapio_node.metrics import DaemonState

        now = time.monotonic()
        drops = 0
        kstats = {}
        if self.kernel is not None and self.kernel.obj is not None:
            try:
                kstats = self.kernel.stats()
                drops = kstats["drops"]
            except OSError:
                pass
        lost = {"kernel_lost": kstats.get("lost", 0), "kernel_skipped": kstats.get("skipped", 0),
                "fd_race": kstats.get("fd_races", 0),
                "syscall_drop": kstats.get("syscall_drops", 0),
                "bad_record": self.reader.bad_records if self.reader is not None else 0,
                "failed_group": self.failed_groups, "unresolved": self.unresolved,
                "output_dropped": self.sink.dropped_lines}
        return DaemonState(
            events_lost=lost, losing=self._losing(lost, now),
            ebpf_loaded=bool(self.kernel is not None and self.kernel.obj is not None
                             and self.kernel.programs()),
            ring_buffer_active=self.reader is not None and self.ready,
            events_processed=self.events_processed,
            ring_buffer_drops=drops,
            watched_volumes=len(self.volumes.volumes) if self.volumes else 0,
            watched_files=self.volumes.file_count if self.volumes else 0,
            watched_pods=self.volumes.pod_count if self.volumes else 0,
            last_event_age_seconds=(now - self.last_event_mono) if self.last_event_mono else None,
            loop_heartbeat_age_seconds=now - self.heartbeat,
            backend=self.kernel.backend if self.kernel else "none",
            status=self.status_text,
            kernel_features_off=[f.name for f in self.kernel.features_off()] if self.kernel else [],
            watch_capacity_exceeded=self.volumes.capacity_exceeded if self.volumes else 0,
            volumes_over_capacity=len(self.volumes.over_capacity) if self.volumes else 0,
            store="off" if self.store is None else "ok" if self.store.up else "failing",
            store_error=self.store.last_error if self.store is not None and not self.store.up else None)

    def _losing(self, lost: dict[str, int], now: float) -> list[str]:
        """Loss reasons whose count grew within LOSS_RECENT_SECONDS."""
        from tapio_node.metrics import LOSS_RECENT_SECONDS

        with self._loss_lock:
            for reason, n in lost.items():
                if n > self._loss_seen.get(reason, 0):
                    self._loss_grew[reason] = now
                self._loss_seen[reason] = n
            return sorted(r for r, t in self._loss_grew.items() if now - t < LOSS_RECENT_SECONDS)

    # -- start-up ----------------------------------------------------------
    def _progress(self, done: int, total: int, files: int) -> None:
        text = f"scanning kubelet volumes: {done}/{total} pods, {files} files"
        self.notifier.status(text)
        if sys.stderr.isatty():
            sys.stderr.write("\r" + text)
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def start(self) -> None:
        from tapio_node.kernel.loader import Kernel, KernelUnavailable
        from tapio_node.metrics import Metrics
        from tapio_node.volumes import VolumeIndex

        kc = self.kc
        # First of all: a SIGHUP (a reload) or SIGTERM during a long start-up
        # must not kill us with the kernel half set up; the loop acts on them.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.metrics = Metrics(max_series=kc.metrics_max_series)
        if not kc.enable_ebpf:
            raise KernelUnavailable("enable_ebpf is false: nothing to collect (set it to true)")
        from tapio_node import check

        failed = check.preflight(kc)
        if failed:
            raise KernelUnavailable("\n  ".join(["this node cannot run the collector:"]
                                                 + [check.format_check(c) for c in failed]))
        self.notifier.status("loading BPF programs")
        t0 = time.monotonic()
        self.kernel = Kernel(ring_buffer_size=kc.ring_buffer_size,
                             sampling_rate=kc.syscall_sampling_rate,
                             pod_correlation=kc.enable_pod_correlation,
                             pin_path=kc.pin_path, max_watched_files=kc.max_watched_files,
                             hook_backend=hook_backend_of(kc),
                             # Exercise the pre-5.15 fallback on a newer kernel.
                             force_enter_stash=os.environ.get("TAPIO_FORCE_ENTER_STASH") == "1")
        log.info("attached %s (%s backend, paths from %s) in %.0f ms",
                 ", ".join(self.kernel.programs()), self.kernel.backend,
                 self.kernel.path_source, (time.monotonic() - t0) * 1000)
        for backend, why in self.kernel.passed_over.items():
            log.info("hook backend %s not used: %s", backend, why)
        for feature in self.kernel.features_off():
            log.warning("kernel lacks %s (since %s): %s", feature.name, feature.since, feature.off)
        self.reader = self.kernel.reader(capacity=max(1024, kc.buffer_size * 8),
                                         keep_timestamps=self.output == "stdout")
        self.volumes = VolumeIndex(kc.kubelet_pods_path, plugins_for(kc), self.kernel.maps,
                                   max_files=kc.max_watched_files)
        # Before the scan: each volume's protection goes in with it.
        self.enforcer = Enforcer(self.kernel.policy, self.volumes)
        self.volumes.protects = self.enforcer.protects
        try:
            self.enforcer.apply(kc.enforcement, kc.kubelet_cgroups)
        except ValueError as exc:
            raise KernelUnavailable(str(exc)) from None
        self.attribution = Attributor(self.volumes, self.clock)
        t1 = time.monotonic()
        self.volumes.scan_all(progress=self._progress)
        log.info("indexed %d files in %d volumes of %d pods in %.0f ms",
                 self.volumes.file_count, len(self.volumes.volumes),
                 self.volumes.pod_count, (time.monotonic() - t1) * 1000)
        if kc.enable_pod_correlation:
            self._start_pods()
        self._start_podspecs()
        self.attribution.pods, self.attribution.podspecs = self.pods, self.podspecs
        self.enforcer.refresh_pods(self.pods)
        # Every map filled: now our program can take over from one a
        # previous run left enforcing.
        self.kernel.policy.hold()
        self._start_store()
        self.sink = open_sink(self.output, self.clock, stream=self.stream,
                              journal_fold_window=kc.journal_fold_window)
        from tapio_node.httpd import serve

        self.http = serve(kc.listen_address, self.metrics, self.state)
        self._setup_loop()
        # Everything built so far lives as long as the daemon: keep it out
        # of collections, and collect the young generation less often (the
        # loop allocates per batch; collection pauses are latency).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        host.release_free_memory()
        self.ready = True
        self._set_status()
        self.notifier.ready(self.status_text)
        log.info("ready: %s; serving %s", self.status_text, self.http.url
                 if hasattr(self.http, "url") else kc.listen_address)

    def _start_pods(self) -> None:
        try:
            from tapio_node.pods.registry import PodRegistry
        except ImportError:
            log.warning("pod correlation unavailable in this build")
            return
        from tapio_node.kernel.maps import KernelMaps

        root = host.cgroup_root(self.kc.cgroup_root)
        if root is None:
            log.warning("no cgroup v2 mount found: pod correlation off "
                        "(mount cgroup2 or set kernel_collector.cgroup_root)")
            return
        self.pods = PodRegistry(
            cgroup_root=root, pod_logs_path=self.kc.pod_logs_path,
            kubelet_pods_path=self.kc.kubelet_pods_path,
            projected_volume_pattern=self.kc.projected_volume_pattern,
            kubelet_cgroups=self.kc.kubelet_cgroups,
            kubelet_executables=self.kc.kubelet_executables,
            maps=KernelMaps(self.kernel), metrics=self.metrics)
        self.pods.start()

    def _start_podspecs(self) -> None:
        from tapio_node.podspec.source import from_config

        self.podspecs = from_config(self.kc, metrics=self.metrics)
        self.podspecs.start()

    def _start_store(self) -> None:
        from tapio_node.store import AccessStore
        from tapio_node.store.alerts import NewReaderAlerts
        from tapio_node.store.rows import MountInventory, RowKeys

        kc = self.kc
        if not kc.state_path:
            log.info("state_path is empty: no access store (no report, no new-reader alerts)")
            return
        self.row_keys = RowKeys(self.podspecs)
        self.mount_inventory = MountInventory()
        self.alerts = NewReaderAlerts()
        self.store = AccessStore(kc.state_path, kc.retention_days, duration_seconds(kc.learning_period),
                                 node_name=node_name_of(kc), on_new_reader=self._new_reader,
                                 max_objects=kc.metrics_max_series)
        if self.store.open():
            log.info("access store %s", self.store.path)
        if self.pods is None:
            log.warning("access store: pod correlation is off, so every reader is recorded as a host "
                        "process; `tapio-node report unused` and least-privilege will list every mount")
        self.store.commands_folded = lambda: self.row_keys.commands_folded
        self.metrics.register_store(self.store)
        self._inventory(time.monotonic())
        self.store.start()

    def _inventory(self, now: float) -> None:
        self._next_inventory = now + MOUNT_INVENTORY_SECONDS
        self._inventory_mark = self._inventory_state()
        self.store.mounted(self.mount_inventory.rows(self.volumes, self.pods, self.podspecs))

    def _inventory_state(self) -> tuple:
        # What, when it changes, makes the inventory stale before its time.
        return (len(self.volumes.volumes), self.volumes.file_count,
                getattr(self.podspecs, "version", 0))

    def _new_reader(self, pair: tuple, key: tuple) -> None:
        _kind, _ns, _workload, namespace, kind, name = pair
        self.metrics.new_reader(namespace, kind, name)
        self.alerts.send(key)

    def _setup_loop(self) -> None:
        self._epoll = select.epoll()
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        self._register(self._sig_r.fileno(), self._drain_signals)
        self._register(self.reader.fileno(), None)
        self._register(self.volumes.fileno(), self._on_volumes)
        if self.pods is not None:
            for fd in self.pods.filenos():
                self._register(fd, self._on_pods)
        # Mount table changes (a secret tmpfs mounted or unmounted) show as
        # EPOLLPRI on /proc/self/mountinfo.
        self._mounts_fd = os.open(host.MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        self._epoll.register(self._mounts_fd, select.EPOLLPRI)
        self._fd_handlers[self._mounts_fd] = self._on_mounts

    def _register(self, fd: int, handler) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._fd_handlers[fd] = handler

    def _on_stop(self, signum, frame) -> None:
        self._stop = True

    def _on_hup(self, signum, frame) -> None:
        self._reload = True

    def _drain_signals(self) -> None:
        try:
            while self._sig_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _on_volumes(self) -> None:
        overflows = self.volumes.overflows
        changes = self.volumes.handle_io()
        if self.volumes.overflows != overflows and self.metrics is not None:
            self.metrics.resync("inotify_overflow", changes)

    def _on_pods(self) -> None:
        self.pods.handle_io()

    def _on_mounts(self) -> None:
        self.volumes.mounts_changed()

    # -- the loop ----------------------------------------------------------
    def run(self) -> int:
        next_periodic = time.monotonic()
        next_overflow = next_periodic + OVERFLOW_SECONDS
        next_resync = time.monotonic() + self.kc.resync_interval
        watchdog = self.notifier.watchdog_interval()
        next_watchdog = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            self.heartbeat = now
            timeout_ms = 0 if self._behind else BUSY_POLL_MS if self._busy else IDLE_POLL_MS
            timeout_ms = min(timeout_ms, max(0, int((min(next_periodic, next_overflow) - now) * 1000)))
            try:
                ready = self._epoll.poll(timeout_ms / 1000.0)
            except InterruptedError:
                ready = []
            for fd, _mask in ready:
                handler = self._fd_handlers.get(fd)
                if handler is not None:
                    try:
                        handler()
                    except Exception:
                        log.exception("handling fd %d", fd)
            self._drain()
            if self._reload:
                self._reload = False
                self.reload()
            now = time.monotonic()
            if watchdog and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + watchdog
            if now >= next_overflow:
                next_overflow = now + OVERFLOW_SECONDS
                self._drain_overflow()
            if now >= next_periodic:
                next_periodic = now + PERIODIC_SECONDS
                self._periodic(now)
            if now >= next_resync:
                next_resync = now + self.kc.resync_interval
                self.resync("periodic")
        return 0

    def _drain(self) -> None:
        reader = self.reader
        got = 0
        deadline = time.monotonic() + DRAIN_BUDGET_SECONDS
        self._behind = False
        while True:
            n = reader.consume()
            got += n
            if reader.pending:
                self._process(reader.take())
                self.sink.flush()
            if not reader.full and n == 0:
                break
            if time.monotonic() >= deadline:
                # The rest stays in the ring: the next turn drains it.
                self.drain_cut += 1
                self._behind = True
                break
        self.sink.flush()
        self._adapt(got)

    def _adapt(self, records: int) -> None:
        """Switch wake-ups within RATE_WINDOW of a change in load: per record
        when quiet (latency), batched when busy (a wake-up costs more than
        the record)."""
        self._recent += records
        now = time.monotonic()
        span = now - self._recent_start
        if span < RATE_WINDOW:
            return
        rate = self._recent / span
        self._recent, self._recent_start = 0, now
        busy = rate > BUSY_RATE if not self._busy else rate > IDLE_RATE
        if busy != self._busy:
            self._busy = busy
            self.kernel.set_wakeup_bytes(NEVER_WAKE if busy else 0)
            self._epoll.modify(self.reader.fileno(), 0 if busy else select.EPOLLIN)
            log.debug("%.0f records/s: %s", rate, f"draining every {BUSY_POLL_MS} ms"
                      if busy else "woken per record")

    def _periodic(self, now: float) -> None:
        self.clock.refresh()
        mark_time, mark_events = self._rate_mark
        if now > mark_time:
            self._rate = (self.events_processed - mark_events) / (now - mark_time)
        self._rate_mark = (now, self.events_processed)
        if self.unresolved != self._unresolved_logged:
            # Accesses to volumes gone before their record was read.
            log.warning("%d accesses could not be tied to a volume (removed before their "
                        "record was read)", self.unresolved - self._unresolved_logged)
            self._unresolved_logged = self.unresolved
        self.sink.tick(now)
        if not self.volumes.root_present:
            # The kubelet has not made its pods dir yet: look again.
            self.volumes.scan_all()
        self.volumes.prune_graveyard()
        self.enforcer.refresh_pods(self.pods)
        if self.metrics is not None:
            self.metrics.expire(self.volumes.volumes.keys(), now)
        if self.store is not None:
            if now >= self._next_inventory or (now >= self._next_inventory - MOUNT_INVENTORY_SECONDS
                                               + MOUNT_CHANGE_SECONDS
                                               and self._inventory_state() != self._inventory_mark):
                self._inventory(now)
            self.store.tick()
        self._set_status()
        self.notifier.status(self.status_text)

    def _set_status(self) -> None:
        drops = self.kernel.stats()["drops"] if self.kernel and self.kernel.obj else 0
        self.status_text = (
            f"{self.kernel.backend if self.kernel else 'no'} backend, watching {len(self.volumes.volumes)} volumes in {self.volumes.pod_count} pods, "
            f"{_human_rate(self._rate)} events/s, {drops} drops")

    def resync(self, reason: str) -> int:
        changes = self.volumes.scan_all()
        if self.pods is not None:
            try:
                changes += self.pods.resync()
            except Exception:
                log.exception("pod resync failed")
        if self.metrics is not None:
            self.metrics.resync(reason, changes)
        if changes:
            log.warning("%s resync fixed %d entries that inotify had missed", reason, changes)
        return changes

    # -- events ------------------------------------------------------------
    def _process(self, groups) -> None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        total = 0
        for rec in groups:
            if rec.kind != REC_ACCESS:
                total += self._syscall_group(rec)
                continue
            total += rec.count
            try:
                self._account(rec, now_ns)
            except Exception:
                # One bad record must not stop the collector; say so, rarely.
                self.failed_groups += 1
                if self.failed_groups in (1, 10, 100) or self.failed_groups % 1000 == 0:
                    log.exception("could not process an access record (%d so far)",
                                  self.failed_groups)
        self.events_processed += total
        if total:
            self.last_event_mono = time.monotonic()

    def _account(self, rec, now_ns: int, overflow: bool = False) -> None:
        """One folded group of identical accesses: metrics, then the sink."""
        t0 = time.perf_counter()
        count = rec.count
        got = self.attribution.access(rec, overflow)
        if got is None:
            self.unresolved += count
            return
        event, vol = got
        metrics = self.metrics
        count_access(metrics, event, vol, count)
        last = rec.last_ts
        store = self.store
        if store is not None:
            off = self.clock.offset_ns
            store.add(self.row_keys.access(event, vol), bool(event.cross_pod), count,
                      (rec.first_ts + off) / 1e9, (last + off) / 1e9)
        self.sink.emit(event, count, rec.first_ts, last, rec.stamps)
        metrics.processing(event.event_type, time.perf_counter() - t0)
        metrics.latency((now_ns - last) / 1e9)

    def _drain_overflow(self, everything: bool = False) -> None:
        """Accesses the kernel counted while the ring buffer was full: no
        path or per-access time, but each one is reported and counted."""
        entries = self.kernel.drain_overflow(everything)
        if not entries:
            return
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        total = 0
        for cgid, pid, vol_id, file_id, op, count in entries:
            total += count
            # One line per group with its count: a per-access line each
            # would let one flooded key become hundreds of MB.
            self._account(overflow_record(cgid, pid, vol_id, file_id, op, count, now_ns),
                          now_ns, overflow=True)
        log.warning("ring buffer was full: %d accesses reported from the kernel's overflow "
                    "counts (no path or per-access time); consider a larger ring_buffer_size", total)
        self.events_processed += total
        self.sink.flush()

    def _syscall_group(self, rec) -> int:
        if self.output == "stdout":
            first = rec.first_ts
            self.sink.emit(self.attribution.syscall(rec), 1, first, first)
        return rec.count

    # -- API for other collectors (AddContainerPID, AddPodInfo,
    # AddMountInfo). Call from the loop's thread, or with the loop stopped.
    def add_container_pid(self, pid: int) -> int:
        if self.pods is None:
            raise RuntimeError("pod correlation is off (enable_pod_correlation: false)")
        return self.pods.add_container_pid(pid)

    def add_pod_info(self, cgroup_id: int, info) -> None:
        if self.pods is None:
            raise RuntimeError("pod correlation is off (enable_pod_correlation: false)")
        self.pods.add_pod_info(cgroup_id, info)

    def add_mount_info(self, info) -> None:
        info.validate()
        self.volumes.add_mount(info.mount_path, "secret" if info.is_secret else "configmap",
                               info.name, info.namespace, info.pod_uid or "")

    def stop(self) -> None:
        """Ask the loop to return (thread-safe)."""
        self._stop = True
        if self._sig_w is not None:
            try:
                self._sig_w.send(b"\0")
            except OSError:
                pass

    # -- reload and stop ---------------------------------------------------
    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path).kernel_collector
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready(self.status_text)
            return
        old = self.kc
        restart = [k for k in RESTART_KEYS if getattr(new, k) != getattr(old, k)]
        if restart:
            log.warning("reload: %s change only on restart; other changes applied",
                        ", ".join(restart))
            keep = {k: getattr(old, k) for k in restart}
            new = msgspec.structs.replace(new, **keep)
        self.kc = new
        if plugins_for(new) != plugins_for(old):
            self.volumes.plugins = plugins_for(new)
            self.volumes.scan_all()
        if self.store is not None:
            self.store.retention_days = new.retention_days
            self.store.learning_until += duration_seconds(new.learning_period) - self.store.learning_period
            self.store.learning_period = duration_seconds(new.learning_period)
        if new.enforcement != old.enforcement or new.kubelet_cgroups != old.kubelet_cgroups:
            try:
                self.enforcer.apply(new.enforcement, new.kubelet_cgroups)
                self.enforcer.refresh_pods(self.pods)
                self.kernel.policy.hold()
            except ValueError as exc:
                log.error("reload: %s; enforcement stays %s", exc, self.enforcer.mode)
                self.kc = new = msgspec.structs.replace(new, enforcement=old.enforcement)
        if new.journal_fold_window != old.journal_fold_window and self.output == "journal":
            self.sink.window = new.journal_fold_window
        log.info("configuration reloaded from %s", self.config_path or "defaults")
        self.notifier.ready(self.status_text)

    def close(self) -> None:
        self.notifier.stopping()
        try:
            if self.reader is not None and self.kernel is not None and self.kernel.obj is not None:
                self._drain()
                self._drain_overflow(everything=True)
        except Exception:
            log.exception("final drain")
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                log.exception("closing the access store")
        for part in (self.sink, self.http, self.podspecs, self.pods, self.volumes):
            if part is None:
                continue
            try:
                (part.stop if hasattr(part, "stop") and not hasattr(part, "close") else part.close)()
            except Exception:
                log.exception("closing %s", type(part).__name__)
        self.reader = None
        if self.kernel is not None:
            if self._stop and self.kernel.obj is not None:
                # An orderly stop (SIGTERM): stop enforcing. A crash leaves
                # the pinned link enforcing until the next start.
                self.kernel.policy.release()
            self.kernel.close()
        if self._epoll is not None:
            self._epoll.close()
        if self._mounts_fd is not None:
            os.close(self._mounts_fd)
        if self._sig_w is not None:
            signal.set_wakeup_fd(-1)
            self._sig_r.close()
            self._sig_w.close()


def run(config_path: str | None, output: str) -> int:
    from tapio_node.kernel.loader import KernelUnavailable

    try:
        kc = load_config(config_path).kernel_collector
    except ConfigError as exc:
        print(f"tapio-node: config error: {exc}", file=sys.stderr)
        return 2
    daemon = Daemon(kc, output=output, config_path=config_path)
    try:
        daemon.start()
        rc = daemon.run()
    except KernelUnavailable as exc:
        print(f"tapio-node: cannot start: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Not a clean exit: Restart=on-failure must bring us back.
        print("tapio-node: stdout was closed by its reader (EPIPE): events after that were "
              "not written; exiting 1", file=sys.stderr)
        return 1
    except OSError as exc:
        if getattr(exc, "errno", None) in (errno.EPERM, errno.EACCES):
            print(f"tapio-node: cannot start: {exc} (needs root or CAP_BPF+CAP_PERFMON; "
                  "run `tapio-node check`)", file=sys.stderr)
            return 1
        print(f"tapio-node: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon.close()
    dropped = daemon.sink.dropped_lines
    if dropped:
        print(f"tapio-node: {dropped} events were dropped because stdout was not being read; "
              "exiting 1", file=sys.stderr)
        return 1
    return rc
