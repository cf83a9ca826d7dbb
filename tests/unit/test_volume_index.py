"""VolumeIndex: every file of every watched kubelet volume, in the maps the
kernel matches opens against, and back from the ids the kernel reports.

No BPF here: the maps are dicts, and the inode identity comes from lstat
(a generation can be set per inode, to act out inode reuse).
"""
import errno
import os
import shutil
import stat
import uuid

import pytest

from tapio_node import volumes
from tapio_node.kernel import wire
from tapio_node.volumes import MAX_KEY_DEPTH, MountInfo, VolumeIndex


PLUGINS = {"kubernetes.io~configmap": "configmap", "kubernetes.io~secret": "secret",
           "kubernetes.io~projected": "projected"}
MAP_NAMES = ("watched_inodes", "watched_devs", "watched_dirs", "dev_filter", "ino_filter")


class FakeMap:
    """A BPF hash map: update/delete by bytes key; optionally bounded."""

    def __init__(self, name, ops, max_entries=None):
        self.name, self.ops, self.max_entries = name, ops, max_entries
        self.d: dict[bytes, bytes] = {}

    def update(self, key, value):
        if self.max_entries is not None and key not in self.d and len(self.d) >= self.max_entries:
            raise OSError(errno.E2BIG, "map full")
        self.d[key] = value
        self.ops.append(("put", self.name, key))

    def delete(self, key):
        del self.d[key]
        self.ops.append(("del", self.name, key))


class Inodes:
    """What the index asks of a path: (kernel dev, generation, ino, mode).
    `gen` overrides the generation of an inode; `no_gen` devs have none
    (as on a filesystem whose file handles we cannot read); `fake_dev`
    puts a dir and everything below it on a device of its own (a tmpfs)."""

    def __init__(self):
        self.gen: dict[tuple[int, int], int] = {}
        self.no_gen: set[int] = set()
        self.fake_dev: dict[str, int] = {}

    def dev_of(self, path, st):
        for top, dev in self.fake_dev.items():
            if path == top or path.startswith(top + "/"):
                return dev
        return os.major(st.st_dev) << 20 | os.minor(st.st_dev)

    def __call__(self, path):
        st = os.lstat(path)
        dev = self.dev_of(path, st)
        gen = None if dev in self.no_gen else self.gen.get((dev, st.st_ino), 1)
        return dev, gen, st.st_ino, st.st_mode

    def key(self, path):
        dev, gen, ino, _ = self(path)
        return wire.pack_inode_key(dev, gen or 0, ino)


class Node:
    """A kubelet pods dir, the maps, and the indexes made over them."""

    def __init__(self, pods):
        self.pods = pods
        self.ops: list = []   # every map update and delete, in order
        self.inodes = Inodes()
        self.maps = {name: FakeMap(name, self.ops) for name in MAP_NAMES}
        self.made: list = []

    def index(self, **kw):
        idx = VolumeIndex(self.pods, PLUGINS, maps=kw.pop("maps", self.maps), stat_inode_key=self.inodes, **kw)
        self.made.append(idx)
        return idx

    def watched(self):
        """{(dev, gen, ino): (volume_id, file_id)} of watched_inodes."""
        return {wire.INODE_KEY.unpack(k): wire.WATCH.unpack(v) for k, v in self.maps["watched_inodes"].d.items()}


@pytest.fixture
def node(tmp_path):
    n = Node(str(tmp_path / "pods"))
    os.makedirs(n.pods)
    yield n
    for idx in n.made:
        idx.close()


def new_uid():
    return str(uuid.uuid4())


def vol_dir(pods, uid, plugin, name):
    return os.path.join(pods, uid, "volumes", plugin, name)


def write_payload(vol, files, stamp):
    """The kubelet's atomic writer: files in a ..<stamp> dir, ..data -> it,
    top-level key symlinks -> ..data/<key>; the previous payload dir is
    removed last. Returns the new payload dir."""
    os.makedirs(vol, exist_ok=True)
    ts = os.path.join(vol, f"..{stamp}")
    for key, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(ts, key)), exist_ok=True)
        with open(os.path.join(ts, key), "wb") as f:
            f.write(data)
    old = os.readlink(os.path.join(vol, "..data")) if os.path.islink(os.path.join(vol, "..data")) else None
    os.symlink(os.path.basename(ts), os.path.join(vol, "..data_tmp"))
    os.rename(os.path.join(vol, "..data_tmp"), os.path.join(vol, "..data"))
    for top in {k.split("/", 1)[0] for k in files}:
        link = os.path.join(vol, top)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", top), link)
    if old:
        shutil.rmtree(os.path.join(vol, old))
    return ts


def add_pod(pods, volumes_, uid=None):
    """volumes_: {(plugin, name): {key: bytes}}; returns the pod UID."""
    uid = uid or new_uid()
    os.makedirs(os.path.join(pods, uid, "volumes"), exist_ok=True)
    for (plugin, name), files in volumes_.items():
        write_payload(vol_dir(pods, uid, plugin, name), files, "2026_01_01_00_00_00.1")
    return uid


APP = {("kubernetes.io~configmap", "app-config"): {"app.yaml": b"a: 1\n", "conf.d/extra.yaml": b"x\n"},
       ("kubernetes.io~secret", "db"): {"password": b"p\n", "username": b"u\n"}}


def by_key(idx):
    return {(wf.volume.name, wf.key): wf for wf in idx.files.values()}


# -- indexing and lookup -----------------------------------------------------

def test_scan_indexes_every_key_of_every_watched_volume(node):
    uid = add_pod(node.pods, {**APP, ("kubernetes.io~empty-dir", "scratch"): {"junk": b"j"}})
    idx = node.index()
    assert idx.scan_all() == 4
    assert (idx.pod_count, idx.file_count, len(idx.volumes)) == (1, 4, 2)
    assert set(by_key(idx)) == {("app-config", "app.yaml"), ("app-config", "conf.d/extra.yaml"),
                                ("db", "password"), ("db", "username")}
    vols = {v.name: v for v in idx.volumes.values()}
    assert (vols["db"].kind, vols["db"].pod_uid, vols["db"].plugin) == ("secret", uid, "kubernetes.io~secret")
    assert vols["app-config"].path == vol_dir(node.pods, uid, "kubernetes.io~configmap", "app-config")
    assert idx.by_path[vols["db"].path] is vols["db"]
    # A second scan of an unchanged tree changes nothing.
    ops = len(node.ops)
    assert idx.scan_all() == 0
    assert node.ops[ops:] == []


def test_lookup_by_dev_and_inode_gives_volume_file_and_key(node):
    uid = add_pod(node.pods, APP)
    idx = node.index()
    idx.scan_all()
    watched = node.watched()
    assert len(watched) == 4
    for (vname, key), wf in by_key(idx).items():
        plugin = "kubernetes.io~secret" if vname == "db" else "kubernetes.io~configmap"
        path = os.path.join(vol_dir(node.pods, uid, plugin, vname), "..data", key)
        dev, gen, ino, _ = node.inodes(path)
        # What the kernel finds for this file's inode ...
        assert watched[(dev, gen, ino)] == (wf.volume.id, wf.id)
        # ... and what the daemon makes of the ids it reports.
        assert idx.resolve(wf.volume.id, wf.id, ()) == (wf.volume, key)
    assert idx.resolve(1, 10_000, ()) is None
    assert idx.resolve(10_000, 0, ("password",)) is None


def test_a_volume_on_the_pods_disk_is_matched_by_dir_walk(node):
    add_pod(node.pods, APP)
    idx = node.index()
    idx.scan_all()
    vols = {v.name: v for v in idx.volumes.values()}
    dev = vols["db"].dev
    assert not vols["db"].whole_dev
    # One walk entry for the shared device, one dir entry per volume.
    assert node.maps["watched_devs"].d == {
        wire.U32.pack(dev): wire.dev_value(wire.DEV_WALK | wire.DEV_USE_GEN, 0)}
    dirs = {wire.U32.unpack(v)[0]: k for k, v in node.maps["watched_dirs"].d.items()}
    for name, vol in vols.items():
        assert dirs[vol.id] == node.inodes.key(vol.path)
    # An open the inode map did not catch resolves by volume and dir names.
    assert idx.resolve(vols["db"].id, 0, ("password", "..2026_01_01_00_00_00.1", "db")) == (vols["db"], "password")
    assert idx.resolve(vols["app-config"].id, 0, ("extra.yaml", "conf.d", "..x", "app-config")) == \
        (vols["app-config"], "conf.d/extra.yaml")
    assert idx.resolve(vols["db"].id, 0, None) == (vols["db"], "")


def test_a_volume_on_its_own_device_is_matched_whole(node, monkeypatch):
    """A Secret on its own tmpfs: one watched_devs entry names the volume."""
    uid = add_pod(node.pods, APP)
    secret = vol_dir(node.pods, uid, "kubernetes.io~secret", "db")
    tmpfs = (77 << 20) | 5
    node.inodes.fake_dev[secret] = tmpfs
    real_lstat = os.lstat

    def lstat(path, *a, **kw):
        st = real_lstat(path, *a, **kw)
        p = os.fspath(path)
        if p == secret or p.startswith(secret + "/"):
            fields = list(st)
            fields[stat.ST_DEV] = os.makedev(77, 5)
            return os.stat_result(fields)
        return st
    monkeypatch.setattr(volumes.os, "lstat", lstat)
    idx = node.index()
    idx.scan_all()
    db = next(v for v in idx.volumes.values() if v.name == "db")
    assert (db.dev, db.whole_dev) == (tmpfs, True)
    assert node.maps["watched_devs"].d[wire.U32.pack(tmpfs)] == \
        wire.dev_value(wire.DEV_WHOLE | wire.DEV_USE_GEN, db.id)
    assert db.dir_key not in node.maps["watched_dirs"].d
    assert {k[0] for k in node.watched() if node.watched()[k][0] == db.id} == {tmpfs}
    # The tmpfs goes away (unmounted): the volume is re-read on the disk's device.
    monkeypatch.setattr(volumes.os, "lstat", real_lstat)
    del node.inodes.fake_dev[secret]
    assert idx.mounts_changed() > 0
    assert not db.whole_dev and wire.U32.pack(tmpfs) not in node.maps["watched_devs"].d
    assert idx.mounts_changed() == 0


def test_nested_keys_are_bounded_in_depth(node):
    deep = "/".join(f"d{i}" for i in range(MAX_KEY_DEPTH)) + "/leaf"
    too_deep = "/".join(f"d{i}" for i in range(MAX_KEY_DEPTH + 1)) + "/leaf"
    add_pod(node.pods, {("kubernetes.io~configmap", "c"): {deep: b"1", too_deep: b"2", "top": b"3"}})
    idx = node.index()
    idx.scan_all()
    assert {wf.key for wf in idx.files.values()} == {deep, "top"}


def test_a_plain_dir_volume_is_indexed_by_its_files(node):
    """Not the atomic-writer layout: the files themselves, no '..' names."""
    uid = new_uid()
    vol = vol_dir(node.pods, uid, "kubernetes.io~projected", "plain")
    os.makedirs(os.path.join(vol, "sub"))
    for rel in ("token", "sub/ca.crt", "..hidden"):
        with open(os.path.join(vol, rel), "w") as f:
            f.write("x")
    os.symlink("token", os.path.join(vol, "alias"))
    idx = node.index()
    idx.scan_all()
    assert {wf.key for wf in idx.files.values()} == {"token", "sub/ca.crt"}
    assert {wf.volume.kind for wf in idx.files.values()} == {"projected"}


# -- atomic-writer updates and removal -----------------------------------------

def test_update_swaps_payload_new_entries_before_old_ones_go(node):
    uid = add_pod(node.pods, APP)
    secret = vol_dir(node.pods, uid, "kubernetes.io~secret", "db")
    idx = node.index()
    idx.scan_all()
    old = {k: wf.id for (v, k), wf in by_key(idx).items() if v == "db"}
    old_keys = {node.inodes.key(os.path.join(secret, "..data", k)) for k in old}
    mark = len(node.ops)
    write_payload(secret, {"password": b"p2\n", "username": b"u2\n"}, "2026_01_01_00_00_01.2")
    assert idx.handle_io() == 4
    new_keys = {node.inodes.key(os.path.join(secret, "..data", k)) for k in old}
    assert new_keys.isdisjoint(old_keys)
    ops = [(op, key) for op, name, key in node.ops[mark:] if name == "watched_inodes"]
    assert sorted(ops) == sorted([("put", k) for k in new_keys] + [("del", k) for k in old_keys])
    last_put = max(i for i, (op, _) in enumerate(ops) if op == "put")
    first_del = min(i for i, (op, _) in enumerate(ops) if op == "del")
    assert last_put < first_del, ops
    watched = {wire.INODE_KEY.pack(*k) for k in node.watched()}
    assert new_keys <= watched and old_keys.isdisjoint(watched)
    now = {k: wf.id for (v, k), wf in by_key(idx).items() if v == "db"}
    assert set(now) == set(old) and set(now.values()).isdisjoint(old.values())
    # Records already in the ring buffer still name the old files ...
    db = next(v for v in idx.volumes.values() if v.name == "db")
    assert idx.resolve(db.id, old["password"], ()) == (db, "password")
    # ... until the graveyard is pruned.
    idx.prune_graveyard()
    assert idx.resolve(db.id, old["password"], ()) == (db, "password")
    for k in list(idx._grave):
        t, obj = idx._grave[k]
        idx._grave[k] = (t - volumes.GRAVE_SECONDS - 1, obj)
    idx.prune_graveyard()
    assert idx.resolve(db.id, old["password"], ()) is None
    assert idx.resolve(db.id, now["password"], ()) == (db, "password")


def test_both_payload_dirs_are_watched_until_the_old_one_is_removed(node):
    uid = add_pod(node.pods, APP)
    cm = vol_dir(node.pods, uid, "kubernetes.io~configmap", "app-config")
    idx = node.index()
    idx.scan_all()
    old_ts = os.path.join(cm, os.readlink(os.path.join(cm, "..data")))
    keep = os.path.join(node.pods, "..kept")
    shutil.copytree(old_ts, keep)    # write_payload removes the old dir: put it back after
    write_payload(cm, {"app.yaml": b"a: 2\n", "conf.d/extra.yaml": b"y\n"}, "2026_01_01_00_00_01.2")
    shutil.move(keep, old_ts)
    idx.handle_io()
    assert idx.file_count == 2 + 4   # the secret's 2, both payloads of the ConfigMap
    shutil.rmtree(old_ts)
    idx.handle_io()
    assert idx.file_count == 4


def test_a_new_key_and_a_dropped_key(node):
    uid = add_pod(node.pods, APP)
    cm = vol_dir(node.pods, uid, "kubernetes.io~configmap", "app-config")
    idx = node.index()
    idx.scan_all()
    os.unlink(os.path.join(cm, "conf.d"))
    write_payload(cm, {"app.yaml": b"a\n", "new.yaml": b"n\n"}, "2026_01_01_00_00_01.2")
    idx.handle_io()
    assert {k for v, k in by_key(idx) if v == "app-config"} == {"app.yaml", "new.yaml"}
    assert len(node.watched()) == 4


def test_removed_pod_leaves_no_entry_and_its_ids_still_resolve(node):
    keep = add_pod(node.pods, APP)
    gone = add_pod(node.pods, APP)
    idx = node.index()
    idx.scan_all()
    assert (idx.pod_count, idx.file_count) == (2, 8)
    vol = next(v for v in idx.volumes.values() if v.pod_uid == gone and v.name == "db")
    fid = next(fid for fid in vol.files.values())
    key = idx.files[fid].key
    shutil.rmtree(os.path.join(node.pods, gone))
    assert idx.handle_io() == 4
    assert (idx.pod_count, idx.file_count) == (1, 4)
    assert {v.pod_uid for v in idx.volumes.values()} == {keep}
    assert {vid for vid, _ in node.watched().values()} == {v.id for v in idx.volumes.values()}
    assert len(node.maps["watched_dirs"].d) == 2
    assert vol.path not in idx.by_path and vol.files == {}
    assert idx.resolve(vol.id, fid, ()) == (vol, key)
    assert idx.resolve(vol.id, 0, ("password", "..x")) == (vol, "password")
    shutil.rmtree(os.path.join(node.pods, keep))
    idx.handle_io()
    assert idx.pod_count == 0 and all(not node.maps[m].d for m in ("watched_inodes", "watched_devs",
                                                                    "watched_dirs"))
    # The kernel's filters count nothing any more.
    assert set(node.maps["dev_filter"].d.values()) <= {wire.U32.pack(0)}
    assert set(node.maps["ino_filter"].d.values()) <= {wire.U32.pack(0)}


def test_filters_count_the_watched_inodes_of_each_slot(node):
    add_pod(node.pods, APP)
    add_pod(node.pods, APP)
    idx = node.index()
    idx.scan_all()
    # Files and the volume dirs the kernel walks up to share the inode filter.
    want: dict[int, int] = {}
    for key in [*node.maps["watched_inodes"].d, *node.maps["watched_dirs"].d]:
        slot = wire.INODE_KEY.unpack(key)[2] % wire.INO_FILTER_SLOTS
        want[slot] = want.get(slot, 0) + 1
    got = {wire.U32.unpack(k)[0]: wire.U32.unpack(v)[0] for k, v in node.maps["ino_filter"].d.items()}
    assert {s: n for s, n in got.items() if n} == want
    (dev,) = {v.dev for v in idx.volumes.values()}
    got = {wire.U32.unpack(k)[0]: wire.U32.unpack(v)[0] for k, v in node.maps["dev_filter"].d.items()}
    assert got == {dev % wire.DEV_FILTER_SLOTS: 1}


# -- inode identity --------------------------------------------------------------

def test_a_reused_inode_number_with_a_new_generation_is_a_new_key(node):
    uid = add_pod(node.pods, {("kubernetes.io~secret", "db"): {"password": b"p\n"}})
    path = os.path.join(vol_dir(node.pods, uid, "kubernetes.io~secret", "db"), "..data", "password")
    idx = node.index()
    idx.scan_all()
    dev, gen, ino, _ = node.inodes(path)
    (old_fid,) = idx.files
    # Same (dev, ino), a later generation: another file as far as the kernel is concerned.
    node.inodes.gen[(dev, ino)] = gen + 1
    idx.scan_volume(next(iter(idx.volumes.values())))
    assert set(node.watched()) == {(dev, gen + 1, ino)}
    (new_fid,) = idx.files
    assert new_fid != old_fid and idx.files[new_fid].key == "password"


def test_an_inode_that_changes_its_name_gets_a_new_file_id(node):
    """A key renamed in place (same inode): the entry must name the new key."""
    uid = new_uid()
    vol = vol_dir(node.pods, uid, "kubernetes.io~projected", "plain")
    os.makedirs(vol)
    with open(os.path.join(vol, "a"), "w") as f:
        f.write("x")
    idx = node.index()
    idx.scan_all()
    (fid_a,) = idx.files
    os.rename(os.path.join(vol, "a"), os.path.join(vol, "b"))
    idx.handle_io()
    (fid_b,) = idx.files
    assert fid_b != fid_a and idx.files[fid_b].key == "b"
    (value,) = node.watched().values()
    assert value == (idx.files[fid_b].volume.id, fid_b)
    assert idx.resolve(0, fid_a, ())[1] == "a"       # an old record still says "a"


def test_a_device_without_generations_keys_by_inode_alone(node):
    uid = add_pod(node.pods, APP)
    dev = node.inodes(os.path.join(node.pods, uid))[0]
    node.inodes.no_gen.add(dev)
    idx = node.index()
    idx.scan_all()
    assert {g for _d, g, _i in node.watched()} == {0}
    assert node.maps["watched_devs"].d[wire.U32.pack(dev)] == wire.dev_value(wire.DEV_WALK, 0)


# -- bounds ------------------------------------------------------------------------

def test_a_volume_that_does_not_fit_is_left_out_whole(node):
    first = add_pod(node.pods, {("kubernetes.io~secret", "small"): {"a": b"1", "b": b"2"}})
    idx = node.index(max_files=3)
    idx.scan_all()
    add_pod(node.pods, {("kubernetes.io~configmap", "big"): {"x": b"1", "y": b"2"}})
    idx.scan_all()
    vols = {v.name: v for v in idx.volumes.values()}
    assert vols["big"].over_capacity and idx.over_capacity == {vols["big"].id}
    assert idx.capacity_exceeded == 1
    # None of its files went in (all or nothing), the other volume is untouched ...
    assert {vid for vid, _ in node.watched().values()} == {vols["small"].id}
    assert idx.file_count == 2
    # ... and its dir is still watched, so its opens are seen by name.
    assert vols["big"].dir_key in node.maps["watched_dirs"].d
    # Rescans do not count it again.
    idx.scan_all()
    assert idx.capacity_exceeded == 1
    # Room again: it is indexed on the next scan.
    shutil.rmtree(os.path.join(node.pods, first))
    idx.scan_all()
    assert not vols["big"].over_capacity and idx.over_capacity == set()
    assert {k for _v, k in by_key(idx)} == {"x", "y"}


def test_a_full_kernel_map_fails_that_volume_only(node):
    maps = {name: FakeMap(name, node.ops) for name in MAP_NAMES}
    maps["watched_inodes"].max_entries = 3
    add_pod(node.pods, {("kubernetes.io~secret", "small"): {"a": b"1", "b": b"2"}})
    idx = node.index(maps=maps)
    idx.scan_all()
    add_pod(node.pods, {("kubernetes.io~configmap", "big"): {"x": b"1", "y": b"2"}})
    idx.scan_all()
    big = next(v for v in idx.volumes.values() if v.name == "big")
    assert big.over_capacity and idx.capacity_exceeded == 1
    assert len(maps["watched_inodes"].d) == 2 and big.files == {}
    # The filter counts exactly what the maps hold (a refused entry is rolled back).
    counted = sum(wire.U32.unpack(v)[0] for v in maps["ino_filter"].d.values())
    assert counted == len(maps["watched_inodes"].d) + len(maps["watched_dirs"].d)


def test_without_maps_the_index_only_counts(node):
    add_pod(node.pods, APP)
    idx = node.index(maps=None, max_files=1)   # `tapio-node check`: no kernel, no bound
    assert idx.scan_all() == 4 and idx.file_count == 4
    assert node.ops == []


# -- what is not a pod, and a pods dir that comes later --------------------------------

def test_names_that_are_not_pods_or_volumes_are_skipped(node, caplog):
    uid = add_pod(node.pods, APP)
    os.makedirs(os.path.join(node.pods, "not-a-uid", "volumes", "kubernetes.io~secret", "s"))
    bad = vol_dir(node.pods, uid, "kubernetes.io~secret", "Not_A_Label")
    write_payload(bad, {"k": b"v"}, "2026_01_01_00_00_00.1")
    target = os.path.join(node.pods, "elsewhere")
    write_payload(target, {"k": b"v"}, "2026_01_01_00_00_00.1")
    os.symlink(target, vol_dir(node.pods, uid, "kubernetes.io~secret", "linked"))
    idx = node.index()
    caplog.set_level("WARNING", logger="tapio_node.volumes")
    idx.scan_all()
    idx.scan_all()
    assert {v.name for v in idx.volumes.values()} == {"app-config", "db"}
    text = caplog.text
    assert "not a pod UID" in text and "not a DNS-1123 label" in text
    assert text.count("not-a-uid") == 1     # one warning, not one per scan


def test_pods_dir_created_after_start(node):
    shutil.rmtree(node.pods)
    idx = node.index()
    assert idx.scan_all() == 0 and not idx.root_present
    os.makedirs(node.pods)
    add_pod(node.pods, APP)
    assert idx.scan_all() == 4 and idx.root_present
    # Now watched: a new pod arrives through inotify.
    add_pod(node.pods, APP)
    for _ in range(5):
        idx.handle_io()
    assert idx.pod_count == 2 and idx.file_count == 8
    # The whole dir goes away: every volume with it.
    shutil.rmtree(node.pods)
    idx.handle_io()
    assert idx.pod_count == 0 and not node.maps["watched_inodes"].d


def test_inotify_overflow_is_a_full_resync(node, monkeypatch):
    add_pod(node.pods, APP)
    idx = node.index()
    idx.scan_all()
    add_pod(node.pods, APP)

    class Overflow:
        mask, wd, name = volumes.IN.Q_OVERFLOW, -1, ""
    monkeypatch.setattr(idx.inotify, "read", lambda timeout=0: [Overflow()])
    assert idx.handle_io() == 4
    assert idx.overflows == 1 and idx.pod_count == 2


# -- volumes named by another collector -----------------------------------------------

def test_add_mount_watches_a_dir_named_by_another_collector(node, tmp_path):
    outside = str(tmp_path / "mnt" / "certs")
    write_payload(outside, {"tls.key": b"k"}, "2026_01_01_00_00_00.1")
    idx = node.index()
    vol = idx.add_mount(outside, "secret", "web-tls", "prod", pod_uid="")
    assert (vol.kind, vol.name, vol.config_name, vol.namespace) == ("secret", "certs", "web-tls", "prod")
    assert {wf.key for wf in idx.files.values()} == {"tls.key"}
    # The same dir again updates what we were told, not a second volume.
    again = idx.add_mount(outside, "secret", "web-tls-2", "prod2")
    assert again is vol and (vol.config_name, vol.namespace) == ("web-tls-2", "prod2")
    assert len(idx.volumes) == 1
    # A kubelet volume path is parsed for its pod and volume.
    uid = add_pod(node.pods, {("kubernetes.io~secret", "db"): {"password": b"p"}})
    kv = idx.add_mount(vol_dir(node.pods, uid, "kubernetes.io~secret", "db"), "secret", "db-credentials", "shop")
    assert (kv.pod_uid, kv.plugin, kv.name, kv.config_name) == (uid, "kubernetes.io~secret", "db", "db-credentials")
    # A scan of the pods dir keeps a volume someone told us about.
    idx.scan_all()
    assert vol.id in idx.volumes
    with pytest.raises(FileNotFoundError):
        idx.add_mount(str(tmp_path / "absent"), "secret", "x", None)


def test_mount_info_validation(tmp_path):
    ok = MountInfo(name="web-tls", namespace="prod", mount_path=str(tmp_path), is_secret=True,
                   pod_uid=str(uuid.uuid4()))
    ok.validate()
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    for bad, word in [(dict(name="Web_TLS"), "name"), (dict(namespace="Prod"), "namespace"),
                      (dict(mount_path="rel/path"), "absolute"), (dict(mount_path=str(tmp_path / "no")), "directory"),
                      (dict(mount_path=str(link)), "directory"), (dict(pod_uid="xyz"), "pod UID")]:
        fields = {"name": "web-tls", "namespace": "prod", "mount_path": str(tmp_path), **bad}
        with pytest.raises(ValueError, match=word):
            MountInfo(**fields).validate()
