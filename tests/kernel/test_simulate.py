"""The simulated node looks like a kubelet's node and leaves nothing behind."""

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from inotify_simple import INotify, flags

from tapio_node import host
from tapio_node.sim.atomic_writer import atomic_write
from tapio_node.sim.demo import build_demo_node, run_demo
from tapio_node.host import mounts_under
from tapio_node.sim.system import cgroup2_mount
from tapio_node.sim.node import SA_MOUNT, VolumeSpec, sweep_stale
from tapio_node.sim.system import SimulationError

TS_DIR = re.compile(r"^\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d+$")


def _mount_fstype(path):
    """The fstype of what is mounted right at `path` (the top mount), or None."""
    return next((m.fstype for m in reversed(host.mounts()) if m.point == path), None)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _web_volumes():
    return [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"a: 1\n", "conf.d/extra.yaml": b"b: 2\n"}),
        VolumeSpec("secret", "certs", {"tls.key": b"KEY\n", "tls.crt": b"CRT\n"}, source_name="web-tls"),
    ]


def test_volume_layout_is_the_kubelets(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    assert pod.pod_dir == os.path.join(sim_node.pods_path, pod.uid)
    cm = pod.volume_dir("app-config")
    sec = pod.volume_dir("certs")
    sa_name = pod.service_account_volume
    assert re.fullmatch(r"kube-api-access-[bcdfghjklmnpqrstvwxz2456789]{5}", sa_name)
    sa = pod.volume_dir(sa_name)
    assert cm == f"{sim_node.pods_path}/{pod.uid}/volumes/kubernetes.io~configmap/app-config"
    assert sec == f"{sim_node.pods_path}/{pod.uid}/volumes/kubernetes.io~secret/certs"
    assert sa == f"{sim_node.pods_path}/{pod.uid}/volumes/kubernetes.io~projected/{sa_name}"

    for vol, keys in ((cm, ["app.yaml", "conf.d"]), (sec, ["tls.crt", "tls.key"]),
                      (sa, ["ca.crt", "namespace", "token"])):
        entries = sorted(os.listdir(vol))
        ts = [e for e in entries if TS_DIR.match(e)]
        assert len(ts) == 1, entries
        assert entries == sorted([ts[0], "..data"] + keys)
        assert os.readlink(os.path.join(vol, "..data")) == ts[0]
        assert stat.S_ISDIR(os.stat(os.path.join(vol, ts[0])).st_mode)
        for k in keys:
            assert os.readlink(os.path.join(vol, k)) == f"..data/{k}"
    # A nested key: only its top-level dir is a symlink.
    assert open(os.path.join(cm, "conf.d/extra.yaml"), "rb").read() == b"b: 2\n"
    assert open(os.path.join(sec, "tls.key"), "rb").read() == b"KEY\n"
    assert open(os.path.join(sa, "namespace"), "rb").read() == b"shop"
    assert open(os.path.join(sa, "token"), "rb").read().count(b".") == 2

    # Secret and projected volumes are their own tmpfs; ConfigMaps are plain dirs.
    assert _mount_fstype(sec) == "tmpfs"
    assert _mount_fstype(sa) == "tmpfs"
    assert _mount_fstype(cm) is None
    devs = {os.stat(p).st_dev for p in (cm, sec, sa)}
    assert len(devs) == 3

    assert os.path.isdir(os.path.join(sim_node.logs_path, f"shop_web-0_{pod.uid}"))


def test_two_pods_secret_volumes_have_distinct_devices(sim_node):
    a = sim_node.add_pod("shop", "a", [VolumeSpec("secret", "s", {"k": b"1"})], service_account=False)
    b = sim_node.add_pod("shop", "b", [VolumeSpec("secret", "s", {"k": b"1"})], service_account=False)
    assert os.stat(a.volume_dir("s")).st_dev != os.stat(b.volume_dir("s")).st_dev
    assert a.service_account_volume is None


@pytest.mark.parametrize("driver,qos,pod_rel,leaf", [
    ("systemd", "burstable", "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice",
     "cri-containerd-{id}.scope"),
    ("systemd", "besteffort", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u_}.slice",
     "cri-containerd-{id}.scope"),
    ("systemd", "guaranteed", "kubepods.slice/kubepods-pod{u_}.slice", "cri-containerd-{id}.scope"),
    ("cgroupfs", "burstable", "kubepods/burstable/pod{u}", "{id}"),
    ("cgroupfs", "besteffort", "kubepods/besteffort/pod{u}", "{id}"),
    ("cgroupfs", "guaranteed", "kubepods/pod{u}", "{id}"),
])
def test_cgroup_naming(sim_node_factory, driver, qos, pod_rel, leaf):
    node = sim_node_factory(driver=driver)
    assert os.path.isfile(os.path.join(node.cgroup_root, "cgroup.procs"))
    pod = node.add_pod("ns1", "p", [], qos=qos, service_account=False)
    c = pod.add_container("app")
    assert re.fullmatch(r"[0-9a-f]{64}", c.id)
    rel = os.path.join(pod_rel, leaf).format(u=pod.uid, u_=pod.uid.replace("-", "_"), id=c.id)
    assert c.cgroup_dir == os.path.join(node.cgroup_root, rel)
    assert os.path.isdir(c.cgroup_dir)
    assert c.cgroup_id == os.stat(c.cgroup_dir).st_ino
    assert os.path.isdir(os.path.join(node.logs_path, f"ns1_p_{pod.uid}", "app"))


def test_other_runtimes_scope_names(sim_node):
    pod = sim_node.add_pod("ns1", "p", [], service_account=False)
    assert os.path.basename(pod.add_container("a", runtime="crio").cgroup_dir).startswith("crio-")
    assert os.path.basename(pod.add_container("b", runtime="docker").cgroup_dir).startswith("docker-")


def test_update_follows_the_atomic_writer_sequence(sim_node):
    pod = sim_node.add_pod("shop", "web-0", [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"v1\n", "old.txt": b"gone soon\n"})])
    vol = pod.volume_dir("app-config")
    old_ts = os.readlink(os.path.join(vol, "..data"))
    old_ino = os.stat(os.path.join(vol, "app.yaml")).st_ino

    ino = INotify()
    try:
        ino.add_watch(vol, flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO)
        assert pod.update_volume("app-config", {"app.yaml": b"v2\n", "new.txt": b"hello\n"}) is True
        seq = [(tuple(f.name for f in flags.from_mask(e.mask) if f.name != "ISDIR"), e.name)
               for e in ino.read(timeout=0)]
    finally:
        ino.close()
    new_ts = os.readlink(os.path.join(vol, "..data"))
    assert TS_DIR.match(new_ts) and new_ts != old_ts
    assert seq == [
        (("CREATE",), new_ts),
        (("CREATE",), "..data_tmp"),
        (("MOVED_FROM",), "..data_tmp"),
        (("MOVED_TO",), "..data"),
        (("CREATE",), "new.txt"),
        (("DELETE",), "old.txt"),
        (("DELETE",), old_ts),
    ]
    assert open(os.path.join(vol, "app.yaml"), "rb").read() == b"v2\n"
    assert open(os.path.join(vol, "new.txt"), "rb").read() == b"hello\n"
    assert not os.path.lexists(os.path.join(vol, "old.txt"))
    assert os.stat(os.path.join(vol, "app.yaml")).st_ino != old_ino
    assert sorted(os.listdir(vol)) == sorted(["..data", new_ts, "app.yaml", "new.txt"])

    # The write ran as the node's kubelet: its cgroup and its comm.
    assert pod.last_kubelet_write["comm"] == "kubelet"
    assert pod.last_kubelet_write["cgroup"] == "/" + os.path.relpath(sim_node.kubelet_cgroup, cgroup2_mount())
    assert sim_node.kubelet_cgroup.endswith("/system.slice/kubelet.service")

    # Same content again: the kubelet writes nothing.
    assert pod.update_volume("app-config", {"app.yaml": b"v2\n", "new.txt": b"hello\n"}) is False
    assert os.readlink(os.path.join(vol, "..data")) == new_ts


def test_update_on_tmpfs_in_process(sim_node):
    pod = sim_node.add_pod("shop", "db-0", [VolumeSpec("secret", "db", {"password": b"a"})])
    assert pod.update_volume("db", {"password": b"b"}, as_kubelet=False) is True
    assert open(os.path.join(pod.volume_dir("db"), "password"), "rb").read() == b"b"
    assert _mount_fstype(pod.volume_dir("db")) == "tmpfs"


def test_atomic_write_rejects_reserved_keys(tmp_path):
    with pytest.raises(ValueError, match="must not start with '..'"):
        atomic_write(str(tmp_path), {"..data": b"x"})
    with pytest.raises(ValueError, match="must not contain '..'"):
        atomic_write(str(tmp_path), {"a/../b": b"x"})
    with pytest.raises(ValueError, match="relative path"):
        atomic_write(str(tmp_path), {"/etc/passwd": b"x"})
    assert os.listdir(tmp_path) == []


def test_container_process_is_in_its_cgroup_and_namespace(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    c = pod.add_container("web")
    r = c.start_reader("/run/secrets/certs/tls.key", count=3)
    try:
        with open(f"/proc/{r.pid}/cgroup") as f:
            v2 = [line.strip() for line in f if line.startswith("0::")]
        assert v2 == ["0::/" + os.path.relpath(c.cgroup_dir, cgroup2_mount())]
        assert os.readlink(f"/proc/{r.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        # The container sees its volumes at the in-container paths...
        root = f"/proc/{r.pid}/root"
        assert open(f"{root}/run/secrets/certs/tls.key", "rb").read() == b"KEY\n"
        assert open(f"{root}/run/config/app-config/conf.d/extra.yaml", "rb").read() == b"b: 2\n"
        # /var/run -> /run is an absolute symlink: resolve it before going through /proc/<pid>/root.
        sa_in_container = SA_MOUNT.replace("/var/run/", "/run/", 1)
        assert open(f"{root}{sa_in_container}/namespace", "rb").read() == b"shop"
        # ...and the host does not.
        assert not os.path.exists("/run/secrets/certs")
        assert not os.path.exists("/run/config/app-config")
    finally:
        summary = r.wait()
    assert summary["opened"] == 3 and summary["failed"] == 0 and summary["bytes"] == 12
    assert r.proc.returncode == 0


def test_reader_sets_its_comm_before_ready(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    r = pod.add_container("web").start_reader("/run/secrets/certs/tls.key", count=1, comm="nginx")
    try:
        assert open(f"/proc/{r.pid}/comm").read() == "nginx\n"
    finally:
        assert r.wait()["opened"] == 1


@pytest.mark.parametrize("syscall", ["open", "openat", "openat2"])
def test_reader_syscalls_relative_and_absolute(sim_node, syscall):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    c = pod.add_container("web")
    s = c.start_reader("/run/config/app-config/app.yaml", count=4, syscall=syscall).wait()
    assert (s["opened"], s["failed"], s["syscall"]) == (4, 0, syscall)
    s = c.start_reader("tls.crt", count=2, syscall=syscall, cwd="/run/secrets/certs").wait()
    assert (s["opened"], s["failed"]) == (2, 0)
    s = c.start_reader("token", count=2, syscall=syscall, chdir=SA_MOUNT).wait()
    assert (s["opened"], s["failed"]) == (2, 0)


def test_reader_counts_failed_opens(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    r = pod.add_container("web").start_reader("/run/secrets/certs/missing", count=3)
    s = r.wait()
    assert (s["opened"], s["failed"], s["errors"]) == (0, 3, {"ENOENT": 3})
    assert r.proc.returncode == 1


def test_container_volumes_are_read_only(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    p = pod.add_container("web").run(["sh", "-c", "echo x > /run/secrets/certs/new"],
                                     stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"Read-only" in err
    assert not os.path.exists(os.path.join(pod.volume_dir("certs"), "new"))


def test_mount_under_an_existing_host_dir_is_private(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    target = f"/etc/tapio-sim-{os.getpid()}"
    assert not os.path.exists(target)
    p = pod.add_container("web").run(
        ["sh", "-c", "cat app.yaml && test -s /etc/passwd && echo ok"],
        mounts={target: pod.volume_dir("app-config")}, cwd=target, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out == b"a: 1\nok\n"
    assert not os.path.exists(target)


def test_mount_at_a_new_top_level_dir_and_two_under_etc(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    top, etc1, etc2 = (f"/tapio-sim-{os.getpid()}", f"/etc/tapio-sim-{os.getpid()}/a", f"/etc/tapio-sim-{os.getpid()}/b")
    p = pod.add_container("web").run(
        ["sh", "-c", f"cat {top}/tls.key {etc1}/app.yaml {etc2}/tls.crt && test -s /etc/passwd && test -e /proc/self"],
        mounts={top: pod.volume_dir("certs"), etc1: pod.volume_dir("app-config"), etc2: pod.volume_dir("certs")},
        stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, b"KEY\na: 1\nCRT\n")
    assert not os.path.exists(top) and not os.path.exists(os.path.dirname(etc1))


def test_subpath_file_mount_keeps_the_old_inode_after_an_update(sim_node):
    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    c = pod.add_container("web")
    key = os.path.join(pod.volume_dir("app-config"), "app.yaml")
    old_ino = os.stat(key).st_ino
    mounts = {"/etc/app.yaml": key, "/run/config/app-config": pod.volume_dir("app-config")}
    p = c.run(["sh", "-c", "echo mounted; read _; cat /etc/app.yaml /run/config/app-config/app.yaml; "
               "stat -c %i /etc/app.yaml"], mounts=mounts, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"mounted\n"  # the subPath is bound before the update
        assert pod.update_volume("app-config", {"app.yaml": b"a: 2\n", "conf.d/extra.yaml": b"b: 2\n"})
    finally:
        out, _ = p.communicate(b"go\n", timeout=60)
        out = out or b""
    # The subPath file is the pre-update inode; the directory mount sees the new content.
    assert out.decode().split("\n") == ["a: 1", "a: 2", str(old_ino), ""]
    assert not os.path.exists("/etc/app.yaml") or os.stat("/etc/app.yaml").st_ino != old_ino


def test_downward_api_volume_is_a_plain_dir(sim_node):
    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("downward-api", "podinfo", {"labels": b"app=web\n"})],
                           service_account=False)
    d = pod.volume_dir("podinfo")
    assert d.endswith("/volumes/kubernetes.io~downward-api/podinfo")
    assert _mount_fstype(d) is None and os.readlink(os.path.join(d, "labels")) == "..data/labels"


def test_bad_input_is_named(sim_node):
    with pytest.raises(ValueError, match="kind 'dowwnward'"):
        VolumeSpec("dowwnward", "x", {})
    with pytest.raises(ValueError, match="namespace 'Bad_NS'"):
        sim_node.add_pod("Bad_NS", "p", [])
    with pytest.raises(ValueError, match="qos 'gold'"):
        sim_node.add_pod("ns", "p", [], qos="gold")
    pod = sim_node.add_pod("ns", "p", [], service_account=False)
    with pytest.raises(KeyError, match="no volume 'nope'"):
        pod.volume_dir("nope")
    with pytest.raises(ValueError, match="inside another mount"):
        pod.add_container("c").run(["true"], mounts={"/run/a": sim_node.pods_path, "/run/a/b": sim_node.pods_path})


def test_failed_add_pod_leaves_nothing(sim_node):
    before = set(os.listdir(sim_node.pods_path))
    with pytest.raises(ValueError, match="duplicate volume name 'certs'"):
        sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"a": b"1"}),
                                           VolumeSpec("secret", "certs", {"b": b"2"})])
    assert set(os.listdir(sim_node.pods_path)) == before
    assert mounts_under(sim_node.pods_path) == []
    assert sim_node.pods == []
    assert os.listdir(sim_node.logs_path) == []


def test_remove_pod_is_kubelet_style(sim_node):
    keep = sim_node.add_pod("shop", "keep", _web_volumes())
    gone = sim_node.add_pod("shop", "gone", _web_volumes())
    r = gone.add_container("web").start_reader("/run/secrets/certs/tls.key", count=0, interval=0.05)
    r.go()
    sim_node.remove_pod(gone)
    assert not _alive(r.pid)
    assert not os.path.exists(gone.pod_dir)
    assert not os.path.exists(gone.log_dir)
    assert not os.path.exists(gone.cgroup_dir)
    assert mounts_under(gone.pod_dir) == []
    assert len(mounts_under(keep.pod_dir)) == 2  # its secret and its projected tmpfs
    assert os.path.exists(os.path.join(keep.volume_dir("certs"), "tls.key"))
    sim_node.remove_pod(gone)  # idempotent


def test_close_removes_everything_even_with_running_processes(sim_node_factory):
    node = sim_node_factory()
    pods = build_demo_node(node)
    readers = []
    for p in pods.values():
        c = p.add_container("main")
        path = f"{SA_MOUNT}/token"
        readers.append(c.start_reader(path, count=0, interval=0.05))
    host = node.start_host_reader(os.path.join(pods["db"].volume_dir("db-credentials"), "password"),
                                  count=0, interval=0.05)
    sleeper = pods["web"].containers["main"].run(["sh", "-c", "sleep 1000 & echo started; sleep 1000"],
                                                  stdout=subprocess.PIPE)
    assert sleeper.stdout.readline() == b"started\n"
    for r in readers + [host]:
        r.go()
    pids = [r.pid for r in readers] + [host.pid, sleeper.pid]
    cgroup_pids = []
    for p in pods.values():
        for c in p.containers.values():
            cgroup_pids += [int(x) for x in open(os.path.join(c.cgroup_dir, "cgroup.procs")).read().split()]
    assert len(cgroup_pids) >= 5  # readers plus both sleeps
    assert len(mounts_under(node.base_dir)) == 4  # 2 secret + 2 service-account tmpfs (web is static)
    base, cg = node.base_dir, node.cgroup_root

    node.close()
    assert mounts_under(base) == []
    assert not os.path.exists(base)
    assert not os.path.exists(cg)
    assert [p for p in pids + cgroup_pids if _alive(p)] == []
    node.close()  # idempotent
    with pytest.raises(SimulationError, match="closed"):
        node.add_pod("ns", "p", [])


def test_given_base_dir_keeps_what_it_did_not_create(sim_node_factory, tmp_path):
    (tmp_path / "mine").write_text("keep me")
    node = sim_node_factory(base_dir=str(tmp_path))
    node.add_pod("ns", "p", [VolumeSpec("secret", "s", {"k": b"v"})])
    assert node.pods_path == os.path.join(str(tmp_path), "var/lib/kubelet/pods")
    node.close()
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_pod_manifest_names_the_objects_behind_the_volumes(sim_node):
    import yaml

    pod = sim_node.add_pod("shop", "web-0", _web_volumes())
    m = pod.manifest()
    assert (m["kind"], m["metadata"]["name"], m["metadata"]["uid"]) == ("Pod", "web-0", pod.uid)
    vols = {v["name"]: v for v in m["spec"]["volumes"]}
    assert vols["certs"]["secret"] == {"secretName": "web-tls"}
    assert vols["app-config"]["configMap"] == {"name": "app-config"}
    sa = vols[pod.service_account_volume]["projected"]["sources"]
    assert sa[0]["serviceAccountToken"]["path"] == "token"
    assert pod.manifest_path is None and os.listdir(sim_node.static_pods_path) == []

    st = sim_node.add_pod("kube-system", "etcd", [VolumeSpec("secret", "certs", {"k": b"v"}, source_name="etcd-pki")],
                          static=True, service_account=False)
    assert st.name == "etcd-sim-node" and st.static_name == "etcd"
    assert st.manifest_path == os.path.join(sim_node.static_pods_path, "etcd.yaml")
    doc = yaml.safe_load(open(st.manifest_path))
    assert doc["metadata"] == {"name": "etcd", "namespace": "kube-system"}
    assert doc["spec"]["volumes"] == [{"name": "certs", "secret": {"secretName": "etcd-pki"}}]
    assert os.path.isdir(os.path.join(sim_node.logs_path, f"kube-system_etcd-sim-node_{st.uid}"))
    sim_node.remove_pod(st)
    assert os.listdir(sim_node.static_pods_path) == []


def test_config_yaml_points_at_the_node(sim_node):
    import yaml

    cfg = yaml.safe_load(sim_node.config_yaml(syscall_sampling_rate=0))["kernel_collector"]
    assert cfg["kubelet_pods_path"] == sim_node.pods_path
    assert cfg["pod_logs_path"] == sim_node.logs_path
    assert cfg["cgroup_root"] == sim_node.cgroup_root
    assert cfg["pin_path"].startswith("/sys/fs/bpf/tapio-sim-")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", cfg["listen_address"])
    assert cfg["syscall_sampling_rate"] == 0
    assert cfg["node_name"] == "sim-node"
    assert cfg["static_pods_path"] == sim_node.static_pods_path


def test_run_demo_builds_streams_and_tears_down(require_root_cgroup2):
    # A stand-in collector (the real one is tested with the daemon): prints one event, then waits.
    event = {"event_type": "secret_access", "timestamp": "2026-01-01T00:00:00.123456789Z",
             "namespace": "shop", "pod_name": "db-0", "config_name": "db-credentials", "file": "password",
             "path": "/run/secrets/db-credentials/password", "cross_pod": True,
             "process": {"pid": 42, "command": "cat", "pod_uid": None}}
    started = []

    def start_collector(cfg):
        started.append(open(cfg).read())
        return subprocess.Popen([sys.executable, "-c", f"import time; print({json.dumps(json.dumps(event))}, "
                                 "flush=True); time.sleep(1000)"], stdout=subprocess.PIPE)

    out = io.StringIO()
    rc = run_demo(start_collector, duration=1.0, out=out, wait_ready=False)
    text = out.getvalue()
    assert rc == 0, text
    assert "kernel_collector:" in started[0]
    assert "secret_access" in text and "shop/db-0 db-credentials/password" in text and "CROSS-POD" in text
    base = re.search(r"simulated node in (\S+),", text).group(1)
    cg = re.search(r"cgroups in (\S+)\n", text).group(1)
    assert not os.path.exists(base) and not os.path.exists(cg)
    assert mounts_under(base) == []
    assert "cleaned up" in text


_DEMO_UNDER_SIGTERM = r"""
import json, subprocess, sys
from tapio_node.sim.demo import run_demo
def start(cfg):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], stdout=subprocess.PIPE)
sys.exit(run_demo(start, wait_ready=False))
"""


def test_run_demo_cleans_up_on_sigterm(require_root_cgroup2, repo_root):
    p = subprocess.Popen([sys.executable, "-c", _DEMO_UNDER_SIGTERM], stdout=subprocess.PIPE, cwd=repo_root,
                         env=dict(os.environ, PYTHONPATH=repo_root), text=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if "readers started" in line:
                break
        text = "".join(lines)
        base = re.search(r"simulated node in (\S+),", text).group(1)
        cg = re.search(r"cgroups in (\S+)\n", text).group(1)
        reader_pids = [int(x) for d, _, _ in os.walk(cg) for x in open(os.path.join(d, "cgroup.procs")).read().split()]
        assert os.path.isdir(base) and len(mounts_under(base)) == 4
        assert len(reader_pids) == 4  # the demo's readers are in their cgroups once it says so
        p.terminate()
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    assert "cleaned up" in rest
    assert not os.path.exists(base) and not os.path.exists(cg) and mounts_under(base) == []
    assert [pid for pid in reader_pids if _alive(pid)] == []


_KILLED_NODE = r"""
import os, sys
from tapio_node.sim.node import SimulatedNode, VolumeSpec
node = SimulatedNode()
pod = node.add_pod("ns", "p", [VolumeSpec("secret", "s", {"k": b"v"})])
r = pod.add_container("c").start_reader("/run/secrets/s/k", count=0, interval=0.1)
r.go()
print(node.base_dir, node.cgroup_root, r.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_sweep_stale_removes_what_a_killed_run_left(sim_node, repo_root):
    p = subprocess.run([sys.executable, "-c", _KILLED_NODE], stdout=subprocess.PIPE, text=True, cwd=repo_root,
                       env=dict(os.environ, PYTHONPATH=repo_root))
    assert p.returncode == -9
    base, cg, reader = p.stdout.split()
    try:
        assert os.path.isdir(base) and os.path.isdir(cg) and len(mounts_under(base)) == 2
        assert _alive(int(reader))
    finally:
        removed = sweep_stale()
    assert base in removed and cg in removed
    assert not os.path.exists(base) and not os.path.exists(cg) and mounts_under(base) == []
    assert not _alive(int(reader))
    # A live node (this process's) is left alone.
    assert os.path.isdir(sim_node.cgroup_root) and os.path.isdir(sim_node.base_dir)


_KILLED_NODE_WITH_PIN = r"""
import os, subprocess
from tapio_node.sim.node import SimulatedNode
node = SimulatedNode()
# What a collector run on the node leaves when it dies with it: a map pinned in pin_path.
os.makedirs(node.pin_path, mode=0o700)
subprocess.run(["bpftool", "map", "create", os.path.join(node.pin_path, "events"), "type", "array",
                "key", "4", "value", "4", "entries", "1", "name", "tapio_sim_stale"], check=True)
print(node.pin_path, flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.usefixtures("require_root_bpf")
def test_sweep_stale_removes_pins_a_killed_run_left(sim_node, repo_root):
    if shutil.which("bpftool") is None:
        pytest.skip("requires bpftool")
    p = subprocess.Popen([sys.executable, "-c", _KILLED_NODE_WITH_PIN], stdout=subprocess.PIPE, text=True,
                         cwd=repo_root, env=dict(os.environ, PYTHONPATH=repo_root))
    stale = p.communicate(timeout=60)[0].strip()
    assert p.returncode == -9
    # Named after its creator, as the node's cgroup and temp dir are.
    assert re.fullmatch(rf"/sys/fs/bpf/tapio-sim-{p.pid}-[0-9a-f]{{8}}", stale), stale
    live = os.path.join(sim_node.pin_path, "events")
    os.makedirs(sim_node.pin_path, mode=0o700)
    try:
        subprocess.run(["bpftool", "map", "create", live, "type", "array", "key", "4", "value", "4",
                        "entries", "1", "name", "tapio_sim_live"], check=True)
        assert os.path.exists(os.path.join(stale, "events"))
        removed = sweep_stale()
        assert stale in removed and not os.path.exists(stale)
        # The pins of a live node (this process's) are left alone.
        assert sim_node.pin_path not in removed and os.path.exists(live)
    finally:
        shutil.rmtree(stale, ignore_errors=True)
