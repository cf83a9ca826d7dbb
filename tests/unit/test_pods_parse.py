"""tapio_node.pods without privileges: the cgroup and /var/log/pods name
parsers, PodInfo validation and packing, and PodRegistry over a directory
tree laid out like the cgroup tree (names are what it reads; the cgroup id
is the dir's inode, as on cgroup v2). The same registry on real cgroup v2
dirs with real processes is in tests/kernel/test_pods.py."""

import logging
import os
import re
import uuid

import pytest

from tapio_node.pods.cgroupnames import parse_cgroup_path
from tapio_node.pods.info import QOS, Accessor, PodInfo, pack_pod_info, unpack_pod_info
from tapio_node.pods.names import parse_log_dir
from tapio_node.pods.registry import PodRegistry
from tests.fakes import FakeMaps, drain as _drain_registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UID = "1b2c3d4e-5f60-4718-9a0b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")
STATIC_UID = "9d8f3c6b2a1e4f5d8c7b6a5948372615"   # kubelet's hash uid of a static pod
CID = "4f1e" + "0123456789abcdef" * 3 + "a1b2c3d4e5f6"
assert len(CID) == 64



def drain(reg, cond, rounds=200):
    return _drain_registry(reg, cond, rounds)

# ---------------------------------------------------------------- cgroup paths

@pytest.mark.parametrize("path, qos, runtime", [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     "burstable", "cri-containerd"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     "besteffort", "crio"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope", "guaranteed", "docker"),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope", "burstable", "cri-containerd"),
    (f"/kubepods/burstable/pod{UID}/{CID}", "burstable", None),
    (f"/kubepods/besteffort/pod{UID}/{CID}", "besteffort", None),
    (f"/kubepods/pod{UID}/{CID}", "guaranteed", None),
    (f"/kubepods/pod{UID}/crio-{CID}", "guaranteed", "crio"),
    # a node inside a container (kind): the tree sits lower down
    (f"/system.slice/docker-{'e' * 64}.scope/kubepods/burstable/pod{UID}/{CID}", "burstable", None),
])
def test_container_paths(path, qos, runtime):
    ref = parse_cgroup_path(path)
    assert ref is not None and ref.kind == "container"
    assert (ref.pod_uid, ref.container_id, ref.qos, ref.runtime) == (UID, CID, qos, runtime)


def test_static_pod_uid_and_pod_level_cgroup():
    ref = parse_cgroup_path(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice")
    assert ref is not None and (ref.kind, ref.pod_uid, ref.container_id) == ("pod", STATIC_UID, None)
    ref = parse_cgroup_path(f"/kubepods/pod{UID}")
    assert (ref.kind, ref.pod_uid, ref.qos, ref.driver) == ("pod", UID, "guaranteed", "cgroupfs")


def test_nested_cgroup_below_a_container_belongs_to_it():
    ref = parse_cgroup_path(f"/kubepods/burstable/pod{UID}/{CID}/init.scope/x")
    assert (ref.kind, ref.pod_uid, ref.container_id) == ("nested", UID, CID)


@pytest.mark.parametrize("path", [
    "/", "", "/system.slice/kubelet.service", "/user.slice/user-0.slice/session-1.scope",
    "/kubepods.slice", "/kubepods.slice/kubepods-burstable.slice", "/kubepods/burstable",
    # the runtime's monitor is not a container
    f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
    # uids: dashes in a systemd name, upper case, wrong length, not hex
    f"/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{CID}.scope",
    f"/kubepods.slice/kubepods-pod{UID_.upper()}.slice",
    f"/kubepods.slice/kubepods-pod{UID_}0.slice",
    f"/kubepods/pod{UID[:-1]}g",
    f"/kubepods/pod{UID.replace('-', '_')}",
    "/kubepods/pod../x",
    # container ids: short, long, upper case, prefixed wrongly
    f"/kubepods/pod{UID}/{CID[:-1]}",
    f"/kubepods/pod{UID}/{CID}0",
    f"/kubepods/pod{UID}/{CID.upper()}",
    f"/kubepods.slice/kubepods-pod{UID_}.slice/containerd-{CID}.scope",
    f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}",
    # QoS of the pod slice must match its parent; prefixes must be the parent's
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_}.slice",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-pod{UID_}.slice",
    f"/kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-pod{UID_}.slice",
    f"/kubepods/guaranteed/pod{UID}",
    # traversal and absurd names
    f"/kubepods/pod{UID}/../../etc", "/kubepods/" + "a" * 300,
    f"/kubepods/pod{UID}\n/{CID}",
])
def test_not_a_pod_cgroup(path):
    assert parse_cgroup_path(path) is None


# ---------------------------------------------------------------- /var/log/pods

def test_log_dir_names():
    assert parse_log_dir(f"kube-system_coredns-7db6d8ff4d-x2x9k_{UID}") == (
        "kube-system", "coredns-7db6d8ff4d-x2x9k", UID)
    assert parse_log_dir(f"default_web.v1_{STATIC_UID}") == ("default", "web.v1", STATIC_UID)
    long_name = ("a" * 63 + ".") * 3 + "b" * 61            # 253 characters: the longest allowed
    assert len(long_name) == 253
    assert parse_log_dir(f"ns_{long_name}_{UID}") == ("ns", long_name, UID)


@pytest.mark.parametrize("name", [
    f"Default_web_{UID}", f"default_Web_{UID}", f"default_web_{UID.upper()}", f"default_web_{UID[:-2]}",
    f"default_web_x_{UID}", f"default_{UID}", "default_web", f"-ns_web_{UID}", f"ns-_web_{UID}",
    f"{'n' * 64}_web_{UID}", f"ns_{'a' * 254}_{UID}", f"ns_web._{UID}",
    f"ns_we..b_{UID}", f"ns_web_{UID}\n", f"ns_wéb_{UID}", "..", "",
])
def test_bad_log_dir_names(name):
    assert parse_log_dir(name) is None


# ---------------------------------------------------------------- PodInfo

def _header_defines():
    with open(os.path.join(REPO, "bpf/tapio.h")) as f:
        return {m.group(1): m.group(2) for m in re.finditer(r"#define (TAPIO_\w+) (\S+)", f.read())}


def test_pod_info_fits_the_wire_struct():
    d = _header_defines()
    name_len = int(d["TAPIO_NAME_LEN"])
    # the longest valid values must keep their terminating NUL
    assert int(d["TAPIO_UID_LEN"]) > 36 and name_len > 63 and name_len * 4 > 253
    assert int(d["TAPIO_CONTAINER_ID_LEN"]) > 64
    size = int(d["TAPIO_UID_LEN"]) + name_len + name_len * 4 + int(d["TAPIO_CONTAINER_ID_LEN"]) + 16
    info = PodInfo(UID, "n" * 63, ("a" * 63 + ".") * 3 + "b" * 61, CID, 1700000000, "burstable")
    raw = pack_pod_info(info)
    assert len(raw) == size
    assert unpack_pod_info(raw) == info
    assert unpack_pod_info(raw[:-1]) is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(pod_uid="abc-123-def"), "pod_uid"),
    (dict(pod_uid=UID.upper()), "pod_uid"),
    (dict(pod_uid=123), "pod_uid"),
    (dict(namespace="Production"), "namespace"),
    (dict(namespace="n" * 64), "namespace"),
    (dict(namespace="a_b"), "namespace"),
    (dict(pod_name="x" * 254), "pod_name"),
    (dict(pod_name="web/../x"), "pod_name"),
    (dict(container_id="containerd://" + CID), "container_id"),
    (dict(container_id=CID[:12]), "container_id"),
    (dict(created_at=-1), "created_at"),
    (dict(created_at=1.5), "created_at"),
    (dict(created_at=True), "created_at"),
    (dict(qos="Burstable"), "qos"),
])
def test_pod_info_validation(kwargs, field):
    base = dict(pod_uid=UID, namespace="production", pod_name="nginx-deployment-xyz")
    base.update(kwargs)
    with pytest.raises(ValueError, match=rf"PodInfo\.{field} "):
        PodInfo(**base)


def test_pod_info_minimal_and_qos_numbers():
    info = PodInfo(UID, None, None)
    assert (info.container_id, info.created_at, info.qos) == (None, 0, None)
    assert QOS == {"guaranteed": 1, "burstable": 2, "besteffort": 3}


# ---------------------------------------------------------------- registry on a dir tree

class FakeMetrics:
    def __init__(self):
        self.ops: dict[str, int] = {}

    def correlation(self, operation, n=1):
        self.ops[operation] = self.ops.get(operation, 0) + n


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "cgroup"
    logs = tmp_path / "logs"
    kpods = tmp_path / "kubelet-pods"
    for d in (root, logs, kpods):
        d.mkdir()
    return root, logs, kpods


def _registry(tree, **kw):
    root, logs, kpods = tree
    args = dict(cgroup_root=str(root), pod_logs_path=str(logs), kubelet_pods_path=str(kpods),
                projected_volume_pattern="kubernetes.io~projected",
                kubelet_cgroups=["kubelet.service"], kubelet_executables=["kubelet"],
                maps=FakeMaps(), metrics=FakeMetrics())
    args.update(kw)
    reg = PodRegistry(**args)
    return reg


def test_registry_scan_names_and_maps(tree):
    root, logs, kpods = tree
    _sa_volume(kpods, UID, b"shop")
    pod = root / f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    ctr = pod / f"cri-containerd-{CID}.scope"
    ctr.mkdir(parents=True)
    (ctr / "cgroup.procs").write_text("4242\n4243\n")
    (logs / f"shop_cart-5d9f_{UID}").mkdir()
    maps, metrics = FakeMaps(), FakeMetrics()
    reg = _registry(tree, maps=maps, metrics=metrics)
    try:
        reg.start()
        cgid = os.stat(ctr).st_ino
        assert reg.accessor(cgid, 1, "app") == Accessor(CID, UID, "shop", "cart-5d9f", None)
        assert reg.accessor(os.stat(pod).st_ino, 1, "pause") == Accessor(None, UID, "shop", "cart-5d9f", None)
        assert reg.pods() == 1 and reg.pod_names(UID) == ("shop", "cart-5d9f")
        # the SA volume's namespace file is opened only when the logs dir
        # does not name the pod (that open is itself a watched access)
        assert "namespace_file" not in metrics.ops
        assert unpack_pod_info(maps.pod_info[cgid]) == PodInfo(
            UID, "shop", "cart-5d9f", CID, unpack_pod_info(maps.pod_info[cgid]).created_at, "burstable")
        assert maps.pids == {4242: cgid, 4243: cgid}
        host = reg.accessor(1, os.getpid(), "bash")
        assert host == Accessor(None, None, None, None, None)
        assert metrics.ops["cgroup_lookup"] == 3 and metrics.ops["cgroup_lookup_miss"] == 1
        assert reg.resync() == 0
        # a map entry lost or changed behind our back is repaired and counted
        del maps.pod_info[cgid]
        maps.pids[99999] = 12345
        assert reg.resync() == 2
        assert cgid in maps.pod_info and 99999 not in maps.pids
    finally:
        reg.close()


def test_registry_follows_new_and_removed_cgroups_and_log_dirs(tree):
    root, logs, _ = tree
    (root / "kubepods/besteffort").mkdir(parents=True)
    maps, metrics = FakeMaps(), FakeMetrics()
    reg = _registry(tree, maps=maps, metrics=metrics)
    try:
        reg.start()
        assert reg.pods() == 0
        # made quickly in one go: the watch on each new dir is added after
        # its children may already exist, so the registry must list it too
        ctr = root / f"kubepods/besteffort/pod{UID}/{CID}"
        ctr.mkdir(parents=True)
        cgid = os.stat(ctr).st_ino
        assert drain(reg, lambda: reg.accessor(cgid, 1, "a").container_id == CID)
        assert reg.accessor(cgid, 1, "a").namespace is None
        (logs / f"team-a_api_{UID}").mkdir()
        assert drain(reg, lambda: reg.accessor(cgid, 1, "a").pod_name == "api")
        assert unpack_pod_info(maps.pod_info[cgid]).namespace == "team-a"
        maps.pids[777] = cgid
        ctr.rmdir()
        assert drain(reg, lambda: cgid not in maps.pod_info)
        assert reg.accessor(cgid, 1, "a").pod_uid is None
        assert 777 not in maps.pids
        (root / f"kubepods/besteffort/pod{UID}").rmdir()
        assert drain(reg, lambda: reg.pods() == 0)
        assert maps.pod_info == {}
    finally:
        reg.close()


def test_hostile_names_are_skipped_and_logged_once(tree, caplog):
    root, logs, kpods = tree
    outside = root.parent / "outside"
    (outside / f"cri-containerd-{CID}.scope").mkdir(parents=True)
    (outside / f"default_evil_{UID}").mkdir()
    qos = root / "kubepods.slice/kubepods-burstable.slice"
    qos.mkdir(parents=True)
    # a pod slice that is a symlink to a tree outside the root
    os.symlink(outside, qos / f"kubepods-burstable-pod{UID_}.slice")
    (qos / "kubepods-burstable-podNOT_A_UID.slice").mkdir()
    (qos / ("x" * 255)).mkdir()
    os.symlink(outside / f"default_evil_{UID}", logs / f"default_evil_{UID}")
    (logs / f"Bad_Name_{UID}").mkdir()
    (logs / f"ns_{'a' * 180}-_{UID}").mkdir()
    (logs / f"ns_web_{UID}").write_text("a file, not a dir")
    maps, metrics = FakeMaps(), FakeMetrics()
    reg = _registry(tree, maps=maps, metrics=metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="tapio_node.pods"):
            reg.start()
            reg.resync()
        assert reg.pods() == 0 and maps.pod_info == {}
        assert reg.pod_names(UID) == (None, None)
        lines = [r.getMessage() for r in caplog.records]
        for needle in ("podNOT_A_UID", "x" * 255, f"default_evil_{UID}", "Bad_Name", "a" * 180 + "-", "ns_web_"):
            assert sum(needle in line for line in lines) == 1, (needle, lines)
        assert reg.handle_io() is None
    finally:
        reg.close()


def _sa_volume(kpods, uid, namespace: bytes, vol="kube-api-access-x7k2p", plugin="kubernetes.io~projected"):
    d = kpods / uid / "volumes" / plugin / vol
    ts = d / "..2026_11_25_10_00_00.123456789"
    ts.mkdir(parents=True)
    (ts / "namespace").write_bytes(namespace)
    os.symlink(ts.name, d / "..data")
    os.symlink("..data/namespace", d / "namespace")
    return d


def test_namespace_from_the_service_account_volume(tree):
    _, _, kpods = tree
    _sa_volume(kpods, UID, b"payments")
    maps, metrics = FakeMaps(), FakeMetrics()
    reg = _registry(tree, maps=maps, metrics=metrics)
    try:
        reg.start()
        assert reg.pod_names(UID) == ("payments", None)
        assert metrics.ops.get("namespace_file") == 1
        assert reg.pod_names(UID) == ("payments", None)   # cached
        assert metrics.ops.get("namespace_file") == 1
    finally:
        reg.close()


def test_service_account_volume_under_the_configured_projected_pattern(tree):
    """projected_volume_pattern names the kubelet's projected volume dir:
    the namespace is read there, and not from the default dir."""
    _, _, kpods = tree
    uid2 = str(uuid.uuid4())
    _sa_volume(kpods, UID, b"payments", plugin="example.com~projected")
    _sa_volume(kpods, uid2, b"elsewhere")      # the default dir: not what this node uses
    reg = _registry(tree, projected_volume_pattern="example.com~projected")
    try:
        reg.start()
        assert reg.pod_names(UID) == ("payments", None)
        assert reg.pod_names(uid2) == (None, None)
    finally:
        reg.close()


@pytest.mark.parametrize("pattern", ["", ".", "..", "a/b", None])
def test_projected_volume_pattern_must_be_a_dir_name(tree, pattern):
    with pytest.raises(ValueError, match="projected_volume_pattern"):
        _registry(tree, projected_volume_pattern=pattern)


def test_only_the_service_account_volume_names_the_namespace(tree):
    _, _, kpods = tree
    _sa_volume(kpods, UID, b"kube-system", vol="my-projected-config")   # user content
    reg = _registry(tree)
    try:
        assert reg.pod_names(UID) == (None, None)
    finally:
        reg.close()


@pytest.mark.parametrize("attack", ["data_out", "key_out", "vol_link", "pod_link", "bad_content", "big"])
def test_service_account_volume_never_leaves_its_root(tree, attack):
    _, _, kpods = tree
    uid = str(uuid.uuid4())
    outside = kpods.parent / "outside"
    outside.mkdir()
    (outside / "namespace").write_text("stolen")
    if attack == "pod_link":
        os.symlink(outside, kpods / uid)
        (outside / "volumes/kubernetes.io~projected/kube-api-access-v").mkdir(parents=True)
        (outside / "volumes/kubernetes.io~projected/kube-api-access-v/namespace").write_text("stolen")
    elif attack == "vol_link":
        (kpods / uid / "volumes/kubernetes.io~projected").mkdir(parents=True)
        os.symlink(outside, kpods / uid / "volumes/kubernetes.io~projected/kube-api-access-v")
    else:
        d = _sa_volume(kpods, uid, {"bad_content": b"Not A Label", "big": b"a" * 4096}.get(attack, b"ok"))
        if attack == "data_out":
            os.unlink(d / "..data")
            os.symlink(str(outside), d / "..data")
        elif attack == "key_out":
            os.unlink(d / "namespace")
            os.symlink(str(outside / "namespace"), d / "namespace")
    reg = _registry(tree)
    try:
        assert reg.pod_names(uid) == (None, None)
    finally:
        reg.close()


def test_roots_that_do_not_exist_yet_are_waited_for(tmp_path):
    root = tmp_path / "later/cgroup"
    logs = tmp_path / "later/logs"
    reg = PodRegistry(cgroup_root=str(root), pod_logs_path=str(logs), kubelet_pods_path=str(tmp_path / "k"),
                      projected_volume_pattern="kubernetes.io~projected",
                      kubelet_cgroups=[], kubelet_executables=[], maps=FakeMaps())
    try:
        reg.start()
        assert reg.pods() == 0 and reg.resync() == 0
        ctr = root / f"kubepods/pod{UID}/{CID}"
        ctr.mkdir(parents=True)
        logs.mkdir()
        (logs / f"late_pod_{UID}").mkdir()
        cgid = os.stat(ctr).st_ino
        assert drain(reg, lambda: reg.accessor(cgid, 1, "x") == Accessor(CID, UID, "late", "pod", None))
    finally:
        reg.close()


def test_kubelet_is_recognised(tree):
    with open("/proc/self/cgroup") as f:
        mine = [ln[3:].strip() for ln in f if ln.startswith("0::")]
    exe = os.path.basename(os.readlink("/proc/self/exe"))
    reg = _registry(tree, kubelet_executables=["kubelet", exe])
    try:
        reg.start()
        assert reg.accessor(1, os.getpid(), "kubelet").role == "kubelet"     # by comm
        assert reg.accessor(1, os.getpid(), "python").role == "kubelet"      # by exe
        assert reg.accessor(1, 2**22 + 7, "python").role is None           # gone: no role
    finally:
        reg.close()
    if not mine or mine[0] == "/":
        pytest.skip("this process is in the root cgroup: no cgroup name to match on")
    reg = _registry(tree, kubelet_cgroups=[mine[0].rsplit("/", 1)[1]], kubelet_executables=[])
    try:
        reg.start()
        assert reg.accessor(5, os.getpid(), "python").role == "kubelet"      # by cgroup
    finally:
        reg.close()


def test_api_validation(tree):
    maps, metrics = FakeMaps(), FakeMetrics()
    reg = _registry(tree, maps=maps, metrics=metrics)
    try:
        reg.start()
        for bad in (0, -1, True, "12", 2**22 + 2, 1.0):
            with pytest.raises(ValueError, match="add_container_pid: pid"):
                reg.add_container_pid(bad)
        # this process is not in a pod cgroup under the root
        with pytest.raises(ValueError, match="not a pod or container cgroup"):
            reg.add_container_pid(os.getpid())
        for bad in (0, -5, 2**64, "7", None):
            with pytest.raises(ValueError, match="add_pod_info: cgroup_id"):
                reg.add_pod_info(bad, PodInfo(UID, "ns", "p"))
        with pytest.raises(ValueError, match="PodInfo"):
            reg.add_pod_info(7, {"pod_uid": UID})
        info = PodInfo(UID, "ns", "p", CID, 5, "besteffort")
        reg.add_pod_info(7, info)
        assert reg.accessor(7, 1, "x") == Accessor(CID, UID, "ns", "p", None)
        assert unpack_pod_info(maps.pod_info[7]) == info
        assert reg.pods() == 1
        # kept across a resync although no dir carries that id
        reg.resync()
        assert 7 in maps.pod_info
    finally:
        reg.close()


def test_queue_overflow_triggers_a_full_rescan(tree):
    root, logs, _ = tree
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        limit = int(f.read())
    if limit > 70000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many dirs to make for an overflow")
    reg = _registry(tree)
    try:
        reg.start()
        for i in range(limit + 50):
            os.mkdir(logs / f"ns_p{i}_{uuid.UUID(int=i)}")
        ctr = root / f"kubepods/pod{UID}/{CID}"
        ctr.mkdir(parents=True)
        cgid = os.stat(ctr).st_ino
        reg.handle_io()
        assert reg.pod_names(str(uuid.UUID(int=limit + 49))) == ("ns", f"p{limit + 49}")
        assert reg.accessor(cgid, 1, "x").pod_uid == UID
    finally:
        reg.close()
