"""What is mounted where in this mount namespace, from /proc/self/mountinfo."""

from __future__ import annotations

import os
import re

from tapio_node.sim.system import SimulationError


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount in this process's namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out.append((_unescape_mountinfo(left.split()[4]), right.split()[0]))
    return out


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    path = os.path.realpath(path).rstrip("/")
    return [mp for mp, _ in _mountinfo() if mp == path or mp.startswith(path + "/")]


def cgroup2_mount() -> str:
    """The cgroup v2 mount: /sys/fs/cgroup (unified), /sys/fs/cgroup/unified (hybrid), or any other."""
    found = [mp for mp, fstype in _mountinfo() if fstype == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    if found:
        return found[0]
    raise SimulationError("no cgroup v2 mount found in /proc/self/mountinfo; mount one with "
                          "'mount -t cgroup2 none /sys/fs/cgroup/unified'")
