"""What pods/ needs that is not about pods: the host's cgroup v2 mounts
(/proc/self/mountinfo), the readers of /proc/<pid>/cgroup and cgroup.procs,
and the Kubernetes name validators. Kept together here so that they can
move as one to the modules that own host facts and Kubernetes names.
"""

from __future__ import annotations

import os
import re

from tapio_node import kpath

# ------------------------------------------------------------------ names

# Pod uids: kpath.valid_pod_uid (UUIDs, and static pods' 32-hex hash).
_CID_RE = re.compile(r"[0-9a-f]{64}\Z")


def valid_pod_uid(uid: object) -> bool:
    return isinstance(uid, str) and kpath.valid_pod_uid(uid)


def valid_namespace(ns: object) -> bool:
    return isinstance(ns, str) and kpath.valid_label(ns)


def valid_pod_name(name: object) -> bool:
    return isinstance(name, str) and kpath.valid_subdomain(name)


def valid_container_id(cid: object) -> bool:
    """64 lowercase hex characters, without a runtime prefix."""
    return isinstance(cid, str) and _CID_RE.match(cid) is not None


# ------------------------------------------------------------------- host

def cgroup2_mounts() -> list[str]:
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
    mounts = cgroup2_mounts()
    for cand in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if cand in mounts:
            return cand
    return mounts[0] if mounts else None


def cgroup_v2_path(data: bytes) -> str | None:
    """The cgroup v2 path (relative to the mount) in the contents of a
    /proc/<pid>/cgroup file; None when there is none or it climbs out."""
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


def cgroup_procs(cgroup_dir: str) -> list[int]:
    """The pids in a cgroup dir's cgroup.procs; [] when it cannot be read."""
    try:
        with open(cgroup_dir + "/cgroup.procs", "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return []
    return [int(x) for x in data.split() if x.isdigit()]


def stat_is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000


def is_real_dir(path: str) -> bool:
    """A directory, not a symlink to one."""
    try:
        return stat_is_dir(os.stat(path, follow_symlinks=False))
    except OSError:
        return False
