"""The HTTP endpoint on `listen_address`: GET /metrics and GET /healthz.

A WSGI server in a daemon thread, like prometheus_client's
start_http_server, but closable (tests and reloads need the port back), with
/healthz next to /metrics, and bounded: anyone who can reach the port (a
pod, on a node-wide address) must not be able to exhaust the daemon's
threads (the unit's TasksMax) or starve /healthz. Connections wait in a
selector until they have sent something, so an idle one holds no thread;
a fixed pool serves requests with a per-socket timeout; idle connections
are closed after IDLE_SECONDS and the oldest goes when MAX_WAITING wait.
"""
from __future__ import annotations

import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .metrics import DaemonState, Metrics

__all__ = ["serve", "Server", "ListenError", "health", "parse_listen_address", "STUCK_AFTER"]

# A loop that has not run for this long is stuck.
STUCK_AFTER = 30.0
# The bounds (see the module doc); Prometheus and a probe need one or two.
WORKERS = 4
MAX_WAITING = 64
IDLE_SECONDS = 10.0
REQUEST_TIMEOUT = 5.0


class ListenError(OSError):
    """The listen address is taken or not ours; the message names it."""


def parse_listen_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:9717', '[::1]:9717', 'localhost:0' -> (host, port), by the
    same rules as the config check (config.split_listen_address)."""
    from .config import split_listen_address

    if not isinstance(value, str):
        raise ValueError(f"kernel_collector.listen_address must be a string HOST:PORT, got {value!r}")
    try:
        return split_listen_address(value)
    except ValueError as e:
        raise ValueError(f"kernel_collector.listen_address: {e}") from None


def health(state: DaemonState | None, stuck_after: float = STUCK_AFTER) -> tuple[int, dict]:
    """(HTTP status, /healthz body) for a daemon state; None = state unreadable."""
    if state is None:
        return 503, {"status": "unhealthy", "reason": "daemon state not available (starting or stopped)",
                     "focus": "config_access"}
    reason = None
    if not state.ebpf_loaded:
        reason = "eBPF programs are not loaded and attached"
    elif not state.ring_buffer_active:
        reason = "ring buffer is not being polled"
    elif state.loop_heartbeat_age_seconds > stuck_after:
        reason = (f"event loop stuck: last heartbeat {state.loop_heartbeat_age_seconds:.1f}s ago "
                  f"(limit {stuck_after:g}s)")
    degraded = degraded_reasons(state)
    body = {
        "status": "unhealthy" if reason else "degraded" if degraded else "healthy",
        "ebpf_loaded": state.ebpf_loaded,
        "focus": "config_access",
        "ring_buffer_active": state.ring_buffer_active,
        "events_processed": state.events_processed,
        "ring_buffer_drops": state.ring_buffer_drops,
        "last_event_age_seconds": state.last_event_age_seconds,
        "loop_heartbeat_age_seconds": round(state.loop_heartbeat_age_seconds, 3),
        "backend": state.backend,
        "watched_volumes": state.watched_volumes,
        "watched_pods": state.watched_pods,
        "store": state.store,
    }
    if state.kernel_features_off:
        # Not degraded: the kernel cannot do more; `tapio-node check` says the cost.
        body["kernel_features_off"] = state.kernel_features_off
    if reason:
        body["reason"] = reason
    if degraded:
        body["degraded"] = degraded
    return (503 if reason else 200), body


def degraded_reasons(state: DaemonState) -> list[str]:
    """Why the daemon runs but sees less than everything (HTTP 200, status
    "degraded": restarting would not help)."""
    out = []
    if state.losing:
        out.append("accesses lost in the last minute: "
                   + ", ".join(f"{r} ({state.events_lost.get(r, 0)} in all)" for r in state.losing)
                   + " (see kernel_monitor_events_lost_total)")
    if state.volumes_over_capacity:
        out.append(f"{state.volumes_over_capacity} volumes not indexed: watched_inodes is full "
                   "(raise kernel_collector.max_watched_files)")
    if state.store == "failing":
        out.append(f"access store failing ({state.store_error}): collection goes on, reports miss "
                   "this data (see kernel_monitor_store_errors_total)")
    return out


class _BoundedWSGIServer(WSGIServer):
    request_queue_size = 128   # the kernel's accept queue: a burst waits there, not in SYN retries
    on_refused: Callable[[str], None] = staticmethod(lambda reason: None)

    def server_activate(self):
        super().server_activate()
        self._stop = threading.Event()
        self._jobs: queue.Queue = queue.Queue(maxsize=MAX_WAITING)
        self._workers = [threading.Thread(target=self._work, name=f"tapio-httpd-{i}", daemon=True)
                         for i in range(WORKERS)]
        for t in self._workers:
            t.start()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        waiting: dict[socket.socket, float] = {}   # accepted, nothing sent yet -> since
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(poll_interval):
                    if key.fileobj is self.socket:
                        try:
                            conn, _addr = self.socket.accept()
                        except OSError:
                            continue
                        if len(waiting) >= MAX_WAITING:
                            oldest = min(waiting, key=waiting.get)
                            sel.unregister(oldest)
                            del waiting[oldest]
                            self._drop(oldest, "too_many")
                        waiting[conn] = time.monotonic()
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    sel.unregister(conn)
                    del waiting[conn]
                    try:
                        self._jobs.put_nowait(conn)
                    except queue.Full:
                        self._drop(conn, "too_many")
                cutoff = time.monotonic() - IDLE_SECONDS
                for conn in [c for c, since in waiting.items() if since < cutoff]:
                    sel.unregister(conn)
                    del waiting[conn]
                    self._drop(conn, "idle")
        for conn in waiting:
            conn.close()

    def _drop(self, conn: socket.socket, reason: str) -> None:
        conn.close()
        self.on_refused(reason)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                conn.settimeout(REQUEST_TIMEOUT)
                self.finish_request(conn, conn.getpeername())
            except Exception:  # a client that vanished or stalled: its problem
                pass
            finally:
                self.shutdown_request(conn)

    def shutdown(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(REQUEST_TIMEOUT + 1)
        while not self._jobs.empty():
            self._jobs.get_nowait().close()


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT   # also bounds a client that sends its request slowly

    def log_message(self, format, *args):  # scrapes every 15s would spam stderr
        pass


class Server:
    """A running endpoint; close() stops it and frees the port."""

    def __init__(self, httpd, thread, listen_address):
        self._httpd = httpd
        self._thread = thread
        self.listen_address = listen_address
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        if self._thread is None:
            return
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_app(metrics: Metrics, state_fn: Callable[[], DaemonState] | None, stuck_after: float):
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            try:
                state = state_fn() if state_fn is not None else metrics.state()
            except Exception as e:
                code, body = 503, {"status": "unhealthy", "focus": "config_access",
                                   "reason": f"reading daemon state failed: {e}"}
            else:
                code, body = health(state, stuck_after)
            data = json.dumps(body).encode()
            start_response("200 OK" if code == 200 else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        data = b"tapio-node: try /metrics or /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
        return [data]

    return app


def serve(listen_address: str, metrics: Metrics, state_fn: Callable[[], DaemonState] | None = None,
          *, stuck_after: float = STUCK_AFTER) -> Server:
    """Start serving /metrics and /healthz on listen_address ("host:port"; port 0 = any).

    state_fn (default: the one given to metrics.register_state) feeds
    /healthz; it is also registered for /metrics if metrics has none yet.
    """
    host, port = parse_listen_address(listen_address)
    if state_fn is not None and metrics._state_fn is None:
        metrics.register_state(state_fn)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {listen_address}: host {host!r} does not resolve ({e.strerror}); "
                          "fix kernel_collector.listen_address") from None
    family, _, _, _, sockaddr = infos[0]

    class ServerClass(_BoundedWSGIServer):
        address_family = family
        on_refused = staticmethod(metrics.http_refused)

    try:
        httpd = make_server(sockaddr[0], sockaddr[1], make_app(metrics, state_fn, stuck_after),
                            server_class=ServerClass, handler_class=_QuietHandler)
    except OSError as e:
        raise ListenError(e.errno, f"cannot listen on {listen_address}: {e.strerror} "
                          "(another tapio-node running? change kernel_collector.listen_address)") from None
    thread = threading.Thread(target=httpd.serve_forever, name="tapio-httpd", daemon=True)
    thread.start()
    return Server(httpd, thread, listen_address)
