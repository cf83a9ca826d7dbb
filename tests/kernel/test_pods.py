"""PodRegistry on real cgroup v2 dirs with real processes in them (root).

Each test makes its own cgroup tree under a unique dir of the cgroup v2
mount, named as the kubelet's systemd or cgroupfs driver names it, moves
`sleep` processes into it by writing their pids to cgroup.procs, and checks
what the registry reports for the dirs' inode numbers (the cgroup ids the
kernel programs see). Everything is killed by pid and removed, deepest
first, even when a test fails."""

import os
import secrets
import select
import signal
import subprocess
import time
import uuid

import pytest

from tapio_node.host import cgroup2_root
from tapio_node.pods.info import Accessor, PodInfo, unpack_pod_info
from tapio_node.pods.registry import PodRegistry
from tests.fakes import FakeMaps, drain

pytestmark = pytest.mark.kernel

class Node:
    """A unique cgroup v2 dir plus logs/kubelet dirs; tracks what to undo."""

    def __init__(self, mount: str, tmp):
        self.root = os.path.join(mount, f"tapio-pods-test-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.root)
        self.logs = tmp / "logs"
        self.kpods = tmp / "kubelet-pods"
        self.logs.mkdir()
        self.kpods.mkdir()
        self.procs: list[subprocess.Popen] = []

    def mkdir(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        os.makedirs(path, exist_ok=True)
        return path

    def run_in(self, cgroup_dir: str, argv=("sleep", "600"), **popen) -> subprocess.Popen:
        p = subprocess.Popen(list(argv), **popen)
        self.procs.append(p)
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(p.pid))
        return p

    def kill(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait()

    def cleanup(self) -> list[str]:
        left = []
        for p in self.procs:
            self.kill(p)
        for d, _, _ in os.walk(self.root):
            # processes we did not start ourselves (children of the shells)
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            except OSError:
                pass
        for d, _, _ in sorted(os.walk(self.root), key=lambda w: -w[0].count("/")):
            for _ in range(100):   # an rmdir right after a kill can see EBUSY
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != 16:
                        left.append(f"{d}: {e}")
                        break
                    time.sleep(0.01)
            else:
                left.append(f"{d}: still busy")
        return left


@pytest.fixture
def node(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("requires root (creates cgroups)")
    mount = cgroup2_root()
    if mount is None:
        pytest.skip("requires a cgroup v2 mount")
    n = Node(mount, tmp_path)
    yield n
    left = n.cleanup()
    assert not left, f"cgroups left behind: {left}"


def registry(node, maps=None, **kw):
    args = dict(cgroup_root=node.root, pod_logs_path=str(node.logs), kubelet_pods_path=str(node.kpods),
                projected_volume_pattern="kubernetes.io~projected",
                kubelet_cgroups=["kubelet.service"], kubelet_executables=["kubelet"],
                maps=FakeMaps() if maps is None else maps)
    args.update(kw)
    return PodRegistry(**args)


def systemd_pod(uid, qos):
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"kubepods.slice/kubepods-pod{u}.slice"
    return f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"


def cgroupfs_pod(uid, qos):
    return f"kubepods/pod{uid}" if qos == "guaranteed" else f"kubepods/{qos}/pod{uid}"


def ino(path):
    return os.stat(path).st_ino


def test_both_drivers_every_runtime(node):
    pods = {}   # uid -> (ns, name, qos, [(container dir, container id, proc)])
    layout = [("systemd", "burstable", "cri-containerd"), ("systemd", "besteffort", "crio"),
              ("systemd", "guaranteed", "docker"), ("cgroupfs", "burstable", "fs"),
              ("cgroupfs", "guaranteed", "fs")]
    for i, (driver, qos, rt) in enumerate(layout):
        uid = str(uuid.uuid4())
        pod_rel = systemd_pod(uid, qos) if driver == "systemd" else cgroupfs_pod(uid, qos)
        cid = secrets.token_hex(32)
        leaf = f"{rt}-{cid}.scope" if driver == "systemd" else cid
        cdir = node.mkdir(f"{pod_rel}/{leaf}")
        proc = node.run_in(cdir)
        (node.logs / f"ns{i}_pod-{i}_{uid}").mkdir()
        pods[uid] = (f"ns{i}", f"pod-{i}", qos, cdir, cid, proc, os.path.join(node.root, pod_rel))
    # CRI-O's monitor sits in the pod slice next to the container: not a container
    conmon_uid = next(u for u, v in pods.items() if v[2] == "besteffort")
    conmon = node.mkdir(os.path.relpath(pods[conmon_uid][6], node.root) + f"/crio-conmon-{secrets.token_hex(32)}.scope")
    conmon_proc = node.run_in(conmon)
    host = node.run_in(node.mkdir("system.slice/cron.service"))
    maps = FakeMaps()
    reg = registry(node, maps=maps)
    try:
        reg.start()
        assert reg.pods() == len(pods)
        for uid, (ns, name, qos, cdir, cid, proc, pdir) in pods.items():
            cgid = ino(cdir)
            assert reg.accessor(cgid, proc.pid, "sleep") == Accessor(cid, uid, ns, name, None)
            assert reg.accessor(ino(pdir), 1, "pause") == Accessor(None, uid, ns, name, None)
            info = unpack_pod_info(maps.pod_info[cgid])
            assert (info.pod_uid, info.namespace, info.pod_name, info.container_id, info.qos) == (
                uid, ns, name, cid, qos)
            assert maps.pids[proc.pid] == cgid          # seeded from the real cgroup.procs
        assert reg.accessor(ino(conmon), conmon_proc.pid, "conmon").pod_uid is None
        assert conmon_proc.pid not in maps.pids
        assert reg.accessor(ino(os.path.join(node.root, "system.slice/cron.service")), host.pid,
                            "sleep") == Accessor(None, None, None, None, None)
        assert len(maps.pod_info) == 2 * len(pods)      # containers and pod-level cgroups
        assert reg.resync() == 0
    finally:
        reg.close()
    # a restart with the pods present gives the same answers
    reg2 = registry(node)
    try:
        reg2.start()
        for uid, (ns, name, qos, cdir, cid, proc, pdir) in pods.items():
            assert reg2.accessor(ino(cdir), proc.pid, "sleep") == Accessor(cid, uid, ns, name, None)
    finally:
        reg2.close()


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_containers_after_start_through_inotify(node, driver):
    node.mkdir("kubepods.slice/kubepods-burstable.slice" if driver == "systemd" else "kubepods/burstable")
    maps = FakeMaps()
    reg = registry(node, maps=maps)
    try:
        reg.start()
        assert reg.pods() == 0
        uid = str(uuid.uuid4())
        pod_rel = systemd_pod(uid, "burstable") if driver == "systemd" else cgroupfs_pod(uid, "burstable")
        cid = secrets.token_hex(32)
        t0 = time.monotonic()
        cdir = node.mkdir(f"{pod_rel}/cri-containerd-{cid}.scope" if driver == "systemd" else f"{pod_rel}/{cid}")
        proc = node.run_in(cdir)
        cgid = ino(cdir)
        assert drain(reg, lambda: reg.accessor(cgid, proc.pid, "sleep").container_id == cid)
        print(f"{driver}: container attributed {1000 * (time.monotonic() - t0):.1f} ms after mkdir")
        assert maps.pids.get(proc.pid) == cgid
        (node.logs / f"late_web_{uid}").mkdir()
        assert drain(reg, lambda: reg.accessor(cgid, proc.pid, "sleep").pod_name == "web")
        # a second container of the same pod
        cid2 = secrets.token_hex(32)
        cdir2 = node.mkdir(f"{pod_rel}/cri-containerd-{cid2}.scope" if driver == "systemd" else f"{pod_rel}/{cid2}")
        assert drain(reg, lambda: reg.accessor(ino(cdir2), 1, "x").container_id == cid2)
        assert reg.pods() == 1
        # teardown: the container goes, then the pod
        node.kill(proc)
        cg2 = ino(cdir2)
        os.rmdir(cdir)
        os.rmdir(cdir2)
        assert drain(reg, lambda: cgid not in maps.pod_info and cg2 not in maps.pod_info)
        assert reg.accessor(cgid, proc.pid, "sleep").pod_uid is None
        assert proc.pid not in maps.pids
        os.rmdir(os.path.join(node.root, pod_rel))
        assert drain(reg, lambda: reg.pods() == 0)
        assert maps.pod_info == {}
    finally:
        reg.close()


def test_hostile_cgroup_names_are_skipped(node, caplog):
    qos = node.mkdir("kubepods.slice/kubepods-burstable.slice")
    reg = registry(node)
    try:
        reg.start()
        bad = ["kubepods-burstable-podNOTAUID.slice", "kubepods-burstable-pod" + "0" * 200 + ".slice",
               "x" * 255, f"kubepods-besteffort-pod{str(uuid.uuid4()).replace('-', '_')}.slice"]
        for name in bad:
            os.mkdir(os.path.join(qos, name))
        uid = str(uuid.uuid4())
        good = node.mkdir(f"{systemd_pod(uid, 'burstable')}/cri-containerd-{secrets.token_hex(32)}.scope")
        assert drain(reg, lambda: reg.accessor(ino(good), 1, "x").pod_uid == uid)
        for name in bad:
            assert reg.accessor(ino(os.path.join(qos, name)), 1, "x").pod_uid is None
        assert reg.pods() == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "tapio_node.pods"]
        for name in bad:
            assert sum(name in ln for ln in lines) == 1, name
        reg.resync()
        lines = [r.getMessage() for r in caplog.records if r.name == "tapio_node.pods"]
        assert sum("x" * 255 in ln for ln in lines) == 1     # once, not per resync
    finally:
        reg.close()


def test_add_container_pid_and_add_pod_info(node):
    uid = str(uuid.uuid4())
    node.mkdir("kubepods")
    maps = FakeMaps()
    reg = registry(node, maps=maps)
    try:
        reg.start()
        cid = secrets.token_hex(32)
        cdir = node.mkdir(f"kubepods/pod{uid}/{cid}")
        proc = node.run_in(cdir)
        # before inotify is read: the API resolves the cgroup itself
        assert reg.add_container_pid(proc.pid) == ino(cdir)
        assert maps.pids[proc.pid] == ino(cdir)
        assert reg.accessor(ino(cdir), proc.pid, "sleep").container_id == cid
        host = node.run_in(node.mkdir("system.slice/sshd.service"))
        with pytest.raises(ValueError, match="not a pod or container cgroup"):
            reg.add_container_pid(host.pid)
        node.kill(host)
        with pytest.raises(ValueError, match=f"no process with pid {host.pid}"):
            reg.add_container_pid(host.pid)
        with pytest.raises(ValueError, match="not a valid process id"):
            reg.add_container_pid(-3)
        with pytest.raises(ValueError, match="PodInfo.namespace"):
            reg.add_pod_info(ino(cdir), PodInfo(uid, "Bad_NS", "x"))
        # another collector knows the names before /var/log/pods has them
        reg.add_pod_info(ino(cdir), PodInfo(uid, "billing", "invoicer-0", cid, 1700000000, "guaranteed"))
        assert reg.accessor(ino(cdir), proc.pid, "sleep") == Accessor(cid, uid, "billing", "invoicer-0", None)
        reg.handle_io()
        assert reg.pods() == 1
    finally:
        reg.close()


def test_kubelet_role_by_cgroup_and_executable(node):
    kdir = node.mkdir("system.slice/kubelet.service")
    kubelet = node.run_in(kdir)
    other = node.run_in(node.mkdir("system.slice/other.service"))
    reg = registry(node)
    try:
        reg.start()
        assert reg.accessor(ino(kdir), kubelet.pid, "sleep").role == "kubelet"
        assert reg.accessor(ino(os.path.join(node.root, "system.slice/other.service")),
                            other.pid, "sleep").role is None
        assert reg.accessor(12345, other.pid, "kubelet").role is None   # never by comm
    finally:
        reg.close()
    reg = registry(node, kubelet_cgroups=[], kubelet_executables=["sleep"])
    try:
        reg.start()
        assert reg.accessor(ino(os.path.join(node.root, "system.slice/other.service")),
                            other.pid, "not-sleep").role == "kubelet"      # by /proc/<pid>/exe
    finally:
        reg.close()


def test_real_bpf_maps(node, request):
    request.getfixturevalue("require_root_bpf")     # tests/kernel/conftest.py: skips with a reason
    from tapio_node.kernel.loader import Kernel
    from tapio_node.kernel.maps import KernelMaps

    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    cdir = node.mkdir(f"{systemd_pod(uid, 'besteffort')}/cri-containerd-{cid}.scope")
    early = node.run_in(cdir)
    (node.logs / f"prod_api-7f9_{uid}").mkdir()
    kernel = Kernel(pin_path=f"/sys/fs/bpf/tapio-pods-test-{secrets.token_hex(4)}")
    try:
        maps = KernelMaps(kernel)
        reg = registry(node, maps=maps)
        try:
            reg.start()
            cgid = ino(cdir)
            items = dict(maps.pod_info_items())
            info = unpack_pod_info(items[cgid])
            assert (info.pod_uid, info.namespace, info.pod_name, info.container_id, info.qos) == (
                uid, "prod", "api-7f9", cid, "besteffort")
            assert dict(maps.container_pid_items()).get(early.pid) == cgid   # seeded
            # moved in after start: the kernel's cgroup_attach_task program adds it
            late = node.run_in(cdir)
            assert dict(maps.container_pid_items()).get(late.pid) == cgid
            # a fork inside the container: sched_process_fork
            # (the shell forks only once it is in the container: after `read`)
            sh = node.run_in(cdir, ["sh", "-c", "read go; sleep 600 & echo $!; wait"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            sh.stdin.write("go\n")
            sh.stdin.flush()
            kids = [sh.stdout.readline().strip()]
            assert kids[0].isdigit() and dict(maps.container_pid_items()).get(int(kids[0])) == cgid
            assert reg.resync() == 0
            # exit drops the pid; rmdir drops the pod info
            for p in (early, late, sh):
                node.kill(p)
            for k in kids:
                try:
                    os.kill(int(k), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(200):
                if not any(c == cgid for _, c in maps.container_pid_items()):
                    break
                select.select([], [], [], 0.01)
            assert not any(c == cgid for _, c in maps.container_pid_items())
            for _ in range(100):
                try:
                    os.rmdir(cdir)
                    break
                except OSError:
                    select.select([], [], [], 0.01)
            assert drain(reg, lambda: cgid not in dict(maps.pod_info_items()))
            assert reg.pods() == 1     # the pod-level cgroup is still there
        finally:
            reg.close()
    finally:
        kernel.close()


_AS_NOBODY = r"""
import json, logging, os, sys
from tapio_node.pods.registry import PodRegistry
logging.basicConfig(level=logging.WARNING, format="%(message)s")
root, logs, kpods, uid, uid2, cid, cid2, uid3 = sys.argv[1:]
reg = PodRegistry(cgroup_root=root, pod_logs_path=logs, kubelet_pods_path=kpods,
                  projected_volume_pattern="kubernetes.io~projected",
                  kubelet_cgroups=["kubelet.service"], kubelet_executables=["kubelet"])
reg.start()
reg.resync()
reg.handle_io()
a = reg.accessor(os.stat(f"{root}/kubepods/pod{uid}/{cid}").st_ino, 1, "x")
print(json.dumps({"pods": reg.pods(), "pod_uid": a.pod_uid, "ns": a.namespace,
                  "sa": reg.pod_names(uid3)}))
"""


def test_permission_errors_are_skipped_not_fatal(tmp_path, as_nobody):
    """As nobody, over a tree with unreadable dirs: the readable
    pod is found, the rest is skipped with a log line, nothing raises."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="tapio-pods-perm-")
    try:
        os.chmod(base, 0o755)
        uid, uid2, uid3 = (str(uuid.uuid4()) for _ in range(3))
        cid, cid2 = secrets.token_hex(32), secrets.token_hex(32)
        root, logs, kpods = (os.path.join(base, d) for d in ("cgroup", "logs", "kpods"))
        os.makedirs(f"{root}/kubepods/pod{uid}/{cid}")
        os.makedirs(f"{root}/kubepods/pod{uid2}/{cid2}")
        os.chmod(f"{root}/kubepods/pod{uid2}", 0o700)          # unreadable for nobody
        os.makedirs(f"{logs}/team_web_{uid}")
        os.makedirs(f"{kpods}/{uid3}/volumes/kubernetes.io~projected/kube-api-access-abcde")
        with open(f"{kpods}/{uid3}/volumes/kubernetes.io~projected/kube-api-access-abcde/namespace", "w") as f:
            f.write("secret-ns")
        os.chmod(f"{kpods}/{uid3}", 0o700)
        for d in (root, logs, kpods):
            os.chmod(d, 0o755)
        r = subprocess.run(as_nobody("-c", _AS_NOBODY, root, logs, kpods, uid, uid2, cid, cid2, uid3),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        import json
        out = json.loads(r.stdout)
        # pod 2's pod-level cgroup is seen (its parent is readable), its container is not
        assert out == {"pods": 2, "pod_uid": uid, "ns": "team", "sa": [None, None]}
        assert "(Permission denied)" in r.stderr
        assert r.stderr.count(f"pod{uid2}") == 1       # one line, not one per scan
    finally:
        shutil.rmtree(base)


def test_auto_root_finds_a_kubepods_tree_below_the_mount(node):
    """cgroup_root "auto" is the whole v2 mount; the kubepods tree of this
    test sits one level down (like kubelet.slice/kubelet-kubepods.slice)."""
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    cdir = node.mkdir(f"{systemd_pod(uid, 'burstable')}/cri-containerd-{cid}.scope")
    proc = node.run_in(cdir)
    reg = registry(node, cgroup_root="auto")
    try:
        reg.start()
        assert reg.cgroup_root == cgroup2_root()
        assert reg.accessor(ino(cdir), proc.pid, "sleep").container_id == cid
        assert reg.add_container_pid(proc.pid) == ino(cdir)
    finally:
        reg.close()


@pytest.mark.parametrize("top", ["kubepods.slice", "kubepods.slice/kubepods-besteffort.slice", "kubepods"])
def test_cgroup_root_inside_the_kubepods_tree(node, top):
    uid = str(uuid.uuid4())
    cid = secrets.token_hex(32)
    if top == "kubepods":
        rel = f"{cgroupfs_pod(uid, 'guaranteed')}/{cid}"
    else:
        rel = f"{systemd_pod(uid, 'guaranteed' if top == 'kubepods.slice' else 'besteffort')}/docker-{cid}.scope"
    cdir = node.mkdir(rel)
    reg = registry(node, cgroup_root=os.path.join(node.root, top))
    try:
        reg.start()
        assert reg.accessor(ino(cdir), 1, "x").container_id == cid
    finally:
        reg.close()
