"""SIGHUP: a valid config is applied without losing events; an invalid
one is logged and the running config kept. systemd hears RELOADING=1
then READY=1 (Type=notify)."""
import os
import signal
import time

import pytest
import yaml

from harness import daemon_factory, notify_messages  # noqa: F401  (fixture)
from tapio_node.sim.node import VolumeSpec

pytestmark = pytest.mark.kernel


def test_sighup_applies_a_valid_config_and_keeps_the_old_on_error(sim_node, daemon_factory,
                                                                    notify_socket):
    path, sock = notify_socket
    pod = sim_node.add_pod("shop", "web-0", [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"a"}),
        VolumeSpec("secret", "certs", {"tls.key": b"k"}),
    ], service_account=False)
    ctr = pod.add_container("app")
    cfg_path = sim_node.write_config()
    env = dict(os.environ, NOTIFY_SOCKET=path)
    d = daemon_factory(cfg_path, env=env)
    assert any(m.startswith("READY=1") or "\nREADY=1" in m
               for m in notify_messages(sock, until=lambda g: any("READY=1" in m for m in g)))

    # A reader loops through both reloads: no open may be lost.
    loop = ctr.start_reader("/run/secrets/certs/tls.key", count=0, interval=0.001)
    loop.go()

    # Invalid: logged, old config kept, still running and reporting.
    with open(cfg_path) as fh:
        good = fh.read()
    with open(cfg_path, "w") as fh:
        fh.write(good.replace("kernel_collector:", "kernel_collector:\n  buffer_size: many"))
    d.proc.send_signal(signal.SIGHUP)
    msgs = notify_messages(sock, until=lambda g: sum("READY=1" in m for m in g) >= 1)
    assert any("RELOADING=1" in m for m in msgs)
    deadline = time.monotonic() + 5
    while not any("reload refused" in line for line in d.stderr) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("reload refused" in line and "kernel_collector.buffer_size" in line for line in d.stderr)
    s1 = ctr.start_reader("/run/config/app-config/app.yaml").wait()
    assert d.wait_events(1, pred=lambda e: e["process"]["pid"] == s1["pid"])

    # Valid: stop watching ConfigMaps; Secrets go on without a gap.
    cfg = yaml.safe_load(good)
    cfg["kernel_collector"]["monitor_configmaps"] = False
    with open(cfg_path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    d.proc.send_signal(signal.SIGHUP)
    msgs = notify_messages(sock, until=lambda g: any("READY=1" in m for m in g))
    assert any("RELOADING=1" in m for m in msgs)
    deadline = time.monotonic() + 5
    while not any("configuration reloaded" in line for line in d.stderr) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("configuration reloaded" in line for line in d.stderr), "".join(d.stderr)
    s2 = ctr.start_reader("/run/config/app-config/app.yaml").wait()
    marker = ctr.start_reader("/run/secrets/certs/tls.key").wait()
    d.wait_events(1, pred=lambda e: e["process"]["pid"] == marker["pid"])
    summary = loop.stop()
    d.wait_events(summary["opened"], timeout=15, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    assert not [e for e in d.lines if e["process"]["pid"] == s2["pid"]]
    looped = [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    assert summary["opened"] > 0 and len(looped) == summary["opened"]
    assert d.proc.poll() is None
    rc, _ = d.stop()
    assert rc == 0
    assert any("STOPPING=1" in m for m in notify_messages(sock))


def test_sighup_during_start_up_is_a_reload_not_a_kill(sim_node, daemon_factory):
    """The BPF programs are attached, the volumes not yet scanned: a SIGHUP
    then (a config push racing a restart) must not kill the daemon."""
    sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"k"})],
                     service_account=False)
    d = daemon_factory(sim_node.write_config(), ready=False)
    deadline = time.monotonic() + 60
    while not any("attached" in line for line in d.stderr) and time.monotonic() < deadline:
        assert d.proc.poll() is None, d.stderr
        time.sleep(0.005)
    d.proc.send_signal(signal.SIGHUP)
    health = d.wait_ready()
    assert health["status"] == "healthy" and d.proc.poll() is None
    deadline = time.monotonic() + 10
    while not any("configuration reloaded" in line for line in d.stderr) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("configuration reloaded" in line for line in d.stderr)
