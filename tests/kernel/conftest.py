"""Fixtures for kernel tests: capability checks with clear skip reasons, and a simulated node.

Use ``@pytest.mark.usefixtures("require_root_bpf")`` (or ``pytestmark``) on tests that
load BPF; ``sim_node`` needs root and cgroup v2 only.
"""

import os
import shutil
import socket
import sys
import tempfile

import pytest

from tapio_node import host
from tapio_node.sim.system import cgroup2_mount
from tapio_node.sim.node import SimulatedNode, sweep_stale
from tapio_node.sim.system import SimulationError


def missing_root() -> str | None:
    return None if os.geteuid() == 0 else "requires root"


def missing_cgroup2() -> str | None:
    try:
        cgroup2_mount()
    except SimulationError:
        return "requires cgroup v2 (no cgroup2 mount in /proc/self/mountinfo)"
    return None


def missing_btf() -> str | None:
    return None if os.path.exists(host.BTF_PATH) else f"requires BTF at {host.BTF_PATH}"


def missing_bpffs() -> str | None:
    if any(m.fstype == "bpf" for m in host.mounts()):
        return None
    return "requires bpffs (mount -t bpf bpf /sys/fs/bpf, or `make mounts`)"


def missing_root_bpf() -> str | None:
    """The first missing capability for BPF tests, or None."""
    for check in (missing_root, missing_btf, missing_cgroup2, missing_bpffs):
        reason = check()
        if reason:
            return reason
    return None


@pytest.fixture
def require_root_bpf():
    """Skip unless root, BTF, cgroup v2 and bpffs are all there."""
    reason = missing_root_bpf()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def require_root_cgroup2():
    """Skip unless root and cgroup v2 (enough for a simulated node)."""
    reason = missing_root() or missing_cgroup2()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def _swept_stale_nodes():
    # A killed earlier run cannot clean up after itself; remove what it left (dead creators only).
    if missing_root() or missing_cgroup2():
        return []
    return sweep_stale()


@pytest.fixture
def sim_node_factory(require_root_cgroup2, _swept_stale_nodes):
    """``make(**kwargs) -> SimulatedNode``; every node made is closed after the test,
    and a teardown that leaves anything behind fails the test."""
    nodes = []

    def make(**kwargs) -> SimulatedNode:
        node = SimulatedNode(**kwargs)
        nodes.append(node)
        return node

    yield make
    errors = []
    for node in reversed(nodes):
        try:
            node.close()
        except SimulationError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("simulated node teardown left things behind: " + "; ".join(errors))


@pytest.fixture
def sim_node(sim_node_factory) -> SimulatedNode:
    """A SimulatedNode (systemd cgroup driver) in a fresh temp dir, closed after the test."""
    return sim_node_factory()


@pytest.fixture
def notify_socket(tmp_path):
    """(path, socket): a NOTIFY_SOCKET for the daemon, as systemd gives it."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


# Imports the package (a world-readable copy) and its dependencies as root,
# then becomes nobody/nogroup like `setpriv --reuid=nobody --regid=nogroup
# --clear-groups`, and runs `-m module args...` or `-c code args...`.
# Nothing is imported from the checkout or the venv after the switch, so
# neither needs to be readable by nobody (a clone under /root is not).
_AS_NOBODY = r"""
import ctypes, grp, importlib, os, pkgutil, pwd, runpy, sys
top, mode, target, *args = sys.argv[1:]
sys.path.insert(0, top)
import tapio_node
for m in pkgutil.walk_packages(tapio_node.__path__, "tapio_node."):
    if not m.name.endswith(".__main__"):
        importlib.import_module(m.name)
for name in ("lightkube.config.kubeconfig", "lightkube.config.client_adapter",
             "lightkube.core.exceptions", "httpx", "httpx2", "systemd.journal",
             "prometheus_client.parser", "encodings.idna"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)   # drops every capability, as for setpriv
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)   # PR_SET_DUMPABLE: as after an exec
if mode == "-m":
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *args]
    exec(compile(target, "<as nobody>", "exec"), {"__name__": "__main__"})
"""


@pytest.fixture
def as_nobody():
    """``argv("-m", "tapio_node", "check", ...)`` or ``argv("-c", code, ...)``:
    a command that runs this checkout's tapio_node as nobody, whatever the
    permissions of the checkout and the venv."""
    if os.geteuid() != 0:
        pytest.skip("requires root (switches to nobody)")
    top = tempfile.mkdtemp(prefix="tapio-test-nobody-")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copytree(os.path.join(repo, "tapio_node"), os.path.join(top, "tapio_node"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d, _dirs, files in os.walk(top):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)

    def argv(mode: str, target: str, *args: str) -> list[str]:
        return [sys.executable, "-c", _AS_NOBODY, top, mode, target, *args]

    yield argv
    shutil.rmtree(top)


def _bpf_lsm_missing() -> str | None:
    from tapio_node.kernel import backends

    a = backends.probe()[backends.LSM]
    return None if a.ok else a.why


def pytest_collection_modifyitems(config, items):
    """Enforce tests need BPF LSM: they run in the VM matrix rows booted
    with bpf in lsm=. Elsewhere they are deselected, and the summary says
    why; a row that expects lsm (TAPIO_EXPECT_BACKEND) runs them whatever."""
    need = [i for i in items if i.get_closest_marker("needs_bpf_lsm")]
    if not need or os.environ.get("TAPIO_EXPECT_BACKEND") == "lsm":
        return
    why = _bpf_lsm_missing()
    if why is None:
        return
    config.hook.pytest_deselected(items=need)
    items[:] = [i for i in items if i not in need]
    config.stash[_LSM_DESELECTED] = (len(need), why)


_LSM_DESELECTED = pytest.StashKey[tuple]()


def pytest_terminal_summary(terminalreporter, config):
    if _LSM_DESELECTED in config.stash:
        n, why = config.stash[_LSM_DESELECTED]
        terminalreporter.write_line(
            f"{n} enforce tests deselected: no BPF LSM here ({why}); they run in the VM "
            "matrix rows with bpf in lsm= (make vmtest KERNELS=6.1)")
