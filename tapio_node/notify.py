"""sd_notify(3) over the NOTIFY_SOCKET datagram socket, no libsystemd needed.

Every method is a no-op when NOTIFY_SOCKET is unset (not run by systemd with
Type=notify), so the daemon calls them unconditionally.
"""
from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier", "sd_notify"]


def sd_notify(state: str, socket_path: str | None = None) -> bool:
    """Send one state string; True if sent, False without a socket.

    A leading "@" names an abstract socket (systemd uses those for
    containers); send errors are swallowed like libsystemd does, because a
    missing supervisor must never take the daemon down.
    """
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path[0] == "@":
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode("utf-8", "replace"))
    except OSError:
        return False
    return True


class Notifier:
    """The daemon's handle on systemd: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

    def __init__(self, socket_path: str | None = None, environ=None):
        env = os.environ if environ is None else environ
        self.socket_path = socket_path if socket_path is not None else env.get("NOTIFY_SOCKET")
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def _send(self, state: str) -> bool:
        if not self.socket_path:
            return False
        return sd_notify(state, self.socket_path)

    def ready(self, status: str | None = None) -> bool:
        return self._send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1")

    def reloading(self) -> bool:
        # systemd 253+ (Type=notify-reload) wants MONOTONIC_USEC with RELOADING=1
        # to tell this reload from an older one; older systemd ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None.

        None when no watchdog is configured, when the value is not a positive
        integer, or when WATCHDOG_PID names another process (the variable was
        inherited, not meant for us).
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the notify datagram.
    return " ".join(str(text).splitlines())
