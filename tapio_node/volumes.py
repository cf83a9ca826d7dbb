"""Every file of every watched kubelet volume, kept in the BPF maps.

The kernel matches an open by the inode of the file it opened, so user
space keeps `watched_inodes` filled with (dev, generation, ino) of each
payload file, names the user-visible key of each, and follows the kubelet
with inotify: new pods and volumes, atomic-writer updates (new entries are
added before old ones are removed), teardown. Files the kernel sees before
we index them are still caught: a per-volume tmpfs matches by device, a
volume dir on the shared disk by parent walk (`watched_devs`,
`watched_dirs`), and the record carries the names to derive the key.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import msgspec

from inotify_simple import INotify, flags as IN

from tapio_node import host, k8snames, kpath
from tapio_node.kernel import wire

log = logging.getLogger("tapio_node.volumes")

DIR_MASK = (IN.CREATE | IN.DELETE | IN.MOVED_FROM | IN.MOVED_TO | IN.DELETE_SELF
            | IN.MOVE_SELF | IN.ONLYDIR | IN.DONT_FOLLOW)
VOLUME_MASK = DIR_MASK | IN.CLOSE_WRITE | IN.ATTRIB
MAX_KEY_DEPTH = 8
# Files removed from the maps stay resolvable this long, for records
# already in the ring buffer.
GRAVE_SECONDS = 30.0
# What a full BPF hash map answers to an update of a new key.
MAP_FULL_ERRNOS = (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


class MapFull(Exception):
    """A watch map has no room for a volume's entries."""


class MountInfo(msgspec.Struct, frozen=True):
    """A ConfigMap/Secret mount named by another collector (the collector
    API's MountInfo): its host dir is watched like a kubelet volume."""
    name: str
    namespace: str | None
    mount_path: str
    is_secret: bool = False
    pod_uid: str | None = None

    def validate(self) -> None:
        if not k8snames.valid_subdomain(self.name):
            raise ValueError(f"MountInfo.name {self.name!r}: expected a DNS-1123 subdomain "
                             "(a ConfigMap/Secret name)")
        if self.namespace is not None and not k8snames.valid_label(self.namespace):
            raise ValueError(f"MountInfo.namespace {self.namespace!r}: expected a DNS-1123 label")
        if not os.path.isabs(self.mount_path):
            raise ValueError(f"MountInfo.mount_path {self.mount_path!r}: expected an absolute path")
        if not os.path.isdir(self.mount_path) or os.path.islink(self.mount_path):
            raise ValueError(f"MountInfo.mount_path {self.mount_path!r}: not a directory")
        if self.pod_uid is not None and not k8snames.valid_pod_uid(self.pod_uid):
            raise ValueError(f"MountInfo.pod_uid {self.pod_uid!r}: expected a pod UID")


@dataclass(eq=False, slots=True)
class Volume:
    id: int
    pod_uid: str
    plugin: str
    kind: str               # configmap | secret | projected
    name: str
    path: str
    namespace: str | None = None  # known only for add_mount_info volumes
    config_name: str | None = None  # ConfigMap/Secret name, when told (add_mount_info)
    dev: int = 0
    whole_dev: bool = False
    dir_key: bytes | None = None
    files: dict[bytes, int] = field(default_factory=dict)   # inode key -> file id
    wds: set[int] = field(default_factory=set)
    over_capacity: bool = False  # its files did not fit in watched_inodes


@dataclass(eq=False, slots=True)
class WatchedFile:
    id: int
    volume: Volume
    key: str


class VolumeIndex:
    def __init__(self, pods_path: str, plugins: dict[str, str], maps=None,
                 stat_inode_key=None, max_files: int | None = None):
        """plugins: kubelet plugin dir name -> kind; maps: the Kernel's
        maps dict (None: index only, e.g. for `tapio-node check`);
        max_files: entries of watched_inodes (max_watched_files);
        stat_inode_key: path -> (dev, gen, ino, mode), by default
        _fast.stat_inode_key."""
        if stat_inode_key is None:
            from tapio_node._fast import stat_inode_key
        self._stat_inode_key = stat_inode_key
        self.pods_path = pods_path.rstrip("/") or "/"
        self.plugins = plugins
        self.maps = maps
        self.volumes: dict[int, Volume] = {}
        self.by_path: dict[str, Volume] = {}
        self.files: dict[int, WatchedFile] = {}
        self._grave: dict[int, tuple[float, object]] = {}
        self._next_volume = 1
        self._next_file = 1
        self._dev_use_gen: dict[int, bool] = {}
        self._walk_devs: dict[int, set[int]] = {}     # shared dev -> volume ids
        self._wd: dict[int, tuple] = {}
        self._present: dict[str, set[bytes]] = {}
        self._filter_counts: dict[str, dict[int, int]] = {}
        self._skipped: set[str] = set()
        self.inotify = INotify()
        self.overflows = 0
        self.root_present = False
        self.max_files = max_files
        # Times a volume could not be watched for lack of map room, and
        # the volumes in that state now (/healthz degraded).
        self.capacity_exceeded = 0
        self._volumes_of_pod: dict[str, int] = {}
        self.over_capacity: set[int] = set()
        # kind -> protected by the enforcement policy (Enforcer.protects).
        self.protects = lambda kind: False

    # -- bookkeeping -------------------------------------------------------
    def _skip(self, path: str, why: str) -> None:
        if path not in self._skipped:
            self._skipped.add(path)
            log.warning("skipping %s: %s", path, why)

    def _watch(self, path: str, mask: int, tag: tuple) -> None:
        try:
            wd = self.inotify.add_watch(path, mask)
        except OSError as exc:
            log.debug("cannot watch %s: %s", path, exc)
            return
        self._wd[wd] = tag
        if tag[0] == "volume":
            vol = self.volumes.get(tag[1])
            if vol is not None:
                vol.wds.add(wd)

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def pod_count(self) -> int:
        # len() of a dict kept up to date: the HTTP thread reads this while
        # the loop adds and removes volumes (iterating them there would race).
        return len(self._volumes_of_pod)

    # -- kernel maps -------------------------------------------------------
    def _key_bytes(self, dev: int, gen: int | None, ino: int) -> bytes:
        use_gen = self._dev_use_gen.setdefault(dev, gen is not None)
        return wire.pack_inode_key(dev, gen if use_gen and gen is not None else 0, ino)

    def _dev_flags(self, dev: int) -> int:
        return wire.DEV_USE_GEN if self._dev_use_gen.get(dev) else 0

    def _map_put(self, name: str, key: bytes, value: bytes) -> None:
        if self.maps is None:
            return
        present = self._present.setdefault(name, set())
        new = key not in present
        if new:
            # Filter first, so the kernel never misses an entry it has.
            self._filter(name, key, +1)
            present.add(key)
        try:
            self.maps[name].update(key, value)
        except OSError as exc:
            if new:
                present.discard(key)
                self._filter(name, key, -1)
            if exc.errno in MAP_FULL_ERRNOS:
                raise MapFull(f"{name} is full") from exc
            raise

    def _map_del(self, name: str, key: bytes) -> None:
        if self.maps is None:
            return
        self.maps[name].delete(key)
        present = self._present.get(name)
        if present is not None and key in present:
            present.discard(key)
            self._filter(name, key, -1)

    def _filter(self, name: str, key: bytes, delta: int) -> None:
        """Keep the kernel's filter arrays (dev_filter, ino_filter) counting
        the watched devices and inodes that fall in each slot."""
        if name == "watched_devs":
            fmap, slot = "dev_filter", wire.U32.unpack(key)[0] % wire.DEV_FILTER_SLOTS
        else:
            fmap, slot = "ino_filter", wire.INODE_KEY.unpack(key)[2] % wire.INO_FILTER_SLOTS
        if fmap not in self.maps:
            return
        counts = self._filter_counts.setdefault(fmap, {})
        n = counts.get(slot, 0) + delta
        if n > 0:
            counts[slot] = n
        else:
            counts.pop(slot, None)
            n = 0
        self.maps[fmap].update(wire.U32.pack(slot), wire.U32.pack(n))

    def _put_policy(self, vol: Volume) -> None:
        """The volume's owner and protection, before any of its entries:
        the kernel never matches a file of a volume it has no policy for."""
        if self.maps is None or "volume_policy" not in self.maps:
            return
        protected = bool(vol.pod_uid) and self.protects(vol.kind)
        try:
            self.maps["volume_policy"].update(wire.U32.pack(vol.id),
                                              wire.volume_policy_value(vol.pod_uid, protected))
        except OSError as exc:
            if exc.errno in MAP_FULL_ERRNOS:
                raise MapFull("volume_policy is full") from exc
            raise

    def refresh_policy(self) -> None:
        """enforcement.kinds changed: rewrite every volume's protection."""
        for vol in list(self.volumes.values()):
            if vol.dev:
                self._put_policy(vol)

    def _attach_dev(self, vol: Volume) -> None:
        self._put_policy(vol)
        if vol.whole_dev:
            self._map_put("watched_devs", wire.U32.pack(vol.dev),
                          wire.dev_value(wire.DEV_WHOLE | self._dev_flags(vol.dev), vol.id))
        else:
            users = self._walk_devs.setdefault(vol.dev, set())
            if not users:
                self._map_put("watched_devs", wire.U32.pack(vol.dev),
                              wire.dev_value(wire.DEV_WALK | self._dev_flags(vol.dev), 0))
            users.add(vol.id)
            if vol.dir_key is not None:
                self._map_put("watched_dirs", vol.dir_key, wire.U32.pack(vol.id))

    def _detach_dev(self, vol: Volume) -> None:
        if vol.whole_dev:
            self._map_del("watched_devs", wire.U32.pack(vol.dev))
        else:
            if vol.dir_key is not None:
                self._map_del("watched_dirs", vol.dir_key)
            users = self._walk_devs.get(vol.dev)
            if users is not None:
                users.discard(vol.id)
                if not users:
                    del self._walk_devs[vol.dev]
                    self._map_del("watched_devs", wire.U32.pack(vol.dev))

    # -- scanning ----------------------------------------------------------
    def scan_all(self, progress=None) -> int:
        """Index every pod (initial scan and full resync); returns the
        number of map entries that had to change."""
        changes = 0
        try:
            st = os.lstat(self.pods_path)
        except FileNotFoundError:
            if self.root_present or not self._skipped:
                log.warning("kubelet pods dir %s does not exist yet; waiting for it", self.pods_path)
            self.root_present = False
            self._skipped.add(self.pods_path)
            for vol in list(self.volumes.values()):
                changes += self._remove_volume(vol)
            return changes
        if not stat.S_ISDIR(st.st_mode):
            self._skip(self.pods_path, "not a directory")
            return 0
        if not self.root_present:
            self._watch(self.pods_path, DIR_MASK, ("root",))
            self.root_present = True
        uids = self._list_dirs(self.pods_path)
        seen = {uid for uid in uids if k8snames.valid_pod_uid(uid)}
        # Gone pods first: the room they free is there for the volumes
        # scanned below (one waiting for room would wait a resync more).
        for vol in list(self.volumes.values()):
            if vol.pod_uid not in seen and vol.path.startswith(self.pods_path + "/"):
                changes += self._remove_volume(vol)
        for n, uid in enumerate(uids):
            if uid not in seen:
                self._skip(os.path.join(self.pods_path, uid), "not a pod UID")
                continue
            changes += self.scan_pod(uid)
            if progress is not None and (n % 100 == 99 or n == len(uids) - 1):
                progress(n + 1, len(uids), len(self.files))
        return changes

    def _list_dirs(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except PermissionError as exc:
            self._skip(path, f"permission denied ({exc.strerror})")
            return []

    def scan_pod(self, uid: str) -> int:
        pod_dir = os.path.join(self.pods_path, uid)
        changes = 0
        self._watch(pod_dir, DIR_MASK, ("pod", uid))
        vols_dir = os.path.join(pod_dir, "volumes")
        present = set()
        if os.path.isdir(vols_dir) and not os.path.islink(vols_dir):
            self._watch(vols_dir, DIR_MASK, ("pod", uid))
            for plugin in self._list_dirs(vols_dir):
                kind = self.plugins.get(plugin)
                if kind is None:
                    continue
                plugin_dir = os.path.join(vols_dir, plugin)
                self._watch(plugin_dir, DIR_MASK, ("pod", uid))
                for name in self._list_dirs(plugin_dir):
                    path = os.path.join(plugin_dir, name)
                    if not k8snames.valid_label(name):
                        self._skip(path, "volume name is not a DNS-1123 label")
                        continue
                    present.add(path)
                    vol = self.by_path.get(path)
                    if vol is None:
                        vol = self._new_volume(uid, plugin, kind, name, path)
                    changes += self.scan_volume(vol)
        for vol in [v for v in self.volumes.values() if v.pod_uid == uid]:
            if vol.path not in present and vol.path.startswith(pod_dir + "/"):
                changes += self._remove_volume(vol)
        return changes

    def _new_volume(self, uid, plugin, kind, name, path, namespace=None) -> Volume:
        vol = Volume(self._next_volume, uid, plugin, kind, name, path, namespace)
        self._next_volume += 1
        self.volumes[vol.id] = vol
        self._volumes_of_pod[vol.pod_uid] = self._volumes_of_pod.get(vol.pod_uid, 0) + 1
        self.by_path[path] = vol
        return vol

    def scan_volume(self, vol: Volume) -> int:
        """Bring one volume's map entries in line with the disk; new files
        go in before gone ones come out."""
        try:
            st = os.lstat(vol.path)
            parent = os.lstat(os.path.dirname(vol.path))
        except FileNotFoundError:
            return self._remove_volume(vol)
        if not stat.S_ISDIR(st.st_mode):
            self._skip(vol.path, "volume is not a directory (symlink?)")
            return self._remove_volume(vol)
        try:
            dev, gen, ino, _mode = self._stat_inode_key(vol.path)
        except OSError:
            return self._remove_volume(vol)
        whole = st.st_dev != parent.st_dev
        dir_key = self._key_bytes(dev, gen, ino)
        if (dev, whole, dir_key) != (vol.dev, vol.whole_dev, vol.dir_key):
            if vol.dev:
                self._detach_dev(vol)
            vol.dev, vol.whole_dev, vol.dir_key = dev, whole, dir_key
            try:
                self._attach_dev(vol)
            except MapFull as exc:
                self._detach_dev(vol)  # undo a half attach; try again on the next scan
                vol.dev, vol.dir_key = 0, None
                return self._over_capacity(vol, str(exc))
            # The path may now be a new inode (tmpfs mounted over it).
            self._watch(vol.path, VOLUME_MASK, ("volume", vol.id))

        found: dict[bytes, str] = {}
        self._collect(vol, found)
        try:
            changes = self._sync_files(vol, found)
        except MapFull as exc:
            return self._over_capacity(vol, str(exc), len(found))
        if vol.over_capacity:
            vol.over_capacity = False
            self.over_capacity.discard(vol.id)
            log.warning("volume %s: all %d files watched again", vol.path, len(found))
        return changes

    def _room_for(self, vol: Volume, found: dict[bytes, str]) -> bool:
        """Whether a volume's new files fit next to everyone's (checked
        first, so a volume goes in whole or not at all)."""
        if self.max_files is None or self.maps is None:
            return True
        present = self._present.get("watched_inodes", ())
        new = sum(1 for k in found if k not in present)
        return len(present) + new <= self.max_files

    def _over_capacity(self, vol: Volume, why: str, files: int | None = None) -> int:
        """Fail this volume alone: its inode entries out (its device or dir
        entry stays, so its opens are still seen, keyed by file name), a
        warning, a count; the other volumes are not touched."""
        changes = 0
        for key_bytes, fid in list(vol.files.items()):
            self._map_del("watched_inodes", key_bytes)
            self._drop_file(fid)
            changes += 1
        vol.files.clear()
        if not vol.over_capacity:
            vol.over_capacity = True
            self.over_capacity.add(vol.id)
            self.capacity_exceeded += 1
            size = f"{files} files" if files is not None else "its entries"
            log.warning("volume %s: %s do not fit (%s; max_watched_files=%s, %d in use): "
                        "not indexed, its opens are matched by %s only; raise "
                        "kernel_collector.max_watched_files", vol.path, size, why,
                        self.max_files, self.file_count,
                        "device" if vol.whole_dev else "directory" if vol.dev else "nothing")
        return changes

    def _sync_files(self, vol: Volume, found: dict[bytes, str]) -> int:
        if not self._room_for(vol, found):
            raise MapFull("watched_inodes has no room")
        changes = 0
        for key_bytes, key in found.items():
            fid = vol.files.get(key_bytes)
            if fid is not None and self.files[fid].key == key:
                continue
            if fid is not None:
                self._drop_file(fid)
            fid = self._next_file
            self._next_file += 1
            self.files[fid] = WatchedFile(fid, vol, key)
            vol.files[key_bytes] = fid
            try:
                self._map_put("watched_inodes", key_bytes, wire.watch_value(vol.id, fid))
            except MapFull:
                vol.files.pop(key_bytes)
                self._drop_file(fid)
                raise
            changes += 1
        for key_bytes in [k for k in vol.files if k not in found]:
            fid = vol.files.pop(key_bytes)
            self._map_del("watched_inodes", key_bytes)
            self._drop_file(fid)
            changes += 1
        return changes

    def _drop_file(self, fid: int) -> None:
        wf = self.files.pop(fid, None)
        if wf is not None:
            self._grave[fid] = (time.monotonic(), wf)

    def _collect(self, vol: Volume, found: dict[bytes, str]) -> None:
        try:
            with os.scandir(vol.path) as it:
                entries = list(it)
        except OSError:
            return
        payload = [e for e in entries if e.name.startswith("..")
                   and e.name not in ("..data", "..data_tmp") and e.is_dir(follow_symlinks=False)]
        if payload or any(e.name == "..data" for e in entries):
            # Atomic-writer layout: the keys are the payload dirs' files
            # (every payload dir: the old one lives until the writer drops it).
            for e in payload:
                self._walk(vol, e.path, "", found, 0)
        else:
            for e in entries:
                if e.name.startswith(".."):
                    continue
                self._entry(vol, e, "", found, 0)

    def _walk(self, vol: Volume, path: str, rel: str, found, depth: int) -> None:
        self._watch(path, VOLUME_MASK, ("volume", vol.id))
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            return
        for e in entries:
            self._entry(vol, e, rel, found, depth)

    def _entry(self, vol, e, rel, found, depth) -> None:
        key = f"{rel}/{e.name}" if rel else e.name
        try:
            if e.is_dir(follow_symlinks=False):
                if depth < MAX_KEY_DEPTH:
                    self._walk(vol, e.path, key, found, depth + 1)
                return
            if not e.is_file(follow_symlinks=False):
                return  # key symlinks point into ..data; the target is indexed
            dev, gen, ino, _mode = self._stat_inode_key(e.path)
        except OSError:
            return
        found[self._key_bytes(dev, gen, ino)] = key

    def _remove_volume(self, vol: Volume) -> int:
        if self.volumes.pop(vol.id, None) is None:
            return 0
        left = self._volumes_of_pod.pop(vol.pod_uid, 1) - 1
        if left:
            self._volumes_of_pod[vol.pod_uid] = left
        self.over_capacity.discard(vol.id)
        self.by_path.pop(vol.path, None)
        changes = 0
        for key_bytes, fid in vol.files.items():
            self._map_del("watched_inodes", key_bytes)
            self._drop_file(fid)
            changes += 1
        vol.files.clear()
        if vol.dev:
            self._detach_dev(vol)
        if self.maps is not None and "volume_policy" in self.maps:
            self.maps["volume_policy"].delete(wire.U32.pack(vol.id))
        self._grave[-vol.id] = (time.monotonic(), vol)
        for wd in vol.wds:
            self._wd.pop(wd, None)
            try:
                self.inotify.rm_watch(wd)
            except OSError:
                pass
        vol.wds.clear()
        return changes

    def add_mount(self, path: str, kind: str, name: str, namespace: str | None,
                  pod_uid: str = "") -> Volume:
        """Watch a volume dir named by another collector (add_mount_info)."""
        path = os.path.realpath(path)
        vol = self.by_path.get(path)
        if vol is None:
            parsed = kpath.parse_volume_path(path, self.pods_path)
            uid = parsed[0] if parsed else pod_uid
            vol = self._new_volume(uid, parsed[1] if parsed else "", kind,
                                   parsed[2] if parsed else os.path.basename(path), path, namespace)
        else:
            vol.namespace = namespace
        vol.config_name = name
        self.scan_volume(vol)
        if vol.id not in self.volumes:
            raise FileNotFoundError(f"mount path {path} is not a directory")
        return vol

    # -- inotify -----------------------------------------------------------
    def fileno(self) -> int:
        return self.inotify.fileno()

    def handle_io(self) -> int:
        """Apply pending inotify events; returns map entries changed."""
        dirty_vols: set[int] = set()
        dirty_pods: set[str] = set()
        rescan_root = False
        for ev in self.inotify.read(timeout=0):
            if ev.mask & IN.Q_OVERFLOW:
                self.overflows += 1
                log.warning("inotify queue overflowed; full resync")
                return self.scan_all()
            tag = self._wd.get(ev.wd)
            if ev.mask & IN.IGNORED:
                self._wd.pop(ev.wd, None)
            if tag is None:
                continue
            if tag[0] == "root":
                if ev.mask & (IN.DELETE_SELF | IN.MOVE_SELF):
                    rescan_root = True
                elif ev.name and k8snames.valid_pod_uid(ev.name):
                    dirty_pods.add(ev.name)
                elif ev.name:
                    self._skip(os.path.join(self.pods_path, ev.name), "not a pod UID")
            elif tag[0] == "pod":
                dirty_pods.add(tag[1])
            elif tag[0] == "volume":
                dirty_vols.add(tag[1])
        changes = 0
        if rescan_root:
            self.root_present = False
            return self.scan_all()
        for uid in dirty_pods:
            changes += self.scan_pod(uid)
        for vid in dirty_vols:
            vol = self.volumes.get(vid)
            if vol is not None:
                changes += self.scan_volume(vol)
        return changes

    def mounts_changed(self) -> int:
        """A mount came or went (e.g. the kubelet mounted a secret tmpfs)."""
        changes = 0
        for vol in list(self.volumes.values()):
            try:
                dev = os.lstat(vol.path).st_dev
            except FileNotFoundError:
                changes += self._remove_volume(vol)
                continue
            if host.kernel_dev(dev) != vol.dev:
                changes += self.scan_volume(vol)
        return changes

    # -- resolution --------------------------------------------------------
    def resolve(self, volume_id: int, file_id: int, dnames) -> tuple[Volume, str] | None:
        if file_id:
            wf = self.files.get(file_id)
            if wf is None:
                grave = self._grave.get(file_id)
                wf = grave[1] if grave else None
            return (wf.volume, wf.key) if wf is not None else None
        vol = self.volumes.get(volume_id)
        if vol is None:
            grave = self._grave.get(-volume_id)
            vol = grave[1] if grave else None
        if vol is None:
            return None
        key = kpath.key_from_dnames(dnames) if dnames else None
        return vol, key or ""

    def prune_graveyard(self) -> None:
        cutoff = time.monotonic() - GRAVE_SECONDS
        for k in [k for k, (t, _) in self._grave.items() if t < cutoff]:
            del self._grave[k]

    def close(self) -> None:
        self.inotify.close()
