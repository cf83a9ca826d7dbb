"""The demo: a simulated node with three pods, the collector started on it,
and its events streamed as one line each until Ctrl-C, SIGTERM or a set
duration; then everything is torn down.

    python -m tapio_node.sim.demo [--duration S] [--raw]

(``tapio-node demo`` runs the same.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from tapio_node.sim.node import PLUGINS, SA_MOUNT, SimPod, SimulatedNode, VolumeSpec, child_env
from tapio_node.sim.opener import reader_argv
from tapio_node.sim.system import SimulationError, terminate


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def build_demo_node(node: SimulatedNode) -> dict[str, SimPod]:
    """Three pods in two namespaces, with ConfigMap, Secret and service-account volumes."""
    # A static pod: its manifest in static_pods_path tells the collector that volume
    # "certs" is Secret "web-tls" (no API server here to ask for the other pods' specs).
    web = node.add_pod("shop", "web", [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"replicas: 3\nlog_level: info\n",
                                               "conf.d/extra.yaml": b"feature_x: true\n"}),
        VolumeSpec("secret", "certs", {"tls.crt": b"-----BEGIN CERTIFICATE-----\n...\n",
                                       "tls.key": b"-----BEGIN PRIVATE KEY-----\n...\n"}, source_name="web-tls"),
    ], static=True, service_account=False)
    db = node.add_pod("shop", "db-0", [
        VolumeSpec("secret", "db-credentials", {"username": b"app\n", "password": b"s3cr3t\n"}),
    ], qos="guaranteed")
    batch = node.add_pod("reports", "nightly-report-29384756-abcde", [
        VolumeSpec("configmap", "report-config", {"query.sql": b"SELECT 1;\n"}),
    ], qos="besteffort")
    return {"web": web, "db": db, "batch": batch}


def _start_demo_readers(pods: dict[str, SimPod]) -> None:
    """One looping reader per container; returns once all are set up in their cgroups."""
    web, db, batch = pods["web"], pods["db"], pods["batch"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": None}  # no summaries; errors go to our stderr
    readers = [
        web.add_container("nginx").start_reader(
            "/run/config/app-config/app.yaml", count=0, interval=1.5, comm="nginx", **quiet),
        # A relative path after chdir, through openat2.
        web.add_container("tls-proxy").start_reader(
            "tls.key", count=0, interval=2.0, syscall="openat2", cwd="/run/secrets/certs", comm="envoy", **quiet),
        db.add_container("postgres").start_reader(
            "/run/secrets/db-credentials/password", count=0, interval=2.0, syscall="open", comm="postgres", **quiet),
        batch.add_container("report").start_reader(
            f"{SA_MOUNT}/token", count=0, interval=2.5, comm="report-job", **quiet),
    ]
    for r in readers:
        r.go()


def _summarise(line: bytes) -> str:
    try:
        ev = json.loads(line)
    except ValueError:
        return line.decode(errors="replace").rstrip("\n")
    if not isinstance(ev, dict) or "event_type" not in ev:
        return line.decode(errors="replace").rstrip("\n")
    proc = ev.get("process") or {}
    owner = f"{ev.get('namespace') or '?'}/{ev.get('pod_name') or ev.get('pod_uid') or '?'}"
    who = f"{proc.get('command') or '?'}[{proc.get('pid')}]"
    if proc.get("role"):
        who += f" ({proc['role']})"
    elif proc.get("pod_name"):
        who += f" in {proc.get('namespace')}/{proc.get('pod_name')}"
    elif proc.get("pod_uid") is None:
        who += " on the host"
    flag = "  CROSS-POD" if ev.get("cross_pod") else ""
    ts = str(ev.get("timestamp", ""))[11:23]
    return (f"{ts} {ev['event_type']:<17} {owner} {ev.get('config_name')}/{ev.get('file')} "
            f"via {ev.get('path')!r} by {who}{flag}")


def run_demo(start_collector: Callable[[str], object] | None = None, duration: float | None = None,
             raw: bool = False, out=None, wait_ready: bool = True) -> int:
    """Build a demo node, start the collector on it, stream its events until
    Ctrl-C/SIGTERM or ``duration`` seconds, then tear everything down.

    ``start_collector(config_path)`` must return a ``subprocess.Popen`` whose
    stdout is a pipe of JSON lines; by default it is
    ``<python> -m tapio_node run --config <file> --output stdout``. With
    ``wait_ready`` the pods start reading only once the collector's /healthz
    answers 200, so none of their opens happen before it is attached."""
    out = sys.stdout if out is None else out
    if start_collector is None:
        def start_collector(cfg: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "tapio_node", "run", "--config", cfg,
                                     "--output", "stdout"], stdout=subprocess.PIPE, env=child_env(None))
    # Signal handlers can only be set from the main thread.
    main = threading.current_thread() is threading.main_thread()
    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    old = {s: signal.getsignal(s) for s in sigs} if main else {}
    if main:
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGHUP, _raise_stop)
    collector = None
    rc = 0
    node = None
    try:
        node = SimulatedNode()
        pods = build_demo_node(node)
        cfg = node.write_config()
        print(f"tapio-node demo: simulated node in {node.base_dir}, cgroups in {node.cgroup_root}", file=out)
        for p in pods.values():
            print(f"  pod {p.namespace}/{p.name} uid={p.uid} volumes={sorted(p.volumes)}", file=out)
        collector = start_collector(cfg)
        if isinstance(collector, subprocess.Popen):
            node._register(collector)
        if wait_ready:
            _wait_healthy(node, cfg, collector)
        _start_demo_readers(pods)
        print("tapio-node demo: readers started; Ctrl-C to stop", file=out, flush=True)
        rc = _stream(node, pods, collector, duration, raw, out)
    except (KeyboardInterrupt, _Stop):
        pass
    except SimulationError as exc:
        print(f"tapio-node demo: error: {exc}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        # A second Ctrl-C/SIGTERM must not cut the teardown short.
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if isinstance(collector, subprocess.Popen):
                terminate(collector, timeout=10)
            if node is not None:
                try:
                    node.close()
                    print("tapio-node demo: cleaned up (processes, mounts, cgroups, temp dir)", file=out, flush=True)
                except SimulationError as exc:
                    print(f"tapio-node demo: error: {exc}", file=sys.stderr, flush=True)
                    rc = 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return rc


def _wait_healthy(node: SimulatedNode, cfg: str, collector, limit: float = 30.0) -> None:
    """Wait until /healthz answers 200 (or the collector exits), so no early access is missed."""
    import urllib.request
    import yaml

    with open(cfg) as f:
        addr = yaml.safe_load(f)["kernel_collector"]["listen_address"]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if isinstance(collector, subprocess.Popen) and collector.poll() is not None:
            raise SimulationError(f"the collector exited with status {collector.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{addr}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    print(f"tapio-node demo: warning: the collector's /healthz did not answer 200 within {limit:.0f} s; "
          "starting the pods anyway", file=sys.stderr, flush=True)


def _demo_steps(node: SimulatedNode, pods: dict[str, SimPod]) -> list[tuple[float, Callable[[], object], str]]:
    """(seconds after start, action, what to say) for the scripted part of the demo."""
    db = pods["db"]
    host_path = os.path.join(db.volume_dir("db-credentials"), "password")
    # A pod with a hostPath mount of the kubelet's pods dir: the classic way to read another pod's secret.
    in_pod_path = os.path.join("/run/host-pods", db.uid, "volumes", PLUGINS["secret"], "db-credentials", "password")

    def update():
        pods["web"].update_volume("app-config", {"app.yaml": b"replicas: 5\nlog_level: debug\n",
                                                 "conf.d/extra.yaml": b"feature_x: false\n"})

    def host_read():
        node.run_host(reader_argv(host_path, count=1, comm="cat"), stdout=subprocess.DEVNULL)

    def pod_read():
        pods["batch"].add_container("debug").run(reader_argv(in_pod_path, count=1, comm="curl"),
                                                 mounts={"/run/host-pods": node.pods_path}, stdout=subprocess.DEVNULL)

    return [
        (5.0, update, "the kubelet updated ConfigMap app-config of shop/web (atomic writer)"),
        (8.0, host_read, "a host process read shop/db-0's secret db-credentials"),
        (11.0, pod_read, "a process in reports/nightly-report read shop/db-0's secret through a hostPath mount"),
    ]


def _stream(node: SimulatedNode, pods: dict[str, SimPod], collector, duration: float | None, raw: bool, out) -> int:
    import selectors

    stdout = getattr(collector, "stdout", None)
    sel = selectors.DefaultSelector()
    if stdout is not None:
        os.set_blocking(stdout.fileno(), False)
        sel.register(stdout, selectors.EVENT_READ)
    start = time.monotonic()
    steps = _demo_steps(node, pods)
    buf = b""
    while duration is None or time.monotonic() - start < duration:
        elapsed = time.monotonic() - start
        while steps and elapsed >= steps[0][0]:
            _, action, message = steps.pop(0)
            action()
            print(f"tapio-node demo: {message}", file=out, flush=True)
        if isinstance(collector, subprocess.Popen) and collector.poll() is not None and not sel.get_map():
            print(f"tapio-node demo: the collector exited with status {collector.returncode}", file=out)
            return collector.returncode
        for key, _ in sel.select(timeout=0.5):
            chunk = key.fileobj.read()
            if chunk == b"":
                sel.unregister(key.fileobj)
                continue
            buf += chunk or b""
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    print(line.decode(errors="replace") if raw else _summarise(line), file=out, flush=True)
        if not sel.get_map():
            time.sleep(0.5)
    return 0


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tapio_node.sim.demo",
                                description="run the demo node against the collector")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--raw", action="store_true", help="print the JSON lines as they are")
    a = p.parse_args(argv)
    return run_demo(duration=a.duration, raw=a.raw)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
