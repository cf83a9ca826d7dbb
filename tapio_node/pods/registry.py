"""PodRegistry: cgroup id -> pod and container, and a pod's namespace and
name, kept current with inotify and mirrored into the BPF maps.

It composes the parts: the cgroup tree (tree.CgroupTree), the pod names
(names.PodNames, with the service-account fallback from kubelet), the map
mirror (mirror.MapMirror) and kubelet recognition, on one inotify instance
(watch.Watches). Everything read from disk is validated; symlinks are never
followed below the roots.
"""

from __future__ import annotations

import logging
import os
import threading

import msgspec

from tapio_node.pods.cgroupnames import CgroupRef
from tapio_node.host import cgroup2_root, cgroup_v2_path, proc_cgroup
from tapio_node.pods.info import HOST, KUBELET, Accessor, PodInfo
from tapio_node.pods.kubelet import KubeletRecognizer, ServiceAccountVolumes
from tapio_node.pods.mirror import MapMirror
from tapio_node.pods.names import PodNames
from tapio_node.pods.oddnames import OddNames
from tapio_node.pods.tree import CgroupTree
from tapio_node.pods.watch import Watches


class _Cg(msgspec.Struct):
    path: str | None        # None: added through add_pod_info
    ref: CgroupRef
    created_at: int
    external: PodInfo | None = None


class PodRegistry:
    """cgroup id -> pod/container, kept current with inotify, mirrored into
    the BPF maps pod_info_map and container_pids (through `maps`, a
    tapio_node.kernel.maps.KernelMaps).

    `metrics.correlation(operation)` counts kernel_monitor_pod_correlation_total:
    "cgroup_lookup" (every accessor() call), "cgroup_lookup_miss" (not a pod
    process), "namespace_file" (service-account fallback read),
    "add_container_pid", "add_pod_info".
    """

    def __init__(self, *, cgroup_root: str, pod_logs_path: str, kubelet_pods_path: str,
                 projected_volume_pattern: str,
                 kubelet_cgroups: list[str], kubelet_executables: list[str],
                 maps=None, metrics=None,
                 log: logging.Logger = logging.getLogger("tapio_node.pods")) -> None:
        if cgroup_root == "auto":
            found = cgroup2_root()
            if found is None:
                raise ValueError("cgroup_root: 'auto' found no cgroup v2 mount in "
                                 "/proc/self/mountinfo; mount one or set cgroup_root")
            cgroup_root = found
        for key, val in (("cgroup_root", cgroup_root), ("pod_logs_path", pod_logs_path),
                         ("kubelet_pods_path", kubelet_pods_path)):
            if not isinstance(val, str) or not os.path.isabs(val):
                raise ValueError(f"{key}: expected an absolute path, got {val!r}")
        if (not isinstance(projected_volume_pattern, str) or "/" in projected_volume_pattern
                or projected_volume_pattern in ("", ".", "..")):
            raise ValueError("projected_volume_pattern: expected a kubelet volume plugin dir name "
                             f"like kubernetes.io~projected, got {projected_volume_pattern!r}")
        self.cgroup_root = os.path.normpath(cgroup_root)
        self.pod_logs_path = os.path.normpath(pod_logs_path)
        self.kubelet_pods_path = os.path.normpath(kubelet_pods_path)
        self._metrics = metrics
        self._log = log
        self._lock = threading.RLock()
        odd = OddNames(log)
        self._watches = Watches(log, odd)
        self._mirror = MapMirror(maps, odd)
        self._kubelet = KubeletRecognizer(kubelet_cgroups, kubelet_executables)
        sa = ServiceAccountVolumes(self.kubelet_pods_path, projected_volume_pattern, odd)
        self._names = PodNames(self.pod_logs_path, self._watches, odd, sa_namespace=sa.namespace,
                               changed=self._refresh_pod, metrics=metrics)
        self._tree = CgroupTree(self.cgroup_root, self._watches, odd,
                                found=self._found, gone=self._gone)
        self._cgs: dict[int, _Cg] = {}          # pod/container/nested cgroups
        self._pod_cgs: dict[str, set[int]] = {}
        self._acc: dict[int, Accessor] = {}

    # ---------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Initial scan of the cgroup tree and the pod logs dir; fills the maps."""
        with self._lock:
            self._watches.open()
            self._rescan()

    def filenos(self) -> list[int]:
        """The inotify fd to select on (call handle_io when readable)."""
        return self._watches.filenos()

    def close(self) -> None:
        with self._lock:
            self._watches.close()

    def pods(self) -> int:
        return len(self._pod_cgs)

    def pod_uids(self) -> list[str]:
        """The UIDs of the pods that have a cgroup on this node."""
        with self._lock:
            return list(self._pod_cgs)

    # ---------------------------------------------------------- lookups

    def accessor(self, cgroup_id: int, pid: int, comm: str) -> Accessor:
        """Who opened a file: one dict lookup for pod processes; for others,
        role "kubelet" by /proc/<pid>/cgroup (cached per cgroup id) or by
        /proc/<pid>/exe, never by comm."""
        acc = self._acc.get(cgroup_id)
        m = self._metrics
        if m is not None:
            m.correlation("cgroup_lookup")
        if acc is not None:
            return acc
        if m is not None:
            m.correlation("cgroup_lookup_miss")
        return KUBELET if self._kubelet.is_kubelet(cgroup_id, pid) else HOST

    def pod_names(self, pod_uid: str) -> tuple[str | None, str | None]:
        """(namespace, pod name) from pod_logs_path; else (namespace from the
        service-account volume, None); else (None, None)."""
        return self._names.names(pod_uid)

    # ---------------------------------------------------------- API for other collectors

    def add_container_pid(self, pid: int) -> int:
        """Put pid -> its cgroup id into container_pids; ValueError unless
        the pid lives in a pod cgroup."""
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**22 + 1:
            raise ValueError(f"add_container_pid: pid {pid!r} is not a valid process id")
        try:
            data = proc_cgroup(pid)
        except FileNotFoundError:
            raise ValueError(f"add_container_pid: no process with pid {pid}") from None
        except OSError as e:
            raise ValueError(f"add_container_pid: cannot read /proc/{pid}/cgroup: {e.strerror}") from None
        path = cgroup_v2_path(data)
        if path is None:
            raise ValueError(f"add_container_pid: pid {pid} has no cgroup v2 entry ('0::/...') "
                             f"in /proc/{pid}/cgroup")
        with self._lock:
            cgid = self._tree.ensure_proc_path(path)
            if cgid is None:
                raise ValueError(f"add_container_pid: pid {pid} is in cgroup {path!r}, which is not "
                                 f"a pod or container cgroup under {self.cgroup_root}")
            self._mirror.put_pid(pid, cgid)
            if self._metrics is not None:
                self._metrics.correlation("add_container_pid")
            return cgid

    def add_pod_info(self, cgroup_id: int, info: PodInfo) -> None:
        """Set what a cgroup id belongs to; it wins over what the cgroup's
        name says and survives resyncs while its dir exists (forever when no
        dir under cgroup_root has that id)."""
        if (not isinstance(cgroup_id, int) or isinstance(cgroup_id, bool)
                or not 0 < cgroup_id < 2**64):
            raise ValueError(f"add_pod_info: cgroup_id {cgroup_id!r} is not a cgroup id "
                             "(a positive 64-bit integer, the inode number of the cgroup dir)")
        if not isinstance(info, PodInfo):
            raise ValueError(f"add_pod_info: info must be a tapio_node.pods.info.PodInfo, "
                             f"got {type(info).__name__}")
        info.__post_init__()  # again: force_setattr/__new__ skip it
        with self._lock:
            ref = CgroupRef("container" if info.container_id else "pod", None, "",
                            info.qos, info.pod_uid, info.container_id)
            old = self._cgs.get(cgroup_id)
            self._cgs[cgroup_id] = _Cg(old.path if old else None, ref, info.created_at, info)
            if old is not None and old.ref.pod_uid != info.pod_uid:
                self._unlink_pod(old.ref.pod_uid, cgroup_id)
            self._pod_cgs.setdefault(info.pod_uid, set()).add(cgroup_id)
            self._publish(cgroup_id)
            if self._metrics is not None:
                self._metrics.correlation("add_pod_info")

    # ---------------------------------------------------------- events

    def handle_io(self) -> None:
        """Process what inotify has queued; never raises."""
        with self._lock:
            try:
                if not self._watches.active:
                    return
                if self._watches.drain(self._event):
                    self._log.info("pods: inotify queue overflow or a root appeared; full rescan")
                    self._rescan()
                self._mirror.drop_removed_pids(self._cgs)
            except Exception:  # noqa: BLE001 - the daemon must keep running
                self._log.exception("pods: error while handling inotify events; next resync repairs")

    def resync(self) -> int:
        """Full rescan; the number of discrepancies it fixed (tree and maps)."""
        with self._lock:
            try:
                fixed = self._rescan()
                self._mirror.drop_removed_pids(self._cgs)
                return fixed
            except Exception:  # noqa: BLE001
                self._log.exception("pods: resync failed")
                return 0

    # ---------------------------------------------------------- internals

    def _event(self, parent: str, ev) -> None:
        if parent == self.pod_logs_path:
            self._names.event(ev)
        else:
            self._tree.event(parent, ev)

    def _rescan(self) -> int:
        self._tree.attach()
        self._names.attach()
        # Names first: with them known, no pod needs the service-account
        # fallback, whose read is itself an open of a watched file.
        fixed = self._names.scan()
        fixed += self._tree.rescan()
        self._names.retry_fallbacks()
        fixed += self._mirror.sync({cgid: cg.path for cgid, cg in self._cgs.items()},
                                   self._info, self._publish)
        return fixed

    def _found(self, cgid: int, path: str, ref: CgroupRef, created_at: int) -> None:
        """A pod/container cgroup dir appeared in the tree."""
        old = self._cgs.get(cgid)
        if old is not None and old.ref.pod_uid != ref.pod_uid:
            self._unlink_pod(old.ref.pod_uid, cgid)
        self._cgs[cgid] = _Cg(path, ref, created_at)
        self._pod_cgs.setdefault(ref.pod_uid, set()).add(cgid)
        self._publish(cgid)
        self._mirror.seed_pids(cgid, path)

    def _gone(self, cgid: int, path: str) -> None:
        """A dir of the tree went away."""
        cg = self._cgs.get(cgid)
        if cg is None or cg.path != path:
            return
        del self._cgs[cgid]
        self._acc.pop(cgid, None)
        self._unlink_pod(cg.ref.pod_uid, cgid)
        self._mirror.cgroup_gone(cgid)

    def _publish(self, cgid: int) -> None:
        """Accessor and pod_info_map entry of one cgroup, from current names."""
        info = self._info(cgid)
        self._acc[cgid] = Accessor(info.container_id, info.pod_uid, info.namespace,
                                   info.pod_name, None)
        self._mirror.put_info(cgid, info)

    def _info(self, cgid: int) -> PodInfo:
        cg = self._cgs[cgid]
        if cg.external is not None:
            ext = cg.external
            if ext.namespace is None or ext.pod_name is None:
                ns, name = self._names.names(ext.pod_uid)
                return msgspec.structs.replace(ext, namespace=ext.namespace or ns,
                                               pod_name=ext.pod_name or name)
            return ext
        ref = cg.ref
        ns, name = self._names.names(ref.pod_uid)
        return PodInfo(ref.pod_uid, ns, name, ref.container_id, cg.created_at, ref.qos)

    def _unlink_pod(self, uid: str | None, cgid: int) -> None:
        s = self._pod_cgs.get(uid)
        if s is not None:
            s.discard(cgid)
            if not s:
                del self._pod_cgs[uid]

    def _refresh_pod(self, uid: str) -> None:
        for cgid in list(self._pod_cgs.get(uid, ())):
            self._publish(cgid)
