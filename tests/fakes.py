"""Test doubles and helpers shared by unit and kernel tests."""
import select


class FakeMaps:
    """tapio_node.kernel.maps.KernelMaps' methods over dicts, for tests
    that do not load BPF."""

    def __init__(self):
        self.pod_info: dict[int, bytes] = {}
        self.pids: dict[int, int] = {}

    def put_pod_info(self, cgroup_id, packed):
        self.pod_info[cgroup_id] = packed

    def delete_pod_info(self, cgroup_id):
        del self.pod_info[cgroup_id]

    def put_container_pid(self, pid, cgroup_id):
        self.pids[pid] = cgroup_id

    def delete_container_pid(self, pid):
        del self.pids[pid]

    def pod_info_items(self):
        return list(self.pod_info.items())

    def container_pid_items(self):
        return list(self.pids.items())


def drain(reg, cond, rounds=400):
    """PodRegistry.handle_io until cond() holds: bounded by rounds, never
    by a deadline."""
    for _ in range(rounds):
        if cond():
            return True
        select.select(reg.filenos(), [], [], 0.05)
        reg.handle_io()
    return cond()
