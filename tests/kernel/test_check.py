"""`tapio-node check` on this machine: it must report the real state, and its
exit status must say whether the daemon could run.

Run as root (the CI case) and as `nobody` (capabilities gone; the as_nobody fixture).
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from tapio_node import check, host
from tapio_node.kernel import compat, sysbpf
from tapio_node.config import KernelCollector

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRACEFS_EVENTS = "/sys/kernel/tracing/events/syscalls"

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="requires root (probes load BPF programs)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def node_dirs():
    """kubelet pods and pod logs dirs, world-readable so `nobody` can read the config."""
    d = tempfile.mkdtemp(prefix="tapio-test-check-")
    os.chmod(d, 0o755)
    for sub in ("pods", "logs"):
        os.mkdir(os.path.join(d, sub))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def write_config(d, **overrides) -> str:
    values = {
        "kubelet_pods_path": os.path.join(d, "pods"),
        "pod_logs_path": os.path.join(d, "logs"),
        "pin_path": f"/sys/fs/bpf/tapio-test-check-{uuid.uuid4().hex[:8]}",  # never created by check
        "listen_address": f"127.0.0.1:{free_port()}",
    }
    values.update(overrides)
    path = os.path.join(d, f"config-{uuid.uuid4().hex[:8]}.yaml")
    with open(path, "w") as f:
        f.write("kernel_collector:\n" + "".join(f"  {k}: {v!r}\n" for k, v in values.items()))
    os.chmod(path, 0o644)
    return path


def run_check(config, as_nobody=None):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    args = ("-m", "tapio_node", "check", "--config", config)
    argv = as_nobody(*args) if as_nobody else [sys.executable, *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/", env=env)
    lines = {}
    for line in r.stdout.splitlines():
        mark, _, rest = line.partition(" ")
        name, sep, detail = rest.partition(": ")
        if sep and mark in (check.OK, check.FAIL, check.WARN):
            lines[name] = (mark, detail.split(" — fix: ")[0])
    return r, lines


def need_tracing():
    if not os.path.isdir(TRACEFS_EVENTS):
        pytest.skip("requires tracefs at /sys/kernel/tracing (make mounts)")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("requires bpffs at /sys/fs/bpf (make mounts)")


def test_this_machine_as_root(node_dirs):
    need_tracing()
    r, lines = run_check(write_config(node_dirs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1].startswith("tapio-node can run here")
    for name in ("config", "capabilities (BPF)", "kernel BTF", "bpf() syscall", "BPF ring buffer",
                 "tracefs", "syscall tracepoints", "hook backend", "bpffs", "cgroup v2", "BPF object",
                 "kubelet pods dir", "pod logs dir", "listen address"):
        assert lines[name][0] == check.OK, (name, lines.get(name), r.stdout)
    from tapio_node.kernel import backends

    avail = backends.probe()
    chosen = backends.candidates("auto", avail)[0]
    assert lines["hook backend"][1].startswith(f"{chosen} (") and "chosen by auto" in lines["hook backend"][1]
    # Each backend is probed for real and says why it cannot attach.
    for b in backends.ORDER:
        mark, detail = lines[f"backend {b} ({backends.HOOKS[b]})"]
        if avail[b].ok:
            assert (mark, detail.split(":")[0]) == (check.OK, "available"), (b, mark, detail)
        else:
            assert mark == check.WARN and detail == f"not available: {avail[b].why}", (b, mark, detail)
    # Pod-spec sources are reported, never fatal.
    assert lines["static pod manifests"][0] == check.OK
    assert lines["pod specs from the API"][0] in (check.OK, check.WARN)
    # Real state of things the test can see for itself:
    journald = os.path.exists(host.JOURNAL_SOCKET)
    assert lines["journald"][0] == (check.OK if journald else check.WARN)
    assert lines["cgroup v2"][1] == f"at {host.cgroup2_root()}"


def test_probe_machinery_is_sound():
    """A refused fentry must be the kernel's answer, not a broken probe: the same
    loader attaches a tp_btf program (which this project's BPF object uses)."""
    need_tracing()
    tid = compat.Btf.load().type_id("btf_trace_sched_process_fork", compat.BTF_KIND_TYPEDEF)
    assert tid is not None
    ok, detail = sysbpf.probe_attach_id(sysbpf.BPF_PROG_TYPE_TRACING, 23, tid)  # BPF_TRACE_RAW_TP
    assert ok, detail
    ok, detail = sysbpf.probe_attach(sysbpf.BPF_PROG_TYPE_TRACING, sysbpf.BPF_TRACE_FEXIT, "no_such_function_tapio")
    assert (ok, detail) == (False, "no_such_function_tapio not in kernel BTF")


def test_busy_port_is_fatal(node_dirs):
    need_tracing()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        r, lines = run_check(write_config(node_dirs, listen_address=addr))
        cfg = KernelCollector(kubelet_pods_path=os.path.join(node_dirs, "pods"),
                              pod_logs_path=os.path.join(node_dirs, "logs"), listen_address=addr)
        failed = check.preflight(cfg)
    assert r.returncode == 1
    assert lines["listen address"] == (check.FAIL, f"cannot bind {addr}: Address already in use"), r.stdout
    assert "kernel_collector.listen_address" in r.stdout
    assert [c.name for c in failed] == ["listen address"]


def test_pin_path_not_on_bpffs_is_fatal(node_dirs):
    need_tracing()
    pin = os.path.join(node_dirs, "pins")
    r, lines = run_check(write_config(node_dirs, pin_path=pin))
    assert r.returncode == 1
    assert lines["bpffs"][0] == check.FAIL
    assert f"pin_path {pin} is on" in lines["bpffs"][1]
    assert not os.path.exists(pin)


def test_bad_config_is_reported_and_fatal(node_dirs):
    need_tracing()
    r, lines = run_check(write_config(node_dirs, resync_interval=0))
    assert r.returncode == 1
    assert lines["config"][0] == check.FAIL
    assert "resync_interval" in lines["config"][1]


def test_preflight_empty_here(node_dirs):
    need_tracing()
    cfg = KernelCollector(kubelet_pods_path=os.path.join(node_dirs, "pods"),
                          pod_logs_path=os.path.join(node_dirs, "logs"),
                          listen_address=f"127.0.0.1:{free_port()}")
    assert check.preflight(cfg) == []


def test_as_nobody_fails_with_exit_1(node_dirs, as_nobody):
    need_tracing()
    r, lines = run_check(write_config(node_dirs), as_nobody)
    assert r.returncode == 1, r.stdout + r.stderr
    assert lines["running as root"][0] == check.WARN
    mark, detail = lines["capabilities (BPF)"]
    assert mark == check.FAIL and "missing CAP_BPF, CAP_PERFMON" in detail
    mark, detail = lines["bpf() syscall"]
    assert mark == check.FAIL and "EPERM" in detail
    assert r.stdout.rstrip().splitlines()[-1].startswith("tapio-node cannot run here")


def test_format_check():
    assert check.format_check(check.Check(name="a", ok=True, fatal=True, detail="d", fix="f")) == "✔ a: d"
    assert check.format_check(check.Check(name="a", ok=False, fatal=True, detail="d", fix="f")) == "✘ a: d — fix: f"
    assert check.format_check(check.Check(name="a", ok=False, fatal=False, detail="d", fix="f")) == "⚠ a: d — fix: f"


def test_daemon_refuses_with_the_same_reasons_as_check(node_dirs, as_nobody):
    need_tracing()
    config = write_config(node_dirs)
    _, lines = run_check(config, as_nobody)
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(as_nobody("-m", "tapio_node", "run", "--config", config),
                       capture_output=True, text=True, timeout=120, cwd="/", env=env)
    assert r.returncode == 1, r.stderr
    assert "cannot run the collector" in r.stderr
    failed = [name for name, (mark, _) in lines.items() if mark == check.FAIL]
    assert failed and all(f"✘ {name}: " in r.stderr for name in failed)


def test_tracepoint_attach_is_probed_with_the_callers_capabilities():
    """Without CAP_PERFMON (and CAP_SYS_ADMIN) a tracepoint perf event is
    refused: check must say so before the daemon fails to attach."""
    need_tracing()
    if shutil.which("setpriv") is None:
        pytest.skip("requires setpriv (util-linux)")
    r = subprocess.run(["setpriv", "--bounding-set", "-all,+bpf,+sys_resource,+dac_read_search",
                        "--inh-caps", "-all", "--", sys.executable, "-m", "tapio_node", "check"],
                       capture_output=True, text=True, timeout=120)
    (line,) = [x for x in r.stdout.splitlines() if "tracepoint attach:" in x]
    assert line.startswith(check.FAIL) and "EACCES" in line and "CAP_" in line
    assert r.returncode == 1
    r = subprocess.run([sys.executable, "-m", "tapio_node", "check"], capture_output=True, text=True, timeout=120)
    (line,) = [x for x in r.stdout.splitlines() if "tracepoint attach:" in x]
    assert line.startswith(check.OK)


def test_access_store_dir(node_dirs):
    from tapio_node.sim.system import MS_RDONLY, mount, umount

    ro = os.path.join(node_dirs, "ro")
    os.mkdir(ro)
    mount("tmpfs", ro, "tmpfs", MS_RDONLY, "mode=0700")
    try:
        for state, mark, words in ((os.path.join(node_dirs, "state"), check.OK, "(the dir will be made)"),
                                   (ro, check.WARN, "read-only mount"),
                                   ("", check.OK, "off")):
            r, lines = run_check(write_config(node_dirs, state_path=state))
            assert lines["access store"][0] == mark and words in lines["access store"][1], r.stdout
    finally:
        umount(ro)
