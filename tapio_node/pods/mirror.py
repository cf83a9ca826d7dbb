"""The BPF maps pod_info_map (cgroup id -> pod info) and container_pids
(pid -> cgroup id), kept equal to what the registry knows."""

from __future__ import annotations

from contextlib import suppress
from typing import Callable, Mapping

from tapio_node.host import cgroup_procs
from tapio_node.pods.info import PodInfo, pack_pod_info, unpack_pod_info
from tapio_node.pods.oddnames import OddNames


class MapMirror:
    """Writes through `maps` (a tapio_node.kernel.maps.KernelMaps, or anything with
    its methods); with maps None every call does nothing."""

    def __init__(self, maps, odd: OddNames) -> None:
        self.maps = maps
        self._odd = odd
        self._removed: set[int] = set()    # cgroups gone whose pids may linger

    def put_info(self, cgid: int, info: PodInfo) -> None:
        if self.maps is None:
            return
        try:
            self.maps.put_pod_info(cgid, pack_pod_info(info))
        except OSError as e:
            self._odd.skip(f"pod_info_map update failed ({e.strerror})", str(cgid))

    def cgroup_gone(self, cgid: int) -> None:
        """Drop its pod info now, its pids at the next drop_removed_pids."""
        self._removed.add(cgid)
        if self.maps is None:
            return
        with suppress(OSError, KeyError):   # already gone
            self.maps.delete_pod_info(cgid)

    def seed_pids(self, cgid: int, cgroup_dir: str) -> None:
        """The processes already in a cgroup found (the kernel programs see
        only those that move in or fork later)."""
        self._removed.discard(cgid)
        if self.maps is None:
            return
        for pid in cgroup_procs(cgroup_dir):
            try:
                self.maps.put_container_pid(pid, cgid)
            except OSError as e:
                self._odd.skip(f"container_pids update failed ({e.strerror})", cgroup_dir)
                return

    def put_pid(self, pid: int, cgid: int) -> None:
        """Raises OSError when the map refuses it."""
        if self.maps is not None:
            self.maps.put_container_pid(pid, cgid)

    def drop_removed_pids(self, known: Mapping[int, object]) -> None:
        # The kernel drops a pid on exit; entries seeded for processes that
        # were gone before it watched, or added by hand, are dropped here.
        removed, self._removed = self._removed, set()
        if not removed or self.maps is None:
            return
        for pid, cgid in self.maps.container_pid_items():
            if cgid in removed and cgid not in known:
                with suppress(OSError, KeyError):   # already gone
                    self.maps.delete_container_pid(pid)

    def sync(self, known: Mapping[int, str | None], want: Callable[[int], PodInfo],
             publish: Callable[[int], None]) -> int:
        """Make pod_info_map match `known` (cgroup id -> its dir, None when
        it has none), with want(cgid) the entry it should hold and publish
        the repair; drop container_pids entries of unknown cgroups and add
        the processes of known dirs. Returns the number of entries fixed."""
        if self.maps is None:
            return 0
        fixed = 0
        present: set[int] = set()
        for cgid, raw in self.maps.pod_info_items():
            present.add(cgid)
            if cgid not in known:
                fixed += 1
                with suppress(OSError, KeyError):   # already gone
                    self.maps.delete_pod_info(cgid)
                continue
            w = want(cgid)
            have = unpack_pod_info(bytes(raw))
            if have is None or (have.pod_uid, have.namespace, have.pod_name, have.container_id,
                                have.qos) != (w.pod_uid, w.namespace, w.pod_name,
                                              w.container_id, w.qos):
                fixed += 1
                publish(cgid)
        for cgid in known:
            if cgid not in present:
                fixed += 1
                publish(cgid)
        pids = dict(self.maps.container_pid_items())
        for pid, cgid in pids.items():
            if cgid not in known:
                fixed += 1
                with suppress(OSError, KeyError):   # already gone
                    self.maps.delete_container_pid(pid)
        # Processes the kernel programs could not see (started before they
        # were attached, or while the map was full).
        for cgid, path in list(known.items()):
            if path is None:
                continue
            for pid in cgroup_procs(path):
                if pids.get(pid) != cgid:
                    fixed += 1
                    try:
                        self.maps.put_container_pid(pid, cgid)
                    except OSError:
                        break
        return fixed
