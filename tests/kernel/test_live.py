"""On this kernel, a node that changes under the daemon. Atomic
updates raced against readers, pods coming and going, cross-pod reads,
inotify overflow, restart."""
import json
import os
import struct
import subprocess
import threading
import time

import pytest

from harness import daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node.sim.node import VolumeSpec

pytestmark = pytest.mark.kernel


def _pinned_dump(pin_path, name):
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", os.path.join(pin_path, name)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _pinned_count(pin_path, name):
    return len(_pinned_dump(pin_path, name))


def _watched_files(pin_path):
    """(kernel dev, ino) of every watched_inodes key (struct: u32 dev, u32 gen, u64 ino)."""
    keys = (bytes(int(b, 16) for b in e["key"]) for e in _pinned_dump(pin_path, "watched_inodes"))
    return {(dev, ino) for dev, _gen, ino in (struct.unpack("<IIQ", k) for k in keys)}


def _files_of(pod, volume, keys):
    """(kernel dev, ino) of a volume's current payload files."""
    out = set()
    for key in keys:
        st = os.stat(os.path.join(pod.volume_dir(volume), "..data", key))
        out.add((os.major(st.st_dev) << 20 | os.minor(st.st_dev), st.st_ino))
    return out


def _pod(node, ns="shop", name="web-0", **kw):
    return node.add_pod(ns, name, [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"v: 0\n", "conf.d/extra.yaml": b"x\n"}),
        VolumeSpec("secret", "db-credentials", {"password": b"p0\n", "username": b"u\n"}),
    ], **kw)


@pytest.mark.parametrize("volume, path, key", [
    ("app-config", "/run/config/app-config/app.yaml", "app.yaml"),
    ("db-credentials", "/run/secrets/db-credentials/password", "password"),
])
def test_atomic_updates_raced_by_a_reader_miss_nothing(sim_node, daemon_factory, volume, path, key):
    pod = _pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    n = 4000
    reader = ctr.start_reader(path, count=n)
    done = threading.Event()

    def updates():
        i = 0
        while not done.is_set() and i < 40:
            i += 1
            files = dict(pod.volumes[volume].files)
            files[key] = f"version {i}\n".encode()
            pod.update_volume(volume, files)
    writer = threading.Thread(target=updates)
    reader.go()
    writer.start()
    summary = reader.wait()
    done.set()
    writer.join()
    assert summary["opened"] == n and summary["failed"] == 0
    got = d.wait_events(n, timeout=20, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    health = json.loads(d.get("/healthz")[1])
    assert len(got) == n, f"{n - len(got)} opens missed during updates ({health})"
    assert {e["file"] for e in got} == {key}
    assert {e["volume_name"] for e in got} == {volume}
    # The kubelet's own reads during the updates are marked, never cross-pod.
    kubelet = [e for e in d.lines if e["process"].get("role") == "kubelet"]
    assert all(e["cross_pod"] is False for e in kubelet)


def test_map_follows_updates_and_pod_deletion(sim_node, daemon_factory):
    first = _pod(sim_node)
    d = daemon_factory(sim_node.write_config())
    pin = d.config["pin_path"]
    before = _pinned_count(pin, "watched_inodes")
    assert before == 2 + 2 + 3  # configmap keys, secret keys, SA token/ca.crt/namespace
    second = _pod(sim_node, name="web-1")
    ctr = second.add_container("app")
    deadline = time.monotonic() + 5
    while _pinned_count(pin, "watched_inodes") != before + 7 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pinned_count(pin, "watched_inodes") == before + 7
    pods_before = _pinned_count(pin, "pod_info_map")
    keys = ("app.yaml", "conf.d/extra.yaml")
    first_files = _files_of(first, "app-config", keys) | _files_of(first, "db-credentials", ("password",))
    old = _files_of(second, "app-config", keys)
    assert old <= _watched_files(pin)
    second.update_volume("app-config", {"app.yaml": b"new\n", "conf.d/extra.yaml": b"y\n"})
    new = _files_of(second, "app-config", keys)
    assert new.isdisjoint(old)
    deadline = time.monotonic() + 5
    while not (new <= _watched_files(pin) and old.isdisjoint(_watched_files(pin))) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    watched = _watched_files(pin)
    assert new <= watched and old.isdisjoint(watched)   # old payload gone, new in
    assert len(watched) == before + 7
    ctr.stop()
    sim_node.remove_pod(second)
    deadline = time.monotonic() + 5
    while _pinned_count(pin, "watched_inodes") != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pinned_count(pin, "watched_inodes") == before
    while _pinned_count(pin, "pod_info_map") >= pods_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pinned_count(pin, "pod_info_map") < pods_before
    health = json.loads(d.get("/healthz")[1])
    assert health["status"] == "healthy"
    # The first pod is untouched: its files are still watched, its reads still its own.
    assert first_files <= _watched_files(pin)
    s = first.add_container("app").start_reader("/run/secrets/db-credentials/password").wait()
    (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
    assert (e["pod_uid"], e["process"]["pod_uid"], e["pod_name"]) == (first.uid, first.uid, "web-0")


def test_inode_reuse_is_never_misattributed(sim_node, daemon_factory, tmp_path):
    """A deleted pod's tmpfs gives its device number and inode numbers back to
    the kernel. A new pod, and a host tmpfs, that get them again must not be
    reported as the old pod's files."""
    gone = _pod(sim_node, name="web-old")
    d = daemon_factory(sim_node.write_config())
    pin = d.config["pin_path"]
    baseline = _pinned_count(pin, "watched_inodes")
    old_dev = os.stat(os.path.join(gone.volume_dir("db-credentials"), "password")).st_dev
    sim_node.remove_pod(gone)
    deadline = time.monotonic() + 5
    while _pinned_count(pin, "watched_inodes") > baseline - 7 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pinned_count(pin, "watched_inodes") == baseline - 7

    # A host tmpfs laid out like the old volume, likely on the old device number.
    d.settle()
    mark = len(d.lines)
    host = tmp_path / "host-tmpfs"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tapio-test", str(host)], check=True)
    try:
        for name in ("..data", "password", "username"):
            (host / name).write_bytes(b"host\n")
        with open(host / "password", "rb") as f:
            f.read()
        host_dev = os.stat(host / "password").st_dev
    finally:
        subprocess.run(["umount", str(host)], check=True)
    d.settle()
    assert d.lines[mark:] == []

    new = _pod(sim_node, name="web-new")
    ctr = new.add_container("app")
    new_dev = os.stat(os.path.join(new.volume_dir("db-credentials"), "password")).st_dev
    summary = ctr.start_reader("/run/secrets/db-credentials/password", count=3).wait()
    d.wait_events(3, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    assert len(got) == 3
    assert {e["pod_uid"] for e in got} == {new.uid}, (old_dev, host_dev, new_dev)
    assert not [e for e in d.lines[mark:] if e["pod_uid"] == gone.uid]


def test_pod_created_after_start_is_attributed(sim_node, daemon_factory):
    d = daemon_factory(sim_node.write_config())
    t0 = time.monotonic()
    pod = _pod(sim_node, ns="late", name="newcomer")
    ctr = pod.add_container("app")
    summary = ctr.start_reader("/run/secrets/db-credentials/username").wait()
    (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == summary["pid"])
    assert time.monotonic() - t0 < 10
    assert e["pod_uid"] == pod.uid
    assert (e["namespace"], e["pod_name"]) == ("late", "newcomer")
    assert e["process"]["pod_uid"] == pod.uid
    assert e["process"]["container_id"] == ctr.id
    assert (e["process"]["namespace"], e["process"]["pod_name"]) == ("late", "newcomer")
    assert e["cross_pod"] is False


def test_cross_pod_reads(sim_node, daemon_factory):
    victim = _pod(sim_node, ns="prod", name="db-0")
    other = sim_node.add_pod("dev", "snoop", [], service_account=False)
    own = victim.add_container("postgres")
    snoop = other.add_container("sh")
    d = daemon_factory(sim_node.write_config())
    secret_dir = victim.volume_dir("db-credentials")
    s_own = own.start_reader("/run/secrets/db-credentials/password").wait()
    s_other = snoop.start_reader("/run/stolen/password", mounts={"/run/stolen": secret_dir}).wait()
    s_host = sim_node.start_host_reader(os.path.join(secret_dir, "password")).wait()
    # A host process that names itself kubelet (prctl) is not the kubelet.
    s_fake = sim_node.start_host_reader(os.path.join(secret_dir, "password"), comm="kubelet").wait()
    pids = {s_own["pid"], s_other["pid"], s_host["pid"], s_fake["pid"]}
    d.wait_events(4, pred=lambda e: e["process"]["pid"] in pids)
    by_pid = {e["process"]["pid"]: e for e in d.lines if e["process"]["pid"] in pids}
    assert by_pid[s_own["pid"]]["cross_pod"] is False
    e = by_pid[s_other["pid"]]
    assert e["cross_pod"] is True
    assert (e["process"]["namespace"], e["process"]["pod_name"]) == ("dev", "snoop")
    assert (e["namespace"], e["pod_name"], e["config_name"]) == ("prod", "db-0", "db-credentials")
    h = by_pid[s_host["pid"]]
    assert h["cross_pod"] is True and h["process"]["pod_uid"] is None
    f = by_pid[s_fake["pid"]]
    assert f["process"]["command"] == "kubelet"
    assert f["cross_pod"] is True and f["process"].get("role") is None
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_secret_access_total", namespace="prod",
                        secret="db-credentials") >= 3


def test_inotify_overflow_resyncs(sim_node, daemon_factory):
    knob = "/proc/sys/fs/inotify/max_queued_events"
    with open(knob) as fh:
        old = fh.read().strip()
    try:
        with open(knob, "w") as fh:
            fh.write("8")
        d = daemon_factory(sim_node.write_config())
    finally:
        with open(knob, "w") as fh:
            fh.write(old)
    pods = [_pod(sim_node, name=f"burst-{i}", service_account=False) for i in range(12)]
    ctr = pods[-1].add_container("app")
    deadline = time.monotonic() + 10
    summary = None
    while time.monotonic() < deadline:
        summary = ctr.start_reader("/run/secrets/db-credentials/password").wait()
        if d.wait_events(1, timeout=1, pred=lambda e: e["process"]["pid"] == summary["pid"]):
            break
    assert d.wait_events(1, timeout=1, pred=lambda e: e["process"]["pid"] == summary["pid"])
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_resyncs_total", reason="inotify_overflow") >= 1
    health = json.loads(d.get("/healthz")[1])
    assert health["watched_pods"] == 12


def test_restart_keeps_attribution(sim_node, daemon_factory):
    pod = _pod(sim_node, ns="prod", name="api-0")
    ctr = pod.add_container("api")
    cfg = sim_node.write_config()
    seen = []
    for _ in range(2):
        d = daemon_factory(cfg)
        s = ctr.start_reader("/run/config/app-config/app.yaml").wait()
        (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
        seen.append((e["pod_uid"], e["namespace"], e["pod_name"], e["file"],
                     e["process"]["pod_uid"], e["process"]["container_id"]))
        rc, _ = d.stop()
        assert rc == 0
    assert seen[0] == seen[1] == (pod.uid, "prod", "api-0", "app.yaml", pod.uid, ctr.id)


def test_full_ring_buffer_loses_no_access(sim_node, daemon_factory):
    """With the daemon stopped the ring buffer fills; the kernel keeps
    counting in overflow_counts and every access is still reported."""
    import signal

    pod = _pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config(ring_buffer_size=4096))
    n = 3000
    reader = ctr.start_reader("/run/secrets/db-credentials/password", count=n)
    d.proc.send_signal(signal.SIGSTOP)
    try:
        summary = reader.wait()
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert summary["opened"] == n

    def mine():
        return [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    deadline = time.monotonic() + 15
    while sum(e.get("count", 1) for e in mine()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    d.settle()
    got = mine()
    # Each line is one access, except overflow lines, which carry a count.
    assert sum(e.get("count", 1) for e in got) == n
    assert all("count" not in e for e in got if not e["overflow"])
    overflowed = [e for e in got if e["overflow"]]
    assert overflowed, "the 4 KiB ring buffer should have overflowed"
    # One line per overflowed group, never one per access.
    assert len(overflowed) <= 4 and all(e["count"] >= 1 for e in overflowed)
    assert {(e["file"], e["volume_name"], e["process"]["container_id"]) for e in overflowed} == \
        {("password", "db-credentials", ctr.id)}
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_secret_access_total", namespace="shop",
                        secret="db-credentials") == n
    assert json.loads(d.get("/healthz")[1])["ring_buffer_drops"] == sum(e["count"] for e in overflowed)
