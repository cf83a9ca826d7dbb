"""The cgroup tree under cgroup_root, walked and kept current with inotify:
which dir is which pod or container cgroup, and its cgroup id (the inode
number of a cgroup v2 dir, what the kernel programs read with
bpf_get_current_cgroup_id()). Symlinks are never followed."""

from __future__ import annotations

import errno
import os
from typing import Callable

from inotify_simple import flags as F

from tapio_node.pods.cgroupnames import OTHER, POD_KINDS, CgroupRef, classify, known_non_pod
from tapio_node.host import cgroup2_mounts, is_real_dir, stat_is_dir
from tapio_node.pods.oddnames import OddNames
from tapio_node.pods.watch import Watches

# How deep to look for a kubepods tree below cgroup_root (it can sit under
# e.g. kubelet.slice/kubelet-kubepods.slice when --cgroup-root is set), and
# units that never hold one.
_SEARCH_DEPTH = 3
_LEAF_UNITS = (".service", ".scope", ".mount", ".socket", ".swap", ".device")
# Containers may nest cgroups (systemd or docker inside); bound the depth.
_MAX_DEPTH = 32


class CgroupTree:
    """Reports each pod/container cgroup dir found with
    found(cgroup_id, path, ref, created_at) and each one gone with
    gone(cgroup_id, path)."""

    def __init__(self, cgroup_root: str, watches: Watches, odd: OddNames, *,
                 found: Callable[[int, str, CgroupRef, int], None],
                 gone: Callable[[int, str], None]) -> None:
        self.root = cgroup_root
        self._watches = watches
        self._odd = odd
        self._found = found
        self._gone = gone
        # The cgroup v2 mount that holds the root (/proc/<pid>/cgroup
        # paths are relative to it).
        mounts = [m for m in cgroup2_mounts()
                  if self.root == m or self.root.startswith(m.rstrip("/") + "/")]
        self._mount = max(mounts, key=len) if mounts else self.root
        # The root may itself be inside the tree (e.g. .../kubepods.slice):
        # its children are named after it.
        self._root_ref = OTHER
        if self._mount != self.root:
            for name in self.root[len(self._mount):].split("/"):
                if name:
                    self._root_ref = classify(self._root_ref, name) or OTHER
        self._dirs: dict[str, CgroupRef] = {}   # every dir walked under the root
        self._dir_id: dict[str, int] = {}
        self._ok = False                        # the root exists and is watched

    def attach(self) -> None:
        """Watch the root, or wait for it to appear."""
        if not self._ok and self._watches.attach(self.root):
            self._ok = True
            self._dirs[self.root] = self._root_ref

    def rescan(self) -> int:
        """Walk the whole tree; the number of dirs found changed or gone."""
        fixed = 0
        seen: set[str] = set()
        if self._ok:
            if not is_real_dir(self.root):
                self._ok = False
            else:
                seen.add(self.root)
                self._watches.watch(self.root)
                fixed += self._walk(self.root, self._root_ref, 0, seen)
        for path in [p for p in self._dirs if p not in seen]:
            if path in self._dirs:
                fixed += 1
                self._forget(path)
        if self._ok and self.root not in self._dirs:
            self._dirs[self.root] = self._root_ref
        return fixed

    def event(self, parent: str, ev) -> None:
        """One inotify event on a watched dir of the tree."""
        if ev.mask & (F.DELETE_SELF | F.MOVE_SELF):
            if parent == self.root:
                self._ok = False
                self._forget(self.root)
                self._watches.wait_for(self.root)
            return
        name = ev.name
        if not name:
            return
        path = parent + "/" + name
        if ev.mask & (F.DELETE | F.MOVED_FROM):
            self._forget(path)
        elif ev.mask & F.ISDIR:
            ref = self._dirs.get(parent)
            if ref is not None:
                self._add_dir(parent, ref, name, _depth(self.root, parent) + 1, None)

    def ensure_proc_path(self, path: str) -> int | None:
        """Register the dirs down to the cgroup of a /proc/<pid>/cgroup path;
        its cgroup id when it is a pod/container cgroup under the root."""
        full = os.path.normpath(self._mount + ("" if path == "/" else path))
        if full != self.root and not full.startswith(self.root + "/"):
            return None
        parts = [p for p in full[len(self.root):].split("/") if p]
        if not is_real_dir(self.root):
            return None
        self._ok = True
        self._dirs.setdefault(self.root, self._root_ref)
        self._watches.watch(self.root)
        path = self.root
        for depth, name in enumerate(parts, 1):
            nxt = path + "/" + name
            if nxt not in self._dirs:
                self._add_dir(path, self._dirs[path], name, depth, None)
                if nxt not in self._dirs:
                    return None
            path = nxt
        if self._dirs[path].kind not in POD_KINDS:
            return None
        return self._dir_id[path]

    # ---------------------------------------------------------- internals

    def _walk(self, path: str, ref: CgroupRef, depth: int, seen: set[str] | None) -> int:
        """Register the children of `path` (already registered), recursively."""
        fixed = 0
        try:
            it = os.scandir(path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._odd.skip(f"unreadable cgroup dir ({e.strerror})", path)
            return 0
        with it:
            entries = list(it)
        for ent in entries:
            fixed += self._add_dir(path, ref, ent.name, depth + 1, seen, ent)
        return fixed

    def _add_dir(self, parent: str, pref: CgroupRef, name: str, depth: int,
                 seen: set[str] | None, ent: os.DirEntry | None = None) -> int:
        path = parent + "/" + name
        try:
            if ent is not None:
                if not ent.is_dir(follow_symlinks=False):
                    if ent.is_symlink() and pref.kind != "other":
                        self._odd.skip("symlink in the cgroup tree", path)
                    return 0
                st = ent.stat(follow_symlinks=False)
            else:
                st = os.stat(path, follow_symlinks=False)
                if not stat_is_dir(st):
                    return 0
        except OSError:
            return 0
        if depth > _MAX_DEPTH:
            self._odd.skip("cgroup nested too deep", path)
            return 0
        ref = classify(pref, name)
        if ref is None:
            if not known_non_pod(pref, name):
                self._odd.skip("cgroup dir with an unexpected name", path)
            return 0
        if ref.kind == "other" and (depth >= _SEARCH_DEPTH or name.endswith(_LEAF_UNITS)):
            return 0
        if seen is not None:
            seen.add(path)
        fixed = 0
        old = self._dirs.get(path)
        if old != ref or self._dir_id.get(path) != st.st_ino:
            if old is not None:
                self._forget(path)
            fixed = 1
            self._dirs[path] = ref
            self._dir_id[path] = st.st_ino
            if ref.kind in POD_KINDS:
                self._found(st.st_ino, path, ref, int(st.st_ctime))
        # Watch before listing, so a child made in between is not lost.
        self._watches.watch(path)
        return fixed + self._walk(path, ref, depth, seen)

    def _forget(self, path: str) -> None:
        """Drop `path` and every dir below it."""
        prefix = path + "/"
        for p in [p for p in self._dirs if p == path or p.startswith(prefix)]:
            self._dirs.pop(p, None)
            cgid = self._dir_id.pop(p, None)
            self._watches.unwatch(p)
            if cgid is not None:
                self._gone(cgid, p)


def _depth(root: str, path: str) -> int:
    return 0 if path == root else path[len(root):].count("/")
