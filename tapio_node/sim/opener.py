"""A tiny file reader run inside simulated containers by tests, demo and bench.

    python -m tapio_node.sim.opener --path P --count N
        [--syscall open|openat|openat2|open_by_handle_at]
        [--chdir DIR] [--at DIR] [--interval S] [--comm NAME] [--vary-path]
        [--ready-fd FD] [--go-fd FD]

Opens P (then reads it to EOF and closes it) N times with exactly the named
syscall, issued through ``syscall(2)`` so that libc cannot substitute another
one. open_by_handle_at takes the file's handle once (name_to_handle_at, no
open) and opens by it each time, relative to an fd of its directory.
``--vary-path`` spells the path differently at each open (``./`` and ``/``
runs before the file name), as a tenant would to defeat event folding. ``--count 0`` loops until SIGTERM/SIGINT. A JSON summary goes to stdout
at the end: ``{"pid", "path", "syscall", "opened", "failed", "errors", "bytes"}``.
Exit status 0 when every open succeeded, 1 otherwise, 2 on bad arguments.

On the parent's side, ``reader_argv`` builds that command line and
``Reader`` starts one, set up and waiting for ``go()``, then collects its
summary.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Callable

from tapio_node.sim.system import SimulationError

# Syscall numbers per architecture; aarch64 has no open(2) at all.
_SYSCALL_NR = {
    "x86_64": {"open": 2, "openat": 257, "openat2": 437, "open_by_handle_at": 304,
               "name_to_handle_at": 303},
    "aarch64": {"openat": 56, "openat2": 437, "open_by_handle_at": 265, "name_to_handle_at": 264},
}
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400  # a key is a symlink into ..data: name the file
SYSCALLS = ("open", "openat", "openat2", "open_by_handle_at")
MAX_HANDLE_SZ = 128


class _OpenHow(ctypes.Structure):
    # struct open_how from linux/openat2.h: three u64, 24 bytes.
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _FileHandle(ctypes.Structure):
    # struct file_handle from fcntl.h, with room for MAX_HANDLE_SZ bytes.
    _fields_ = [("handle_bytes", ctypes.c_uint32), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


class Opener:
    """Issues one exact open syscall; returns an fd or raises OSError."""

    def __init__(self, syscall: str, dirfd: int = AT_FDCWD):
        machine = platform.machine()
        table = _SYSCALL_NR.get(machine)
        if table is None:
            raise ValueError(f"unsupported architecture {machine!r}: expected one of {sorted(_SYSCALL_NR)}")
        if syscall not in SYSCALLS:
            raise ValueError(f"unknown syscall {syscall!r}: expected one of {', '.join(SYSCALLS)}")
        if syscall not in table:
            raise ValueError(f"{syscall}(2) does not exist on {machine}; use openat or openat2")
        if syscall == "open" and dirfd != AT_FDCWD:
            raise ValueError("open(2) has no directory fd; use --chdir instead of --at")
        self.nr = table[syscall]
        self.syscall = syscall
        self.dirfd = dirfd
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._flags = os.O_RDONLY | os.O_CLOEXEC
        self._how = _OpenHow(self._flags, 0, 0)
        self._handles: dict[bytes, tuple[_FileHandle, int]] = {}

    def _check(self, ret: int, path: bytes) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path.decode(errors="replace"))
        return ret

    def _handle(self, path: bytes) -> tuple[_FileHandle, int]:
        """The file's handle and an fd on its mount: its directory (an open of
        the file itself would be one more open of it; O_PATH fds are refused)."""
        if path not in self._handles:
            handle, mount_id = _FileHandle(MAX_HANDLE_SZ), ctypes.c_int()
            self._check(self._libc.syscall(
                ctypes.c_long(_SYSCALL_NR[platform.machine()]["name_to_handle_at"]),
                ctypes.c_int(self.dirfd), ctypes.c_char_p(path), ctypes.byref(handle),
                ctypes.byref(mount_id), ctypes.c_int(AT_SYMLINK_FOLLOW)), path)
            parent = os.path.dirname(path) or b"."
            mount_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                               dir_fd=None if self.dirfd == AT_FDCWD else self.dirfd)
            self._handles[path] = (handle, mount_fd)
        return self._handles[path]

    def open(self, path: bytes) -> int:
        sc = self._libc.syscall
        if self.syscall == "open_by_handle_at":
            handle, mount_fd = self._handle(path)
            return self._check(sc(ctypes.c_long(self.nr), ctypes.c_int(mount_fd), ctypes.byref(handle),
                                  ctypes.c_int(self._flags)), path)
        if self.syscall == "open":
            fd = sc(ctypes.c_long(self.nr), ctypes.c_char_p(path), ctypes.c_int(self._flags), ctypes.c_int(0))
        elif self.syscall == "openat":
            fd = sc(ctypes.c_long(self.nr), ctypes.c_int(self.dirfd), ctypes.c_char_p(path),
                    ctypes.c_int(self._flags), ctypes.c_int(0))
        else:
            fd = sc(ctypes.c_long(self.nr), ctypes.c_int(self.dirfd), ctypes.c_char_p(path),
                    ctypes.byref(self._how), ctypes.c_size_t(ctypes.sizeof(self._how)))
        return self._check(fd, path)


def _spelling(head: bytes, base: bytes, i: int) -> bytes:
    """The i-th of 6,000 spellings of head + base (all the same file)."""
    return head + b"./" * (i % 100) + b"/" * ((i // 100) % 60) + base


def _read_all(fd: int) -> int:
    total = 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return total
        total += len(chunk)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tapio_node.sim.opener", description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="file to open (relative to --chdir/--at when given)")
    p.add_argument("--count", type=int, default=1, help="number of opens; 0 loops until killed")
    p.add_argument("--syscall", choices=SYSCALLS, default="openat")
    p.add_argument("--chdir", metavar="DIR", help="chdir to DIR first (for relative paths)")
    p.add_argument("--at", metavar="DIR", help="open relative to a directory fd of DIR (openat/openat2)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds to sleep between opens")
    p.add_argument("--vary-path", action="store_true",
                   help="spell the path differently at each open (defeats folding by path)")
    p.add_argument("--comm", help="set the process name (comm, at most 15 bytes) before opening, e.g. nginx")
    p.add_argument("--ready-fd", type=int, metavar="FD", help="write 'ready\\n' to FD and close it before the first open")
    p.add_argument("--go-fd", type=int, metavar="FD", help="block until FD is readable (a byte or EOF) before the first open")
    args = p.parse_args(argv)
    if args.count < 0:
        p.error(f"--count must be >= 0, got {args.count}")
    if args.interval < 0:
        p.error(f"--interval must be >= 0, got {args.interval}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stop = False

    def _on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    try:
        if args.chdir:
            os.chdir(args.chdir)
        dirfd = AT_FDCWD
        if args.at:
            dirfd = os.open(args.at, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        opener = Opener(args.syscall, dirfd)
        if args.comm:
            # PR_SET_NAME: the kernel reports this comm with every open that follows.
            ctypes.CDLL(None).prctl(15, os.fsencode(args.comm)[:15], 0, 0, 0)
    except (OSError, ValueError) as exc:
        print(f"reader: {exc}", file=sys.stderr)
        return 2

    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    if args.go_fd is not None:
        os.read(args.go_fd, 1)
        os.close(args.go_fd)

    path = os.fsencode(args.path)
    head, _, base = path.rpartition(b"/")
    head = head + b"/" if _ else b""
    opened = failed = nbytes = 0
    errors: dict[str, int] = {}
    i = 0
    while not stop and (args.count == 0 or i < args.count):
        i += 1
        try:
            fd = opener.open(_spelling(head, base, i) if args.vary_path else path)
        except OSError as exc:
            failed += 1
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            errors[name] = errors.get(name, 0) + 1
        else:
            opened += 1
            try:
                nbytes += _read_all(fd)
            finally:
                os.close(fd)
        if args.interval and not stop and (args.count == 0 or i < args.count):
            time.sleep(args.interval)

    summary = {"pid": os.getpid(), "path": args.path, "syscall": args.syscall,
               "opened": opened, "failed": failed, "errors": errors, "bytes": nbytes}
    print(json.dumps(summary), flush=True)
    return 0 if failed == 0 else 1


# --------------------------------------------------------------------------
# the parent's side: start an opener, let it go, collect its summary

def reader_argv(path: str, count: int = 1, syscall: str = "openat", chdir: str | None = None,
                interval: float | None = None, ready_fd: int | None = None, go_fd: int | None = None,
                at: str | None = None, comm: str | None = None, vary_path: bool = False) -> list[str]:
    """argv for ``python -m tapio_node.sim.opener`` with these options."""
    argv = [sys.executable, "-m", "tapio_node.sim.opener", "--path", path, "--count", str(count), "--syscall", syscall]
    if vary_path:
        argv.append("--vary-path")
    for opt, val in (("--chdir", chdir), ("--at", at), ("--interval", interval), ("--comm", comm),
                     ("--ready-fd", ready_fd), ("--go-fd", go_fd)):
        if val is not None:
            argv += [opt, str(val)]
    return argv


class Reader:
    """A ``tapio_node.sim.opener`` process that has started and waits for ``go()``.

    Python start-up, mount setup and chdir are done before ``go()``, so the
    only opens of the target after ``go()`` are the reader's N opens."""

    def __init__(self, start: Callable[..., subprocess.Popen], argv_kwargs: dict, **popen_kwargs):
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        try:
            argv = reader_argv(ready_fd=ready_w, go_fd=go_r, **argv_kwargs)
            popen_kwargs.setdefault("stdout", subprocess.PIPE)
            popen_kwargs.setdefault("stderr", subprocess.PIPE)
            self.proc = start(argv, pass_fds=(ready_w, go_r), **popen_kwargs)
        except BaseException:
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
            raise
        os.close(ready_w)
        os.close(go_r)
        self._go_w = go_w
        with os.fdopen(ready_r, "rb") as f:
            line = f.readline()
        if line != b"ready\n":
            self.proc.wait()
            os.close(go_w)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise SimulationError(f"reader {argv_kwargs} exited with status {self.proc.returncode} "
                                  f"before it was ready: {err.strip()}")
        self.pid = self.proc.pid

    def go(self) -> None:
        """Let the reader start opening."""
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        self._go_w = -1

    def wait(self, timeout: float | None = 60) -> dict:
        """Wait for the reader to finish; returns its JSON summary."""
        if self._go_w >= 0:
            self.go()
        out, err = self.proc.communicate(timeout=timeout)
        lines = (out or b"").decode(errors="replace").strip().splitlines()
        if not lines:
            raise SimulationError(f"reader {self.pid} printed no summary (status {self.proc.returncode}): "
                                  f"{(err or b'').decode(errors='replace').strip()}")
        return json.loads(lines[-1])

    def stop(self) -> dict:
        """SIGTERM a looping reader (``count=0``); returns its JSON summary."""
        if self._go_w >= 0:
            self.go()
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()


if __name__ == "__main__":
    raise SystemExit(main())
