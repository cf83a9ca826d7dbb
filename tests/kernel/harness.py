"""Run the real daemon (`python -m tapio_node run`) against a simulated node
and collect what it prints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Waits stretch by this factor where the kernel is emulated (the VM matrix
# sets it under TCG): a wait that runs out there says nothing about the daemon.
SLOWDOWN = float(os.environ.get("TAPIO_TEST_SLOWDOWN") or 1)


class TapioProcess:
    def __init__(self, config_path: str, output: str = "stdout", env: dict | None = None,
                 extra_args: list[str] | None = None, read_stdout: bool = True):
        """read_stdout=False: nobody reads the daemon's stdout (a stalled consumer)."""
        self.config_path = config_path
        with open(config_path) as fh:
            self.config = yaml.safe_load(fh)["kernel_collector"]
        self.listen = self.config["listen_address"]
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tapio_node", "--log-level", os.environ.get("TAPIO_LOG_LEVEL", "info"), "run", "--config", config_path,
             "--output", output, *(extra_args or [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env)
        self.lines: list[dict] = []
        self.raw_stdout: list[bytes] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True)]
        if read_stdout:
            self._threads.append(threading.Thread(target=self._read_out, daemon=True))
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.raw_stdout.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 30.0) -> dict:
        timeout *= SLOWDOWN
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {''.join(self.stderr)}")
            try:
                status, body = self.get("/healthz")
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout}s: {''.join(self.stderr)}")

    def wait_events(self, n: int, timeout: float = 10.0, pred=None) -> list[dict]:
        """Wait until at least n (matching) events arrived; return them."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        with self._cond:
            while True:
                got = [e for e in self.lines if pred is None or pred(e)]
                if len(got) >= n or time.monotonic() >= deadline:
                    return got
                self._cond.wait(timeout=max(0.01, deadline - time.monotonic()))

    def wait_stderr(self, text: str, timeout: float = 10.0) -> str:
        """The first stderr line containing text, waiting for it."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        while True:
            for line in list(self.stderr):
                if text in line:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {text!r} in the daemon's stderr: {''.join(self.stderr)}")
            time.sleep(0.02)

    def settle(self, quiet: float = 0.5, timeout: float = 10.0) -> list[dict]:
        """Wait until no new line arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        last = -1
        while time.monotonic() < deadline:
            with self._cond:
                n = len(self.raw_stdout)
            if n == last:
                break
            last = n
            time.sleep(quiet)
        return list(self.lines)

    def stop(self, timeout: float = 5.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        timeout *= SLOWDOWN
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout}s of SIGTERM")
        for t in self._threads:
            t.join(timeout=5)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def metric_value(text: str, sample: str, /, **labels) -> float:
    """A sample's value from the exposition text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def make_daemon_fixture():
    import pytest

    @pytest.fixture
    def daemon_factory(require_root_bpf):
        """start(config_path, output="stdout") -> a ready TapioProcess, stopped after the test."""
        started: list[TapioProcess] = []

        def start(config_path: str, output: str = "stdout", ready: bool = True, **kw) -> TapioProcess:
            d = TapioProcess(config_path, output, **kw)
            started.append(d)
            if ready:
                d.wait_ready()
            return d

        yield start
        for d in started:
            d.kill()
            for t in d._threads:
                t.join(timeout=5)

    return daemon_factory


daemon_factory = make_daemon_fixture()


def notify_messages(sock, until=None, timeout=10.0) -> list[str]:
    """sd_notify datagrams from the notify_socket fixture's socket: until
    `until(got)` is true, or (without `until`) until a quiet 0.2 s."""
    import socket

    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            if until is None:
                break
            continue
        if until is not None and until(got):
            break
    return got
