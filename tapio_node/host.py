"""This host as the daemon sees it: the mount table, where cgroup v2 and
tracefs are mounted, device numbers as the kernel writes them, a few /proc
readers, and the fixed paths of the kernel's BTF and journald's socket.

parse_mountinfo has a Cython twin in _fast; TAPIO_PURE_PYTHON=1 selects
this one everywhere (tests run both).
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple

from tapio_node import accelerated

MOUNTINFO = "/proc/self/mountinfo"
BTF_PATH = "/sys/kernel/btf/vmlinux"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# Unified hosts, then hybrid ones.
CGROUP2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


class Mount(NamedTuple):
    """One line of /proc/<pid>/mountinfo (proc(5)), unescaped."""
    mount_id: int
    parent_id: int
    dev: int                    # kernel encoding, as kernel_dev()
    root: str                   # the dir of the file system mounted here
    point: str
    options: str
    optional: tuple[str, ...]   # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: str


# -- device numbers ----------------------------------------------------------
def kernel_dev(st_dev: int) -> int:
    """A stat() st_dev as the kernel's s_dev (MINORBITS 20), the device
    number the BPF side sees and mountinfo prints."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


# -- mountinfo ---------------------------------------------------------------
# The kernel escapes space, tab, newline and backslash in every field as
# \ooo (fs/proc_namespace.c); nothing else.
_ESCAPE = re.compile(rb"\\([0-3][0-7][0-7])")


def _unescape(field: bytes) -> str:
    if b"\\" in field:
        field = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 8),)), field)
    return os.fsdecode(field)


def _num(b: bytes) -> bool:
    return 0 < len(b) <= 10 and b.isdigit()


def _py_parse_mountinfo(data: bytes) -> list[tuple]:
    """The twin of _fast.parse_mountinfo: mountinfo text -> one tuple per
    well-formed line, in Mount's field order; other lines are left out."""
    out = []
    for line in data.split(b"\n"):
        f = line.split(b" ")
        if len(f) < 10:
            continue
        try:
            sep = f.index(b"-", 6)   # ends the optional fields
        except ValueError:
            continue
        if len(f) < sep + 4:
            continue
        major, colon, minor = f[2].partition(b":")
        if not (colon and _num(f[0]) and _num(f[1]) and _num(major) and _num(minor)):
            continue
        out.append((int(f[0]), int(f[1]), int(major) << 20 | int(minor),
                    _unescape(f[3]), _unescape(f[4]), _unescape(f[5]),
                    tuple(_unescape(x) for x in f[6:sep]),
                    _unescape(f[sep + 1]), _unescape(f[sep + 2]), _unescape(f[sep + 3])))
    return out


parse_mountinfo = accelerated("parse_mountinfo", _py_parse_mountinfo)


def read_proc(path: str) -> bytes:
    """A whole /proc file: seq files hand out a page or so per read(),
    and st_size says 0."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


_as_mount = tuple.__new__


def mounts(path: str = MOUNTINFO) -> list[Mount]:
    """This mount namespace's mounts, in mountinfo order (a mount comes
    after the one it is mounted over); [] when it cannot be read."""
    try:
        data = read_proc(path)
    except OSError:
        return []
    return [_as_mount(Mount, r) for r in parse_mountinfo(data)]


def mounts_under(path: str, table: list[Mount] | None = None) -> list[str]:
    """Mount points at or below `path` (resolved), outermost first."""
    path = os.path.realpath(path).rstrip("/") or "/"
    prefix = path if path == "/" else path + "/"
    return [m.point for m in (mounts() if table is None else table)
            if m.point == path or m.point.startswith(prefix)]


def fs_type_at(path: str, table: list[Mount] | None = None) -> str | None:
    """File system type of the mount that holds `path` (the longest mount
    point above it; the last of equals, which is mounted over the others)."""
    best, fstype = "", None
    path = os.path.abspath(path)
    for m in mounts() if table is None else table:
        point = m.point
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, m.fstype
    return fstype


def cgroup2_mounts(table: list[Mount] | None = None) -> list[str]:
    return [m.point for m in (mounts() if table is None else table) if m.fstype == "cgroup2"]


def cgroup2_root(table: list[Mount] | None = None) -> str | None:
    """Where the cgroup v2 hierarchy is mounted (`cgroup_root: auto`):
    /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid
    ones, else the first cgroup2 mount; None without one."""
    found = cgroup2_mounts(table)
    for preferred in CGROUP2_ROOTS:
        if preferred in found:
            return preferred
    return found[0] if found else None


def cgroup_root(setting: str) -> str | None:
    """kernel_collector.cgroup_root as a path ('auto': cgroup2_root())."""
    return cgroup2_root() if setting == "auto" else setting


# -- tracefs -----------------------------------------------------------------
def tracefs_root() -> str | None:
    """The tracefs the tracepoints are found in (its events dir present;
    looking there also triggers the debugfs automount)."""
    for root in TRACEFS_ROOTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


# -- /proc readers -------------------------------------------------------------
def active_lsms() -> tuple[list[str] | None, str]:
    """The kernel's active LSMs in order, and where that was read: securityfs
    when mounted, else the lsm= boot parameter, else the kernel's built-in
    CONFIG_LSM from /boot/config-<release>; (None, why) when none says."""
    try:
        with open("/sys/kernel/security/lsm", encoding="ascii") as f:
            return [w for w in f.read().strip().split(",") if w], "/sys/kernel/security/lsm"
    except OSError:
        pass
    try:
        with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
            words = f.read().split()
    except OSError:
        words = []
    given = [w[len("lsm="):] for w in words if w.startswith("lsm=")]
    if given:
        # The last lsm= wins, as in the kernel.
        return [w for w in given[-1].split(",") if w], "the lsm= boot parameter"
    config = f"/boot/config-{os.uname().release}"
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("CONFIG_LSM="):
                    value = line.split("=", 1)[1].strip().strip('"')
                    return [w for w in value.split(",") if w], f"CONFIG_LSM in {config}"
    except OSError:
        pass
    return None, "securityfs is not mounted, the boot line has no lsm= and no kernel config says"


def proc_comm(pid: int) -> str:
    """A process's comm, '' when it is gone."""
    try:
        with open(f"/proc/{int(pid)}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def proc_cgroup(pid: int) -> bytes:
    """/proc/<pid>/cgroup, its first 64 KiB; OSError when unreadable."""
    with open(f"/proc/{int(pid)}/cgroup", "rb") as f:
        return f.read(65536)


def cap_eff() -> int:
    """This process's effective capability set."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


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


def release_free_memory() -> None:
    """Give the start-up scan's freed heap back to the kernel (glibc keeps
    it otherwise, and it counts in RSS for the daemon's whole life)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc
