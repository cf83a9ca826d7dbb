"""Look into a running daemon's `watched_inodes` map, to time how long after
an atomic-writer update the new inode is watched.

The map is not pinned, so take a copy of the daemon's own fd with
pidfd_getfd(2) and pick it by its shape from /proc/<pid>/fdinfo (a hash map
with 16-byte keys and 8-byte values: struct tapio_inode_key -> tapio_watch).
"""

from __future__ import annotations

import ctypes
import os
import struct

from tapio_node import _fast

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
BPF_MAP_TYPE_HASH = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(*args):
    rc = _libc.syscall(*args)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def _fdinfo(pid, fd):
    out = {}
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


class WatchedInodes:
    def __init__(self, pid):
        self.fd = None
        want = None
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
            except OSError:
                continue
            info = _fdinfo(pid, fd)
            if (info.get("map_type") == str(BPF_MAP_TYPE_HASH) and info.get("key_size") == "16"
                    and info.get("value_size") == "8"):
                want = int(fd)
                break
        if want is None:
            raise RuntimeError(f"no watched_inodes-shaped BPF map among pid {pid}'s fds")
        pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
        try:
            self.fd = _syscall(SYS_PIDFD_GETFD, pidfd, want, 0)
        finally:
            os.close(pidfd)
        self.map = _fast.Map(self.fd, "watched_inodes", 16, 8)

    def has(self, path):
        """Is the file at path (not following a final symlink) in the map?"""
        kdev, gen, ino, _mode = _fast.stat_inode_key(path)
        for g in {gen or 0, 0}:
            if self.map.lookup(struct.pack("<IIQ", kdev, g, ino)) is not None:
                return True
        return False

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
