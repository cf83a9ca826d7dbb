"""Odd and hostile things under the kubelet pods dir: skipped with a log
line, never followed out of the tree, never a crash."""
import json
import os
import shutil
import time
import uuid

import pytest

from harness import daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node.sim.node import VolumeSpec

pytestmark = pytest.mark.kernel


def test_pods_dir_that_appears_later_is_waited_for(sim_node, daemon_factory, tmp_path):
    pods = str(tmp_path / "kubelet" / "pods")
    cfg = sim_node.write_config(kubelet_pods_path=pods)
    d = daemon_factory(cfg)
    assert any("does not exist yet" in line for line in d.stderr)
    # The kubelet starts: its pods dir and a pod with a secret appear.
    uid = str(uuid.uuid4())
    vol = os.path.join(pods, uid, "volumes", "kubernetes.io~secret", "token")
    os.makedirs(vol)
    with open(os.path.join(vol, "key"), "w") as fh:
        fh.write("v")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if json.loads(d.get("/healthz")[1]).get("watched_volumes") == 1:
            break
        time.sleep(0.1)
    with open(os.path.join(vol, "key")) as fh:
        fh.read()
    got = d.wait_events(1, pred=lambda e: e["pod_uid"] == uid)
    assert got and got[0]["file"] == "key"


def test_hostile_names_and_symlinks_are_skipped(sim_node, daemon_factory, tmp_path):
    good = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"k": b"v"})],
                           service_account=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_text("not yours")
    pods = sim_node.pods_path
    # A dir that is not a pod UID, with a volume inside.
    bad_uid = os.path.join(pods, "not-a-uid", "volumes", "kubernetes.io~secret", "s")
    os.makedirs(bad_uid)
    (open(os.path.join(bad_uid, "k"), "w")).write("x")
    # A pod whose volume dir is a symlink out of the tree.
    uid = str(uuid.uuid4())
    plugin = os.path.join(pods, uid, "volumes", "kubernetes.io~secret")
    os.makedirs(plugin)
    os.symlink(str(outside), os.path.join(plugin, "escape"))
    # A volume whose payload dir and a key are symlinks out of the tree.
    vol = os.path.join(plugin, "tricky")
    os.makedirs(vol)
    os.symlink(str(outside), os.path.join(vol, "..2026_01_01_00_00_00.1"))
    os.symlink("..2026_01_01_00_00_00.1", os.path.join(vol, "..data"))
    os.symlink(str(outside / "shadow"), os.path.join(vol, "shadow"))
    # Names that are not DNS-1123 labels, one of 253 characters.
    for name in ("Upper_Case", "x" * 253):
        os.makedirs(os.path.join(plugin, name))
        (open(os.path.join(plugin, name, "k"), "w")).write("x")
    d = daemon_factory(sim_node.write_config())
    health = json.loads(d.get("/healthz")[1])
    assert health["status"] == "healthy"
    assert health["watched_volumes"] == 2  # certs and the (empty) tricky volume
    log = "".join(d.stderr)
    assert "not-a-uid" in log and "not a pod UID" in log
    assert "DNS-1123" in log
    # Reading the file outside the tree through every symlink: no event.
    for path in (os.path.join(plugin, "escape", "shadow"), os.path.join(vol, "shadow"),
                 str(outside / "shadow"), os.path.join(bad_uid, "k")):
        with open(path) as fh:
            fh.read()
    ctr = good.add_container("app")
    marker = ctr.start_reader("/run/secrets/certs/k").wait()
    d.wait_events(1, pred=lambda e: e["process"]["pid"] == marker["pid"])
    d.settle()
    assert {e["volume_name"] for e in d.lines} == {"certs"}
    assert d.proc.poll() is None
    shutil.rmtree(os.path.join(pods, "not-a-uid"))


def test_a_volume_too_big_for_the_map_fails_alone(sim_node, daemon_factory):
    """A tenant's ConfigMap with more keys than watched_inodes holds must not
    crash-loop the daemon: that volume is reported, the others are watched."""
    good = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K", "tls.crt": b"C"})],
                            service_account=False)
    sim_node.add_pod("evil", "flood-0", [VolumeSpec("configmap", "flood",
                                                     {f"k{i}": b"x" for i in range(40)})],
                     service_account=False)
    d = daemon_factory(sim_node.write_config(max_watched_files=16))
    health = json.loads(d.get("/healthz")[1])
    assert health["status"] == "degraded", health
    assert any("max_watched_files" in r for r in health["degraded"])
    assert any("volume" in line and "do not fit" in line and "flood" in line for line in d.stderr)
    metrics = d.get("/metrics")[1].decode()
    assert metric_value(metrics, "kernel_monitor_watch_capacity_exceeded_total") == 1
    assert metric_value(metrics, "kernel_monitor_volumes_over_capacity") == 1
    # The volume that fits is watched, with exact counts.
    ctr = good.add_container("app")
    summary = ctr.start_reader("/run/secrets/certs/tls.key", count=7).wait()
    d.wait_events(7, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    assert len(got) == 7 and {e["file"] for e in got} == {"tls.key"}
    assert d.proc.poll() is None


def test_a_storm_of_unfoldable_opens_cannot_stall_the_loop(sim_node, daemon_factory, notify_socket):
    """Opens through ever-different path strings defeat folding. The drain
    is bounded, so the loop keeps turning: watchdog pings, the heartbeat
    /healthz reports, and in the end the counts are exact."""
    import signal
    import threading

    from harness import notify_messages

    path, sock = notify_socket
    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K"})],
                           service_account=False)
    ctr = pod.add_container("app")
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    d = daemon_factory(sim_node.write_config(ring_buffer_size=64 << 20), output="none", env=env)
    storm = [ctr.start_reader("/run/secrets/certs/tls.key", count=0, vary_path=True) for _ in range(2)]
    pings: list[float] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            for m in notify_messages(sock, timeout=0.5):
                if "WATCHDOG=1" in m:
                    pings.append(time.monotonic())
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        for r in storm:
            r.go()
        # A backlog first: the ring fills while the daemon is stopped.
        d.proc.send_signal(signal.SIGSTOP)
        time.sleep(3)
        d.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        worst_answer = worst_heartbeat = 0.0
        time.sleep(0.3)   # the first turn after SIGCONT: the stop itself is no stall
        while time.monotonic() - resumed < 8:
            t0 = time.monotonic()
            health = json.loads(d.get("/healthz")[1])
            worst_answer = max(worst_answer, time.monotonic() - t0)
            worst_heartbeat = max(worst_heartbeat, health["loop_heartbeat_age_seconds"])
            time.sleep(0.2)
    finally:
        summaries = [r.stop() for r in storm]
        stop.set()
        listener.join(5)
    opened = sum(s["opened"] for s in summaries)
    assert opened > 10000, summaries
    assert worst_answer < 1.0 and worst_heartbeat < 1.0, (worst_answer, worst_heartbeat)
    gaps = [b - a for a, b in zip(pings, pings[1:]) if a > resumed + 0.5]
    assert gaps and max(gaps) < 1.5, gaps
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = d.get("/metrics")[1].decode()
        seen = metric_value(text, "kernel_monitor_secret_access_total", namespace="shop", secret="certs")
        if seen >= opened:
            break
        time.sleep(0.5)
    assert seen == opened
    assert d.proc.poll() is None


def test_a_stalled_stdout_reader_cannot_stop_the_daemon(sim_node, daemon_factory):
    """Nobody reads our stdout: events beyond the buffer are dropped and
    counted, the loop and SIGTERM still work, and the exit status says
    output was lost (so Restart=on-failure would act)."""
    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K"})],
                           service_account=False)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config(), read_stdout=False)
    storm = ctr.start_reader("/run/secrets/certs/tls.key", count=0, vary_path=True)
    storm.go()
    try:
        deadline = time.monotonic() + 60
        dropped = 0
        while time.monotonic() < deadline and not dropped:
            time.sleep(0.5)
            t0 = time.monotonic()
            text = d.get("/metrics")[1].decode()
            assert time.monotonic() - t0 < 2.0
            dropped = metric_value(text, "kernel_monitor_events_lost_total", reason="output_dropped")
        assert dropped > 0
        health = json.loads(d.get("/healthz")[1])
        assert health["status"] == "degraded" and health["loop_heartbeat_age_seconds"] < 2.0
    finally:
        storm.stop()
    rc, took = d.stop(timeout=15)
    assert rc == 1 and took < 15
    assert any("dropped because stdout was not being read" in line for line in d.stderr)


def test_epipe_on_stdout_exits_non_zero(sim_node, daemon_factory):
    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K"})],
                           service_account=False)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config(), read_stdout=False)
    d.proc.stdout.close()   # the consumer went away
    ctr.start_reader("/run/secrets/certs/tls.key", count=3).wait()
    rc = d.proc.wait(timeout=30)
    assert rc == 1
    deadline = time.monotonic() + 5
    while not any("EPIPE" in line for line in d.stderr) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("stdout was closed by its reader (EPIPE)" in line for line in d.stderr), d.stderr


def test_a_long_key_name_from_the_kernel_says_it_was_cut(sim_node, daemon_factory):
    """A file not indexed yet is named from the kernel's dentry (at most 63
    bytes); a longer key name must say it is incomplete."""
    import signal

    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K"})],
                           service_account=False)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    long_name, short_name = "k" * 100, "short-key"
    d.proc.send_signal(signal.SIGSTOP)   # so the new files are not indexed before the reads
    try:
        for name in (long_name, short_name):
            with open(os.path.join(pod.volume_dir("certs"), name), "w") as f:
                f.write("v")
        pids = [ctr.start_reader(f"/run/secrets/certs/{n}").wait()["pid"] for n in (long_name, short_name)]
    finally:
        d.proc.send_signal(signal.SIGCONT)
    d.wait_events(2, pred=lambda e: e["process"]["pid"] in pids)
    by_pid = {e["process"]["pid"]: e for e in d.lines if e["process"]["pid"] in pids}
    cut, whole = by_pid[pids[0]], by_pid[pids[1]]
    assert cut["file"] == "k" * 63 and cut["file_truncated"] is True
    assert whole["file"] == short_name and whole["file_truncated"] is False
