"""The correlation maps as typed calls, for the pod registry and for other
collectors: pod_info_map (cgroup id -> pod) and container_pids (pid ->
cgroup id)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tapio_node.kernel import wire

if TYPE_CHECKING:
    from tapio_node.kernel.loader import Kernel


class KernelMaps:
    """The correlation maps of a loaded Kernel, typed."""

    def __init__(self, kernel: Kernel):
        self._pods = kernel.maps["pod_info_map"]
        self._pids = kernel.maps["container_pids"]

    def put_pod_info(self, cgroup_id: int, packed: bytes) -> None:
        """packed: a struct tapio_pod_info (pods.info.pack_pod_info)."""
        self._pods.update(wire.U64.pack(cgroup_id), packed)

    def delete_pod_info(self, cgroup_id: int) -> None:
        self._pods.delete(wire.U64.pack(cgroup_id))

    def put_container_pid(self, pid: int, cgroup_id: int) -> None:
        self._pids.update(wire.U32.pack(pid), wire.U64.pack(cgroup_id))

    def delete_container_pid(self, pid: int) -> None:
        self._pids.delete(wire.U32.pack(pid))

    def pod_info_items(self) -> list[tuple[int, bytes]]:
        out = []
        for key in self._pods.keys():
            raw = self._pods.lookup(key)
            if raw is not None:
                out.append((wire.U64.unpack(key)[0], raw))
        return out

    def container_pid_items(self) -> list[tuple[int, int]]:
        out = []
        for key in self._pids.keys():
            raw = self._pids.lookup(key)
            if raw is not None:
                out.append((wire.U32.unpack(key)[0], wire.U64.unpack(raw)[0]))
        return out
