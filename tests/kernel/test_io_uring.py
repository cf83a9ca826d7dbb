"""io_uring opens make no open syscall; syscall-tracepoint tools miss
them. tapio-node catches their completion (io_uring/io_uring_complete), or
sees them at security_file_open with the lsm and fentry backends.
Where the kernel's completion record carries no request (before 5.18) the
daemon must say that these opens are not seen."""
import json
import os
import shutil
import subprocess

import pytest

from harness import daemon_factory  # noqa: F401  (fixture)
from tapio_node.kernel import compat
from tapio_node.sim.node import VolumeSpec

pytestmark = pytest.mark.kernel
SRC = os.path.join(os.path.dirname(__file__), "progs", "uring_open.c")


@pytest.fixture(scope="module")
def uring_open(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("requires gcc")
    if not os.path.exists("/usr/include/liburing.h"):
        pytest.skip("requires liburing-dev (make deps installs it)")
    exe = str(tmp_path_factory.mktemp("uring") / "uring_open")
    subprocess.run(["gcc", "-O2", "-o", exe, SRC, "-luring"], check=True)
    return exe


@pytest.mark.parametrize("op", ["openat", "openat2"])
def test_io_uring_opens_are_reported(sim_node, daemon_factory, uring_open, op):
    pod = sim_node.add_pod("shop", "web-0", [VolumeSpec("secret", "certs", {"tls.key": b"K"})],
                           service_account=False)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    backend = json.loads(d.get("/healthz")[1])["backend"]
    hook = backend != "tracepoint"   # security_file_open sees io_uring's opens itself
    attached = any("trace_config_access_uring" in line for line in d.stderr if "attached" in line)
    if not hook and not compat.probe()[compat.URING_REQUEST].available:
        assert not attached
        assert any("kernel lacks io_uring_complete.req" in line and "io_uring opens are not seen" in line
                   for line in d.stderr), d.stderr
        return
    assert attached != hook, d.stderr
    proc = ctr.run([uring_open, "/run/secrets/certs/tls.key", "25", op], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    summary = json.loads(out)
    assert summary["opened"] == 25
    d.wait_events(25, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = [e for e in d.lines if e["process"]["pid"] == summary["pid"]]
    assert len(got) == 25
    assert {(e["file"], e["syscall"], e["process"]["container_id"]) for e in got} == \
        {("tls.key", "io_uring" if hook else f"io_uring_{op}", ctr.id)}
