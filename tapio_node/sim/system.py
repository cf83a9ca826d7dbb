"""System calls the simulated node makes as root: mount, umount, signals by pid."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

from tapio_node import host

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MNT_DETACH = 2


class SimulationError(RuntimeError):
    """The simulated node could not be built or torn down."""


def cgroup2_mount() -> str:
    """The cgroup v2 mount the simulated node builds its tree under."""
    root = host.cgroup2_root()
    if root is None:
        raise SimulationError("no cgroup v2 mount found in /proc/self/mountinfo; mount one with "
                              "'mount -t cgroup2 none /sys/fs/cgroup/unified'")
    return root


def terminate(proc, timeout: float) -> None:
    """SIGTERM a child (a subprocess.Popen) and reap it; SIGKILL it after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        # Busy (a process still has it open): detach so teardown still completes.
        if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
