"""What the registry reads about the kubelet: whether a process is the
kubelet, and the namespace in a pod's service-account volume (under the
kubelet's pods dir)."""

from __future__ import annotations

import errno
import os

from tapio_node.host import cgroup_v2_path, proc_cgroup
from tapio_node.k8snames import valid_namespace
from tapio_node.pods.oddnames import OddNames

_SA_VOLUME_PREFIX = "kube-api-access-"
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class KubeletRecognizer:
    """A process is the kubelet when its cgroup path ends with one of
    `kubelet_cgroups` (cached per cgroup id) or its executable's name is in
    `kubelet_executables`; never by comm: any process can name itself
    "kubelet" (prctl)."""

    def __init__(self, kubelet_cgroups: list[str], kubelet_executables: list[str]) -> None:
        cgroups = [tuple(p for p in c.split("/") if p) for c in kubelet_cgroups]
        self._cgroups = [c for c in cgroups if c]
        self._exes = frozenset(kubelet_executables)
        self._by_cgroup: dict[int, bool] = {}

    def is_kubelet(self, cgroup_id: int, pid: int) -> bool:
        by_cg = self._by_cgroup.get(cgroup_id)
        if by_cg is None and self._cgroups:
            try:
                path = cgroup_v2_path(proc_cgroup(pid))
            except (OSError, ValueError):
                path = None
            if path is not None:
                parts = tuple(p for p in path.split("/") if p)
                by_cg = any(parts[-len(c):] == c for c in self._cgroups)
                if len(self._by_cgroup) > 4096:
                    self._by_cgroup.clear()
                self._by_cgroup[cgroup_id] = by_cg
        if by_cg:
            return True
        if self._exes:
            try:
                exe = os.readlink(f"/proc/{int(pid)}/exe")
            except (OSError, ValueError):
                return False
            if exe.endswith(" (deleted)"):  # the binary was replaced (upgrade)
                exe = exe[:-len(" (deleted)")]
            return os.path.basename(exe) in self._exes
        return False


class ServiceAccountVolumes:
    """The `namespace` key of a pod's service-account volume, at
    <kubelet_pods_path>/<uid>/volumes/<projected_volume_pattern>/kube-api-access-*.

    Walked with O_NOFOLLOW opens relative to dir fds; the atomic writer's
    two symlinks (`namespace -> ..data/namespace`, `..data -> ..<timestamp>`)
    are resolved by hand and must stay inside the volume dir."""

    def __init__(self, kubelet_pods_path: str, projected_volume_pattern: str, odd: OddNames) -> None:
        self.kubelet_pods_path = kubelet_pods_path
        self.projected_volume_pattern = projected_volume_pattern
        self._odd = odd

    def namespace(self, uid: str) -> str | None:
        fds: list[int] = []
        try:
            fd = os.open(self.kubelet_pods_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(fd)
            for part in (uid, "volumes", self.projected_volume_pattern):
                fd = os.open(part, _O_DIR, dir_fd=fd)
                fds.append(fd)
            # Only the service-account volume: its `namespace` key comes from
            # the downward API, while any other projected volume may carry a
            # user-chosen `namespace` key (a pod could claim another namespace).
            with os.scandir(fd) as it:
                vols = sorted(e.name for e in it if e.name.startswith(_SA_VOLUME_PREFIX)
                              and e.is_dir(follow_symlinks=False))
            for vol in vols:
                ns = self._volume_namespace(fd, vol)
                if ns is not None:
                    return ns
        except OSError:
            return None
        finally:
            for fd in fds:
                os.close(fd)
        return None

    def _volume_namespace(self, pfd: int, vol: str) -> str | None:
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
                return _read_namespace(name, vfd)  # a plain file
            if target != "..data/namespace":
                self._odd.skip("unexpected namespace symlink", f"{vol}/namespace -> {target}")
                return None
            data = os.readlink("..data", dir_fd=vfd)
            if not data.startswith("..") or "/" in data or data in ("..", "..data"):
                self._odd.skip("unexpected ..data symlink", f"{vol}/..data -> {data}")
                return None
            dfd = os.open(data, _O_DIR, dir_fd=vfd)
            try:
                return _read_namespace(name, dfd)
            finally:
                os.close(dfd)
        except OSError:
            return None
        finally:
            os.close(vfd)


def _read_namespace(name: str, dir_fd: int) -> str | None:
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
    return ns if valid_namespace(ns) else None
