"""Pod correlation: which pod and container a cgroup id belongs to, and a
pod's namespace and name.

cgroup id (the inode number of a cgroup v2 dir, what the kernel program
reads with bpf_get_current_cgroup_id()) -> pod uid, container id, QoS, from
the kubelet's cgroup naming (systemd and cgroupfs drivers). Namespace and
pod name come from the names of the dirs under /var/log/pods, with the
service-account volume's `namespace` file as a fallback. Everything read
from disk is validated; symlinks are never followed below the roots.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time

import msgspec
from inotify_simple import INotify, flags as _F

from tapio_node import kpath, wire

__all__ = [
    "QOS", "PodInfo", "Accessor", "CgroupRef", "PodRegistry",
    "parse_cgroup_path", "parse_log_dir", "valid_pod_uid",
    "pack_pod_info", "unpack_pod_info", "detect_cgroup_root",
]

QOS = {"guaranteed": 1, "burstable": 2, "besteffort": 3}
_QOS_NAME = {v: k for k, v in QOS.items()}

# struct tapio_pod_info (bpf/tapio.h): every name below fits its
# NUL-terminated field (uid 36 < 40, namespace 63 < 64, pod name 253 < 256,
# container id 64 < 72).

# Pod uids: kpath.valid_pod_uid (UUIDs, and static pods' 32-hex hash).
_CID_RE = re.compile(r"[0-9a-f]{64}\Z")
# cgroup dir names (matched on the part after the parent slice's prefix).
_SD_QOS_RE = re.compile(r"(burstable|besteffort)\.slice\Z")
_SD_POD_RE = re.compile(r"pod([0-9a-f_]{32,36})\.slice\Z")
_SD_CONTAINER_RE = re.compile(r"(cri-containerd|crio|docker)-([0-9a-f]{64})\.scope\Z")
_SD_CONMON_RE = re.compile(r"crio-conmon-[0-9a-f]{64}(?:\.scope)?\Z")
_FS_CONTAINER_RE = re.compile(r"(?:(cri-containerd|crio|docker)-)?([0-9a-f]{64})\Z")
_FS_POD_RE = re.compile(r"pod([0-9a-f-]{32,36})\Z")

# How deep to look for a kubepods tree below cgroup_root (it can sit under
# e.g. kubelet.slice/kubelet-kubepods.slice when --cgroup-root is set), and
# units that never hold one.
_SEARCH_DEPTH = 3
_LEAF_UNITS = (".service", ".scope", ".mount", ".socket", ".swap", ".device")
# Containers may nest cgroups (systemd or docker inside); bound the depth.
_MAX_DEPTH = 32

_WATCH_MASK = (_F.CREATE | _F.DELETE | _F.MOVED_FROM | _F.MOVED_TO
               | _F.DELETE_SELF | _F.MOVE_SELF | _F.ONLYDIR | _F.DONT_FOLLOW)
_SA_VOLUME_PREFIX = "kube-api-access-"
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def valid_pod_uid(uid: object) -> bool:
    return isinstance(uid, str) and kpath.valid_pod_uid(uid)


def _valid_namespace(ns: object) -> bool:
    return isinstance(ns, str) and kpath.valid_label(ns)


def _valid_pod_name(name: object) -> bool:
    return isinstance(name, str) and kpath.valid_subdomain(name)


class PodInfo(msgspec.Struct, frozen=True):
    """One entry of pod_info_map (the seed's PodInfo), validated."""

    pod_uid: str
    namespace: str | None
    pod_name: str | None
    container_id: str | None = None
    created_at: int = 0
    qos: str | None = None

    def __post_init__(self) -> None:
        if not valid_pod_uid(self.pod_uid):
            raise ValueError(f"PodInfo.pod_uid {self.pod_uid!r}: expected a lowercase UUID "
                             "(or the 32-hex uid of a static pod)")
        if self.namespace is not None and not _valid_namespace(self.namespace):
            raise ValueError(f"PodInfo.namespace {self.namespace!r}: expected a DNS-1123 label "
                             "(lowercase alphanumerics and '-', at most 63 characters)")
        if self.pod_name is not None and not _valid_pod_name(self.pod_name):
            raise ValueError(f"PodInfo.pod_name {self.pod_name!r}: expected a DNS-1123 subdomain "
                             "(lowercase alphanumerics, '-' and '.', at most 253 characters)")
        if self.container_id is not None and (
                not isinstance(self.container_id, str) or not _CID_RE.match(self.container_id)):
            raise ValueError(f"PodInfo.container_id {self.container_id!r}: expected 64 lowercase "
                             "hex characters (without a runtime prefix such as 'containerd://')")
        if (not isinstance(self.created_at, int) or isinstance(self.created_at, bool)
                or not 0 <= self.created_at < 2**63):
            raise ValueError(f"PodInfo.created_at {self.created_at!r}: expected Unix seconds >= 0")
        if self.qos is not None and self.qos not in QOS:
            raise ValueError(f"PodInfo.qos {self.qos!r}: expected one of {sorted(QOS)} or None")


class Accessor(msgspec.Struct, frozen=True):
    """Who opened a file: what an event's `process` needs beyond pid/comm."""

    container_id: str | None
    pod_uid: str | None
    namespace: str | None
    pod_name: str | None
    role: str | None


_HOST = Accessor(None, None, None, None, None)
_KUBELET = Accessor(None, None, None, None, "kubelet")


def pack_pod_info(info: PodInfo) -> bytes:
    """struct tapio_pod_info as the kernel sees it (flags 0)."""
    return wire.pack_pod_info(info.pod_uid, info.namespace, info.pod_name, info.container_id,
                              info.created_at, QOS.get(info.qos or "", 0))


def unpack_pod_info(raw: bytes) -> PodInfo | None:
    """The inverse of pack_pod_info; None for anything that does not validate."""
    if len(raw) != wire.POD_INFO.size:
        return None
    uid, ns, name, cid, created, qos = wire.unpack_pod_info(raw)
    try:
        return PodInfo(uid, ns or None, name or None, cid or None, max(created, 0), _QOS_NAME.get(qos))
    except ValueError:
        return None


# ---------------------------------------------------------------- cgroup names

class CgroupRef(msgspec.Struct, frozen=True):
    """What one cgroup dir is, from its name and its parent's.

    kind: "other" (above the kubepods tree), "kubepods", "qos", "pod",
    "container" (a container's own cgroup), "nested" (below a container).
    """

    kind: str
    driver: str | None = None      # "systemd" | "cgroupfs"
    stem: str = ""                 # systemd: the slice name without ".slice"
    qos: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    runtime: str | None = None


_OTHER = CgroupRef("other")


def _pod_uid(raw: str, systemd: bool) -> str | None:
    # systemd escapes '-' in unit names, so the slice carries the uid with '_'.
    uid = raw.replace("_", "-") if systemd else raw
    if systemd and "-" in raw:
        return None
    return uid if kpath.valid_pod_uid(uid) else None


def classify(parent: CgroupRef, name: str) -> CgroupRef | None:
    """The child dir `name` of a dir classified `parent`.

    Returns _OTHER-like refs above the kubepods tree and None for a name
    that has no place inside it (odd or hostile: skipped by the caller).
    """
    kind = parent.kind
    if kind == "other":
        if name == "kubepods.slice":
            return CgroupRef("kubepods", "systemd", "kubepods")
        # --cgroup-root=/kubelet with the systemd driver: kubelet.slice/kubelet-kubepods.slice
        if parent.stem and name == parent.stem + "-kubepods.slice":
            return CgroupRef("kubepods", "systemd", name[:-len(".slice")])
        if name == "kubepods":
            return CgroupRef("kubepods", "cgroupfs")
        if name.endswith(".slice") and name != "-.slice":
            return CgroupRef("other", stem=name[:-len(".slice")])
        return _OTHER
    if kind == "container" or kind == "nested":
        return CgroupRef("nested", parent.driver, "", parent.qos, parent.pod_uid,
                         parent.container_id, parent.runtime)
    if parent.driver == "systemd":
        prefix = parent.stem + "-"
        if kind == "pod":
            m = _SD_CONTAINER_RE.match(name)
            if m:
                return CgroupRef("container", "systemd", "", parent.qos, parent.pod_uid,
                                 m.group(2), m.group(1))
            return None
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        if kind == "kubepods":
            m = _SD_QOS_RE.match(rest)
            if m:
                return CgroupRef("qos", "systemd", name[:-len(".slice")], m.group(1))
            qos = "guaranteed"
        else:  # qos
            qos = parent.qos
        m = _SD_POD_RE.match(rest)
        if m:
            uid = _pod_uid(m.group(1), True)
            if uid:
                return CgroupRef("pod", "systemd", name[:-len(".slice")], qos, uid)
        return None
    # cgroupfs
    if kind == "pod":
        m = _FS_CONTAINER_RE.match(name)
        if m:
            return CgroupRef("container", "cgroupfs", "", parent.qos, parent.pod_uid,
                             m.group(2), m.group(1))
        return None
    if kind == "kubepods" and name in ("burstable", "besteffort"):
        return CgroupRef("qos", "cgroupfs", "", name)
    m = _FS_POD_RE.match(name)
    if m:
        uid = _pod_uid(m.group(1), False)
        if uid:
            return CgroupRef("pod", "cgroupfs", "",
                             "guaranteed" if kind == "kubepods" else parent.qos, uid)
    return None


def _silent_skip(parent: CgroupRef, name: str) -> bool:
    """Known non-pod dirs inside the tree: no log line for them."""
    return parent.kind == "pod" and _SD_CONMON_RE.match(name) is not None


def parse_cgroup_path(path: str) -> CgroupRef | None:
    """A cgroup v2 path (as in /proc/<pid>/cgroup, '/'-separated, relative
    to the mount) -> its pod/container ref, or None when it is not inside a
    pod cgroup (host processes) or does not parse."""
    ref = _OTHER
    for name in path.split("/"):
        if not name:
            continue
        if name in (".", "..") or len(name) > 255:
            return None
        ref = classify(ref, name)
        if ref is None:
            return None
    return ref if ref.kind in ("pod", "container", "nested") else None


def parse_log_dir(name: str) -> tuple[str, str, str] | None:
    """`<namespace>_<pod-name>_<pod-uid>` (a /var/log/pods dir) -> the three
    parts, or None when any part does not validate."""
    parts = name.split("_")
    if len(parts) != 3:
        return None
    ns, pod, uid = parts
    if _valid_namespace(ns) and _valid_pod_name(pod) and valid_pod_uid(uid):
        return ns, pod, uid
    return None


def _cgroup2_mounts() -> list[str]:
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    mp = left.split(" ")[4]
                    out.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp))
    except OSError:
        pass
    return out


def detect_cgroup_root() -> str | None:
    """The cgroup v2 mount: /sys/fs/cgroup on unified hosts,
    /sys/fs/cgroup/unified on hybrid ones."""
    mounts = _cgroup2_mounts()
    for cand in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if cand in mounts:
            return cand
    return mounts[0] if mounts else None


# ------------------------------------------------------------------- registry

class _Cg(msgspec.Struct):
    path: str | None        # None: added through add_pod_info
    ref: CgroupRef
    created_at: int
    external: PodInfo | None = None


class _OddNames:
    """One log line per odd name, and at most `burst` lines per minute."""

    def __init__(self, log: logging.Logger, burst: int = 20) -> None:
        self._log = log
        self._seen: set[str] = set()
        self._burst = burst
        self._window = 0.0
        self._lines = 0
        self.suppressed = 0

    def skip(self, what: str, path: str) -> None:
        if path in self._seen:
            return
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen.add(path)
        now = time.monotonic()
        if now - self._window > 60.0:
            if self.suppressed:
                self._log.warning("pods: %d more odd names skipped (not logged)", self.suppressed)
            self._window, self._lines, self.suppressed = now, 0, 0
        if self._lines >= self._burst:
            self.suppressed += 1
            return
        self._lines += 1
        self._log.warning("pods: skipping %s: %r", what, path)


class PodRegistry:
    """cgroup id -> pod/container, kept current with inotify, mirrored into
    the BPF maps pod_info_map and container_pids (through `maps`, a
    tapio_node.bpf.KernelMaps).

    `metrics.correlation(operation)` counts kernel_monitor_pod_correlation_total:
    "cgroup_lookup" (every accessor() call), "cgroup_lookup_miss" (not a pod
    process), "namespace_file" (service-account fallback read),
    "add_container_pid", "add_pod_info".
    """

    def __init__(self, *, cgroup_root: str, pod_logs_path: str, kubelet_pods_path: str,
                 kubelet_cgroups: list[str], kubelet_executables: list[str],
                 maps=None, metrics=None,
                 log: logging.Logger = logging.getLogger("tapio_node.pods")) -> None:
        if cgroup_root == "auto":
            found = detect_cgroup_root()
            if found is None:
                raise ValueError("cgroup_root: 'auto' found no cgroup v2 mount in "
                                 "/proc/self/mountinfo; mount one or set cgroup_root")
            cgroup_root = found
        for key, val in (("cgroup_root", cgroup_root), ("pod_logs_path", pod_logs_path),
                         ("kubelet_pods_path", kubelet_pods_path)):
            if not isinstance(val, str) or not os.path.isabs(val):
                raise ValueError(f"{key}: expected an absolute path, got {val!r}")
        self.cgroup_root = os.path.normpath(cgroup_root)
        self.pod_logs_path = os.path.normpath(pod_logs_path)
        self.kubelet_pods_path = os.path.normpath(kubelet_pods_path)
        self._kubelet_cgroups = [tuple(p for p in c.split("/") if p) for c in kubelet_cgroups]
        self._kubelet_cgroups = [c for c in self._kubelet_cgroups if c]
        self._kubelet_exes = frozenset(kubelet_executables)
        self._maps = maps
        self._metrics = metrics
        self._log = log
        self._odd = _OddNames(log)
        self._lock = threading.RLock()
        # The cgroup v2 mount that holds cgroup_root (/proc/<pid>/cgroup
        # paths are relative to it).
        mounts = [m for m in _cgroup2_mounts()
                  if self.cgroup_root == m or self.cgroup_root.startswith(m.rstrip("/") + "/")]
        self._cg_mount = max(mounts, key=len) if mounts else self.cgroup_root
        # cgroup_root may itself be inside the tree (e.g. .../kubepods.slice):
        # its children are named after it.
        self._root_ref = _OTHER
        if self._cg_mount != self.cgroup_root:
            for name in self.cgroup_root[len(self._cg_mount):].split("/"):
                if name:
                    self._root_ref = classify(self._root_ref, name) or _OTHER
        self._ino: INotify | None = None
        self._wd_path: dict[int, str] = {}
        self._path_wd: dict[str, int] = {}
        self._waiting: dict[str, tuple[int, str]] = {}  # missing root -> (wd, ancestor)
        self._dirs: dict[str, CgroupRef] = {}   # every dir walked under cgroup_root
        self._dir_id: dict[str, int] = {}
        self._cgs: dict[int, _Cg] = {}          # pod/container/nested cgroups
        self._pod_cgs: dict[str, set[int]] = {}
        self._acc: dict[int, Accessor] = {}
        self._log_names: dict[str, tuple[str, str]] = {}
        self._sa_ns: dict[str, str | None] = {}
        self._role_cache: dict[int, bool] = {}
        self._removed: set[int] = set()
        self._logs_ok = False
        self._cg_ok = False

    # ---------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Initial scan of the cgroup tree and the pod logs dir; fills the maps."""
        with self._lock:
            if self._ino is None:
                self._ino = INotify(nonblocking=True)
            self._rescan()

    def filenos(self) -> list[int]:
        """The inotify fd to select on (call handle_io when readable)."""
        return [self._ino.fileno()] if self._ino is not None else []

    def close(self) -> None:
        with self._lock:
            if self._ino is not None:
                self._ino.close()
                self._ino = None
            self._wd_path.clear()
            self._path_wd.clear()
            self._waiting.clear()

    def pods(self) -> int:
        return len(self._pod_cgs)

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
        return _KUBELET if self._is_kubelet(cgroup_id, pid, comm) else _HOST

    def pod_names(self, pod_uid: str) -> tuple[str | None, str | None]:
        """(namespace, pod name) from pod_logs_path; else (namespace from the
        service-account volume, None); else (None, None)."""
        names = self._log_names.get(pod_uid)
        if names is not None:
            return names
        if pod_uid in self._sa_ns:
            return self._sa_ns[pod_uid], None
        if not valid_pod_uid(pod_uid):
            return None, None
        ns = self._read_sa_namespace(pod_uid)
        if len(self._sa_ns) > 65536:
            self._sa_ns.clear()
        self._sa_ns[pod_uid] = ns
        if self._metrics is not None:
            self._metrics.correlation("namespace_file")
        return ns, None

    # ---------------------------------------------------------- API for other collectors

    def add_container_pid(self, pid: int) -> int:
        """Put pid -> its cgroup id into container_pids (the seed's
        AddContainerPID); ValueError unless the pid lives in a pod cgroup."""
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**22 + 1:
            raise ValueError(f"add_container_pid: pid {pid!r} is not a valid process id")
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                data = f.read(65536)
        except FileNotFoundError:
            raise ValueError(f"add_container_pid: no process with pid {pid}") from None
        except OSError as e:
            raise ValueError(f"add_container_pid: cannot read /proc/{pid}/cgroup: {e.strerror}") from None
        path = _v2_path(data)
        if path is None:
            raise ValueError(f"add_container_pid: pid {pid} has no cgroup v2 entry ('0::/...') "
                             f"in /proc/{pid}/cgroup")
        with self._lock:
            full = self._cg_mount + ("" if path == "/" else path)
            cgid = self._ensure(full)
            if cgid is None:
                raise ValueError(f"add_container_pid: pid {pid} is in cgroup {path!r}, which is not "
                                 f"a pod or container cgroup under {self.cgroup_root}")
            if self._maps is not None:
                self._maps.put_container_pid(pid, cgid)
            if self._metrics is not None:
                self._metrics.correlation("add_container_pid")
            return cgid

    def add_pod_info(self, cgroup_id: int, info: PodInfo) -> None:
        """Set what a cgroup id belongs to (the seed's AddPodInfo); it wins
        over what the cgroup's name says and survives resyncs while its
        dir exists (forever when no dir under cgroup_root has that id)."""
        if (not isinstance(cgroup_id, int) or isinstance(cgroup_id, bool)
                or not 0 < cgroup_id < 2**64):
            raise ValueError(f"add_pod_info: cgroup_id {cgroup_id!r} is not a cgroup id "
                             "(a positive 64-bit integer, the inode number of the cgroup dir)")
        if not isinstance(info, PodInfo):
            raise ValueError(f"add_pod_info: info must be a tapio_node.pods.PodInfo, "
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
                if self._ino is None:
                    return
                events = self._ino.read(timeout=0)
                rescan = False
                for ev in events:
                    if ev.mask & _F.Q_OVERFLOW:
                        rescan = True
                        continue
                    for root, (wd, anc) in self._waiting.items():
                        if wd == ev.wd and ev.name == _next_part(anc, root):
                            rescan = True
                    self._event(ev)
                if rescan:
                    self._log.info("pods: inotify queue overflow or a root appeared; full rescan")
                    self._rescan()
                self._drop_removed_pids()
            except Exception:  # noqa: BLE001 - the daemon must keep running
                self._log.exception("pods: error while handling inotify events; next resync repairs")

    def resync(self) -> int:
        """Full rescan; the number of discrepancies it fixed (tree and maps)."""
        with self._lock:
            try:
                fixed = self._rescan()
                self._drop_removed_pids()
                return fixed
            except Exception:  # noqa: BLE001
                self._log.exception("pods: resync failed")
                return 0

    # ---------------------------------------------------------- internals: roots

    def _attach_roots(self) -> None:
        if not self._cg_ok:
            if _is_real_dir(self.cgroup_root):
                self._cg_ok = True
                self._stop_waiting(self.cgroup_root)
                self._watch(self.cgroup_root)
                self._dirs[self.cgroup_root] = self._root_ref
            else:
                self._wait_for(self.cgroup_root)
        if not self._logs_ok:
            if _is_real_dir(self.pod_logs_path):
                self._logs_ok = True
                self._stop_waiting(self.pod_logs_path)
                self._watch(self.pod_logs_path)
            else:
                self._wait_for(self.pod_logs_path)

    def _wait_for(self, root: str) -> None:
        # Watch the nearest existing ancestor so the root is picked up when
        # it is created; resync retries too (a mount does not notify).
        parent = os.path.dirname(root)
        while parent != "/" and not _is_real_dir(parent):
            parent = os.path.dirname(parent)
        if self._ino is None or self._waiting.get(root, (0, ""))[1] == parent:
            return
        first = root not in self._waiting
        self._stop_waiting(root)
        try:
            wd = self._ino.add_watch(parent, _WATCH_MASK)
        except OSError as e:
            self._log.warning("pods: cannot watch %s for %s to appear: %s", parent, root, e.strerror)
            return
        self._waiting[root] = (wd, parent)
        if first:
            self._log.warning("pods: %s does not exist yet; waiting for it", root)

    def _stop_waiting(self, root: str) -> None:
        wd, _ = self._waiting.pop(root, (None, ""))
        # The same dir may be watched for the other root or the tree.
        if (wd is not None and self._ino is not None and wd not in self._wd_path
                and all(w != wd for w, _ in self._waiting.values())):
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass

    def _watch(self, path: str) -> None:
        if path in self._path_wd or self._ino is None:
            return
        try:
            wd = self._ino.add_watch(path, _WATCH_MASK)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._odd.skip(f"unwatchable dir ({e.strerror})", path)
            return
        self._wd_path[wd] = path
        self._path_wd[path] = wd

    def _unwatch(self, path: str) -> None:
        wd = self._path_wd.pop(path, None)
        if wd is not None:
            self._wd_path.pop(wd, None)
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass  # already gone with its dir

    # ---------------------------------------------------------- internals: events

    def _event(self, ev) -> None:
        if ev.mask & _F.IGNORED:
            path = self._wd_path.pop(ev.wd, None)
            if path is not None and self._path_wd.get(path) == ev.wd:
                del self._path_wd[path]
            for root in [r for r, (w, _) in self._waiting.items() if w == ev.wd]:
                del self._waiting[root]
            return
        parent = self._wd_path.get(ev.wd)
        if parent is None:
            return
        if ev.mask & (_F.DELETE_SELF | _F.MOVE_SELF):
            if parent == self.pod_logs_path:
                self._logs_ok = False
                self._drop_all_log_names()
                self._wait_for(self.pod_logs_path)
            elif parent == self.cgroup_root:
                self._cg_ok = False
                self._forget_tree(self.cgroup_root)
                self._wait_for(self.cgroup_root)
            return
        name = ev.name
        if not name:
            return
        gone = bool(ev.mask & (_F.DELETE | _F.MOVED_FROM))
        if parent == self.pod_logs_path:
            if gone:
                self._log_dir_gone(name)
            else:
                self._log_dir_added(name)
            return
        path = parent + "/" + name
        if gone:
            self._forget_tree(path)
        elif ev.mask & _F.ISDIR:
            ref = self._dirs.get(parent)
            if ref is not None:
                self._add_dir(parent, ref, name, _depth(self.cgroup_root, parent) + 1, None)

    # ---------------------------------------------------------- internals: cgroup tree

    def _rescan(self) -> int:
        self._attach_roots()
        # Names first: with them known, no pod needs the service-account
        # fallback, whose read is itself an open of a watched file.
        fixed = self._scan_logs()
        seen: set[str] = set()
        if self._cg_ok:
            if not _is_real_dir(self.cgroup_root):
                self._cg_ok = False
            else:
                seen.add(self.cgroup_root)
                self._watch(self.cgroup_root)
                fixed += self._walk(self.cgroup_root, self._root_ref, 0, seen)
        for path in [p for p in self._dirs if p not in seen]:
            if path in self._dirs:
                fixed += 1
                self._forget_tree(path)
        if self._cg_ok and self.cgroup_root not in self._dirs:
            self._dirs[self.cgroup_root] = self._root_ref
        self._sa_ns = {k: v for k, v in self._sa_ns.items() if v is not None}
        fixed += self._sync_maps()
        return fixed

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
                if not _stat_is_dir(st):
                    return 0
        except OSError:
            return 0
        if depth > _MAX_DEPTH:
            self._odd.skip("cgroup nested too deep", path)
            return 0
        ref = classify(pref, name)
        if ref is None:
            if not _silent_skip(pref, name):
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
                self._forget_tree(path)
            fixed = 1
            self._dirs[path] = ref
            self._dir_id[path] = st.st_ino
            if ref.kind in ("pod", "container", "nested"):
                self._register(st.st_ino, path, ref, int(st.st_ctime))
        # Watch before listing, so a child made in between is not lost.
        self._watch(path)
        return fixed + self._walk(path, ref, depth, seen)

    def _ensure(self, full: str) -> int | None:
        """Register the dirs from cgroup_root down to `full`; its cgroup id
        when it is a pod/container cgroup."""
        full = os.path.normpath(full)
        if full != self.cgroup_root and not full.startswith(self.cgroup_root + "/"):
            return None
        parts = [p for p in full[len(self.cgroup_root):].split("/") if p]
        if not _is_real_dir(self.cgroup_root):
            return None
        self._cg_ok = True
        self._dirs.setdefault(self.cgroup_root, self._root_ref)
        self._watch(self.cgroup_root)
        path = self.cgroup_root
        for depth, name in enumerate(parts, 1):
            nxt = path + "/" + name
            if nxt not in self._dirs:
                self._add_dir(path, self._dirs[path], name, depth, None)
                if nxt not in self._dirs:
                    return None
            path = nxt
        ref = self._dirs[path]
        if ref.kind not in ("pod", "container", "nested"):
            return None
        return self._dir_id[path]

    def _register(self, cgid: int, path: str, ref: CgroupRef, created_at: int) -> None:
        old = self._cgs.get(cgid)
        if old is not None and old.ref.pod_uid != ref.pod_uid:
            self._unlink_pod(old.ref.pod_uid, cgid)
        self._cgs[cgid] = _Cg(path, ref, created_at)
        self._removed.discard(cgid)
        self._pod_cgs.setdefault(ref.pod_uid, set()).add(cgid)
        self._publish(cgid)
        self._seed_pids(path, cgid)

    def _publish(self, cgid: int) -> None:
        """Accessor and pod_info_map entry of one cgroup, from current names."""
        info = self._info(cgid)
        self._acc[cgid] = Accessor(info.container_id, info.pod_uid, info.namespace,
                                   info.pod_name, None)
        if self._maps is not None:
            try:
                self._maps.put_pod_info(cgid, info)
            except OSError as e:
                self._odd.skip(f"pod_info_map update failed ({e.strerror})", str(cgid))

    def _info(self, cgid: int) -> PodInfo:
        cg = self._cgs[cgid]
        if cg.external is not None:
            ext = cg.external
            if ext.namespace is None or ext.pod_name is None:
                ns, name = self.pod_names(ext.pod_uid)
                return msgspec.structs.replace(ext, namespace=ext.namespace or ns,
                                               pod_name=ext.pod_name or name)
            return ext
        ref = cg.ref
        ns, name = self.pod_names(ref.pod_uid)
        return PodInfo(ref.pod_uid, ns, name, ref.container_id, cg.created_at, ref.qos)

    def _seed_pids(self, path: str, cgid: int) -> None:
        if self._maps is None:
            return
        for pid in _read_procs(path):
            try:
                self._maps.put_container_pid(pid, cgid)
            except OSError as e:
                self._odd.skip(f"container_pids update failed ({e.strerror})", path)
                return

    def _forget_tree(self, path: str) -> None:
        prefix = path + "/"
        for p in [p for p in self._dirs if p == path or p.startswith(prefix)]:
            self._dirs.pop(p, None)
            cgid = self._dir_id.pop(p, None)
            self._unwatch(p)
            if cgid is None:
                continue
            cg = self._cgs.get(cgid)
            if cg is None or cg.path != p:
                continue
            del self._cgs[cgid]
            self._acc.pop(cgid, None)
            self._unlink_pod(cg.ref.pod_uid, cgid)
            self._removed.add(cgid)
            if self._maps is not None:
                try:
                    self._maps.delete_pod_info(cgid)
                except (OSError, KeyError):
                    pass  # already gone

    def _unlink_pod(self, uid: str | None, cgid: int) -> None:
        s = self._pod_cgs.get(uid)
        if s is not None:
            s.discard(cgid)
            if not s:
                del self._pod_cgs[uid]

    def _drop_removed_pids(self) -> None:
        # The kernel drops a pid on exit; entries seeded for processes that
        # were gone before it watched, or added by hand, are dropped here.
        removed, self._removed = self._removed, set()
        if not removed or self._maps is None:
            return
        for pid, cgid in self._maps.container_pid_items():
            if cgid in removed and cgid not in self._cgs:
                try:
                    self._maps.delete_container_pid(pid)
                except (OSError, KeyError):
                    pass

    def _sync_maps(self) -> int:
        """Make pod_info_map match what is known; drop container_pids entries
        of unknown cgroups. Returns the number of entries fixed."""
        if self._maps is None:
            return 0
        fixed = 0
        present: set[int] = set()
        for cgid, raw in self._maps.pod_info_items():
            present.add(cgid)
            if cgid not in self._cgs:
                fixed += 1
                try:
                    self._maps.delete_pod_info(cgid)
                except (OSError, KeyError):
                    pass
                continue
            want = self._info(cgid)
            have = unpack_pod_info(bytes(raw))
            if have is None or (have.pod_uid, have.namespace, have.pod_name, have.container_id,
                                have.qos) != (want.pod_uid, want.namespace, want.pod_name,
                                              want.container_id, want.qos):
                fixed += 1
                self._publish(cgid)
        for cgid in self._cgs:
            if cgid not in present:
                fixed += 1
                self._publish(cgid)
        pids = dict(self._maps.container_pid_items())
        for pid, cgid in pids.items():
            if cgid not in self._cgs:
                fixed += 1
                try:
                    self._maps.delete_container_pid(pid)
                except (OSError, KeyError):
                    pass
        # Processes the kernel programs could not see (started before they
        # were attached, or while the map was full).
        for cgid, cg in list(self._cgs.items()):
            if cg.path is None:
                continue
            for pid in _read_procs(cg.path):
                if pids.get(pid) != cgid:
                    fixed += 1
                    try:
                        self._maps.put_container_pid(pid, cgid)
                    except OSError:
                        break
        return fixed

    # ---------------------------------------------------------- internals: names

    def _scan_logs(self) -> int:
        if not self._logs_ok:
            return 0
        if not _is_real_dir(self.pod_logs_path):
            self._logs_ok = False
            self._drop_all_log_names()
            self._wait_for(self.pod_logs_path)
            return 0
        self._watch(self.pod_logs_path)
        found: dict[str, tuple[str, str]] = {}
        try:
            with os.scandir(self.pod_logs_path) as it:
                for ent in it:
                    parsed = self._parse_log_entry(ent.name, ent)
                    if parsed is not None:
                        found[parsed[2]] = (parsed[0], parsed[1])
        except OSError as e:
            self._odd.skip(f"unreadable pod logs dir ({e.strerror})", self.pod_logs_path)
            return 0
        fixed = 0
        changed = {u for u in found if self._log_names.get(u) != found[u]}
        changed |= {u for u in self._log_names if u not in found}
        self._log_names = found
        for uid in changed:
            fixed += 1
            self._refresh_pod(uid)
        return fixed

    def _parse_log_entry(self, name: str, ent: os.DirEntry | None = None):
        path = self.pod_logs_path + "/" + name
        try:
            is_dir = (ent.is_dir(follow_symlinks=False) if ent is not None
                      else _stat_is_dir(os.stat(path, follow_symlinks=False)))
        except OSError:
            return None
        if not is_dir:
            self._odd.skip("pod log entry that is not a real dir", path)
            return None
        parsed = parse_log_dir(name)
        if parsed is None:
            self._odd.skip("pod log dir not named <namespace>_<pod>_<uid>", path)
        return parsed

    def _log_dir_added(self, name: str) -> None:
        parsed = self._parse_log_entry(name)
        if parsed is None:
            return
        ns, pod, uid = parsed
        if self._log_names.get(uid) != (ns, pod):
            self._log_names[uid] = (ns, pod)
            self._refresh_pod(uid)

    def _log_dir_gone(self, name: str) -> None:
        parsed = parse_log_dir(name)
        if parsed is None:
            return
        ns, pod, uid = parsed
        if self._log_names.get(uid) == (ns, pod):
            del self._log_names[uid]
            self._refresh_pod(uid)

    def _drop_all_log_names(self) -> None:
        uids = list(self._log_names)
        self._log_names.clear()
        for uid in uids:
            self._refresh_pod(uid)

    def _refresh_pod(self, uid: str) -> None:
        for cgid in list(self._pod_cgs.get(uid, ())):
            self._publish(cgid)

    def _read_sa_namespace(self, uid: str) -> str | None:
        """The `namespace` key of the pod's service-account projected volume.

        Walked with O_NOFOLLOW opens relative to dir fds; the atomic
        writer's two symlinks (`namespace -> ..data/namespace`,
        `..data -> ..<timestamp>`) are resolved by hand and must stay
        inside the volume dir."""
        fds: list[int] = []
        try:
            fd = os.open(self.kubelet_pods_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            for part in (uid, "volumes", "kubernetes.io~projected"):
                fd = os.open(part, _O_DIR, dir_fd=fd)
                fds.append(fd)
            # Only the service-account volume: its `namespace` key comes from
            # the downward API, while any other projected volume may carry a
            # user-chosen `namespace` key (a pod could claim another namespace).
            with os.scandir(fd) as it:
                vols = sorted(e.name for e in it if e.name.startswith(_SA_VOLUME_PREFIX)
                              and e.is_dir(follow_symlinks=False))
            for vol in vols:
                ns = self._read_vol_namespace(fd, vol)
                if ns is not None:
                    return ns
        except OSError:
            return None
        finally:
            for fd in fds:
                os.close(fd)
        return None

    def _read_vol_namespace(self, pfd: int, vol: str) -> str | None:
        try:
            vfd = os.open(vol, _O_DIR, dir_fd=pfd)
        except OSError:
            return None
        try:
            name = "namespace"
            try:
                target = os.readlink(name, dir_fd=vfd)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return None
                return _read_small(name, vfd)  # a plain file
            if target != "..data/namespace":
                self._odd.skip("unexpected namespace symlink", f"{vol}/namespace -> {target}")
                return None
            data = os.readlink("..data", dir_fd=vfd)
            if not data.startswith("..") or "/" in data or data in ("..", "..data"):
                self._odd.skip("unexpected ..data symlink", f"{vol}/..data -> {data}")
                return None
            dfd = os.open(data, _O_DIR, dir_fd=vfd)
            try:
                return _read_small(name, dfd)
            finally:
                os.close(dfd)
        except OSError:
            return None
        finally:
            os.close(vfd)

    # ---------------------------------------------------------- internals: kubelet

    def _is_kubelet(self, cgroup_id: int, pid: int, comm: str) -> bool:
        # Never by comm: any process can name itself "kubelet" (prctl).
        by_cg = self._role_cache.get(cgroup_id)
        if by_cg is None and self._kubelet_cgroups:
            try:
                with open(f"/proc/{int(pid)}/cgroup", "rb") as f:
                    path = _v2_path(f.read(65536))
            except (OSError, ValueError):
                path = None
            if path is not None:
                parts = tuple(p for p in path.split("/") if p)
                by_cg = any(parts[-len(c):] == c for c in self._kubelet_cgroups)
                if len(self._role_cache) > 4096:
                    self._role_cache.clear()
                self._role_cache[cgroup_id] = by_cg
        if by_cg:
            return True
        if self._kubelet_exes:
            try:
                exe = os.readlink(f"/proc/{int(pid)}/exe")
            except (OSError, ValueError):
                return False
            if exe.endswith(" (deleted)"):  # the binary was replaced (upgrade)
                exe = exe[:-len(" (deleted)")]
            return os.path.basename(exe) in self._kubelet_exes
        return False


# ------------------------------------------------------------------- helpers

def _v2_path(data: bytes) -> str | None:
    for line in data.split(b"\n"):
        if line.startswith(b"0::"):
            path = line[3:].decode("utf-8", "replace")
            if path.endswith(" (deleted)"):
                path = path[:-len(" (deleted)")]
            if not path.startswith("/"):
                return None
            norm = os.path.normpath(path)
            return None if ".." in norm.split("/") else norm
    return None


def _next_part(ancestor: str, root: str) -> str:
    rest = root[len(ancestor):].lstrip("/")
    return rest.split("/", 1)[0]


def _depth(root: str, path: str) -> int:
    return 0 if path == root else path[len(root):].count("/")


def _stat_is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000


def _is_real_dir(path: str) -> bool:
    try:
        return _stat_is_dir(os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _read_procs(path: str) -> list[int]:
    try:
        with open(path + "/cgroup.procs", "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return []
    return [int(x) for x in data.split() if x.isdigit()]


def _read_small(name: str, dir_fd: int) -> str | None:
    fd = os.open(name, _O_FILE, dir_fd=dir_fd)
    try:
        if not (os.fstat(fd).st_mode & 0o170000) == 0o100000:
            return None
        raw = os.read(fd, 128)
    finally:
        os.close(fd)
    try:
        ns = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return ns if _valid_namespace(ns) else None
