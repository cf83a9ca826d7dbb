"""The Python API other collectors use (AddContainerPID,
AddPodInfo, AddMountInfo), against a daemon running in this process."""
import json
import os
import subprocess
import tempfile
import threading
import time

import pytest
import yaml

from tapio_node.config import parse_config
from tapio_node.daemon import Daemon
from tapio_node.pods.info import PodInfo
from tapio_node.sim.node import VolumeSpec
from tapio_node.volumes import MountInfo

pytestmark = pytest.mark.kernel


class _NoNotify:
    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.fixture
def live_daemon(sim_node, require_root_bpf):
    cfg = parse_config(sim_node.config_yaml()).kernel_collector
    r, w = os.pipe()
    out = os.fdopen(w, "wb", buffering=0)
    daemon = Daemon(cfg, output="stdout", stream=out, notifier=_NoNotify())
    lines, stop_reading = [], threading.Event()

    def read():
        with os.fdopen(r, "rb") as fh:
            for line in fh:
                lines.append(json.loads(line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    daemon.start()
    loop = threading.Thread(target=daemon.run, daemon=True)
    loop.start()
    daemon.lines = lines
    yield daemon
    daemon.stop()
    loop.join(timeout=5)
    daemon.close()
    out.close()
    reader.join(timeout=5)


def _wait(lines, pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e for e in lines if pred(e)]
        if hits:
            return hits
        time.sleep(0.02)
    return []


def test_add_mount_info_watches_a_dir_named_by_another_collector(sim_node, live_daemon):
    extra = tempfile.mkdtemp(prefix="tapio-extra-", dir=sim_node.base_dir)
    with open(os.path.join(extra, "token"), "w") as fh:
        fh.write("t")
    live_daemon.add_mount_info(MountInfo(name="vault-token", namespace="ops", mount_path=extra,
                                         is_secret=True))
    proc = subprocess.run(["cat", os.path.join(extra, "token")], capture_output=True)
    assert proc.returncode == 0
    (e,) = _wait(live_daemon.lines, lambda e: e["mount_path"] == extra)
    assert (e["event_type"], e["config_name"], e["namespace"], e["file"]) == \
        ("secret_access", "vault-token", "ops", "token")
    with pytest.raises(ValueError, match="mount_path"):
        live_daemon.add_mount_info(MountInfo(name="x", namespace="ops", mount_path="relative"))
    with pytest.raises(ValueError, match="name"):
        live_daemon.add_mount_info(MountInfo(name="Not_Valid", namespace=None, mount_path=extra))


def test_add_container_pid_and_pod_info(sim_node, live_daemon):
    pod = sim_node.add_pod("api", "svc-0", [VolumeSpec("secret", "s", {"k": b"v"})],
                           service_account=False)
    ctr = pod.add_container("main")
    sleeper = ctr.run(["sleep", "30"])
    # Wait until the sleeper is in the container cgroup.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(os.path.join(ctr.cgroup_dir, "cgroup.procs")) as fh:
            if str(sleeper.pid) in fh.read().split():
                break
        time.sleep(0.02)
    pin = live_daemon.kc.pin_path
    cgid = live_daemon.add_container_pid(sleeper.pid)
    assert cgid == ctr.cgroup_id
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "lookup", "pinned",
                                      os.path.join(pin, "container_pids"), "key",
                                      *[str(b) for b in sleeper.pid.to_bytes(4, "little")]],
                                     capture_output=True, text=True, check=True).stdout)
    assert int.from_bytes(bytes(int(b, 16) for b in dump["value"]), "little") == cgid
    with pytest.raises(ValueError, match="pid"):
        live_daemon.add_container_pid(-5)
    with pytest.raises(ValueError, match="not a pod or container cgroup"):
        live_daemon.add_container_pid(os.getpid())
    live_daemon.add_pod_info(cgid, PodInfo(pod_uid=pod.uid, namespace="api", pod_name="renamed-0",
                                           container_id=ctr.id, created_at=1, qos="burstable"))
    acc = live_daemon.pods.accessor(cgid, sleeper.pid, "sleep")
    assert (acc.pod_uid, acc.pod_name) == (pod.uid, "renamed-0")
    with pytest.raises(ValueError, match="pod_uid"):
        live_daemon.add_pod_info(cgid, PodInfo(pod_uid="nope", namespace=None, pod_name=None))
