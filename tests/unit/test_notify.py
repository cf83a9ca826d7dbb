"""sd_notify against a real AF_UNIX datagram listener, path and abstract."""
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tapio_node.notify import Notifier, sd_notify


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        addr = str(tmp_path / "notify.sock")
        s.bind(addr)
        env_value = addr
    else:
        name = f"tapio-test-notify-{uuid.uuid4().hex}"
        s.bind("\0" + name)
        env_value = "@" + name
    s.settimeout(5)
    yield s, env_value
    s.close()


def recv(s) -> dict:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_each_state(listener):
    s, addr = listener
    n = Notifier(environ={"NOTIFY_SOCKET": addr})
    assert n.enabled
    assert n.ready("watching 3 volumes")
    assert recv(s) == {"READY": "1", "STATUS": "watching 3 volumes"}
    assert n.status("line one\nline two")
    assert recv(s) == {"STATUS": "line one line two"}
    assert n.watchdog()
    assert recv(s) == {"WATCHDOG": "1"}
    assert n.reloading()
    msg = recv(s)
    assert msg["RELOADING"] == "1"
    mono_us = time_monotonic_usec()
    assert 0 < int(msg["MONOTONIC_USEC"]) <= mono_us
    assert n.stopping()
    assert recv(s) == {"STOPPING": "1"}


def time_monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_from_process_environment(listener):
    """The default Notifier() reads NOTIFY_SOCKET from the real environment."""
    s, addr = listener
    code = "from tapio_node.notify import Notifier; import sys; sys.exit(0 if Notifier().ready() else 3)"
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    env = dict(os.environ, NOTIFY_SOCKET=addr, PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", timeout=60)
    assert r.returncode == 0
    assert recv(s) == {"READY": "1"}


def test_noop_without_socket():
    n = Notifier(environ={})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None
    assert sd_notify("READY=1", "") is False


def test_dead_socket_is_not_an_error(tmp_path):
    # The supervisor went away: the daemon must keep running.
    assert Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready() is False


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert Notifier(environ=dict(env, NOTIFY_SOCKET="@x")).watchdog_interval() == expected
